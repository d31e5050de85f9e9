"""The engine configuration the engine unit tests share."""

from __future__ import annotations

import torch

from cluster.config import ModelConfig

GREEDY = dict(temperature=0.0, ignore_eos=True)


def make_config(checkpoint, **overrides) -> ModelConfig:
    fields = dict(model_size="tiny", checkpoint=str(checkpoint), dtype="float32", device="cpu",
                  max_num_seqs=8, max_batched_tokens=256, context_length=512, max_tokens=64)
    fields.update(overrides)
    return ModelConfig(**fields)


def hf_greedy(checkpoint, prompt_ids, n):
    """Hugging Face `generate`, greedy, exactly `n` new tokens: the golden reference."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                         min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()
