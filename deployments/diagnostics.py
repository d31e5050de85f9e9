"""The cluster's timing breakdowns, read back from Ray's metrics endpoints, and diagnosed.

Every process records its requests' stages into ``m_ai_request_stage_seconds``; Ray's metrics
agent on each node exposes them (the endpoint Prometheus scrapes). ``DiagnosticsReader`` reads
those pages directly, so ``/v1/diagnostics`` works without Prometheus and sees every replica
of every model, not just the one a handle call would reach. The figures are cumulative; the
reader keeps snapshots of earlier calls and reports the difference over about ``window_s``
(the first call reports everything since the processes started). Ray exports every few
seconds, so the newest requests show after a short delay.
"""

from __future__ import annotations

import collections
import time
from typing import Any

from cluster.observability.diagnosis import (
    EngineFigures,
    StageStats,
    diagnose,
    merge,
    parse_exposition,
    stats_from_exposition,
)
from cluster.observability.metric_specs import prom

SNAPSHOTS = 64


def metrics_endpoints() -> list[str]:
    """The metrics page of every alive Ray node."""
    import ray

    return [
        f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics"
        for n in ray.nodes()
        if n.get("Alive") and n.get("MetricsExportPort")
    ]


def engine_figures(pages: list[str], model: str | None) -> EngineFigures:
    """KV use (max over replicas), prefix hit rate (mean) and waiting requests (sum) from gauges."""
    names = {prom("kv_cache_usage_perc"): [], prom("prefix_cache_hit_rate"): [], prom("num_requests_waiting"): []}
    for page in pages:
        for name, labels, value in parse_exposition(page, names):
            if model is None or labels.get("model") == model:
                names[name].append(value)
    kv, hit, waiting = names.values()
    return EngineFigures(
        kv_cache_usage=max(kv) if kv else None,
        prefix_cache_hit_rate=sum(hit) / len(hit) if hit else None,
        requests_waiting=sum(waiting) if waiting else None,
    )


class DiagnosticsReader:
    """Reads the metrics pages and diagnoses the latest window (see the module docstring)."""

    def __init__(self, endpoints=metrics_endpoints, timeout_s: float = 5.0) -> None:
        self.endpoints = endpoints
        self.timeout_s = timeout_s
        self._snapshots: dict[str | None, collections.deque] = {}

    async def pages(self) -> list[str]:
        import httpx

        async with httpx.AsyncClient(timeout=self.timeout_s) as client:
            pages = []
            for url in self.endpoints():
                try:
                    response = await client.get(url)
                    response.raise_for_status()
                    pages.append(response.text)
                except httpx.HTTPError:
                    continue  # a node going away; the others still count
            return pages

    async def report(self, model: str | None = None, window_s: float = 300.0) -> dict[str, Any]:
        pages = await self.pages()
        now = time.time()
        totals = merge(*(stats_from_exposition(p, model) for p in pages))
        history = self._snapshots.setdefault(model, collections.deque(maxlen=SNAPSHOTS))
        base_time, base = None, None
        for taken, snap in history:  # oldest first: keep the newest one old enough
            if now - taken >= window_s or base is None:
                base_time, base = taken, snap
        history.append((now, totals))
        stats: dict[str, StageStats] = (
            {s: st.minus(base[s]) for s, st in totals.items()} if base is not None else totals
        )
        if base is not None and not any(st.count for st in stats.values()):
            stats, base_time = totals, None  # nothing new since the baseline: show everything
        result = diagnose(stats, engine_figures(pages, model)).as_dict()
        result.update(
            model=model,
            since=base_time,
            window_s=None if base_time is None else round(now - base_time, 1),
            nodes=len(pages),
        )
        return result


__all__ = ["DiagnosticsReader", "metrics_endpoints", "engine_figures"]
