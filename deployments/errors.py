"""The one place where failures become HTTP answers (and handle-API exceptions).

Everything a request can fail with is first turned into a ``cluster.errors.MAIError``
(``as_mai_error``): our own errors pass through (after unwrapping Ray's ``RayTaskError``),
validation errors become 400 naming the field, Serve's back-pressure becomes 429, a dead
replica or shard becomes 503. ``error_response`` then writes the OpenAI error body, with
``Retry-After`` on 429 and 503.
"""

from __future__ import annotations

import math
import re
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import ValidationError

from cluster.errors import (
    CapacityError,
    EngineDeadError,
    InvalidRequestError,
    MAIError,
)
from cluster.logging_setup import get_logger

log = get_logger("deployments.errors")

# pydantic puts the union member it tried into the error location; these are not fields.
_TYPE_TAG = re.compile(
    r"^(str|int|float|bool|none|list\[.*\]|dict\[.*\]|[A-Z]\w*|.*-.*|function-.*)$"
)
_LEADING_FIELD = re.compile(r"^([a-z_][a-z0-9_]*)\b")


def field_path(loc: tuple[Any, ...]) -> str | None:
    """``("body", "messages", 0, "content", "str")`` -> ``"messages[0].content"``."""
    out = ""
    for i, part in enumerate(loc):
        if i == 0 and part in ("body", "query", "path"):
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _TYPE_TAG.match(str(part)):
            out += f".{part}" if out else str(part)
    return out or None


def validation_error(errors: list[dict[str, Any]]) -> InvalidRequestError:
    """A 400 naming the first bad field, from pydantic's (or FastAPI's) error list."""
    grouped: dict[str | None, list[dict[str, Any]]] = {}
    for err in errors:
        grouped.setdefault(field_path(tuple(err.get("loc", ()))), []).append(err)
    parts = []
    first_param = None
    for path, errs in grouped.items():
        msg = errs[0]["msg"].removeprefix("Value error, ")
        if path is None:
            named = _LEADING_FIELD.match(msg)
            path = named.group(1) if named else None
        if len(errs) > 1 and all(e["type"].endswith("_type") for e in errs):
            kinds = [str(e["loc"][-1]) for e in errs]
            msg = f"wrong type; expected one of {', '.join(kinds)}"
        elif errs[0]["type"] == "json_invalid":
            msg = f"the body is not valid JSON: {errs[0].get('ctx', {}).get('error', msg)}"
        got = errs[0].get("input")
        shown = (
            ""
            if errs[0]["type"] in ("missing", "json_invalid") or isinstance(got, (dict, list))
            else f" (got {got!r:.80})"
        )
        parts.append(
            f"{path}: {msg}{shown}" if path and not msg.startswith(path) else f"{msg}{shown}"
        )
        first_param = first_param or path
    return InvalidRequestError("; ".join(parts), param=first_param)


def as_mai_error(exc: BaseException, part: str = "the model replica") -> MAIError:
    """Map any failure of a request to the ``MAIError`` that describes it to the client.
    ``part``: what failed when a Ray actor or replica is gone, in our words (clients never
    see Ray's class names)."""
    import ray.exceptions
    from ray.serve.exceptions import (
        BackPressureError,
        DeploymentUnavailableError,
        ReplicaUnavailableError,
    )

    while isinstance(exc, ray.exceptions.RayTaskError) and isinstance(exc.cause, BaseException):
        exc = exc.cause  # a task error may wrap another (an actor calling an actor)
    if isinstance(exc, MAIError):
        return exc
    if isinstance(exc, ValidationError):
        return validation_error(exc.errors())
    if isinstance(exc, BackPressureError):
        queued, limit = exc.args[:2]
        return CapacityError(
            f"the queue is full ({queued} requests waiting, max_queued_requests={limit}); "
            f"retry shortly",
            retry_after=exc.retry_after_s or 1.0,
        )
    from actors.tp.stream_channel import RankStreamLost

    if isinstance(
        exc,
        (ray.exceptions.RayActorError, DeploymentUnavailableError, ReplicaUnavailableError, RankStreamLost),
    ):
        log.warning("unavailable", extra={"part": part, "error": type(exc).__name__})
        return EngineDeadError(f"{part} is unavailable (stopped or being replaced); retry shortly")
    log.error("unexpected error", exc_info=exc)
    return MAIError(f"internal error: {type(exc).__name__}: {brief(str(exc))}")


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_TRACE_START = re.compile(r"Traceback \(most recent call last\)|^\s+File \"", re.MULTILINE)
_RAY_TASK_LINE = re.compile(r"^\s*ray::\S+ \(pid=.*$", re.MULTILINE)  # where a Ray task ran
# A server path (two or more components, absolute or file://): never shown to a client.
_SERVER_PATH = re.compile(r"(?<![\w.:/])(?:file://)?/(?:[^\s/'\"]+/)+[^\s/'\",)]*")


def brief(text: str, limit: int = 500) -> str:
    """``text`` fit for a client: without terminal colours and without any stack trace (a
    trace is replaced by its last line, the exception itself), on one line, at most
    ``limit`` characters, server paths replaced. Tracebacks stay in the logs: they show
    paths and internals."""
    text = _RAY_TASK_LINE.sub("", _ANSI.sub("", text))
    text = _SERVER_PATH.sub("<server path>", text)
    trace = _TRACE_START.search(text)
    if trace is not None:
        head = text[: trace.start()].strip()
        lines = [line.strip() for line in text[trace.start() :].splitlines() if line.strip()]
        last = next((line for line in reversed(lines) if not line.startswith(("File ", "^"))), "")
        text = f"{head} {last}" if head else last
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def error_response(exc: BaseException, retry_after_s: float = 1.0) -> JSONResponse:
    """The HTTP answer for ``exc``: its status, the OpenAI error body, Retry-After if useful.
    A 4xx is logged as one line (request id, status, message); see ``serve_logging``."""
    from deployments.serve_logging import log_client_error

    err = as_mai_error(exc)
    log_client_error(exc, err)
    headers = {}
    if err.status_code in (429, 503):
        after = getattr(err, "retry_after", None) or retry_after_s
        headers["Retry-After"] = str(max(1, math.ceil(after)))
    return JSONResponse(err.to_dict(), status_code=err.status_code, headers=headers)


def error_event(exc: BaseException) -> dict[str, Any]:
    """The body sent as the last SSE event when a stream fails after it started."""
    from deployments.serve_logging import log_client_error

    err = as_mai_error(exc)
    log_client_error(exc, err)
    return err.to_dict()


__all__ = [
    "as_mai_error",
    "error_response",
    "error_event",
    "validation_error",
    "field_path",
    "brief",
]
