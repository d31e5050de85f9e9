"""Serve's ``Request failed.`` record of a client's 4xx becomes one line without a traceback;
a 5xx keeps its traceback (deployments/serve_logging.py)."""

from __future__ import annotations

import logging
import sys

import pytest

from cluster.errors import CapacityError, EngineDeadError, InvalidRequestError
from deployments.serve_logging import SERVE_LOGGER, ClientErrorFilter


def failed_record(exc: BaseException) -> logging.LogRecord:
    try:
        raise exc
    except type(exc):
        info = sys.exc_info()
    return logging.getLogger(SERVE_LOGGER).makeRecord(
        SERVE_LOGGER, logging.ERROR, __file__, 1, "Request failed.", (), info
    )


@pytest.fixture(autouse=True)
def serve_logger_at_info():
    logger = logging.getLogger(SERVE_LOGGER)
    level = logger.level
    logger.setLevel(logging.INFO)
    yield
    logger.setLevel(level)


def test_a_400_becomes_one_info_line_without_a_traceback():
    record = failed_record(InvalidRequestError("model='x' is not served here", param="model"))
    assert ClientErrorFilter().filter(record)
    assert record.levelno == logging.INFO and record.exc_info is None
    assert record.getMessage() == (
        "request failed: 400 invalid_request_error: model='x' is not served here"
    )
    assert "Traceback" not in logging.Formatter().format(record)


def test_a_429_is_a_warning():
    record = failed_record(CapacityError("the queue is full"))
    assert ClientErrorFilter().filter(record) and record.levelno == logging.WARNING


def test_a_503_keeps_its_traceback():
    record = failed_record(EngineDeadError("the engine stopped"))
    assert ClientErrorFilter().filter(record)
    assert record.levelno == logging.ERROR and record.exc_info is not None
    assert "Traceback" in logging.Formatter().format(record)


def test_below_the_loggers_level_the_line_is_dropped():
    """The model replica's 4xx: the ingress logs it, so the replica writes nothing."""
    record = failed_record(InvalidRequestError("bad"))
    assert not ClientErrorFilter(logging.DEBUG).filter(record)


def test_a_wrapped_400_is_found():
    outer = RuntimeError("wrapped")
    outer.__cause__ = InvalidRequestError("bad field", param="x")
    record = failed_record(outer)
    assert ClientErrorFilter().filter(record) and record.exc_info is None
