"""``GET /metrics`` on the HTTP port shows the engines' running and waiting requests of the
moment (vLLM's names), not the ~10 s old figures of Ray's metrics export."""

from __future__ import annotations

import re

import httpx
import pytest

from tests.support.serve_harness import app_config, wait_until

MODEL = "m-ai-tiny"


@pytest.fixture(scope="module")
def app(serve_cluster):
    config = app_config(models=[{"tp_size": 1, "max_num_seqs": 4, "context_length": 512, "temperature": 0.0}])
    deployed = serve_cluster.deploy(config, prefix="metrics", engine_cls=None)  # the real engine
    yield deployed
    deployed.delete()


def gauge(text: str, name: str) -> float:
    found = re.search(rf'^{re.escape(name)}{{model_name="{MODEL}",replica="[^"]+"}} (\S+)$', text, re.M)
    assert found, text
    return float(found.group(1))


def test_a_running_stream_shows_at_once_and_leaves_at_once(app):
    with httpx.Client(base_url=app.url, timeout=30) as http:
        idle = http.get("/metrics")
        assert idle.status_code == 200 and idle.headers["content-type"].startswith("text/plain")
        assert "# TYPE vllm:num_requests_running gauge" in idle.text
        assert gauge(idle.text, "vllm:num_requests_running") == 0
        # ignore_eos: the random-weight model may end a sampled answer after a few tokens
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 300, "stream": True,
                "ignore_eos": True}
        with http.stream("POST", "/v1/chat/completions", json=body) as stream:
            # a chunk with text: the engine runs the request now. The line iterator is held: a
            # dropped one is finalized at once, which closes the response and cancels the request
            lines = stream.iter_lines()
            next(line for line in lines if '"content":"' in line and '"content":""' not in line)
            text = http.get("/metrics").text
            running = gauge(text, "vllm:num_requests_running")
            waiting = gauge(text, "vllm:num_requests_waiting")
        assert (running, waiting) == (1, 0), text
        wait_until(lambda: gauge(http.get("/metrics").text, "vllm:num_requests_running") == 0,
                   timeout_s=2, interval_s=0.1, what="the closed stream leaving the batch")
        assert gauge(http.get("/metrics").text, "vllm:num_requests_waiting") == 0
        assert re.search(rf'^m_ai:replicas_reporting{{model_name="{MODEL}"}} 1$', http.get("/metrics").text, re.M)
