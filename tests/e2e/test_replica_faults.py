"""Processes of a running application killed under traffic, seen over HTTP (the real tiny engine):

- an LLMServer replica killed in the middle of streams (``serving.migration`` off): the streams
  end with an error event,
  ``/health`` answers 503 until Serve has a replica running again, then new requests are
  served by the replacement;
- a session store shard killed in the middle of a conversation: Serve recreates it, it
  recovers from its write-ahead log, and no acknowledged turn is lost.

The module shares one application: each test waits until what it killed is back.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
import ray

from tests.support.faulty_engine import FAULTY_ENGINE
from tests.support.serve_harness import app_config

MODEL = "m-ai-tiny"


def ask(content: str = "hi", **fields):
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **fields}


def named_actors(prefix: str) -> list[tuple[str, str]]:
    """(name, namespace) of the live named actors whose name starts with ``prefix``."""
    return [
        (a["name"], a["namespace"])
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(prefix)
    ]


def kill_named(prefix: str) -> str:
    (name, namespace), *_ = named_actors(prefix)
    ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)
    return name


def assert_no_stack_trace(text: str) -> None:
    assert "Traceback" not in text and 'File "' not in text, text[:500]


async def read_stream(client: httpx.AsyncClient, started: asyncio.Event) -> list[str]:
    """The data lines of one long stream; sets ``started`` at its first event."""
    lines = []
    async with client.stream(
        "POST", "/v1/chat/completions", json=ask(max_tokens=1500, ignore_eos=True, stream=True)
    ) as response:
        assert response.status_code == 200, (await response.aread()).decode()
        async for line in response.aiter_lines():
            if line:
                lines.append(line)
                started.set()
    return lines


async def all_started(events: list[asyncio.Event], streams: list[asyncio.Task]) -> None:
    """Wait until every stream has its first event; a stream that fails raises here."""
    waiting = asyncio.ensure_future(asyncio.gather(*(e.wait() for e in events)))
    done, _ = await asyncio.wait([waiting, *streams], timeout=30, return_when="FIRST_COMPLETED")
    assert waiting in done, [t.result() for t in done]  # re-raises a failed stream's error


async def poll_health(client: httpx.AsyncClient, timeout_s: float) -> list[httpx.Response]:
    """/health every 0.1 s until it has answered 503 and then 200 again (or ``timeout_s``)."""
    answers: list[httpx.Response] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        answers.append(await client.get("/health"))
        codes = [a.status_code for a in answers]
        if 503 in codes and codes[-1] == 200:
            break
        await asyncio.sleep(0.1)
    return answers


@pytest.fixture(scope="module")
def app(serve_cluster):
    # Paced (50 tokens/s at most): the streams surely still run when the replica is killed.
    # Migration off: this is the path of a stream that cannot be resumed (one replica, none
    # other to go to); tests/e2e/test_stream_migration.py resumes one on a second replica.
    deployed = serve_cluster.deploy(
        app_config(migration={"enabled": False}),
        prefix="faults",
        engine_cls=FAULTY_ENGINE,
        engine_options={"step_delay_s": 0.02},
    )
    yield deployed
    deployed.delete()


def test_a_killed_llm_replica_ends_its_streams_with_an_error_and_is_replaced(app):
    replica_prefix = f"SERVE_REPLICA::{app.name}#llm-"

    async def scenario():
        async with httpx.AsyncClient(base_url=app.url, timeout=60) as client:
            assert (await client.get("/health")).status_code == 200
            events = [asyncio.Event() for _ in range(4)]
            streams = [asyncio.create_task(read_stream(client, e)) for e in events]
            await all_started(events, streams)
            killed = kill_named(replica_prefix)
            health = asyncio.create_task(poll_health(client, 60))
            # Requests sent while Serve replaces the replica: served, or a designed 503.
            during = asyncio.gather(
                *(client.post("/v1/chat/completions", json=ask(max_tokens=5)) for _ in range(4))
            )
            ended = await asyncio.wait_for(asyncio.gather(*streams), 15)
            return killed, ended, await during, await health

    killed, ended, during, health = asyncio.run(scenario())
    for lines in ended:  # each stream ended (no hang) with an error event, then [DONE]
        assert lines[-1] == "data: [DONE]"
        error = json.loads(lines[-2][len("data: ") :])["error"]
        assert error["type"] == "service_unavailable", error
        assert_no_stack_trace("\n".join(lines))
    for response in during:
        assert response.status_code in (200, 503), response.text
        assert_no_stack_trace(response.text)
        if response.status_code == 503:
            assert response.headers["Retry-After"]
    # /health tells the truth: 503 while no replica runs, 200 once the new one does.
    codes = [a.status_code for a in health]
    assert 503 in codes and codes[-1] == 200, codes
    assert set(codes) <= {200, 503}
    down = next(a for a in health if a.status_code == 503)
    assert "running replicas" in down.json()["error"]["message"] and down.headers["Retry-After"]
    assert health[-1].json()["models"][MODEL]["running_replicas"] == 1
    (replacement, _), *_ = named_actors(replica_prefix)
    assert replacement != killed
    with httpx.Client(base_url=app.url, timeout=30) as client:
        replies = [
            client.post("/v1/chat/completions", json=ask(max_tokens=5)) for _ in range(3)
        ]
    assert [r.status_code for r in replies] == [200] * 3


def test_a_killed_session_store_loses_no_acknowledged_turn(app):
    with httpx.Client(base_url=app.url, timeout=30) as client:
        sid = client.post("/v1/sessions", json={"system_prompt": "Be brief."}).json()["id"]
        for turn in ("first turn", "second turn"):
            reply = client.post(
                "/v1/chat/completions", json=ask(turn, max_tokens=8, session_id=sid)
            )
            assert reply.status_code == 200  # acknowledged

        kill_named(f"SERVE_DEPLOYMENT_ACTOR::{app.name}::ingress::")

        deadline = time.monotonic() + 60
        while True:  # 503 while Serve recreates the shard; anything else is final
            third = client.post(
                "/v1/chat/completions", json=ask("third turn", max_tokens=8, session_id=sid)
            )
            if third.status_code != 503 or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        assert third.status_code == 200, third.text
        stored = client.get(f"/v1/sessions/{sid}")
        assert stored.status_code == 200, stored.text
        users = [m["content"] for m in stored.json()["messages"] if m["role"] == "user"]
        assert users == ["first turn", "second turn", "third turn"]
