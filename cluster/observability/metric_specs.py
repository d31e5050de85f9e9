"""Every metric M-AI exports: names, kinds, labels and buckets, in one place.

Names follow vLLM's (``vllm:time_to_first_token_seconds`` becomes
``m_ai_time_to_first_token_seconds``); Ray's Prometheus endpoint adds its own ``ray_``
prefix, so Prometheus, the alert rules and the dashboards see ``ray_m_ai_...``
(``prometheus_name``). Pure data: ``deployments/llm_server/metrics.py`` creates the ``ray.util.metrics``
objects from these specs, ``cluster/observability/alerts.py`` and ``cluster/observability/dashboards.py`` build their
queries from them, so a renamed metric cannot leave a dashboard or a rule behind.

Labels: ``model`` (served name) and ``replica`` (Serve replica id, or the actor's name) on
every per-replica figure; Ray adds ``WorkerId``, ``NodeAddress`` and ``SessionName``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

PREFIX = "m_ai_"
RAY_PREFIX = "ray_"  # added by Ray's metrics agent to every application metric

Kind = Literal["histogram", "counter", "gauge"]

# The stages of one request's timing breakdown, in the order a request goes through them.
STAGES = ("queue", "memory_retrieval", "prefill", "decode", "output_processing")

# vLLM's latency buckets, trimmed to what a CPU or GPU replica can show.
LATENCY_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0,
)
TOKEN_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075,
    0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
)
RATIO_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)

REPLICA_LABELS = ("model", "replica")


@dataclass(frozen=True)
class MetricSpec:
    """One metric: its name (without the ``m_ai_`` prefix), kind, help text and labels."""

    name: str
    kind: Kind
    description: str
    labels: tuple[str, ...] = REPLICA_LABELS
    buckets: tuple[float, ...] = ()
    unit: str = ""  # Grafana unit of the panel: s, bytes, percentunit, short

    @property
    def full_name(self) -> str:
        """The name given to ``ray.util.metrics``."""
        return PREFIX + self.name

    @property
    def prometheus_name(self) -> str:
        """The name Prometheus stores (Ray's prefix added)."""
        return RAY_PREFIX + self.full_name


def _h(name: str, description: str, buckets=LATENCY_BUCKETS, labels=REPLICA_LABELS, unit="s"):
    return MetricSpec(name, "histogram", description, tuple(labels), tuple(buckets), unit)


def _c(name: str, description: str, labels=REPLICA_LABELS, unit="short"):
    return MetricSpec(name, "counter", description, tuple(labels), (), unit)


def _g(name: str, description: str, labels=REPLICA_LABELS, unit="short"):
    return MetricSpec(name, "gauge", description, tuple(labels), (), unit)


ALL: tuple[MetricSpec, ...] = (
    # -- request latency (LLMServer replicas) ---------------------------------------------
    _h("time_to_first_token_seconds", "Time from the request reaching the replica to its first token."),
    _h("inter_token_latency_seconds", "Time between two streamed outputs, per token.", TOKEN_LATENCY_BUCKETS),
    _h("time_per_output_token_seconds", "Decode time of a request divided by its output tokens after the first.", TOKEN_LATENCY_BUCKETS),
    _h("e2e_request_latency_seconds", "Time from the request reaching the replica to its last token."),
    _h("request_queue_time_seconds", "Time a request waited before the engine worked on it (Serve's queue and the replica's)."),
    _h("request_stage_seconds", "Per-request timing breakdown: queue, memory_retrieval, prefill, decode, output_processing.",
       labels=(*REPLICA_LABELS, "stage")),
    # -- tokens and requests ----------------------------------------------------------------
    _c("prompt_tokens_total", "Prompt tokens processed."),
    _c("generation_tokens_total", "Tokens generated."),
    _c("request_success_total", "Requests that finished, by finish reason.", (*REPLICA_LABELS, "finished_reason")),
    _c("request_errors_total", "Failed requests by error kind (OpenAI error type) and where they were seen.",
       ("model", "kind", "source")),
    _c("stream_migrations_total", "Streams whose model replica died mid-stream, by outcome: resumed (on another "
       "replica, serving.migration) or why not (disabled, max_tries, max_tokens, wait_s).", ("model", "outcome")),
    _h("stream_migration_seconds", "Time from a replica's death to the resumed stream's first new token.",
       labels=("model",)),
    # -- engine state (sampled every serving.metrics_interval_s) ------------------------------
    _g("num_requests_running", "Requests in the engine's running batch."),
    _g("num_requests_waiting", "Requests waiting in the engine for a slot."),
    _g("batch_size", "Mean sequences per engine step over the last sampling interval."),
    _g("kv_cache_usage_perc", "Fraction of the paged KV cache's blocks held by running sequences (vLLM's name).",
       unit="percentunit"),
    _g("prefix_cache_hit_rate", "Fraction of looked-up prompt tokens found in the prefix cache since the engine started.",
       unit="percentunit"),
    _c("prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache (vLLM's prefix_cache_queries)."),
    _c("prefix_cache_hits_total", "Prompt tokens found in the prefix cache, not computed again (vLLM's prefix_cache_hits)."),
    _c("num_preemptions_total", "Sequences preempted (KV blocks ran out) and recomputed later (vLLM's num_preemptions)."),
    # -- resources per replica and actor ------------------------------------------------------
    _g("process_cpu_percent", "CPU use of a process (100 = one core).", (*REPLICA_LABELS, "actor"), unit="percent"),
    _g("process_resident_memory_bytes", "Resident memory of a process.", (*REPLICA_LABELS, "actor"), unit="bytes"),
    _g("process_gpu_memory_bytes", "GPU memory a process holds (only where a GPU is present).", (*REPLICA_LABELS, "actor"), unit="bytes"),
    _g("kv_cache_bytes", "Memory reserved for the KV cache by one tensor-parallel rank.", (*REPLICA_LABELS, "actor"), unit="bytes"),
    # -- caching ------------------------------------------------------------------------------
    _c("response_cache_requests_total", "Deterministic requests looked up in the response cache, by result (hit, miss).",
       ("model", "result")),
    _g("response_cache_hit_rate", "Hit rate of the ingress replica's response cache since it started.",
       ("replica",), unit="percentunit"),
    _g("response_cache_entries", "Responses held by the ingress replica's cache.", ("replica",)),
    # -- sessions and memory --------------------------------------------------------------------
    _h("session_store_op_seconds", "Latency of session store calls seen by the ingress.", labels=("op",)),
    _c("session_store_ops_total", "Session store calls by operation and outcome (ok, error).", ("op", "outcome")),
    _h("memory_retrieval_seconds", "Time to assemble a request's context from its session and memory.", labels=("model",)),
    _g("memory_items", "Items the memory actor holds, by kind (turns, summaries, facts).", ("shard", "kind")),
    # -- output quality -----------------------------------------------------------------------
    _c("output_truncated_total", "Answers cut by max_tokens or the context length (finish_reason=length).", ("model",)),
    _c("output_empty_total", "Answers with no visible text.", ("model",)),
    _h("output_repetition_ratio", "Share of repeated word 3-grams in an answer (degenerate output is near 1).",
       RATIO_BUCKETS, ("model",), unit="percentunit"),
    _c("output_format_total", "Answers that asked for JSON (response_format), by validity (valid, invalid).",
       ("model", "valid")),
    # -- autoscaling ----------------------------------------------------------------------------
    _g("autoscaling_signal_seconds", "Latency a replica reports to the autoscaler (p90 over the look-back).",
       (*REPLICA_LABELS, "signal")),
    _g("autoscaling_desired_replicas", "Replicas the latency policy asked for at its last decision.", ("deployment",)),
)

BY_NAME: dict[str, MetricSpec] = {m.name: m for m in ALL}


def spec(name: str) -> MetricSpec:
    """The spec of ``name`` (without prefix); KeyError names the known ones."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"metric {name!r} is not defined in cluster/observability/metric_specs.py; known: {', '.join(BY_NAME)}") from None


def prom(name: str, suffix: str = "") -> str:
    """Prometheus series name of metric ``name``: ``prom("e2e_request_latency_seconds", "_bucket")``."""
    return spec(name).prometheus_name + suffix


__all__ = [
    "ALL", "BY_NAME", "MetricSpec", "STAGES", "PREFIX", "RAY_PREFIX", "LATENCY_BUCKETS",
    "TOKEN_LATENCY_BUCKETS", "spec", "prom",
]
