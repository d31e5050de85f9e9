"""Fused q/k/v and gate/up projections: the same numbers as the decoder layer's own modules."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

from engine.rank.fused_projections import build_projections, rms_norm

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16


@pytest.fixture()
def config() -> LlamaConfig:
    return LlamaConfig(hidden_size=HEADS * HEAD_DIM, intermediate_size=96, num_attention_heads=HEADS,
                       num_key_value_heads=KV_HEADS, num_hidden_layers=1, vocab_size=32)


@pytest.fixture()
def layer(config) -> LlamaDecoderLayer:
    torch.manual_seed(0)
    return LlamaDecoderLayer(config, layer_idx=0).eval()


def rotary_tables(config, x, positions):
    """As ModelRunner._rotary_tables: ``[B, T, 1, hd]``, sin's first half negated."""
    cos, sin = LlamaRotaryEmbedding(config)(x, positions)
    half = HEAD_DIM // 2
    return cos.unsqueeze(2), torch.cat((-sin[..., :half], sin[..., half:]), -1).unsqueeze(2), cos, sin


def hugging_face_qkv(layer, h, cos, sin):
    attn = layer.self_attn
    shape = (h.shape[0], h.shape[1], -1, HEAD_DIM)
    q = attn.q_proj(h).view(shape).transpose(1, 2)
    k = attn.k_proj(h).view(shape).transpose(1, 2)
    v = attn.v_proj(h).view(shape).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


@torch.no_grad()
def test_fused_projections_match_the_modules_and_share_their_weights(config, layer):
    x = torch.randn(3, 5, config.hidden_size)
    positions = torch.arange(5)[None].expand(3, 5) + torch.tensor([[0], [7], [30]])
    cos4, signed4, cos, sin = rotary_tables(config, x, positions)
    h = rms_norm(layer.input_layernorm, x)
    want_q, want_k, want_v = hugging_face_qkv(layer, h, cos, sin)
    want_mlp = layer.mlp(h)

    proj = build_projections(layer, HEAD_DIM, HEADS, KV_HEADS)
    q, k, v = proj.qkv_heads(h, cos4, signed4)
    for got, want in ((q, want_q), (k, want_k), (v, want_v), (proj.mlp(h), want_mlp)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # the modules now read slices of the fused weight: one copy in memory
    attn = layer.self_attn
    assert attn.k_proj.weight.data_ptr() == proj.qkv.weight[HEADS * HEAD_DIM :].data_ptr()
    assert layer.mlp.up_proj.weight.data_ptr() == proj.gate_up.weight[config.intermediate_size :].data_ptr()
    torch.testing.assert_close(layer.mlp(h), want_mlp, rtol=0, atol=0)


@torch.no_grad()
def test_modules_with_hooks_are_called_one_by_one_and_rotary_is_exact(config, layer):
    calls = []
    for module in (layer.self_attn.q_proj, layer.mlp.gate_proj):
        module.register_forward_hook(lambda m, i, o: calls.append(m))
    x = torch.randn(2, 3, config.hidden_size)
    positions = torch.tensor([[4, 5, 6], [0, 1, 2]])
    cos4, signed4, cos, sin = rotary_tables(config, x, positions)
    want_q, want_k, want_v = hugging_face_qkv(layer, x, cos, sin)
    calls.clear()

    proj = build_projections(layer, HEAD_DIM, HEADS, KV_HEADS)
    q, k, v = proj.qkv_heads(x, cos4, signed4)
    proj.mlp(x)
    assert len(calls) == 2  # not fused: the hooks still see every call
    # the same projections, so rotate-half as a roll with a signed sin is bit for bit HF's
    assert torch.equal(q, want_q) and torch.equal(k, want_k) and torch.equal(v, want_v)


def test_rms_norm_is_the_module_bit_for_bit(layer):
    x = torch.randn(4, 7, HEADS * HEAD_DIM) * 5
    assert torch.equal(rms_norm(layer.input_layernorm, x), layer.input_layernorm(x))


def test_cpu_projections_run_prepacked_through_onednn_unless_told_not_to(config, layer, monkeypatch):
    from engine.rank import fused_projections

    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch has no oneDNN")
    h = rms_norm(layer.input_layernorm, torch.randn(2, 3, config.hidden_size))
    want_mlp = layer.mlp(h)
    packed = build_projections(layer, HEAD_DIM, HEADS, KV_HEADS)
    assert isinstance(packed.qkv, fused_projections._PackedLinear)
    assert isinstance(packed.down, fused_projections._PackedLinear)
    torch.testing.assert_close(packed.mlp(h), want_mlp, rtol=1e-5, atol=1e-5)  # float rounding apart
    monkeypatch.setenv("M_AI_CPU_LINEAR", "torch")
    plain = build_projections(layer, HEAD_DIM, HEADS, KV_HEADS)
    assert isinstance(plain.qkv, fused_projections._FusedLinear)
    torch.testing.assert_close(plain.mlp(h), want_mlp, rtol=0, atol=0)  # torch's own kernels: exact


def test_packed_linears_run_any_row_count_as_one_of_few_shapes():
    """oneDNN JIT-compiles a kernel per input shape (0.6-0.9 MiB each, up to 1,024 kept): row
    counts above a decode batch are padded to 8 steps per doubling, and the answer for every
    row count is the unpadded product."""
    from engine.rank import fused_projections

    assert [fused_projections.padded_rows(r) for r in (1, 32, 33, 37, 64, 65, 1000)] == [
        1, 32, 36, 40, 64, 72, 1024]
    shapes = {fused_projections.padded_rows(r) for r in range(1, 2049)}
    assert len(shapes) == 80
    assert all(r <= fused_projections.padded_rows(r) <= 1.125 * r for r in range(1, 4097))
    if not fused_projections.packing_available(torch.zeros(2, 2)):
        pytest.skip("this torch has no oneDNN")
    torch.manual_seed(0)
    weight, bias = torch.randn(48, 64), torch.randn(48)
    packed = fused_projections._PackedLinear(weight, bias)
    for rows in (1, 31, 33, 50, 130):
        x = torch.randn(2, rows, 64)
        got = packed(x)
        assert got.shape == (2, rows, 48)
        torch.testing.assert_close(got, torch.nn.functional.linear(x, weight, bias), rtol=1e-5, atol=1e-5)
