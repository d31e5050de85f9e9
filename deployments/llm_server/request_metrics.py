"""Per-request measurements in an LLMServer replica: latency metrics and the timing breakdown.

A ``RequestTrace`` follows one request through the replica. Its stages (``cluster.observability.metric_specs``):

- ``queue``: from the ingress handing it over (``sent_at``, wall clock) to the engine taking
  it (the engine's ``arrival_time``): Serve's queue and the replica's;
- ``memory_retrieval``: recorded by the ingress (the session's context), not here;
- ``prefill``: from the engine taking it to its first token;
- ``decode``: from the first token to the last;
- ``output_processing``: from the last delta to the end of the stream here (the caller
  taking it); the ingress records its own pipeline and chunk building.

The engine's times come from ``RequestOutput.arrival_time`` / ``first_token_time``
(``time.monotonic()`` of rank 0, which shares the replica's node and clock).
Every finished request records the histograms, token counters, output-quality figures and
the breakdown; the replica's ``LatencyWindow`` gets TTFT and queue time for the autoscaler.
The ingress adds its own stages (memory retrieval, its output pipeline) to the same histogram:
``cluster.observability.diagnosis`` divides each stage's seconds by the number of requests.
"""

from __future__ import annotations

import time
from typing import Any

from cluster.autoscaling.latency_window import LatencyWindow
from cluster.errors import MAIError, RequestCancelled
from cluster.observability.output_quality import assess
from deployments.llm_server.metrics import MetricsRecorder
from engine.types import RequestOutput


class RequestTrace:
    """Timestamps of one request in the replica (see the module docstring)."""

    def __init__(
        self,
        recorder: MetricsRecorder,
        window: LatencyWindow | None,
        request_id: str,
        sent_at: float | None = None,
    ) -> None:
        self.recorder = recorder
        self.window = window
        self.request_id = request_id
        self.received = time.monotonic()
        self.routing_s = max(0.0, time.time() - float(sent_at)) if sent_at else 0.0
        self.engine_arrival: float | None = None
        self.first_token: float | None = None
        self.last_event: float | None = None
        self.tokens = 0
        self.done = False  # finish, fail or cancelled has recorded the request
        if window is not None:
            window.started(request_id, self.received - self.routing_s)

    def _engine_time(self, value: float | None, now: float) -> float | None:
        """An engine timestamp if it is on this replica's clock (same node), else None."""
        if value is None or not (self.received - 1.0 <= value <= now + 1e-3):
            return None
        return value

    def on_output(self, out: RequestOutput) -> None:
        """Called for each output the engine streams, before it is processed."""
        now = time.monotonic()
        if self.engine_arrival is None:
            self.engine_arrival = self._engine_time(out.arrival_time, now) or self.received
        n = len(out.token_ids)
        if n and self.first_token is None:
            self.first_token = self._engine_time(out.first_token_time, now) or now
            ttft = self.first_token - self.received + self.routing_s
            queue = self.engine_arrival - self.received + self.routing_s
            self.recorder.observe("time_to_first_token_seconds", ttft)
            if self.window is not None:
                self.window.first_token(self.request_id, ttft, queue)
        elif n and self.last_event is not None:
            self.recorder.observe("inter_token_latency_seconds", (now - self.last_event) / n)
        self.tokens += n
        self.last_event = now

    def breakdown(self, end: float) -> dict[str, float]:
        arrival = self.engine_arrival or self.received
        first = self.first_token or self.last_event or end
        last = self.last_event or end
        return {
            "queue": self.routing_s + max(0.0, arrival - self.received),
            "prefill": max(0.0, first - arrival),
            "decode": max(0.0, last - first),
            "output_processing": max(0.0, end - last),
        }

    def finish(
        self, final: RequestOutput | None, text: str = "", response_format: dict[str, Any] | None = None
    ) -> dict[str, float]:
        """Record a request that finished (any finish reason); returns its breakdown."""
        end = time.monotonic()
        self.done = True
        if self.window is not None:
            self.window.finished(self.request_id)
        stages = self.breakdown(end)
        rec = self.recorder
        for stage, seconds in stages.items():
            rec.observe("request_stage_seconds", seconds, stage=stage)
        rec.observe("request_queue_time_seconds", stages["queue"])
        rec.observe("e2e_request_latency_seconds", end - self.received + self.routing_s)
        if final is None:
            return stages
        completion = final.completion_tokens or self.tokens
        rec.inc("prompt_tokens_total", final.prompt_tokens)
        rec.inc("generation_tokens_total", completion)
        rec.inc("request_success_total", finished_reason=final.finish_reason or "unknown")
        if completion > 1:
            rec.observe("time_per_output_token_seconds", stages["decode"] / (completion - 1))
        quality = assess(text, final.finish_reason, response_format)
        if quality.truncated:
            rec.inc("output_truncated_total")
        if quality.empty:
            rec.inc("output_empty_total")
        rec.observe("output_repetition_ratio", quality.repetition_ratio)
        if quality.json_valid is not None:
            rec.inc("output_format_total", valid=str(quality.json_valid).lower())
        return stages

    def fail(self, error: BaseException) -> None:
        """Record a request that failed (its error kind; no latency figures)."""
        if self.done:
            return
        self.done = True
        if self.window is not None:
            self.window.finished(self.request_id)
        kind = error.error_type if isinstance(error, MAIError) else "internal_error"
        self.recorder.inc("request_errors_total", kind=kind, source="llm_server")

    def cancelled(self) -> None:
        """The caller went away before the end (a client disconnect)."""
        if not self.done:
            self.fail(RequestCancelled("the caller went away"))


__all__ = ["RequestTrace"]
