"""Prometheus configuration generated from the metric specs: scrape config and alert rules.

``ray_configs/prometheus/prometheus.yml`` and ``alerts.yml`` are written by
``m-ai dashboards write`` from these functions (and checked by ``promtool`` in the tests), so
the names in a rule are always the names the code exports. Thresholds come from the latency
objectives of ``serving.autoscaling``: the alert and the autoscaler agree on what "too slow"
means.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.observability.metric_specs import prom

# Error kinds that are the caller's fault: they do not count towards the error-rate alert.
CLIENT_ERRORS = "invalid_request_error|authentication_error|not_found_error|cancelled"


@dataclass(frozen=True)
class AlertThresholds:
    ttft_objective_s: float = 2.0
    queue_objective_s: float = 1.0
    error_rate: float = 0.05  # share of requests failing on the server's side
    kv_cache_usage: float = 0.95
    node_memory_usage: float = 0.9
    queue_growth_per_s: float = 0.05  # waiting requests added per second, over 10 minutes
    for_s: float = 300.0  # how long a condition must hold before it fires
    rate_window: str = "5m"

    @classmethod
    def from_autoscaling(cls, autoscaling: Any, **overrides: Any) -> AlertThresholds:
        return cls(
            ttft_objective_s=autoscaling.ttft_objective_s,
            queue_objective_s=autoscaling.queue_objective_s,
            **overrides,
        )


def _duration(seconds: float) -> str:
    return f"{int(seconds)}s" if seconds % 60 else f"{int(seconds // 60)}m"


def _p90(metric: str, window: str, by: str = "model") -> str:
    return f"histogram_quantile(0.9, sum by (le, {by}) (rate({prom(metric, '_bucket')}[{window}])))"


def alert_rules(t: AlertThresholds = AlertThresholds()) -> dict[str, Any]:
    """The rule file as a mapping (``yaml.safe_dump`` it)."""
    w, hold = t.rate_window, _duration(t.for_s)
    errors = f"sum by (model) (rate({prom('request_errors_total')}{{kind!~\"{CLIENT_ERRORS}\"}}[{w}]))"
    successes = f"sum by (model) (rate({prom('request_success_total')}[{w}]))"
    waiting = prom("num_requests_waiting")

    def rule(name: str, expr: str, severity: str, summary: str, description: str) -> dict[str, Any]:
        return {
            "alert": name,
            "expr": expr,
            "for": hold,
            "labels": {"severity": severity, "service": "m-ai"},
            "annotations": {"summary": summary, "description": description},
        }

    return {
        "groups": [
            {
                "name": "m-ai-latency",
                "rules": [
                    rule(
                        "MAITimeToFirstTokenOverObjective",
                        f"{_p90('time_to_first_token_seconds', w)} > {t.ttft_objective_s}",
                        "warning",
                        "p90 time to first token of {{ $labels.model }} is {{ $value | humanizeDuration }}",
                        f"Above the objective of {t.ttft_objective_s}s for {hold}. The autoscaler should be "
                        "adding replicas; if it is at max_replicas, raise it. `m-ai diagnose` names the slow stage.",
                    ),
                    rule(
                        "MAIQueueTimeOverObjective",
                        f"{_p90('request_queue_time_seconds', w)} > {t.queue_objective_s}",
                        "warning",
                        "p90 queue time of {{ $labels.model }} is {{ $value | humanizeDuration }}",
                        f"Requests wait more than {t.queue_objective_s}s before the engine works on them.",
                    ),
                    rule(
                        "MAIQueueGrowing",
                        f"sum by (model) (deriv({waiting}[10m])) > {t.queue_growth_per_s} "
                        f"and sum by (model) ({waiting}) > 0",
                        "warning",
                        "The engine queue of {{ $labels.model }} keeps growing",
                        "Waiting requests have grown for 10 minutes: arrivals exceed what the replicas serve.",
                    ),
                ],
            },
            {
                "name": "m-ai-errors",
                "rules": [
                    rule(
                        "MAIHighErrorRate",
                        f"{errors} / ({errors} + ({successes} or {errors} * 0)) > {t.error_rate}",
                        "critical",
                        "{{ $labels.model }} fails {{ $value | humanizePercentage }} of its requests",
                        "Server-side errors (engine dead, capacity, internal) above "
                        f"{t.error_rate:.0%}; client errors (400, 401, 404, cancellations) are excluded.",
                    ),
                    rule(
                        "MAIReplicaRestarting",
                        "sum by (deployment, application) (increase(ray_serve_health_check_failures_total[15m])) > 0",
                        "critical",
                        "A replica of {{ $labels.deployment }} fails its health checks",
                        "Serve restarts replicas that fail health checks (a dead engine or rank). Check the "
                        "replica's logs and `m-ai diagnose`.",
                    ),
                ],
            },
            {
                "name": "m-ai-resources",
                "rules": [
                    rule(
                        "MAIKVCachePressure",
                        f"max by (model, replica) ({prom('kv_cache_usage_perc')}) > {t.kv_cache_usage}",
                        "warning",
                        "KV cache of {{ $labels.model }} / {{ $labels.replica }} is {{ $value | humanizePercentage }} full",
                        "Every sequence slot is in use: new requests wait. Add replicas or memory for max_num_seqs.",
                    ),
                    rule(
                        "MAINodeMemoryPressure",
                        f"ray_node_mem_used / ray_node_mem_total > {t.node_memory_usage}",
                        "warning",
                        "Node {{ $labels.ip }} uses {{ $value | humanizePercentage }} of its memory",
                        "Replicas, ranks and the object store share this memory; the OS may kill a rank.",
                    ),
                ],
            },
        ]
    }


def scrape_config(
    targets: list[str], interval_s: float = 15.0, rule_files: list[str] | None = None,
    evaluation_interval_s: float | None = None,
) -> dict[str, Any]:
    """A Prometheus config that scrapes Ray's metrics endpoints (``host:metrics-export-port``)."""
    return {
        "global": {
            "scrape_interval": _duration(interval_s),
            "evaluation_interval": _duration(evaluation_interval_s or interval_s),
        },
        "rule_files": list(rule_files if rule_files is not None else ["alerts.yml"]),
        "scrape_configs": [
            {"job_name": "ray", "static_configs": [{"targets": list(targets)}]},
        ],
    }


def write_prometheus_configs(
    directory: Path, thresholds: AlertThresholds = AlertThresholds(),
    targets: list[str] | None = None, interval_s: float = 15.0,
) -> list[Path]:
    """Write ``prometheus.yml`` and ``alerts.yml`` into ``directory``; returns the paths."""
    import yaml

    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "prometheus.yml"
    rules = directory / "alerts.yml"
    header = "# Generated by `m-ai dashboards write` from cluster/observability/alerts.py: edit that, not this.\n"
    config.write_text(header + yaml.safe_dump(
        scrape_config(targets or ["127.0.0.1:8080"], interval_s), sort_keys=False))
    rules.write_text(header + yaml.safe_dump(alert_rules(thresholds), sort_keys=False, width=120))
    return [config, rules]


__all__ = ["AlertThresholds", "alert_rules", "scrape_config", "write_prometheus_configs", "CLIENT_ERRORS"]
