"""Recording of M-AI's metrics with ``ray.util.metrics``, in any Ray process.

The metric objects are created from their specs (``cluster/observability/metric_specs.py``) on first use in each
process and shared by every recorder of that process (Ray's metrics are process-wide). Tags
are filtered to the spec's labels, a missing label is recorded as ``""``. Outside Ray (unit
tests, the engine used as a library) recording does nothing. Ray exports the figures through
its metrics endpoint every few seconds, with its ``ray_`` prefix.
"""

from __future__ import annotations

import threading
from typing import Any

from cluster.logging_setup import get_logger
from cluster.observability.metric_specs import MetricSpec, spec

log = get_logger("deployments.llm_server.metrics")

_metrics: dict[str, Any] = {}
_lock = threading.Lock()


class _Disabled:
    def observe(self, *a: Any, **k: Any) -> None: ...
    def inc(self, *a: Any, **k: Any) -> None: ...
    def set(self, *a: Any, **k: Any) -> None: ...


def _create(s: MetricSpec) -> Any:
    try:
        import ray
        from ray.util import metrics
    except ImportError:
        return _Disabled()
    if not ray.is_initialized():
        return _Disabled()
    if s.kind == "histogram":
        return metrics.Histogram(s.full_name, s.description, boundaries=list(s.buckets), tag_keys=s.labels)
    if s.kind == "counter":
        return metrics.Counter(s.full_name, s.description, tag_keys=s.labels)
    return metrics.Gauge(s.full_name, s.description, tag_keys=s.labels)


def metric(name: str) -> tuple[MetricSpec, Any]:
    """The spec and this process's metric object of ``name``."""
    s = spec(name)
    obj = _metrics.get(name)
    if obj is None or isinstance(obj, _Disabled):
        with _lock:
            obj = _metrics.get(name)
            if obj is None or isinstance(obj, _Disabled):
                obj = _metrics[name] = _create(s)
    return s, obj


class MetricsRecorder:
    """Records metrics with default tags (e.g. ``model`` and ``replica``)."""

    def __init__(self, **default_tags: str) -> None:
        self.default_tags = {k: str(v) for k, v in default_tags.items()}

    def _tags(self, s: MetricSpec, tags: dict[str, Any]) -> dict[str, str]:
        merged = {**self.default_tags, **{k: str(v) for k, v in tags.items()}}
        return {label: merged.get(label, "") for label in s.labels}

    def observe(self, name: str, value: float, **tags: Any) -> None:
        self._record(name, "observe", value, tags)

    def inc(self, name: str, value: float = 1.0, **tags: Any) -> None:
        if value > 0:
            self._record(name, "inc", value, tags)

    def set(self, name: str, value: float, **tags: Any) -> None:
        self._record(name, "set", value, tags)

    def _record(self, name: str, how: str, value: float, tags: dict[str, Any]) -> None:
        s, obj = metric(name)
        try:
            getattr(obj, how)(float(value), tags=self._tags(s, tags))
        except Exception:  # a metric must never fail a request
            log.debug("metric not recorded", extra={"metric": name}, exc_info=True)


__all__ = ["MetricsRecorder", "metric"]
