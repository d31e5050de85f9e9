"""What the ingress measures and caches, kept out of the request code.

- ``timed(stage)``: records the ingress's own stages of the timing breakdown
  (``memory_retrieval``: the session's context; ``output_processing``: the output pipeline)
  into ``m_ai_request_stage_seconds``;
- ``session_op(op)``: latency and outcome of each session store call;
- the response cache (``cluster.response_cache``) for deterministic requests, with its hit
  and miss counters, hit rate and size as metrics;
- ``error(exc)``: errors by kind, as clients see them;
- ``migration(outcome)``: streams moved off a dead model replica (``deployments.ingress.migration``);
- ``diagnostics()``: the bottleneck report of ``/v1/diagnostics``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from cluster.errors import MAIError
from cluster.response_cache import ResponseCache, ResponseCacheConfig, is_deterministic
from deployments.llm_server.metrics import MetricsRecorder


def _replica_id() -> str:
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # not inside a Serve replica
        return "local"


class IngressObservability:
    def __init__(self, cache: ResponseCacheConfig | None = None) -> None:
        self.replica = _replica_id()
        self.recorder = MetricsRecorder(replica=self.replica)
        self.cache = ResponseCache(cache or ResponseCacheConfig())
        self._diagnostics: Any = None

    # -- timing ---------------------------------------------------------------------------------

    @contextmanager
    def timed(self, stage: str, model: str) -> Iterator[None]:
        start = time.monotonic()
        try:
            yield
        finally:
            seconds = time.monotonic() - start
            self.recorder.observe("request_stage_seconds", seconds, stage=stage, model=model)
            if stage == "memory_retrieval":
                self.recorder.observe("memory_retrieval_seconds", seconds, model=model)

    @contextmanager
    def session_op(self, op: str) -> Iterator[None]:
        start = time.monotonic()
        outcome = "error"
        try:
            yield
            outcome = "ok"
        finally:
            self.recorder.observe("session_store_op_seconds", time.monotonic() - start, op=op)
            self.recorder.inc("session_store_ops_total", op=op, outcome=outcome)

    def error(self, exc: BaseException, model: str = "") -> None:
        kind = exc.error_type if isinstance(exc, MAIError) else "internal_error"
        self.recorder.inc("request_errors_total", kind=kind, source="ingress", model=model)

    def migration(self, outcome: str, model: str, seconds: float | None) -> None:
        """A stream whose replica died: resumed (after ``seconds``) or why not."""
        self.recorder.inc("stream_migrations_total", model=model, outcome=outcome)
        if seconds is not None:
            self.recorder.observe("stream_migration_seconds", seconds, model=model)

    # -- response cache -----------------------------------------------------------------------

    def cached(self, request: Any, tenant: str) -> Any | None:
        """A cached response to ``request`` (a pydantic request), or None."""
        if not self.cache.enabled:
            return None
        body = request.model_dump(exclude_none=True)
        if not is_deterministic(body):
            return None
        hit = self.cache.get(tenant, body)
        self.recorder.inc("response_cache_requests_total", model=request.model, result="hit" if hit else "miss")
        self._cache_gauges()
        return hit.model_copy(deep=True) if hit is not None else None

    def remember(self, request: Any, tenant: str, response: Any) -> None:
        if not self.cache.enabled:
            return
        body = request.model_dump(exclude_none=True)
        if is_deterministic(body):
            self.cache.put(tenant, body, response.model_copy(deep=True))
            self._cache_gauges()

    def _cache_gauges(self) -> None:
        self.recorder.set("response_cache_hit_rate", self.cache.stats.hit_rate)
        self.recorder.set("response_cache_entries", len(self.cache))

    # -- diagnostics --------------------------------------------------------------------------

    async def diagnostics(self, model: str | None, window_s: float) -> dict[str, Any]:
        if self._diagnostics is None:
            from deployments.diagnostics import DiagnosticsReader

            self._diagnostics = DiagnosticsReader()
        report = await self._diagnostics.report(model, window_s)
        report["response_cache"] = {
            "enabled": self.cache.enabled,
            "entries": len(self.cache),
            "hit_rate": round(self.cache.stats.hit_rate, 4),
        }
        return report


__all__ = ["IngressObservability"]
