"""Fixtures of the GPU tests (skipped without CUDA): the tiny model and a "small" one.

``small_checkpoint`` has Llama-2-7B's layer shapes (hidden 4096, 32 heads, MLP 11008) with
4 layers and the tiny model's tokenizer (so a 4096-token vocabulary), random weights in
float16: big enough that decode is GPU work, small enough to write in seconds. The catalog
has no small Llama, so the GPU check makes this one.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

SMALL_SHAPES = dict(
    hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
    vocab_size=4096, max_position_embeddings=2048, rms_norm_eps=1e-5,
)
SMALL_LAYERS = 4
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "tokenizer.json")


def make_small_checkpoint(path: Path, tiny: Path) -> Path:
    from tests.support.llama_shapes import write_checkpoint

    if not (path / "model.safetensors.index.json").is_file():
        write_checkpoint(path, SMALL_SHAPES, layers=SMALL_LAYERS, dtype=torch.float16, seed=1)
        for name in TOKENIZER_FILES:
            if (tiny / name).is_file():
                shutil.copy(tiny / name, path / name)
    return path


@pytest.fixture(scope="session")
def small_checkpoint(tiny_checkpoint, tmp_path_factory) -> Path:
    return make_small_checkpoint(tmp_path_factory.mktemp("small") / "small-7b-shapes", tiny_checkpoint)
