"""Request size limits of the HTTP API, checked before anything parses the body.

``BodySizeLimit`` is an ASGI middleware of the ingress's FastAPI app: a request whose body is
larger than ``serving.max_request_bytes`` gets 413 in the OpenAI error format, as soon as its
``Content-Length`` says so, or, for a body sent in chunks, as soon as the bytes received pass
the limit; the body is never read further, parsed or tokenized. The other limits live where
the request is understood: the count of ``messages`` in ``deployments/protocol.py`` (400), the
prompt and ``max_tokens`` against the model's context in ``deployments/ingress/openai_api/inputs.py``
(400, in vLLM's words).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from cluster.errors import InvalidRequestError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

DEFAULT_MAX_REQUEST_BYTES = 1 << 20  # 1 MiB: ~250k tokens of text, far above any context
METHODS_WITH_BODY = frozenset({"POST", "PUT", "PATCH"})


class RequestTooLargeError(InvalidRequestError):
    """The request body is above ``serving.max_request_bytes``."""

    status_code = 413


def too_large(limit: int, size: int | None = None) -> RequestTooLargeError:
    got = f"is {size} bytes" if size is not None else "passed that"
    return RequestTooLargeError(
        f"the request body {got}, above the limit of {limit} bytes (serving.max_request_bytes); "
        f"send a shorter prompt or fewer messages, or continue a session (session_id) so that "
        f"only the new turn is sent",
        param=None,
    )


class BodySizeLimit:
    """ASGI middleware: 413 for bodies above ``max_bytes`` (see the module docstring).

    A body within the limit is read here (FastAPI reads it whole anyway) and handed to the
    app unchanged; later ``receive`` calls (the client's disconnect) pass straight through.
    """

    def __init__(self, app: Callable[..., Awaitable[None]], max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") not in METHODS_WITH_BODY:
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await _answer(send, too_large(self.max_bytes, declared))
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending it all
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await _answer(send, too_large(self.max_bytes))
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _answer(send: Send, error: RequestTooLargeError) -> None:
    from deployments.errors import error_response

    response = error_response(error)
    await send(
        {
            "type": "http.response.start",
            "status": response.status_code,
            "headers": response.raw_headers,
        }
    )
    await send({"type": "http.response.body", "body": response.body})


__all__ = ["BodySizeLimit", "RequestTooLargeError", "DEFAULT_MAX_REQUEST_BYTES", "too_large"]
