"""What HTTP clients see when things go wrong: a client that hangs up mid-stream frees its
slot, a full queue answers 429 with Retry-After, a dead engine answers 503 until Serve has
replaced the replica. The real tiny engine throughout, paced (``FaultyEngine``'s
``step_delay_s``) where a stream must surely still run when the client hangs up."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
import ray

from tests.support.faulty_engine import FAULT_MARKER, FAULTY_ENGINE
from tests.support.serve_harness import app_config, wait_until

MODEL = "m-ai-tiny"


def ask(content: str = "hi", **fields):
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **fields}


def long_ask(**fields):
    """A stream that runs to its ``max_tokens`` (the random-weight model may sample EOS)."""
    return ask(max_tokens=2000, ignore_eos=True, **fields)


@pytest.fixture(scope="module")
def one_slot_app(serve_cluster):
    """One engine slot, one request in flight per replica, one more may wait: slow streams."""
    config = app_config(
        models=[{"max_num_seqs": 1}],
        max_ongoing_requests=1,
        max_queued_requests=1,
        retry_after_s=2.0,
    )
    deployed = serve_cluster.deploy(
        config,
        prefix="oneslot",
        engine_cls=FAULTY_ENGINE,
        engine_options={"step_delay_s": 0.04},  # 25 tokens/s at most
    )
    yield deployed
    deployed.delete()


def test_a_client_that_hangs_up_frees_its_slot(one_slot_app):
    url = f"{one_slot_app.url}/v1/chat/completions"
    engine = one_slot_app.rank0()
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", url, json=long_ask(stream=True)) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            events = response.iter_lines()
            assert next(e for e in events if e).startswith("data: {")
            assert ray.get(engine.stats.remote()).running == 1
        # the connection is closed here, long before 2000 tokens at 25 tokens/s
        stats = wait_until(
            lambda: (s := ray.get(engine.stats.remote())).running == 0 and s,
            timeout_s=5,
            what="slot freed after the client hung up",
        )
        assert stats.generated_tokens < 100

        started = time.monotonic()
        reply = client.post(url, json=ask(max_tokens=3))
        assert reply.status_code == 200 and time.monotonic() - started < 3


def test_a_client_that_gives_up_on_a_whole_answer_frees_its_slot(one_slot_app):
    engine = one_slot_app.rank0()
    with pytest.raises(httpx.ReadTimeout):  # the client hangs up after 1.5 s of 80
        httpx.post(
            f"{one_slot_app.url}/v1/chat/completions", json=long_ask(), timeout=1.5
        )
    stats = wait_until(
        lambda: (s := ray.get(engine.stats.remote())).running == 0 and s,
        timeout_s=5,
        what="slot freed after the client gave up",
    )
    assert stats.generated_tokens < 200


def test_a_full_queue_answers_429_with_retry_after(one_slot_app):
    url = f"{one_slot_app.url}/v1/chat/completions"
    engine = one_slot_app.rank0()

    async def scenario() -> httpx.Response:
        async with httpx.AsyncClient(timeout=30) as client:

            async def hold() -> None:  # a slow stream that keeps the one slot (then one queued)
                async with client.stream("POST", url, json=long_ask(stream=True)) as r:
                    async for _ in r.aiter_lines():
                        pass

            holders = [asyncio.create_task(hold())]
            await asyncio.sleep(1.0)
            holders.append(asyncio.create_task(hold()))
            await asyncio.sleep(1.0)
            try:
                return await client.post(url, json=ask(max_tokens=3))
            finally:
                for task in holders:
                    task.cancel()
                await asyncio.gather(*holders, return_exceptions=True)

    response = asyncio.run(scenario())
    assert response.status_code == 429, response.text
    assert response.headers["Retry-After"] == "2"
    error = response.json()["error"]
    assert error["type"] == "rate_limit_error" and "queue is full" in error["message"]
    wait_until(lambda: ray.get(engine.stats.remote()).running == 0, timeout_s=5, what="slots freed")


def test_a_dead_engine_answers_503_until_its_ranks_are_restarted(serve_cluster):
    # Health checks every 3 s: time to see the dead replica before Serve replaces it.
    # FaultyEngine: every engine step raises once a prompt holds FAULT_MARKER.
    app = serve_cluster.deploy(
        app_config(health_check_period_s=3.0),
        prefix="dying",
        engine_cls=FAULTY_ENGINE,
        engine_options={"step_delay_s": 0.01},  # 100 tokens/s at most
    )
    try:
        with httpx.Client(base_url=app.url, timeout=30) as client:
            assert client.get("/health").json()["status"] == "ok"
            with client.stream(
                "POST", "/v1/chat/completions", json=ask(max_tokens=1000, ignore_eos=True, stream=True)
            ) as live:
                lines = live.iter_lines()
                assert next(line for line in lines if line).startswith("data: {")
                died = client.post("/v1/chat/completions", json=ask(f"please {FAULT_MARKER}"))
                rest = [line for line in lines if line]
            # The stream that was running when the engine died ends with an error event.
            assert rest[-1] == "data: [DONE]"
            assert '"type":"service_unavailable"' in rest[-2].replace(" ", "")
            assert died.status_code == 503 and int(died.headers["Retry-After"]) >= 1
            assert died.json()["error"]["type"] == "service_unavailable"
            assert "InjectedStepFault" in died.json()["error"]["message"]  # the cause
            after = client.post("/v1/chat/completions", json=ask(max_tokens=4))
            # the replica restarts its rank group at once: a 503 saying why, or already served
            assert (after.status_code == 503 and "stopped" in after.json()["error"]["message"]) or (
                after.status_code == 200), after.text

            unhealthy = wait_until(
                lambda: (r := client.get("/health")).status_code == 503 and r,
                timeout_s=15,
                interval_s=0.1,
                what="/health 503",
            )
            assert unhealthy.json()["error"]["type"] == "service_unavailable"
            assert "Retry-After" in unhealthy.headers
            wait_until(
                lambda: client.get("/health").status_code == 200,
                timeout_s=60,
                interval_s=0.5,
                what="ranks restarted",
            )
            assert client.post("/v1/chat/completions", json=ask(max_tokens=4)).status_code == 200
    finally:
        app.delete()
