"""The client side of the load tests: requests whose answers can be checked, sent at a rate
or with a fixed number in flight, each one classified as correct, a designed refusal (429 or
503 with Retry-After) or a failure (anything else: a 500, a wrong answer, a broken stream, no
answer within the client timeout)."""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass

import httpx

MODEL = "m-ai-tiny"
CLIENT_TIMEOUT_S = 60.0


@dataclass
class Outcome:
    kind: str  # "ok", "refused" or "failed"
    status: int
    detail: str = ""
    latency_s: float = 0.0


def body(i: int, stream: bool, rng: random.Random) -> dict:
    """Request ``i``: the echoing fake engine answers with its prompt, which names ``i``."""
    fields = {"stream": True} if stream else {}
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"load request {i} about llamas"}],
        "max_tokens": rng.randrange(40, 96),
        "temperature": 0.0,
        **fields,
    }


def check_answer(i: int, text: str, finish: str | None) -> str:
    """'' when the answer is the one request ``i`` must get, else what is wrong."""
    if f"load request {i} " not in text:
        return f"answer of request {i} does not name it: {text[:80]!r}"
    if finish not in ("stop", "length"):
        return f"finish_reason={finish!r}"
    return ""


def refused(response: httpx.Response) -> bool:
    return response.status_code in (429, 503) and bool(response.headers.get("Retry-After"))


async def send(client: httpx.AsyncClient, i: int, stream: bool, rng: random.Random) -> Outcome:
    start = time.monotonic()
    try:
        outcome = await asyncio.wait_for(_send(client, i, stream, rng), CLIENT_TIMEOUT_S)
    except (asyncio.TimeoutError, httpx.TimeoutException):
        return Outcome("failed", 0, f"no answer within {CLIENT_TIMEOUT_S:.0f}s (a hang)")
    except httpx.HTTPError as exc:
        return Outcome("failed", 0, f"{type(exc).__name__}: {exc}")
    outcome.latency_s = time.monotonic() - start
    return outcome


async def _send(client: httpx.AsyncClient, i: int, stream: bool, rng: random.Random) -> Outcome:
    payload = body(i, stream, rng)
    if not stream:
        response = await client.post("/v1/chat/completions", json=payload)
        if response.status_code != 200:
            kind = "refused" if refused(response) else "failed"
            return Outcome(kind, response.status_code, response.text[:200])
        choice = response.json()["choices"][0]
        wrong = check_answer(i, choice["message"]["content"], choice["finish_reason"])
        return Outcome("failed" if wrong else "ok", 200, wrong)
    async with client.stream("POST", "/v1/chat/completions", json=payload) as response:
        if response.status_code != 200:
            await response.aread()
            kind = "refused" if refused(response) else "failed"
            return Outcome(kind, response.status_code, response.text[:200])
        text, finish, done = [], None, False
        async for line in response.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return Outcome("failed", 200, f"error event: {chunk['error']}")
                for choice in chunk.get("choices", []):
                    text.append(choice["delta"].get("content") or "")
                    finish = choice.get("finish_reason") or finish
    if not done:
        return Outcome("failed", 200, "the stream ended without [DONE]")
    wrong = check_answer(i, "".join(text), finish)
    return Outcome("failed" if wrong else "ok", 200, wrong)


def client(url: str, in_flight: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=in_flight, max_keepalive_connections=in_flight)
    return httpx.AsyncClient(base_url=url, limits=limits, timeout=CLIENT_TIMEOUT_S)


async def closed_loop(url: str, n: int, in_flight: int, first: int = 0) -> tuple[list[Outcome], float]:
    """``n`` requests, ``in_flight`` at a time; returns the outcomes and the wall time."""
    rng = random.Random(first)
    queue = list(range(first, first + n))
    outcomes: list[Outcome] = []
    async with client(url, in_flight) as c:

        async def worker() -> None:
            while queue:
                i = queue.pop()
                outcomes.append(await send(c, i, i % 2 == 0, rng))

        start = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(in_flight)))
        return outcomes, time.monotonic() - start


async def open_loop(url: str, n: int, rate: float, first: int = 0) -> tuple[list[Outcome], float]:
    """``n`` requests arriving as a Poisson process of ``rate`` per second."""
    rng = random.Random(first)
    async with client(url, 512) as c:
        start = time.monotonic()
        tasks = []
        for i in range(first, first + n):
            tasks.append(asyncio.create_task(send(c, i, i % 2 == 0, rng)))
            await asyncio.sleep(rng.expovariate(rate))
        outcomes = await asyncio.gather(*tasks)
        return list(outcomes), time.monotonic() - start
