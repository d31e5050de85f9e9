"""Tuning of the batching knobs: ``max_num_seqs`` x ``max_batched_tokens`` against a workload.

For each setting an engine is started with the model's config changed to it, the workload's
requests all arrive at once (the worst case a burst makes), and the run records each
request's time to first token and end-to-end latency, and the output tokens per second. The
best setting is the one with the highest throughput whose p90 TTFT meets the objective (or,
when none does, the lowest p90 TTFT). ``m-ai tune`` prints the table and writes a plot.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cluster.autoscaling.latency_window import quantile
from cluster.config import ModelConfig
from engine.types import SamplingParams


@dataclass(frozen=True)
class Workload:
    requests: int = 32
    prompt_tokens: tuple[int, int] = (16, 128)  # uniform range
    max_tokens: int = 32
    seed: int = 0

    def build(self, vocab_size: int) -> list[tuple[list[int], SamplingParams]]:
        rng = random.Random(self.seed)
        params = SamplingParams(max_tokens=self.max_tokens, temperature=0.0, ignore_eos=True)
        low, high = self.prompt_tokens
        return [
            ([1] + [rng.randrange(3, vocab_size) for _ in range(rng.randint(low, high) - 1)], params)
            for _ in range(self.requests)
        ]


@dataclass(frozen=True)
class SettingResult:
    max_num_seqs: int
    max_batched_tokens: int
    ttft_p50_s: float
    ttft_p90_s: float
    e2e_p90_s: float
    tokens_per_s: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_setting(engine: Any, workload: list[tuple[list[int], SamplingParams]]) -> tuple[list[float], list[float], float]:
    """TTFTs, end-to-end latencies and output tokens/s of ``workload`` sent at once."""
    start = time.perf_counter()
    streams = [engine.submit(ids, params) for ids, params in workload]
    ttfts, e2es, tokens = [], [], 0
    for stream in streams:
        first = None
        for out in stream:
            if first is None and out.token_ids:
                first = time.perf_counter() - start
            tokens += len(out.token_ids)
        ttfts.append(first if first is not None else time.perf_counter() - start)
        e2es.append(time.perf_counter() - start)
    return ttfts, e2es, tokens / (time.perf_counter() - start)


def sweep(
    base: ModelConfig,
    num_seqs: list[int],
    batched_tokens: list[int],
    workload: Workload,
    *,
    engine_factory: Callable[[ModelConfig], Any] | None = None,
    on_result: Callable[[SettingResult], None] | None = None,
) -> list[SettingResult]:
    """Run ``workload`` under every combination; ``engine_factory`` builds an engine (default:
    ``LLMEngine.from_config``; it is shut down after its run)."""
    if engine_factory is None:
        from engine.engine import LLMEngine

        engine_factory = LLMEngine.from_config
    results = []
    for seqs in num_seqs:
        for tokens in batched_tokens:
            config = base.model_copy(update={
                "max_num_seqs": seqs, "max_batched_tokens": tokens,
                "max_queued_requests": max(base.max_queued_requests, workload.requests),
            })
            engine = engine_factory(config)
            try:
                run_setting(engine, workload.build(engine.tokenizer.vocab_size)[:2])  # warm-up
                ttfts, e2es, tps = run_setting(engine, workload.build(engine.tokenizer.vocab_size))
            finally:
                engine.shutdown()
            result = SettingResult(
                seqs, tokens, round(quantile(ttfts, 0.5), 4), round(quantile(ttfts, 0.9), 4),
                round(quantile(e2es, 0.9), 4), round(tps, 1),
            )
            results.append(result)
            if on_result:
                on_result(result)
    return results


def best(results: list[SettingResult], ttft_objective_s: float) -> tuple[SettingResult, bool]:
    """The best setting, and whether it meets the objective."""
    meeting = [r for r in results if r.ttft_p90_s <= ttft_objective_s]
    if meeting:
        return max(meeting, key=lambda r: (r.tokens_per_s, -r.ttft_p90_s)), True
    return min(results, key=lambda r: r.ttft_p90_s), False


def plot(results: list[SettingResult], path: Path, ttft_objective_s: float) -> Path:
    """Throughput against p90 TTFT, one point per setting, the objective as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        ax.scatter(r.ttft_p90_s, r.tokens_per_s, color="tab:green" if r.ttft_p90_s <= ttft_objective_s else "tab:red")
        ax.annotate(f"{r.max_num_seqs}/{r.max_batched_tokens}", (r.ttft_p90_s, r.tokens_per_s), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")
    ax.axvline(ttft_objective_s, linestyle="--", color="gray", label=f"TTFT objective {ttft_objective_s}s")
    ax.set_xlabel("p90 time to first token (s)")
    ax.set_ylabel("output tokens/s")
    ax.set_title("max_num_seqs / max_batched_tokens")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


__all__ = ["Workload", "SettingResult", "sweep", "best", "plot", "run_setting"]
