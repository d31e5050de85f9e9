"""Memory usage per tenant (metrics, warnings near a limit) and ``m-ai memory report``.

``tenant_usage`` counts, per tenant, users, live and superseded facts, sessions, summaries
and bytes (records, stored embeddings, HNSW graphs, turns and summaries), and says when a
tenant is at or above ``capacity.warn_fraction`` of ``capacity.tenant_max_bytes``.
``memory_report`` adds, per user, the oldest and the most used facts and the dedup rate
(share of extracted facts that confirmed an existing one instead of adding a copy).
``MemoryMetrics`` exports the usage as Ray gauges when it runs inside Ray (a no-op outside).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any, Protocol

from actors.memory.episodic import UserEpisodes
from actors.memory.longterm import UserLongTerm
from cluster.config.memory import MemoryConfig
from cluster.logging_setup import get_logger

log = get_logger("actors.memory.report")

# Gauges (``ray_m_ai_...`` in Prometheus). ``memory_items`` is defined in cluster/observability/metric_specs.py;
# the per-tenant ones are defined here until that module lists them.
TENANT_GAUGES = {
    "memory_tenant_items": ("Memory items one tenant holds in one shard, by kind.", ("shard", "tenant", "kind")),
    "memory_tenant_bytes": ("Bytes of memory one tenant holds in one shard.", ("shard", "tenant")),
    "memory_tenant_limit_fraction": (
        "Share of memory.capacity.tenant_max_bytes one tenant uses in one shard.", ("shard", "tenant"),
    ),
}


class UserView(Protocol):
    tenant: str
    user: str
    longterm: UserLongTerm
    episodes: UserEpisodes


def user_figures(user: UserView) -> dict[str, Any]:
    longterm, episodes = user.longterm, user.episodes
    summaries = sum(len(s.summaries) for s in episodes.sessions.values())
    turns = sum(len(s.window) + len(s.pending) for s in episodes.sessions.values())
    return {
        "memories": longterm.active_count,
        "history": len(longterm.records) - longterm.active_count,
        "sessions": len(episodes.sessions),
        "turns": turns,
        "summaries": summaries,
        "bytes": longterm.nbytes() + episodes.nbytes(),
    }


def tenant_usage(users: Iterable[UserView], config: MemoryConfig) -> dict[str, dict[str, Any]]:
    """Per tenant: counts, bytes, the limit and a warning when near or over it."""
    usage: dict[str, dict[str, Any]] = {}
    keys = ("memories", "history", "sessions", "turns", "summaries", "bytes")
    for user in users:
        if not user.longterm.records and not user.episodes.sessions and not user.episodes.archived:
            continue  # looked up, never written to
        figures = user_figures(user)
        row = usage.setdefault(user.tenant, {"tenant": user.tenant, "users": 0, **dict.fromkeys(keys, 0)})
        row["users"] += 1
        for key in keys:
            row[key] += figures[key]
    limit = config.capacity.tenant_max_bytes
    for row in usage.values():
        row["limit_bytes"] = limit
        row["limit_fraction"] = round(row["bytes"] / limit, 4) if limit else None
        row["warning"] = None
        if limit and row["bytes"] >= config.capacity.warn_fraction * limit:
            row["warning"] = (
                f"tenant {row['tenant']!r} holds {row['bytes']} bytes of memory, "
                f"{row['limit_fraction']:.0%} of memory.capacity.tenant_max_bytes={limit}; "
                "raise the limit, lower capacity.max_memories_per_user or set capacity.ttl_s"
            )
    return usage


def user_report(user: UserView, most_used: int = 3) -> dict[str, Any]:
    longterm = user.longterm
    active = list(longterm.active())
    oldest = min(active, key=lambda r: r.created_at, default=None)
    used = sorted(active, key=lambda r: (-r.access_count, r.created_at))[:most_used]
    counters = longterm.counters
    candidates = counters.get("candidates", 0)
    merged = counters.get("update", 0) + counters.get("none", 0)
    return {
        "tenant": user.tenant,
        "user": user.user,
        **user_figures(user),
        "oldest": None if oldest is None else {
            "id": oldest.id, "text": oldest.text, "created_at": oldest.created_at,
        },
        "most_used": [{"id": r.id, "text": r.text, "access_count": r.access_count} for r in used],
        "decisions": {k: counters.get(k, 0) for k in ("candidates", "add", "update", "supersede", "none")},
        "dedup_rate": round(merged / candidates, 4) if candidates else None,
        "evicted": counters.get("evicted", 0),
        "expired": counters.get("expired", 0),
    }


def memory_report(
    users: Iterable[UserView], config: MemoryConfig, tenant: str | None = None, user: str | None = None
) -> dict[str, Any]:
    """The report of ``m-ai memory report`` (optionally one tenant, or one user of it)."""
    chosen = [
        u for u in users
        if (tenant is None or u.tenant == tenant) and (user is None or u.user == user)
        and (u.longterm.records or u.episodes.sessions or u.episodes.archived)
    ]
    usage = tenant_usage(chosen, config)
    tenants = []
    for name in sorted(usage):
        rows = sorted((user_report(u) for u in chosen if u.tenant == name), key=lambda r: r["user"])
        tenants.append({**usage[name], "users_detail": rows})
    return {"generated_at": time.time(), "tenants": tenants}


class MemoryMetrics:
    """Exports tenant usage as Ray gauges and logs each warning once per crossing."""

    def __init__(self, shard: int = 0) -> None:
        self.shard = str(shard)
        self._gauges: dict[str, Any] | None = None
        self._warned: set[str] = set()

    def publish(self, usage: dict[str, dict[str, Any]]) -> None:
        for tenant, row in usage.items():
            if row["warning"] and tenant not in self._warned:
                self._warned.add(tenant)
                log.warning("memory usage near its limit", extra={"tenant": tenant, "detail": row["warning"]})
            elif not row["warning"]:
                self._warned.discard(tenant)
        gauges = self._ensure_gauges()
        if not gauges:
            return
        try:
            for tenant, row in usage.items():
                for kind in ("memories", "history", "sessions", "summaries"):
                    gauges["memory_tenant_items"].set(row[kind], tags={"shard": self.shard, "tenant": tenant, "kind": kind})
                gauges["memory_tenant_bytes"].set(row["bytes"], tags={"shard": self.shard, "tenant": tenant})
                if row["limit_fraction"] is not None:
                    gauges["memory_tenant_limit_fraction"].set(
                        row["limit_fraction"], tags={"shard": self.shard, "tenant": tenant})
            if "memory_items" in gauges:
                for kind in ("memories", "summaries", "turns"):
                    gauges["memory_items"].set(
                        sum(r[kind] for r in usage.values()), tags={"shard": self.shard, "kind": kind})
        except Exception as exc:  # metrics are best effort
            log.debug("memory metrics not exported", extra={"error": str(exc)})

    def _ensure_gauges(self) -> dict[str, Any]:
        if self._gauges is not None:
            return self._gauges
        try:
            import ray

            if not ray.is_initialized():
                return {}
            from ray.util.metrics import Gauge
        except ImportError:
            return {}
        gauges = {name: Gauge("m_ai_" + name, text, tag_keys=labels)
                  for name, (text, labels) in TENANT_GAUGES.items()}
        try:
            from cluster.observability.metric_specs import spec

            s = spec("memory_items")
            gauges["memory_items"] = Gauge(s.full_name, s.description, tag_keys=s.labels)
        except (ImportError, KeyError):
            pass
        self._gauges = gauges
        return gauges


__all__ = ["tenant_usage", "user_report", "memory_report", "MemoryMetrics", "TENANT_GAUGES"]
