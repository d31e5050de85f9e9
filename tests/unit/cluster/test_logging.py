"""Logs: readable lines in development, one JSON object per line in production."""

from __future__ import annotations

import json
import logging

from cluster.logging_setup import JsonFormatter, TextFormatter, get_logger, setup_logging


def _record(**extra) -> logging.LogRecord:
    record = logging.LogRecord("m_ai.engine", logging.INFO, __file__, 1, "model loaded", (), None)
    record.__dict__.update(extra)
    return record


def test_json_lines_carry_extra_fields():
    line = JsonFormatter().format(_record(rank=1, load_s=0.5))
    payload = json.loads(line)
    assert payload["msg"] == "model loaded" and payload["level"] == "info"
    assert payload["rank"] == 1 and payload["load_s"] == 0.5 and payload["ts"].endswith("Z")


def test_text_lines_are_readable_with_key_values():
    line = TextFormatter().format(_record(rank=1))
    assert "model loaded" in line and "rank=1" in line and "{" not in line


def test_setup_is_idempotent_and_force_switches_format(capsys):
    setup_logging("text", force=True)
    setup_logging("json")  # ignored: already configured
    get_logger("test").warning("hello", extra={"k": 2})
    assert "hello k=2" in capsys.readouterr().err
    setup_logging("json", force=True)
    get_logger("test").warning("hello")
    assert json.loads(capsys.readouterr().err.strip().splitlines()[-1])["msg"] == "hello"
    setup_logging("text", force=True)
