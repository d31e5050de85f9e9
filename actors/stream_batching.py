"""Coalescing of a request's deltas into fewer stream events.

Every event of a stream costs CPU in each process it crosses (shard actor -> LLM replica ->
ingress -> HTTP proxy), far more than the token it carries. So the shard sends a delta at once
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

from engine.types import RequestOutput, joined_logprobs


@dataclass(frozen=True)
class StreamPacing:
    """How often one stream may send an event (see the module docstring)."""

    min_interval_s: float = 0.02
    max_events_per_s: float = 200.0

    def interval_s(self, active_streams: int) -> float:
        return max(self.min_interval_s, active_streams / self.max_events_per_s)


def merge_deltas(outputs: list[RequestOutput]) -> RequestOutput:
    """Fold consecutive deltas of one request into one (token ids and text concatenated)."""
    if len(outputs) == 1:
        return outputs[0]
    first, last = outputs[0], outputs[-1]
    return RequestOutput(
        last.request_id,
        token_ids=[t for o in outputs for t in o.token_ids],
        text="".join(o.text for o in outputs),
        finish_reason=last.finish_reason,
        prompt_tokens=last.prompt_tokens,
        completion_tokens=last.completion_tokens,
        error=last.error,
        arrival_time=first.arrival_time,
        first_token_time=next((o.first_token_time for o in outputs if o.first_token_time), None),
        logprobs=joined_logprobs(outputs),
    )


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


__all__ = ["StreamPacing", "coalesce", "merge_deltas"]
