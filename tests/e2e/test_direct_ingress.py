"""``serving.direct_ingress``: ``m-ai serve`` with the ingress replica serving HTTP on the
configured port itself (Serve's direct ingress), as a user runs it. Its own Ray: the setting is
read by every Serve process at its start, so it cannot share the test session's cluster."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.support.serve_harness import free_port
from tests.support.serve_process import start_serve, streamed_hello


def _listener(port: int) -> psutil.Process:
    """The process listening on 127.0.0.1:``port``."""
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            return psutil.Process(conn.pid)
    raise AssertionError(f"nothing listens on port {port}")


@pytest.mark.slow  # its own `m-ai serve` and Ray, ~30 s, like test_cli's serve test
def test_m_ai_serve_with_direct_ingress_streams_chat_on_the_configured_port(tmp_path: Path):
    import openai

    port = free_port()
    served = start_serve(tmp_path, {
        "M_AI_SERVING__PORT": str(port),
        "M_AI_SERVING__DIRECT_INGRESS": "true",
        "M_AI_SERVING__SESSION_STATE_URI": str(tmp_path / "sessions"),
        "M_AI_MEMORY__STORAGE_URI": str(tmp_path / "memory"),
        "M_AI_MEMORY__EMBEDDER": "hashing",
    })
    stopped_in = None
    try:
        served.wait_ready()
        url = f"http://127.0.0.1:{port}"
        assert url in served.output  # what the user is told to call

        # the configured port is the ingress replica's own: no proxy between client and app
        owner = " ".join(_listener(port).cmdline())
        assert "ServeReplica" in owner and "ingress" in owner, owner

        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        chunks = streamed_hello(client)
        assert sum(len(c.choices[0].delta.content or "") for c in chunks) > 0

        whole = client.chat.completions.create(
            model="m-ai-tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=8
        )
        assert whole.choices[0].message.content and whole.usage.completion_tokens > 0

        assert httpx.get(f"{url}/health").json()["status"] == "ok"
        assert "m-ai-tiny" in [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]]
        assert "vllm:num_requests_running" in httpx.get(f"{url}/metrics").text

        # a session's turns are kept across requests on this port too
        session = httpx.post(f"{url}/v1/sessions", json={}).json()["id"]
        body = {"model": "m-ai-tiny", "max_tokens": 8, "session_id": session,
                "messages": [{"role": "user", "content": "my name is Ada"}]}
        assert httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).status_code == 200
        stored = httpx.get(f"{url}/v1/sessions/{session}").json()
        assert [m["content"] for m in stored["messages"] if m["role"] == "user"] == ["my name is Ada"]

        # bad input is still a 400 naming the field, not the replica's traceback
        bad = httpx.post(f"{url}/v1/chat/completions", json={"model": "m-ai-tiny", "messages": "x"})
        assert bad.status_code == 400 and "messages" in json.dumps(bad.json())
    finally:
        started = time.monotonic()
        served.proc.send_signal(signal.SIGINT)
        assert served.proc.wait(timeout=60) == 0
        stopped_in = time.monotonic() - started
    # Serve's 30 s hold of a stopping direct-ingress replica (for a load balancer) is off
    assert stopped_in < 25, stopped_in
    logged = served.stderr()
    assert "Traceback" not in logged, logged[-3000:]
