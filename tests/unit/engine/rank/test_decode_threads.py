"""Decode attention shared over threads: balanced shares, every sequence once, in order."""

from __future__ import annotations

import threading

import pytest
import torch

from engine.rank.decode_threads import MIN_SEQUENCES_PER_SHARE, DecodeThreads, shares


def test_shares_cover_every_sequence_once_balanced_by_the_keys_they_read():
    lengths = [600, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 600]
    parts = shares(lengths, 2)
    assert parts[0][0] == 0 and parts[-1][1] == len(lengths)
    assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))  # consecutive, no gap, no overlap
    keys = [sum(lengths[lo:hi]) for lo, hi in parts]
    assert len(parts) == 2 and max(keys) <= 0.6 * sum(lengths)
    assert shares([100] * (2 * MIN_SEQUENCES_PER_SHARE - 1), 2) == [(0, 2 * MIN_SEQUENCES_PER_SHARE - 1)]
    assert shares([100] * 32, 1) == [(0, 32)]
    assert len(shares([100] * 32, 4)) == 4


def test_the_shares_run_on_several_threads_each_with_one_torch_thread_and_come_back_in_order():
    runner = DecodeThreads()
    seen: dict[int, tuple[int, int]] = {}

    def attend(b: int) -> torch.Tensor:
        seen[b] = (threading.get_ident(), torch.get_num_threads())
        return torch.full((1,), float(b))

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = runner.run(attend, [50] * 16, threads=2, on_cpu=True)
        assert torch.get_num_threads() == 2  # the caller's count is back
        assert {threads for _, threads in seen.values()} == {1}
        assert len({ident for ident, _ in seen.values()}) == 2
        serial = runner.run(attend, [50] * 16, threads=2, on_cpu=False)  # CUDA: in order, here
    finally:
        torch.set_num_threads(before)
        runner.close()
    assert [float(t) for t in out] == [float(t) for t in serial] == list(range(16))


def test_an_error_in_a_share_reaches_the_caller():
    runner = DecodeThreads()

    def attend(b: int) -> torch.Tensor:
        if b == 12:
            raise RuntimeError("share failed")
        return torch.zeros(1)

    try:
        with pytest.raises(RuntimeError, match="share failed"):
            runner.run(attend, [50] * 16, threads=2, on_cpu=True)
    finally:
        runner.close()
