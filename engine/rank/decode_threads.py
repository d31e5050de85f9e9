"""Decode attention across a rank's CPU threads, a share of the sequences per thread.

On the CPU a decode step's attention is one small SDPA call per sequence (one query token
over that sequence's keys). Splitting one call over threads costs an OpenMP fork and join per
call, more than the call itself; so each call runs on one thread, and with more threads the
*sequences* are shared out instead: the calling thread takes the first share, helper threads
(each pinned to one torch thread) the others, balanced by the keys each share reads. Torch
releases the GIL inside each call, so the shares run at once; only the Python around each
call is serialised. On CUDA, and at one thread, the calls run in order on the calling thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch

# Below this many sequences a share is too small to pay for the hand-off to a helper thread.
MIN_SEQUENCES_PER_SHARE = 4


@contextmanager
def one_thread(threads: int) -> Iterator[None]:
    """The calling thread's torch ops on one thread for the block (``threads``: its count now)."""
    if threads <= 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _pin_one_thread() -> None:
    torch.set_num_threads(1)  # per OS thread: the caller's count is unchanged


def shares(lengths: Sequence[int], parts: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` ranges of consecutive sequences, at most ``parts``, each reading about the
    same number of keys (``lengths``) and holding at least ``MIN_SEQUENCES_PER_SHARE``."""
    n = len(lengths)
    parts = max(1, min(parts, n // MIN_SEQUENCES_PER_SHARE))
    if parts == 1:
        return [(0, n)]
    total = float(sum(lengths)) or 1.0
    bounds, lo, acc = [], 0, 0.0
    for i, length in enumerate(lengths):
        acc += length
        if len(bounds) < parts - 1 and acc >= total * (len(bounds) + 1) / parts and i + 1 < n:
            bounds.append((lo, i + 1))
            lo = i + 1
    bounds.append((lo, n))
    return bounds


class DecodeThreads:
    """Runs ``attend(b)`` for every decode sequence ``b``, shared over ``threads`` threads."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._workers = 0
        self._lock = threading.Lock()

    def run(self, attend: Callable[[int], torch.Tensor], lengths: Sequence[int], threads: int,
            on_cpu: bool) -> list[torch.Tensor]:
        n = len(lengths)
        parts = shares(lengths, threads) if on_cpu and threads > 1 else [(0, n)]
        if len(parts) == 1:
            with one_thread(threads if on_cpu else 1):
                return [attend(b) for b in range(n)]
        pool = self._helpers(len(parts) - 1)
        futures = [pool.submit(lambda lo=lo, hi=hi: [attend(b) for b in range(lo, hi)])
                   for lo, hi in parts[1:]]
        lo, hi = parts[0]
        try:
            with one_thread(threads):
                out = [attend(b) for b in range(lo, hi)]
        finally:
            rest = [f.result() for f in futures]  # wait for every share, even after an error
        for part in rest:
            out.extend(part)
        return out

    def _helpers(self, workers: int) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None or self._workers < workers:
                if self._pool is not None:
                    self._pool.shutdown(wait=True)
                self._pool = ThreadPoolExecutor(workers, thread_name_prefix="decode-attention",
                                                initializer=_pin_one_thread)
                self._workers = workers
            return self._pool

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None


__all__ = ["DecodeThreads", "MIN_SEQUENCES_PER_SHARE", "one_thread", "shares"]
