"""Quiet logs for a client's mistakes.

Ray Serve logs every exception that leaves a replica method as ``ERROR ... Request failed.``
with the whole traceback. For M-AI most of those are a client's mistake (a 400 naming a
field, a 404 session, a 429 when the queue is full) that the client has been told about:
``quiet_client_errors`` installs a filter on Serve's logger in this replica that turns such a
record into one line with the request id, the status and the message, no traceback. 5xx and
unplanned errors keep Serve's ERROR record with the traceback.

``log_client_error`` writes the same one line for errors answered over HTTP (the ingress's
exception handlers), where Serve logs nothing but the access line.
"""

from __future__ import annotations

import logging
from typing import Any

from cluster.errors import MAIError
from cluster.logging_setup import get_logger

log = get_logger("deployments.requests")

SERVE_LOGGER = "ray.serve"
_FAILED = "Request failed."


def _request_id() -> str | None:
    try:
        from ray.serve.context import _get_serve_request_context

        return _get_serve_request_context().request_id or None
    except Exception:  # not inside a Serve request
        return None


def client_error(exc: BaseException | None) -> MAIError | None:
    """The ``MAIError`` with a 4xx status that ``exc`` is (or wraps), else None."""
    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, MAIError):
            return exc if 400 <= exc.status_code < 500 else None
        cause = getattr(exc, "cause", None)  # ray.exceptions.RayTaskError
        exc = cause if isinstance(cause, BaseException) else exc.__cause__
        seen += 1
    return None


def describe(err: MAIError, request_id: str | None = None) -> str:
    rid = f" (request_id={request_id})" if request_id else ""
    return f"request failed{rid}: {err.status_code} {err.error_type}: {err.message}"


def client_error_level(err: MAIError) -> int:
    """429 (busy) is worth an operator's attention; other 4xx are the client's business."""
    return logging.WARNING if err.status_code == 429 else logging.INFO


class ClientErrorFilter(logging.Filter):
    """Rewrites Serve's ``Request failed.`` record of a 4xx into one line at ``level`` (or
    drops it when the logger does not log that level)."""

    def __init__(self, level: int | None = None) -> None:
        super().__init__()
        self.level = level  # None: INFO, or WARNING for 429

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != _FAILED or not record.exc_info:
            return True
        err = client_error(record.exc_info[1])
        if err is None:
            return True  # 5xx or unplanned: the traceback stays
        level = self.level if self.level is not None else client_error_level(err)
        if not logging.getLogger(SERVE_LOGGER).isEnabledFor(level):
            return False
        record.levelno, record.levelname = level, logging.getLevelName(level)
        rid = _request_id() or getattr(record, "request_id", None)
        record.msg, record.args = describe(err, rid), ()
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


_installed: dict[str, ClientErrorFilter] = {}


def quiet_client_errors(level: int | None = None) -> None:
    """In a Serve replica: M-AI's log lines go where Serve's go (the replica's log file and
    stderr, with the request id), and the filter is installed on Serve's logger (once; a later
    call sets the level).

    ``level``: where the caller's callers log the error themselves (an LLMServer's 4xx reach
    the ingress, which logs them), pass ``logging.DEBUG`` to keep one line per request."""
    serve_logger = logging.getLogger(SERVE_LOGGER)
    ours = logging.getLogger("m_ai")
    if serve_logger.handlers and ours.handlers != serve_logger.handlers:
        ours.handlers[:] = list(serve_logger.handlers)
        ours.setLevel(serve_logger.level or logging.INFO)
        ours.propagate = False
    current = _installed.get(SERVE_LOGGER)
    if current is None:
        current = _installed[SERVE_LOGGER] = ClientErrorFilter(level)
        logging.getLogger(SERVE_LOGGER).addFilter(current)
    current.level = level


def log_client_error(exc: BaseException, err: MAIError | None = None, **extra: Any) -> None:
    """One line for a 4xx answered over HTTP: request id, status, type and message."""
    err = err if err is not None else client_error(exc)
    if err is None:
        return
    extra = {k: v for k, v in extra.items() if v is not None}
    log.log(client_error_level(err), describe(err, _request_id()), extra=extra)


__all__ = ["quiet_client_errors", "log_client_error", "client_error", "ClientErrorFilter"]
