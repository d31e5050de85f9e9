"""The engine on one CUDA GPU: greedy output equal to Hugging Face in float16 and bfloat16,
per-rank loading equal to AutoTP's on the device (needs a GPU).

Tokens are compared one for one on the tiny model (trained: its logits are decisive). The
small model has random weights, so its logits are nearly flat and a different GEMM kernel
may break a near-tie: there the outputs must agree up to the first step whose top two
Hugging Face logits are within ``NEAR_TIE`` of each other, and that step must be one.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

from cluster.config import ModelConfig  # noqa: E402
from engine.engine import LLMEngine  # noqa: E402
from engine.types import SamplingParams  # noqa: E402

NEW_TOKENS = 24
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
NEAR_TIE = 0.05
PROMPTS = [
    [1, 450, 4996, 17354, 1701, 432, 17204, 975, 278, 17366, 11203],
    [1, 15043, 29892, 920, 526, 366, 9826, 29973],
    [1, 3118, 2501, 263, 931, 727, 471, 263],
    [1, 1724, 338, 278, 7483, 310],
]


def prompts_for(vocab: int) -> list[list[int]]:
    return [[t % vocab for t in p] for p in PROMPTS]


def config(checkpoint, dtype: str, **overrides) -> ModelConfig:
    fields = dict(model_size="tiny", checkpoint=str(checkpoint), dtype=dtype, device="cuda",
                  max_num_seqs=8, max_batched_tokens=512, context_length=512, max_tokens=64)
    fields.update(overrides)
    return ModelConfig(**fields)


def hugging_face_greedy(checkpoint, dtype: str, prompt: list[int]) -> tuple[list[int], list[float]]:
    """HF's greedy tokens and, per step, the gap between its top two logits."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(checkpoint, dtype=getattr(torch, dtype)).cuda().eval()
    out = model.generate(
        torch.tensor([prompt], device="cuda"), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
        do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0,
    )
    gaps = [float(s[0].float().topk(2).values.diff().abs()) for s in out.scores]
    del model
    torch.cuda.empty_cache()
    return out.sequences[0, len(prompt):].tolist(), gaps


def assert_same_greedy(got: list[int], want: list[int], gaps: list[float] | None) -> None:
    if gaps is None:
        assert got == want
        return
    first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
    if first is not None:
        assert gaps[first] < NEAR_TIE, f"diverged at step {first} with HF's top-2 gap {gaps[first]:.3f}"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("model", ["tiny", "small"])
def test_greedy_decoding_equals_hugging_face(tiny_checkpoint, small_checkpoint, model, dtype):
    checkpoint = tiny_checkpoint if model == "tiny" else small_checkpoint
    prompt = prompts_for(4096)[0]
    want, gaps = hugging_face_greedy(checkpoint, dtype, prompt)
    with LLMEngine.from_config(config(checkpoint, dtype)) as engine:
        got = engine.generate_text(prompt, GREEDY).token_ids
    assert len(got) == NEW_TOKENS
    assert_same_greedy(got, want, None if model == "tiny" else gaps)


def test_slice_loading_on_cuda_equals_autotp(small_checkpoint):
    from engine.rank.loader import load_full_then_slice
    from engine.rank.slice_loader import load_rank_slices

    torch.cuda.set_device(0)
    cfg = config(small_checkpoint, "float16")
    old = load_full_then_slice(cfg, small_checkpoint, 1)
    new = load_rank_slices(small_checkpoint, dtype=torch.float16, device="cuda", tp_size=1)
    a = dict(old.named_parameters()) | dict(old.named_buffers())
    b = dict(new.named_parameters()) | dict(new.named_buffers())
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].device.type == b[name].device.type == "cuda", name
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    ids = torch.tensor([prompts_for(4096)[0]], device="cuda")
    with torch.no_grad():
        assert torch.equal(old(ids).logits, new(ids).logits)
