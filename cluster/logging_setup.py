"""Logging, set up once per process.

Development gets readable lines; production gets one JSON object per line (for log
shippers). The format is chosen by the caller (the CLI reads ``--log-format`` or the config),
never silently by an environment variable.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Literal

LogFormat = Literal["text", "json"]

_configured = False
_RESERVED = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record; ``extra={...}`` fields are kept as top-level keys."""

    def format(self, record: logging.LogRecord) -> str:
        payload = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                payload[key] = value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``time level logger: message key=value ...`` for a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-5s %(name)s: %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = [
            f"{k}={v}"
            for k, v in record.__dict__.items()
            if k not in _RESERVED and not k.startswith("_")
        ]
        return f"{line} {' '.join(extras)}" if extras else line


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record (it may be replaced)."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self):  # noqa: D401 - logging reads this attribute
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def setup_logging(fmt: LogFormat = "text", level: str | int = "INFO", *, force: bool = False) -> None:
    """Configure the ``m_ai`` loggers once per process (``force`` reconfigures)."""
    global _configured
    if _configured and not force:
        return
    handler = _StderrHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger("m_ai")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    _configured = True


def get_logger(name: str) -> logging.Logger:
    """A logger under the ``m_ai`` namespace (``m_ai.engine.core`` and so on)."""
    return logging.getLogger(f"m_ai.{name}")
