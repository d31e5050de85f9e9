"""A cache of whole responses to deterministic requests, bounded and scoped by tenant.

A request is deterministic when it decodes greedily (``temperature == 0``) or with a fixed
``seed``: the engine then produces the same tokens for the same prompt and parameters, so an
identical request can be answered from memory. Requests tied to a session are never cached
(their prompt depends on the session's history, and their turn must be stored).

The key is the tenant plus a digest of the request's canonical JSON without the fields that
do not change the answer (``stream``, ``stream_options``, ``user``). Tenants never share
entries: one tenant's prompt cannot reveal another's answer. Bounds: ``max_entries`` in all
(least recently used first out), ``max_entries_per_tenant`` so one tenant cannot evict the
others, and ``ttl_s``. Pure Python; the ingress holds one per replica.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

IGNORED_FIELDS = frozenset({"stream", "stream_options", "user"})


class ResponseCacheConfig(BaseModel):
    """``serving.response_cache``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_entries: int = Field(
        0, ge=0, description="Responses kept per ingress replica; 0 turns the cache off."
    )
    max_entries_per_tenant: int | None = Field(
        None, ge=1, description="Entries one tenant may hold; None: a quarter of max_entries (at least 1)."
    )
    ttl_s: float = Field(600.0, gt=0, description="How long a response stays valid.")


def is_deterministic(request: Mapping[str, Any]) -> bool:
    """Whether the answer to ``request`` (an OpenAI request as a dict) is reproducible."""
    if request.get("session_id") or (request.get("n") or 1) > 1:
        return False
    return request.get("temperature") == 0 or request.get("seed") is not None


def cache_key(tenant: str, request: Mapping[str, Any]) -> str:
    """The entry key: the tenant and a digest of the fields that shape the answer."""
    shaped = {k: v for k, v in request.items() if k not in IGNORED_FIELDS and v is not None}
    canonical = json.dumps(shaped, sort_keys=True, separators=(",", ":"), default=str)
    return f"{tenant}:{hashlib.sha256(canonical.encode()).hexdigest()}"


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class ResponseCache:
    """LRU entries with a TTL and a per-tenant bound (thread-safe)."""

    def __init__(self, config: ResponseCacheConfig, clock=time.monotonic) -> None:
        self.config = config
        self.per_tenant = config.max_entries_per_tenant or max(1, config.max_entries // 4)
        self.clock = clock
        self.stats = CacheStats()
        self._entries: OrderedDict[str, tuple[float, str, Any]] = OrderedDict()  # key -> (expiry, tenant, value)
        self._tenant_counts: dict[str, int] = {}
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.config.max_entries > 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, tenant: str, request: Mapping[str, Any]) -> Any | None:
        """The cached answer, or None (counted as a miss) when absent or expired."""
        key = cache_key(tenant, request)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry[0] <= self.clock():
                self._drop(key)
                entry = None
            if entry is None:
                self.stats.misses += 1
                return None
            self._entries.move_to_end(key)
            self.stats.hits += 1
            return entry[2]

    def put(self, tenant: str, request: Mapping[str, Any], value: Any) -> None:
        if not self.enabled:
            return
        key = cache_key(tenant, request)
        with self._lock:
            if key in self._entries:
                self._drop(key)
            if self._tenant_counts.get(tenant, 0) >= self.per_tenant:
                oldest = next(k for k, e in self._entries.items() if e[1] == tenant)
                self._drop(oldest)
            while len(self._entries) >= self.config.max_entries:
                self._drop(next(iter(self._entries)))
            self._entries[key] = (self.clock() + self.config.ttl_s, tenant, value)
            self._tenant_counts[tenant] = self._tenant_counts.get(tenant, 0) + 1

    def clear(self, tenant: str | None = None) -> None:
        with self._lock:
            for key in [k for k, e in self._entries.items() if tenant is None or e[1] == tenant]:
                self._drop(key)

    def _drop(self, key: str) -> None:
        _, tenant, _ = self._entries.pop(key)
        left = self._tenant_counts[tenant] - 1
        if left:
            self._tenant_counts[tenant] = left
        else:
            del self._tenant_counts[tenant]


__all__ = ["ResponseCache", "ResponseCacheConfig", "is_deterministic", "cache_key", "CacheStats"]
