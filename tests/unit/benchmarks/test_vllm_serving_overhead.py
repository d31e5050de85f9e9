"""The peer's serving benchmark runs M-AI's serving_overhead.py workload, request for request."""

from __future__ import annotations

from benchmarks import serving_overhead, vllm_serving_overhead


def test_the_prompts_and_lengths_are_those_of_serving_overhead_at_32_streams():
    ours = serving_overhead.prompts(192)
    lengths = serving_overhead.output_lengths(192, 128, spread=True)
    peer = vllm_serving_overhead.workload(192, 128)
    assert [p for p, _ in peer] == [chat[0]["content"] for chat in ours]
    assert [n for _, n in peer] == lengths
    assert min(lengths) == 64 and max(lengths) == 192
    assert vllm_serving_overhead.STREAMS == 32
