"""Two figures of ``benchmarks/output_overhead.py`` about OpenAI's sampling fields, on the
real engine (tiny model, CPU, one torch thread), each measured side by side in one run:

- ``n4_speedup``: generated tokens per second of ``GROUPS`` requests with ``n=4`` (the
  engine's siblings: the prompt is computed once and its KV copied from the prefix cache)
  against the same ``4 x GROUPS`` sequences sent as separate requests, all at once. Long
  prompts (``PROMPT_TOKENS``), short answers (``OUTPUT_TOKENS``, ``ignore_eos``): the case
  ``n`` is for (several samples of one prompt). Fresh random prompts each round, so the
  prefix cache never holds a prompt from an earlier run. Rates are per second of the engine
  loop's CPU time (the machine is shared; wall time is reported beside it).
- ``logprobs_overhead``: engine step CPU time with ``logprobs`` and ``top_logprobs=5`` on
  every request of a full batch, against the same batch without, minus 1.

Each is the median over rounds, with the order of the two runs alternating.
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any

import torch

from engine.engine import LLMEngine
from engine.types import SamplingParams

GROUPS = 8
N = 4
PROMPT_TOKENS = 384
OUTPUT_TOKENS = 24
TARGETS = {"n4_speedup": 1.5, "logprobs_overhead": 0.10}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class StepCpu:
    """CPU seconds the engine loop spends in ``_step`` (its thread's own time)."""

    def __init__(self, engine: LLMEngine) -> None:
        self.seconds = 0.0
        core = engine.core
        step = core._step

        def timed() -> None:
            start = time.thread_time()
            try:
                step()
            finally:
                self.seconds += time.thread_time() - start

        core._step = timed


def _prompts(engine: LLMEngine, count: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    vocab = engine.tokenizer.vocab_size
    return [[1] + torch.randint(3, vocab, (PROMPT_TOKENS,), generator=g).tolist() for _ in range(count)]


def _params(i: int) -> SamplingParams:
    return SamplingParams(max_tokens=OUTPUT_TOKENS, temperature=1.0, seed=i, ignore_eos=True)


def _run(engine: LLMEngine, prompts: list[list[int]], shared: bool, timer: StepCpu) -> tuple[float, float, int]:
    """(engine CPU s, wall s, tokens) of N samples of each prompt, as siblings or separately."""
    timer.seconds = 0.0
    start = time.perf_counter()
    streams = []
    for g, prompt in enumerate(prompts):
        leader = engine.submit(prompt, _params(N * g))
        streams.append(leader)
        for i in range(1, N):
            share = leader.request_id if shared else None
            streams.append(engine.submit(prompt, _params(N * g + i), share_prompt_of=share))
    tokens = sum(len(s.result().token_ids) for s in streams)
    return timer.seconds, time.perf_counter() - start, tokens


def bench_n4(engine: LLMEngine, rounds: int) -> dict[str, Any]:
    timer = StepCpu(engine)
    speedups, wall_speedups, rates = [], [], {"n4": [], "separate": []}
    hits0 = engine.stats().prefix_cache_hit_tokens
    for r in range(-1, rounds):  # round -1 warms up
        prompts = _prompts(engine, GROUPS, 1000 + r)
        order = [True, False] if r % 2 == 0 else [False, True]
        result = {}
        for shared in order:
            # the same prompts for both runs would let the second hit the first's cache entries
            run_prompts = prompts if shared else _prompts(engine, GROUPS, 5000 + r)
            result[shared] = _run(engine, run_prompts, shared, timer)
        if r < 0:
            continue
        (cpu_n, wall_n, tok_n), (cpu_s, wall_s, tok_s) = result[True], result[False]
        speedups.append((tok_n / cpu_n) / (tok_s / cpu_s))
        wall_speedups.append((tok_n / wall_n) / (tok_s / wall_s))
        rates["n4"].append(tok_n / cpu_n)
        rates["separate"].append(tok_s / cpu_s)
        log(f"  n4 round {r}: {tok_n / cpu_n:.0f} vs {tok_s / cpu_s:.0f} tokens per CPU-s "
            f"({speedups[-1]:.2f}x; wall {wall_speedups[-1]:.2f}x)")
    return {
        "n4_speedup": statistics.median(speedups),
        "n4_speedup_rounds": speedups,
        "n4_speedup_wall_clock": statistics.median(wall_speedups),
        "n4_tokens_per_cpu_s": statistics.median(rates["n4"]),
        "separate_tokens_per_cpu_s": statistics.median(rates["separate"]),
        "n4_prefix_cache_hit_tokens": engine.stats().prefix_cache_hit_tokens - hits0,
        "n4_workload": {"groups": GROUPS, "n": N, "prompt_tokens": PROMPT_TOKENS, "output_tokens": OUTPUT_TOKENS},
    }


def bench_logprobs(engine: LLMEngine, prompts: list[list[int]], rounds: int) -> dict[str, Any]:
    timer = StepCpu(engine)
    ratios, with_ms, without_ms = [], [], []
    for r in range(-1, rounds):
        per_step = {}
        for top in ([5, None] if r % 2 == 0 else [None, 5]):
            params = [
                SamplingParams(max_tokens=64, temperature=1.0, seed=i, ignore_eos=True, logprobs=top)
                for i in range(len(prompts))
            ]
            steps0 = engine.stats().steps
            timer.seconds = 0.0
            outs = [s.result() for s in [engine.submit(p, sp) for p, sp in zip(prompts, params)]]
            if top is not None:
                assert all(len(o.logprobs) == len(o.token_ids) for o in outs)
            per_step[top] = timer.seconds / (engine.stats().steps - steps0)
        if r < 0:
            continue
        ratios.append(per_step[5] / per_step[None] - 1.0)
        with_ms.append(1000 * per_step[5])
        without_ms.append(1000 * per_step[None])
        log(f"  logprobs round {r}: {with_ms[-1]:.2f} vs {without_ms[-1]:.2f} ms/step ({ratios[-1]:+.1%})")
    return {
        "logprobs_overhead": statistics.median(ratios),
        "logprobs_overhead_rounds": ratios,
        "step_ms_logprobs5": statistics.median(with_ms),
        "step_ms_no_logprobs": statistics.median(without_ms),
    }


__all__ = ["bench_n4", "bench_logprobs", "TARGETS"]
