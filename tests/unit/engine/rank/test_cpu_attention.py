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
    assert paged_decode_attention(64) is None
