"""The CPU decode attention op (engine/rank/cpu_attention.py) against SDPA."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.rank import cpu_attention
from engine.rank.cpu_attention import paged_decode_attention


def test_the_op_equals_sdpa_over_scattered_blocks_with_grouped_heads():
    op = paged_decode_attention(64)
    assert op is not None  # g++ and ninja are part of the project's set-up
    assert cpu_attention._check(op) < 1e-5
    generator = torch.Generator().manual_seed(1)
    heads, kv_heads, head_dim, block_size = 8, 2, 64, 16
    lengths = [1, 17, 200, 64]
    blocks = [-(-n // block_size) for n in lengths]
    order = torch.randperm(sum(blocks) + 3, generator=generator)  # blocks anywhere in the pool
    tables = torch.zeros(len(lengths), max(blocks), dtype=torch.long)
    first = 0
    for b, n in enumerate(blocks):
        tables[b, :n] = order[first : first + n]
        first += n
    shape = (kv_heads, (sum(blocks) + 3) * block_size, head_dim)
    keys, values = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    q = torch.randn(len(lengths), heads, head_dim, generator=generator)
    got = op(q, keys, values, tables, torch.tensor(lengths), block_size, 0.125)
    for b, n in enumerate(lengths):
        rows = (tables[b, : blocks[b], None] * block_size + torch.arange(block_size)).flatten()[:n]
        expected = F.scaled_dot_product_attention(q[b, :, None][None], keys[:, rows][None],
                                                  values[:, rows][None], scale=0.125, enable_gqa=True)
        assert torch.allclose(got[b], expected[0, :, 0], atol=1e-5)


def test_the_op_is_off_by_environment_or_for_a_head_size_it_has_no_kernel_for(monkeypatch):
    assert paged_decode_attention(48) is None
    monkeypatch.setenv("M_AI_CPU_ATTENTION", "sdpa")
    assert paged_decode_attention(64) is None and cpu_attention.paged_kv_write() is None


def test_the_kv_write_equals_index_copy_from_a_strided_step():
    write = cpu_attention.paged_kv_write()
    assert write is not None
    generator = torch.Generator().manual_seed(2)
    fused = torch.randn(7, 1, 8, 32, generator=generator)  # [N, 1, q + k + v heads, D], like qkv
    k, v = fused[:, 0, 4:6], fused[:, 0, 6:8]  # two key/value heads, strided views
    slots = torch.tensor([3, 40, 41, 42, 17, 0, 63])
    expected_k, expected_v = torch.zeros(2, 64, 32), torch.zeros(2, 64, 32)
    expected_k.index_copy_(1, slots, k.transpose(0, 1))
    expected_v.index_copy_(1, slots, v.transpose(0, 1))
    got_k, got_v = torch.zeros(2, 64, 32), torch.zeros(2, 64, 32)
    write(got_k, got_v, k, v, slots)
    assert torch.equal(got_k, expected_k) and torch.equal(got_v, expected_v)
