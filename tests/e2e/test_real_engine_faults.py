"""Faults under the real engine (the tiny model at tensor-parallel size 2), over HTTP:

- a client that disconnects mid-stream: its sequence leaves the running batch at once;
- a TP rank killed while streams run: they end with an error (none hangs), the replica is
  marked unhealthy and replaced, and the replacement serves;
- an engine step that raises (``FaultyEngine``): every request in flight gets an error, as
  with vLLM's ``EngineDeadError``, new ones get 503 until Serve has restarted the replica.

The module shares one application; each fault that kills the replica waits for its
replacement before it returns, so the tests run in any order.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
import ray

from tests.support.faulty_engine import FAULT_MARKER, FAULTY_ENGINE
from tests.support.serve_harness import app_config, wait_until

MODEL = "m-ai-tiny"
LONG = 1500  # output tokens of a stream that must still be running when the fault comes


def ask(content: str = "Tell me about llamas.", **fields):
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **fields}


@pytest.fixture(scope="module")
def real_app(serve_cluster):
    config = app_config(
        models=[{"tp_size": 2, "max_num_seqs": 8, "temperature": 0.0}],
        rank_num_cpus=1.0,
        health_check_period_s=1.0,
    )
    deployed = serve_cluster.deploy(config, prefix="realfault", engine_cls=FAULTY_ENGINE)
    yield deployed
    deployed.delete()


def engine_stats(app) -> dict:
    return ray.get(app.rank0().stats.remote()).__dict__


def wait_replaced(app, rank_names: list[str]) -> None:
    """Until /health is ok again and the model runs on new rank actors."""
    with httpx.Client(base_url=app.url, timeout=10) as client:
        wait_until(
            lambda: client.get("/health").status_code == 200
            and app.llm().describe.remote().result()["rank_names"] != rank_names,
            timeout_s=120,
            interval_s=0.5,
            what="replica replaced",
        )
        reply = client.post("/v1/chat/completions", json=ask(max_tokens=4))
        assert reply.status_code == 200, reply.text


async def stream_lines(client: httpx.AsyncClient, started: asyncio.Event, **fields) -> list[str]:
    lines = []
    body = ask(max_tokens=LONG, stream=True, **fields)
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200, (await response.aread()).decode()
        async for line in response.aiter_lines():
            if line:
                lines.append(line)
                started.set()
    return lines


async def start_streams(client: httpx.AsyncClient, n: int) -> list[asyncio.Task]:
    events = [asyncio.Event() for _ in range(n)]
    tasks = [
        asyncio.create_task(stream_lines(client, e, seed=i, temperature=0.8))
        for i, e in enumerate(events)
    ]
    waiting = asyncio.ensure_future(asyncio.gather(*(e.wait() for e in events)))
    done, _ = await asyncio.wait([waiting, *tasks], timeout=60, return_when="FIRST_COMPLETED")
    assert waiting in done, [t.result() for t in done]
    return tasks


def assert_ended_with_error(lines: list[str]) -> dict:
    assert lines[-1] == "data: [DONE]", lines[-3:]
    error = json.loads(lines[-2][len("data: ") :])["error"]
    assert error["type"] == "service_unavailable", error
    text = "\n".join(lines)
    assert "Traceback" not in text and 'File "' not in text
    return error


def test_a_client_that_disconnects_leaves_the_batch_at_once(real_app):
    rank0 = real_app.rank0()
    with httpx.Client(base_url=real_app.url, timeout=60) as client:
        with client.stream("POST", "/v1/chat/completions", json=ask(max_tokens=LONG, stream=True)) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            for _ in range(3):
                assert next(line for line in lines if line).startswith("data: {")
            assert ray.get(rank0.stats.remote()).running == 1
            left_at = time.monotonic()
        # the connection is closed: the sequence must be out of the batch within a few steps
        stats = wait_until(
            lambda: (s := ray.get(rank0.stats.remote())).running == 0 and s,
            timeout_s=5,
            interval_s=0.02,
            what="sequence left the batch",
        )
        freed_after = time.monotonic() - left_at
        generated = stats.generated_tokens
        time.sleep(0.5)
        assert ray.get(rank0.stats.remote()).generated_tokens == generated  # nothing runs on
        assert freed_after < 2.0, freed_after
        assert generated < LONG // 2
        reply = client.post("/v1/chat/completions", json=ask(max_tokens=4))
        assert reply.status_code == 200


async def first_unhealthy(client: httpx.AsyncClient, timeout_s: float) -> httpx.Response | None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        health = await client.get("/health")
        if health.status_code != 200:
            return health
        await asyncio.sleep(0.05)
    return None


def test_a_killed_tp_rank_fails_the_streams_and_the_replica_is_replaced(real_app):
    """A rank killed under load: the streams end with a typed error naming the rank (no Ray
    class names), ``/health`` says so within 2 s with a ``Retry-After`` of the expected
    rebuild, and the replica serves again on new ranks."""
    before = real_app.llm().describe.remote().result()

    async def scenario():
        async with httpx.AsyncClient(base_url=real_app.url, timeout=90) as client:
            streams = await start_streams(client, 3)
            rank1 = ray.get_actor(before["rank_names"][1], namespace=before["namespace"])
            ray.kill(rank1, no_restart=True)
            killed_at = time.monotonic()
            health = await first_unhealthy(client, 2.0)
            detected = time.monotonic() - killed_at
            ended = await asyncio.wait_for(asyncio.gather(*streams), 60)
            return ended, time.monotonic() - killed_at, health, detected, killed_at

    ended, took, health, detected, killed_at = asyncio.run(scenario())
    for lines in ended:  # each stream ended, with an error: no request hangs
        error = assert_ended_with_error(lines)
        assert not any(n in error["message"] for n in ("ActorDiedError", "RayActorError", "ActorUnavailable")), error
    assert took < 45, took
    assert health is not None, "/health said ok for 2 s after a rank was killed"
    assert health.status_code == 503 and "rank 1" in health.json()["error"]["message"], health.text
    assert int(health.headers["Retry-After"]) >= 1
    print(f"rank kill seen by /health after {detected:.2f}s")
    wait_replaced(real_app, before["rank_names"])
    print(f"serving again {time.monotonic() - killed_at:.1f}s after the kill")


def test_an_engine_step_that_raises_fails_every_request_in_flight(real_app):
    before = real_app.llm().describe.remote().result()

    async def scenario():
        async with httpx.AsyncClient(base_url=real_app.url, timeout=90) as client:
            streams = await start_streams(client, 3)
            whole = asyncio.create_task(
                client.post("/v1/chat/completions", json=ask(max_tokens=LONG))
            )
            await asyncio.sleep(0.3)
            poison = await client.post(
                "/v1/chat/completions", json=ask(f"please {FAULT_MARKER}", max_tokens=8)
            )
            ended = await asyncio.wait_for(asyncio.gather(*streams), 30)
            after = await client.post("/v1/chat/completions", json=ask(max_tokens=4))
            return ended, await asyncio.wait_for(whole, 30), poison, after

    ended, whole, poison, after = asyncio.run(scenario())
    for lines in ended:
        error = assert_ended_with_error(lines)
        assert "InjectedStepFault" in error["message"]
    for response in (whole, poison):
        assert response.status_code == 503, response.text
        assert response.headers["Retry-After"]
        assert "InjectedStepFault" in response.json()["error"]["message"]
    # until Serve restarts the replica: a designed 503, or already the new replica's answer
    assert after.status_code in (503, 200), after.text
    wait_replaced(real_app, before["rank_names"])
