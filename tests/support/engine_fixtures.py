"""The engine configuration the engine unit tests share."""

from __future__ import annotations

from cluster.config import ModelConfig


def make_config(checkpoint, **overrides) -> ModelConfig:
    fields = dict(model_size="tiny", checkpoint=str(checkpoint), dtype="float32", device="cpu",
                  max_num_seqs=8, max_batched_tokens=256, context_length=512, max_tokens=64)
    fields.update(overrides)
    return ModelConfig(**fields)
