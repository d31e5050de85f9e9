"""Decode attention on the CPU: one C++ call per layer for every sequence of a step.

Per-sequence SDPA costs the CPU twice. Its flash kernel is built for many queries, and a
decode step has one per head: on the small model's shapes it read the KV cache at 8-10 GB/s.
Each call also costs Python and dispatch, about 30 µs: 32 sequences times 4 layers was a
third of the tiny model's step. ``csrc/paged_decode_attention.cpp`` reads each sequence's
keys and values once, straight from its blocks in the pool, with float32 scores and softmax.
Against per-sequence SDPA on a 32-sequence step, one thread: 1.9x faster on the small
model's shapes, 3.8x on the tiny one's.

The op is compiled on first use with torch's extension builder (g++ and ninja, ~30 s, cached
under ``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``) for this machine's
CPU (``-march=native``; the cache name carries a digest of the CPU's flags, so a cache shared
between machines never loads code built for another CPU). At load it is checked against SDPA
on random sequences. If it cannot be built or checked, decode attention stays on SDPA with a
warning. ``M_AI_CPU_ATTENTION=sdpa`` in a rank's environment keeps SDPA.
"""

from __future__ import annotations

import hashlib
import os
import platform
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cluster.logging_setup import get_logger

log = get_logger("engine.rank.cpu_attention")

SOURCE = Path(__file__).with_name("csrc") / "paged_decode_attention.cpp"
HEAD_DIMS = (32, 64, 80, 96, 128)
MAX_ERROR = 1e-4  # against SDPA on the check's random sequences (measured: ~3e-7)

Kernel = Callable[..., torch.Tensor]
_lock = threading.Lock()
_loaded: dict[str, Any] = {}


def wanted() -> bool:
    return os.environ.get("M_AI_CPU_ATTENTION", "kernel") != "sdpa"


def paged_decode_attention(head_dim: int) -> Kernel | None:
    """The compiled op (``q [B, H, D], k_pool, v_pool [KVH, rows, D], tables [B, W],
    lengths [B], block_size, scale -> [B, H, D]``), or None where it is off, cannot be built
    on this machine, or has no kernel for ``head_dim``."""
    if head_dim not in HEAD_DIMS or not wanted():
        return None
    module = _module()
    return module.paged_decode_attention if module is not None else None


def paged_kv_write() -> Kernel | None:
    """``(k_pool, v_pool, k, v, slots)``: the step's keys and values ``[N, KVH, D]`` into rows
    ``slots`` of the pools, in place (what ``index_copy_`` along the pools' token axis does, a
    memcpy per token and head); None where the op is off or cannot be built."""
    if not wanted():
        return None
    module = _module()
    return module.write_paged_kv if module is not None else None


def _module() -> Any:
    with _lock:
        if "module" not in _loaded:
            _loaded["module"] = _build()
        return _loaded["module"]


def _build() -> Any:
    try:
        from torch.utils.cpp_extension import load

        log.info("building the CPU decode attention op (first use on this machine: ~30 s)",
                 extra={"source": SOURCE.name})
        module = load(name=f"m_ai_paged_decode_attention_{_cpu_digest()}", sources=[str(SOURCE)],
                      extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
                      verbose=False)
    except Exception as exc:  # no compiler, no headers: SDPA still works
        log.warning("CPU decode attention op unavailable; decode attention stays on SDPA",
                    extra={"error": str(exc)[:300]})
        return None
    error = _check(module.paged_decode_attention)
    if error > MAX_ERROR:
        log.warning("CPU decode attention op differs from SDPA; decode attention stays on SDPA",
                    extra={"max_error": error})
        return None
    return module


def _check(op: Kernel) -> float:
    """Largest difference from SDPA on random sequences in scattered blocks, with GQA."""
    generator = torch.Generator().manual_seed(0)
    heads, kv_heads, head_dim, block_size = 4, 2, 64, 4
    lengths = [1, 5, 9, 16]
    blocks = [-(-n // block_size) for n in lengths]
    order = torch.randperm(sum(blocks), generator=generator)
    tables = torch.zeros(len(lengths), max(blocks), dtype=torch.long)
    first = 0
    for b, n in enumerate(blocks):
        tables[b, :n] = order[first : first + n]
        first += n
    shape = (kv_heads, sum(blocks) * block_size, head_dim)
    keys, values = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    q = torch.randn(len(lengths), heads, head_dim, generator=generator)
    got = op(q, keys, values, tables, torch.tensor(lengths), block_size, head_dim**-0.5)
    error = 0.0
    for b, n in enumerate(lengths):
        rows = (tables[b, : blocks[b], None] * block_size + torch.arange(block_size)).flatten()[:n]
        expected = F.scaled_dot_product_attention(
            q[b, :, None][None], keys[:, rows][None], values[:, rows][None], scale=head_dim**-0.5,
            enable_gqa=True)[0, :, 0]
        error = max(error, float((got[b] - expected).abs().max()))
    return error


def _cpu_digest() -> str:
    """A short digest of this CPU's model and flags: code built with -march=native is for it."""
    text = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                text += line
                if line.startswith("flags"):
                    break
    except OSError:
        text += platform.processor()
    return hashlib.sha1(text.encode()).hexdigest()[:10]


__all__ = ["HEAD_DIMS", "paged_decode_attention", "paged_kv_write", "wanted"]
