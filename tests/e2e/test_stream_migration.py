"""Mid-stream migration over HTTP, on the real engine with two replicas (``serving.migration``):
the model replica that streams a long greedy answer is killed by pid halfway, and the client's
stream goes on from the other replica to the end, with the very text and token count of the
same request answered without interruption. The same holds for a session's stream (session
affinity must let it leave its dead replica) and for a whole (non-streamed) answer.

Which replica streams it is read from ``GET /metrics`` (each replica's engine reports its
running requests there)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import httpx
import pytest
import ray

from tests.support.replica_metrics import per_replica, routed_to_both
from tests.support.serve_harness import app_config, wait_until

MODEL = "m-ai-tiny"
TOKENS = 600


def body(**fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": TOKENS, "ignore_eos": True, "temperature": 0.0, **fields}


def running(url: str) -> dict[str, float]:
    return per_replica(url, MODEL)


def replica_pid(app_name: str, replica: str) -> int:
    """The pid of the LLMServer replica actor whose Serve replica id is ``replica``."""
    for info in ray._private.state.actors().values():
        name = info.get("Name") or ""
        if info.get("State") == "ALIVE" and name.startswith(f"SERVE_REPLICA::{app_name}#llm-") and name.endswith(f"#{replica}"):
            return int(info["Pid"])
    raise LookupError(f"no live replica {replica} of {app_name}")


async def read_stream(client: httpx.AsyncClient, chunks: list[dict], **fields) -> None:
    async with client.stream("POST", "/v1/chat/completions",
                             json=body(stream=True, stream_options={"include_usage": True}, **fields)) as response:
        assert response.status_code == 200, (await response.aread()).decode()
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append({**json.loads(line[len("data: "):]), "at": time.monotonic()})


def text_of(chunks: list[dict]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))


@pytest.fixture(scope="module")
def two_replicas(serve_cluster):
    config = app_config(models=[{"max_num_seqs": 4, "temperature": 0.0}], min_replicas=2, max_replicas=2)
    app = serve_cluster.deploy(config, prefix="migrate", engine_cls=None)
    yield app
    app.delete()


def killed_mid_stream(app, **fields) -> tuple[list[dict], float, int]:
    """The chunks of one stream whose replica is killed by pid after its 20th chunk, the
    time of the kill and the chunks received before it."""

    async def scenario() -> tuple[list[dict], float, int]:
        chunks: list[dict] = []
        async with httpx.AsyncClient(base_url=app.url, timeout=300) as client:
            stream = asyncio.create_task(read_stream(client, chunks, **fields))
            while len(chunks) < 20:  # well under way
                assert not stream.done(), stream.exception()
                await asyncio.sleep(0.02)
            busy = await asyncio.to_thread(
                wait_until, lambda: [r for r, n in running(app.url).items() if n >= 1], 30, 0.05, "a busy replica")
            assert len(busy) == 1, busy  # the one request runs on one replica
            pid = await asyncio.to_thread(replica_pid, app.name, busy[0])
            os.kill(pid, signal.SIGKILL)
            killed_at, before = time.monotonic(), len(chunks)
            await asyncio.wait_for(stream, 300)
        return chunks, killed_at, before

    # both replicas serve (a replica killed by an earlier test has been restarted)
    wait_until(lambda: routed_to_both(app.url, MODEL, body(max_tokens=4)), timeout_s=180, interval_s=0.5, what="requests reaching both replicas")
    return asyncio.run(scenario())


def assert_identical(chunks: list[dict], killed_at: float, before: int, want: dict) -> None:
    assert not any("error" in c for c in chunks), [c for c in chunks if "error" in c]
    after = [c for c in chunks if c["at"] > killed_at]
    assert before < len(chunks) and after, "the stream had ended before the kill"
    assert text_of(chunks) == want["choices"][0]["message"]["content"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    usage = chunks[-1]["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (want["usage"]["prompt_tokens"], TOKENS)
    print(f"resumed {after[0]['at'] - killed_at:.2f} s after the kill, {before} chunks before it")


def test_a_stream_whose_replica_is_killed_goes_on_identical_on_the_other_replica(two_replicas):
    with httpx.Client(base_url=two_replicas.url, timeout=300) as http:
        reference = http.post("/v1/chat/completions", json=body())
    assert reference.status_code == 200, reference.text
    assert_identical(*killed_mid_stream(two_replicas), reference.json())


def test_a_session_stream_leaves_its_dead_replica_and_the_session_keeps_the_whole_answer(two_replicas):
    """Session affinity sends the session's requests to one replica: the resumption must not
    wait for that replica, but go to the other."""
    with httpx.Client(base_url=two_replicas.url, timeout=300) as http:
        first, second = (http.post("/v1/sessions", json={}).json()["id"] for _ in range(2))
        reference = http.post("/v1/chat/completions", json=body(session_id=first))
        assert reference.status_code == 200, reference.text
        chunks, killed_at, before = killed_mid_stream(two_replicas, session_id=second)
        assert_identical(chunks, killed_at, before, reference.json())
        assert chunks[-1]["at"] - killed_at < 60  # not after a restart of the session's replica
        stored = http.get(f"/v1/sessions/{second}").json()["messages"]
    assert stored[-1] == {"role": "assistant", "content": text_of(chunks)} or (
        stored[-1]["role"] == "assistant" and stored[-1]["content"] == text_of(chunks)), stored[-1]


def test_a_whole_answer_whose_replica_is_killed_is_answered_identical(two_replicas):
    app = two_replicas
    with httpx.Client(base_url=app.url, timeout=300) as http:
        want = http.post("/v1/chat/completions", json=body())
        assert want.status_code == 200, want.text
        wait_until(lambda: routed_to_both(app.url, MODEL, body(max_tokens=4)), timeout_s=180, interval_s=0.5, what="requests reaching both replicas")

        async def scenario() -> httpx.Response:
            async with httpx.AsyncClient(base_url=app.url, timeout=300) as client:
                answer = asyncio.create_task(client.post("/v1/chat/completions", json=body()))
                busy = await asyncio.to_thread(
                    wait_until, lambda: [r for r, n in running(app.url).items() if n >= 1], 30, 0.05, "a busy replica")
                await asyncio.sleep(1.0)  # some tokens generated
                assert not answer.done()
                os.kill(await asyncio.to_thread(replica_pid, app.name, busy[0]), signal.SIGKILL)
                return await asyncio.wait_for(answer, 300)

        got = asyncio.run(scenario())
    assert got.status_code == 200, got.text
    assert got.json()["choices"][0]["message"] == want.json()["choices"][0]["message"]
    assert got.json()["usage"] == want.json()["usage"]
