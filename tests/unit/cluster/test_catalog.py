"""The catalog's sizes against the real model classes: parameters, weight bytes, KV cache."""

from __future__ import annotations

import pytest
import torch

from cluster.catalog import (
    DTYPE_BYTES,
    LLAMA2_ARCHITECTURES,
    LLAMA2_MODELS,
    architecture,
    model_spec,
)
from cluster.config import ModelConfig
from cluster.errors import ConfigError


def meta_model(size: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig(**architecture(size).hf_config_dict()))


@pytest.mark.parametrize("size", list(LLAMA2_ARCHITECTURES))
def test_parameter_counts_match_the_model_built_on_the_meta_device(size):
    model = meta_model(size)
    counts = architecture(size).parameter_counts()
    by_name = {name: p.numel() for name, p in model.named_parameters()}
    assert counts.total == sum(by_name.values())
    assert counts.embedding == by_name["model.embed_tokens.weight"]
    assert counts.lm_head == by_name["lm_head.weight"]
    assert counts.linear == sum(n for name, n in by_name.items() if name.endswith("_proj.weight"))
    assert counts.attention == sum(n for name, n in by_name.items() if "self_attn" in name)
    assert counts.norms == sum(n for name, n in by_name.items() if "norm" in name)


def test_published_sizes_are_what_the_names_say():
    # 7B, 13B and 70B within 5% of their names; 70B's grouped-query attention makes k/v 8x smaller.
    for size, nominal in (("7B", 7e9), ("13B", 13e9), ("70B", 70e9)):
        assert abs(architecture(size).parameter_count / nominal - 1) < 0.05
    big = architecture("70B").linear_shapes()
    assert big["k_proj"][0] * 8 == big["q_proj"][0]


@pytest.mark.parametrize("size", list(LLAMA2_ARCHITECTURES))
@pytest.mark.parametrize("dtype", list(DTYPE_BYTES))
def test_dense_weight_bytes_are_parameters_times_element_size(size, dtype):
    model = meta_model(size).to(getattr(torch, dtype))
    want = sum(p.numel() * p.element_size() for p in model.parameters())
    assert architecture(size).weight_bytes(dtype) == want


@pytest.mark.parametrize("size", ["7B", "13B", "70B"])
def test_quantized_weight_bytes_shrink_the_linear_layers_only(size):
    arch = architecture(size)
    counts = arch.parameter_counts()
    dense_rest = (counts.total - counts.linear) * 2
    int8_linear = arch.weight_bytes("float16", "8bit") - dense_rest
    nf4_linear = arch.weight_bytes("float16", "4bit") - dense_rest
    # one byte per weight plus a float32 scale per row; half a byte plus 4 bytes per 64 weights
    assert counts.linear < int8_linear < counts.linear * 1.01
    assert nf4_linear == pytest.approx(counts.linear * (0.5 + 4 / 64), rel=1e-6)
    assert arch.weight_bytes("float16", "4bit") < arch.weight_bytes("float16", "8bit") < arch.weight_bytes("float16")
    with pytest.raises(ValueError, match="quantization='3bit'"):
        arch.weight_bytes("float16", "3bit")


@pytest.mark.parametrize("size", list(LLAMA2_ARCHITECTURES))
def test_kv_cache_bytes_per_token_from_the_hf_config(size):
    from transformers import LlamaConfig

    cfg = LlamaConfig(**architecture(size).hf_config_dict())
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    for dtype, nbytes in DTYPE_BYTES.items():
        want = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * nbytes
        assert architecture(size).kv_cache_bytes_per_token(dtype) == want


def test_kv_cache_bytes_per_token_is_what_the_model_runner_allocates():
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.rank.model_runner import ModelRunner

    arch = architecture("tiny")
    model = LlamaForCausalLM(LlamaConfig(**arch.hf_config_dict())).eval()
    for dtype in ("float32", "bfloat16"):
        runner = ModelRunner(model, num_blocks=12, block_size=16, dtype=getattr(torch, dtype))
        assert runner.kv_cache_bytes == 12 * 16 * arch.kv_cache_bytes_per_token(dtype)


def test_seventy_b_keeps_a_smaller_kv_cache_than_thirteen_b_thanks_to_gqa():
    assert architecture("70B").kv_cache_bytes_per_token() < architecture("13B").kv_cache_bytes_per_token()


@pytest.mark.parametrize("key", list(LLAMA2_MODELS))
def test_base_and_chat_variants_name_their_models_as_the_config_does(key):
    size, variant = key
    spec = model_spec(size, variant)
    assert spec.name == ModelConfig(model_size=size, model_variant=variant).served_name
    assert spec.uses_chat_template == (variant == "chat")
    if size in ("tiny", "small"):
        assert spec.hf_repo is None and not spec.gated
    else:
        assert spec.gated and spec.hf_repo.startswith("meta-llama/Llama-2-")
        assert spec.hf_repo.endswith("-chat-hf") == (variant == "chat")
    with pytest.raises(KeyError, match="variants: base, chat"):
        model_spec(size, "instruct")


@pytest.mark.parametrize("size", list(LLAMA2_ARCHITECTURES))
def test_valid_tp_sizes_are_exactly_what_the_config_accepts(size):
    valid = architecture(size).valid_tp_sizes()
    for tp in range(1, 17):
        fields = dict(model_size=size, tp_size=tp, context_length=1024)
        if tp in valid:
            ModelConfig(**fields)
        else:
            with pytest.raises((ValueError, ConfigError), match=f"tp_size={tp}"):
                ModelConfig(**fields)
