"""Server-Sent Events for the HTTP API: ``data: {json}`` per chunk, then ``data: [DONE]``.

The chunks arrive already coalesced (the shard merges deltas while a stream is fast, see
``engine.stream_batching``), so one chunk is one event. ``stream_response`` waits for the
first chunk before answering, so that a request that fails at once (bad input, full queue,
dead engine) gets its proper status code instead of a 200 stream that carries an error.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel

from cluster.errors import MAIError
from deployments.errors import error_event, error_response

DONE_EVENT = "data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_event(chunk: BaseModel | dict) -> str:
    body = chunk.model_dump_json() if isinstance(chunk, BaseModel) else json.dumps(chunk)
    return f"data: {body}\n\n"


async def sse_events(first: BaseModel | None, rest: AsyncIterator[BaseModel]) -> AsyncIterator[str]:
    """The events of one stream; a failure after the start becomes a last ``error`` event.

    When the client goes away, Starlette cancels this generator; closing ``rest`` then
    cancels the generation down to the engine, which frees the request's slot.
    """
    try:
        if first is not None:
            yield sse_event(first)
        async for chunk in rest:
            yield sse_event(chunk)
    except MAIError as exc:
        yield sse_event(error_event(exc))
    finally:
        await rest.aclose()
    yield DONE_EVENT


async def stream_response(chunks: AsyncIterator[BaseModel], retry_after_s: float) -> Response:
    """An SSE response for ``chunks``, or the error answer if the first chunk fails."""
    try:
        first = await chunks.__anext__()
    except StopAsyncIteration:
        first = None
    except MAIError as exc:
        await chunks.aclose()
        return error_response(exc, retry_after_s)
    return StreamingResponse(
        sse_events(first, chunks), media_type="text/event-stream", headers=SSE_HEADERS
    )


__all__ = ["sse_event", "sse_events", "stream_response", "DONE_EVENT"]
