"""A session's turns reach one model replica through the whole app (``serving.session_affinity``):
the ingress names the session on its call and the model deployment's router keeps it there.

Two replicas of the fake engine; which replica served is read from ``GET /metrics``, where each
replica's engine reports the tokens it generated."""

from __future__ import annotations

import re

import httpx
import pytest

from tests.support.serve_harness import FAKE_ENGINE, app_config, wait_until

MODEL = "m-ai-tiny"
TOKENS = 8  # per answer


def generated(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {replica: float(value) for replica, value in re.findall(
        rf'^vllm:generation_tokens_total{{model_name="{MODEL}",replica="([^"]+)"}} (\S+)$', text, re.M)}


def deploy(serve_cluster, affinity: bool):
    config = app_config(min_replicas=2, max_replicas=2, session_affinity=affinity)
    # Routing in the serving graph only: the fake engine (two replicas, no model to load).
    app = serve_cluster.deploy(
        config, prefix="routing", engine_cls=FAKE_ENGINE, engine_options={"tokens_per_s": 2000}
    )
    wait_until(lambda: len(generated(app.url)) == 2, timeout_s=60, what="both replicas reporting")
    return app


def turns_per_replica(app, http: httpx.Client, session_id: str | None, turns: int) -> list[float]:
    before = generated(app.url)
    for i in range(turns):
        body = {"model": MODEL, "messages": [{"role": "user", "content": f"turn {i}"}],
                "max_tokens": TOKENS, "ignore_eos": True}
        if session_id is not None:
            body["session_id"] = session_id
        answer = http.post("/v1/chat/completions", json=body)
        assert answer.status_code == 200, answer.text
    after = generated(app.url)
    return sorted((after[r] - before.get(r, 0.0)) / TOKENS for r in after)


@pytest.fixture(scope="module")
def affine(serve_cluster):
    app = deploy(serve_cluster, affinity=True)
    yield app
    app.delete()


def test_every_turn_of_a_session_reaches_the_same_replica(affine):
    with httpx.Client(base_url=affine.url, timeout=60) as http:
        for _ in range(3):
            session = http.post("/v1/sessions", json={}).json()["id"]
            assert turns_per_replica(affine, http, session, 8) == [0.0, 8.0]


def test_requests_without_a_session_use_both_replicas(affine):
    with httpx.Client(base_url=affine.url, timeout=60) as http:
        quiet, busy = turns_per_replica(affine, http, None, 24)
    assert quiet >= 1 and quiet + busy == 24
