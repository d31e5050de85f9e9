"""Mid-stream migration over HTTP, on the real engine with two replicas (``serving.migration``):
the model replica that streams a long greedy answer is killed by pid halfway, and the client's
stream goes on from the other replica to the end, with the very text and token count of the
same request answered without interruption.

Which replica streams it is read from ``GET /metrics`` (each replica's engine reports its
running requests there)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time

import httpx
import pytest
import ray

from tests.support.serve_harness import app_config, wait_until

MODEL = "m-ai-tiny"
TOKENS = 600


def body(**fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": TOKENS, "ignore_eos": True, "temperature": 0.0, **fields}


def running(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {replica: float(value) for replica, value in re.findall(
        rf'^vllm:num_requests_running{{model_name="{MODEL}",replica="([^"]+)"}} (\S+)$', text, re.M)}


def replica_pid(app_name: str, replica: str) -> int:
    """The pid of the LLMServer replica actor whose Serve replica id is ``replica``."""
    for info in ray._private.state.actors().values():
        name = info.get("Name") or ""
        if info.get("State") == "ALIVE" and name.startswith(f"SERVE_REPLICA::{app_name}#llm-") and name.endswith(f"#{replica}"):
            return int(info["Pid"])
    raise LookupError(f"no live replica {replica} of {app_name}")


async def read_stream(client: httpx.AsyncClient, chunks: list[dict]) -> None:
    async with client.stream("POST", "/v1/chat/completions",
                             json=body(stream=True, stream_options={"include_usage": True})) as response:
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
    wait_until(lambda: len(running(app.url)) == 2, timeout_s=120, what="both replicas reporting")
    yield app
    app.delete()


def test_a_stream_whose_replica_is_killed_goes_on_identical_on_the_other_replica(two_replicas):
    app = two_replicas
    with httpx.Client(base_url=app.url, timeout=300) as http:
        reference = http.post("/v1/chat/completions", json=body())
    assert reference.status_code == 200, reference.text
    want = reference.json()

    async def scenario() -> tuple[list[dict], float, int]:
        chunks: list[dict] = []
        async with httpx.AsyncClient(base_url=app.url, timeout=300) as client:
            stream = asyncio.create_task(read_stream(client, chunks))
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

    chunks, killed_at, before = asyncio.run(scenario())
    assert not any("error" in c for c in chunks), [c for c in chunks if "error" in c]
    after = [c for c in chunks if c["at"] > killed_at]
    assert before < len(chunks) and after, "the stream had ended before the kill"
    assert text_of(chunks) == want["choices"][0]["message"]["content"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    usage = chunks[-1]["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (want["usage"]["prompt_tokens"], TOKENS)
    print(f"resumed {after[0]['at'] - killed_at:.2f} s after the kill, {before} chunks before it")
