"""Coalescing of a request's deltas into fewer stream events.

Every event of a stream costs CPU in each process it crosses (rank actor -> LLM replica ->
ingress -> HTTP proxy), far more than the token it carries. So rank 0 sends a delta at once
when the stream is slow (the previous event is at least one interval old) and, while deltas
come faster, merges them into one event per interval (the way Ray Serve LLM batches streams).
The interval grows with the number of concurrent streams so that a replica sends about
``max_events_per_s`` events in all: at 1 stream tokens go out nearly one by one, at 32 streams
several tokens ride in each event. The first delta always goes at once (time to first token).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass

from engine.types import RequestOutput, merge_deltas


@dataclass(frozen=True)
class StreamPacing:
    """How often one stream may send an event (see the module docstring)."""

    min_interval_s: float = 0.02
    max_events_per_s: float = 100.0

    def interval_s(self, active_streams: int) -> float:
        return max(self.min_interval_s, active_streams / self.max_events_per_s)


async def coalesce(
    deltas: AsyncIterator[RequestOutput], interval_s: Callable[[], float] | None
) -> AsyncIterator[RequestOutput]:
    """Yield ``deltas`` merged so that events are at least ``interval_s()`` apart.

    ``interval_s=None`` yields one output at the end (a request that is not streamed).
    A delta that arrives when the last event is older than the interval goes out at once;
    held deltas leave with the next one after the interval, or with the final delta. Closing
    this iterator closes ``deltas`` (which cancels the request in the engine).
    """
    pending: list[RequestOutput] = []
    last_sent = float("-inf")
    async with aclosing(deltas):
        async for out in deltas:
            pending.append(out)
            if out.finished:
                break
            if interval_s is None or not any(o.text for o in pending):
                continue  # not streamed, or nothing a client could see yet
            now = time.monotonic()
            if now - last_sent >= interval_s():
                merged = merge_deltas(pending)
                pending = []
                last_sent = now
                yield merged
    if pending:
        yield merge_deltas(pending)


__all__ = ["StreamPacing", "coalesce"]
