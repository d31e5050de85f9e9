"""Bottleneck detection: which stage of a request takes the time, and what to do about it.

Every request records how long it spent in each stage (``cluster.observability.metric_specs.STAGES``: queue,
memory retrieval, prefill, decode, output processing) into the
``m_ai_request_stage_seconds`` histogram: the LLM replica records queue, prefill, decode and
its share of output processing, the ingress adds memory retrieval and its output pipeline. This module reads those figures from any of three
sources and names the dominant stage with a recommendation:

- per-request breakdowns (``summarize``): tests, batch jobs, the tuning tools;
- Prometheus' text format (``stats_from_exposition``): Ray's metrics endpoint, which the
  ``/v1/diagnostics`` admin endpoint reads;
- sums and counts queried from Prometheus (``StageStats`` built by the caller), which
  ``m-ai diagnose --prometheus`` uses.

Pure Python: no Ray, no HTTP.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from cluster.observability.metric_specs import STAGES, prom

# A stage "dominates" when it takes at least this share of a request's time; below, the time
# is spread over stages and the report says so.
DOMINANT_SHARE = 0.4


@dataclass(frozen=True)
class StageStats:
    """Observations of one stage: how many requests, and their total seconds."""

    count: float = 0.0
    total_s: float = 0.0

    @property
    def mean_s(self) -> float:
        return self.total_s / self.count if self.count else 0.0

    def minus(self, earlier: StageStats) -> StageStats:
        """The observations made since ``earlier`` (cumulative counters; a reset restarts)."""
        if self.count < earlier.count:
            return self
        return StageStats(self.count - earlier.count, max(0.0, self.total_s - earlier.total_s))


@dataclass(frozen=True)
class EngineFigures:
    """Optional context that sharpens a recommendation (None: unknown)."""

    kv_cache_usage: float | None = None
    prefix_cache_hit_rate: float | None = None
    requests_waiting: float | None = None


@dataclass
class Diagnosis:
    dominant: str | None  # a stage, "balanced", or None without data
    requests: int
    mean_s: dict[str, float]
    share: dict[str, float]
    recommendation: str
    findings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


RECOMMENDATIONS = {
    "queue": (
        "Requests wait before the engine works on them: the replicas are saturated. Add "
        "replicas (raise serving.max_replicas, or lower serving.autoscaling.ttft_objective_s so "
        "the latency policy scales out sooner), or raise the model's max_num_seqs if KV memory "
        "allows (m-ai tune finds the largest that meets the objective)."
    ),
    "memory_retrieval": (
        "Assembling the context from the session store and memory dominates: add session store "
        "shards (serving.session_store_shards) or keep fewer turns of history per request."
    ),
    "prefill": (
        "Prompt processing dominates: keep prefix caching on and give the KV pool more blocks "
        "(enable_prefix_caching, kv_cache_blocks) so repeated system prompts and earlier turns are reused, raise "
        "max_batched_tokens so long prompts prefill in fewer steps, or shorten system prompts."
    ),
    "decode": (
        "Token generation dominates: each step is bound by the model's forward pass. Use more "
        "tensor-parallel ranks (tp_size) or a faster dtype to cut per-step time, raise "
        "max_num_seqs for more throughput per step, or lower max_tokens."
    ),
    "output_processing": (
        "Output processing dominates: disable costly output plugins or safety checks for this "
        "model, or raise serving.stream_interval_ms so fewer, larger stream events are sent."
    ),
    "balanced": (
        "No single stage dominates; latency is spread over the stages. Compare the means with "
        "the objective and tune the largest stage first."
    ),
}


def summarize(breakdowns: Iterable[Mapping[str, float]]) -> dict[str, StageStats]:
    """Stage statistics of per-request breakdowns (stage -> seconds; a missing stage counts 0s)."""
    count = {s: 0.0 for s in STAGES}
    total = {s: 0.0 for s in STAGES}
    for breakdown in breakdowns:
        for stage in STAGES:
            count[stage] += 1
            total[stage] += max(0.0, float(breakdown.get(stage, 0.0)))
    return {s: StageStats(count[s], total[s]) for s in STAGES}


_SAMPLE_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)")
_LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_exposition(text: str, names: Iterable[str]) -> list[tuple[str, dict[str, str], float]]:
    """The samples of ``names`` in Prometheus' text format: (name, labels, value)."""
    wanted = set(names)
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE_RE.match(line)
        if match is None or match.group(1) not in wanted:
            continue
        try:
            value = float(match.group(4))
        except ValueError:
            continue
        labels = dict(_LABEL_RE.findall(match.group(3) or ""))
        samples.append((match.group(1), labels, value))
    return samples


def stats_from_exposition(text: str, model: str | None = None) -> dict[str, StageStats]:
    """Stage statistics summed over every process in a metrics page (optionally one model)."""
    sum_name = prom("request_stage_seconds", "_sum")
    count_name = prom("request_stage_seconds", "_count")
    count = {s: 0.0 for s in STAGES}
    total = {s: 0.0 for s in STAGES}
    for name, labels, value in parse_exposition(text, (sum_name, count_name)):
        stage = labels.get("stage")
        if stage not in count or (model is not None and labels.get("model") != model):
            continue
        if math.isnan(value):
            continue
        (total if name == sum_name else count)[stage] += value
    return {s: StageStats(count[s], total[s]) for s in STAGES}


def merge(*parts: Mapping[str, StageStats]) -> dict[str, StageStats]:
    """Stage statistics of several sources added up (e.g. one metrics page per node)."""
    out = {s: StageStats() for s in STAGES}
    for part in parts:
        for stage, st in part.items():
            if stage in out:
                prev = out[stage]
                out[stage] = StageStats(prev.count + st.count, prev.total_s + st.total_s)
    return out


def diagnose(stats: Mapping[str, StageStats], figures: EngineFigures | None = None) -> Diagnosis:
    """Name the stage with the largest mean time per request, with a recommendation."""
    figures = figures or EngineFigures()
    # Each request records its queue stage exactly once (in the LLM replica); other stages may
    # be recorded by several processes (the ingress and the replica both process output), so
    # a stage's mean is its total over the number of requests.
    queue = stats.get("queue")
    requests = int(queue.count if queue and queue.count else max((st.count for st in stats.values()), default=0))
    means = {s: (stats[s].total_s / requests if s in stats and requests else 0.0) for s in STAGES}
    total = sum(means.values())
    if requests == 0 or total <= 0:
        return Diagnosis(
            None, 0, means, {s: 0.0 for s in STAGES},
            "No requests have been measured yet: send traffic, then ask again (Ray exports "
            "metrics every few seconds).",
        )
    share = {s: means[s] / total for s in STAGES}
    top = max(STAGES, key=lambda s: means[s])
    dominant = top if share[top] >= DOMINANT_SHARE else "balanced"
    findings = [
        f"{s}: {means[s] * 1000:.1f} ms per request ({share[s]:.0%})"
        for s in sorted(STAGES, key=lambda s: -means[s])
    ]
    recommendation = RECOMMENDATIONS[dominant]
    if figures.kv_cache_usage is not None and figures.kv_cache_usage >= 0.9:
        findings.append(f"KV cache slots {figures.kv_cache_usage:.0%} in use: the batch is full")
        if dominant == "queue":
            recommendation += " The KV cache is full, so more max_num_seqs needs more memory: add replicas."
    if dominant == "prefill" and figures.prefix_cache_hit_rate is not None:
        findings.append(f"prefix cache hit rate {figures.prefix_cache_hit_rate:.0%}")
        if figures.prefix_cache_hit_rate < 0.2:
            recommendation += " The prefix cache rarely hits: check that enable_prefix_caching is on, that kv_cache_blocks leaves room for cached blocks and that prompts share their beginnings."
    if figures.requests_waiting:
        findings.append(f"{figures.requests_waiting:g} requests waiting in the engines")
    return Diagnosis(dominant, requests, means, share, recommendation, findings)


def render(diagnosis: Diagnosis) -> str:
    """A few lines for a terminal."""
    if diagnosis.dominant is None:
        return diagnosis.recommendation
    lines = [f"{diagnosis.requests} requests measured; dominant stage: {diagnosis.dominant}"]
    lines += [f"  {f}" for f in diagnosis.findings]
    lines.append(f"recommendation: {diagnosis.recommendation}")
    return "\n".join(lines)


__all__ = [
    "StageStats", "EngineFigures", "Diagnosis", "summarize", "parse_exposition",
    "stats_from_exposition", "merge", "diagnose", "render", "RECOMMENDATIONS", "DOMINANT_SHARE",
]
