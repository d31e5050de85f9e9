"""A client's mistake makes one log line, not a traceback: a 400 raised inside the model's
replica (over HTTP) and one raised by the ingress (through the handle) each leave one line
``request failed (request_id=...): 400 invalid_request_error: ...`` in the replicas' logs, and
no ``Request failed.`` record with a traceback."""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx
import pytest

from cluster.errors import ModelNotFoundError
from tests.support.serve_harness import app_config, wait_until

MODEL = "m-ai-tiny"


@pytest.fixture(scope="module")
def app(serve_cluster):
    deployed = serve_cluster.deploy(app_config(), prefix="quiet")  # the real engine
    yield deployed
    deployed.delete()


def log_lines(serve_cluster, needle: str) -> list[str]:
    """Lines of the replicas' Serve logs (each line is also on the worker's stderr)."""
    logs = Path(serve_cluster.temp_dir, "session_latest", "logs", "serve")
    return [
        line
        for f in logs.glob("replica_*.log")
        for line in f.read_text(errors="replace").splitlines()
        if needle in line
    ]


def test_a_400_from_the_model_replica_is_one_line_without_a_traceback(app, serve_cluster):
    request_id = f"quiet-{uuid.uuid4().hex[:10]}"
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4093}
    reply = httpx.post(
        f"{app.url}/v1/chat/completions", json=body, headers={"X-Request-ID": request_id}, timeout=30
    )
    assert reply.status_code == 400 and "is too large: 4093" in reply.json()["error"]["message"]

    lines = wait_until(
        lambda: [line for line in log_lines(serve_cluster, request_id) if "request failed" in line],
        timeout_s=20,
        what="the ingress's log line of the 400",
    )
    assert len(lines) == 1, lines
    assert "400 invalid_request_error" in lines[0] and "is too large: 4093" in lines[0]
    assert "ERROR" not in lines[0]
    everything = log_lines(serve_cluster, request_id)
    assert not [line for line in everything if "Request failed." in line], everything
    traces = [line for line in log_lines(serve_cluster, "InvalidRequestError") if "4093" in line]
    assert not traces, traces  # the last line of a traceback


def test_a_400_through_the_handle_is_one_line(app, serve_cluster):
    marker = f"no-such-model-{uuid.uuid4().hex[:8]}"
    with pytest.raises(ModelNotFoundError):  # a 404: a client's mistake, logged in one line
        app.handle.chat.remote(
            {"model": marker, "messages": [{"role": "user", "content": "hi"}]}
        ).result()
    lines = wait_until(
        lambda: log_lines(serve_cluster, marker), timeout_s=20, what="the log line of the 400"
    )
    # one line: a traceback would end with another line naming the model
    assert len(lines) == 1 and "request failed (request_id=" in lines[0], lines
