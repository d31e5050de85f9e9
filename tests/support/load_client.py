"""The client side of the load tests: requests whose answers can be checked, sent at a rate
or with a fixed number in flight, each one classified as correct, a designed refusal (429 or
503 with Retry-After) or a failure (anything else: a 500, a wrong answer, a broken stream, no
answer within the client timeout).

The answers are checked against the real engine's greedy decoding, which a batch does not
change: request ``i`` asks prompt ``i % PROMPTS`` for its own number of tokens (``ignore_eos``),
so its answer is the start of that prompt's reference answer (``reference_answers``, asked
once before the load) with exactly that many tokens. An answer delivered to the wrong request
has another prompt's text or another length."""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass

import httpx

MODEL = "m-ai-tiny"
CLIENT_TIMEOUT_S = 60.0
PROMPTS = 32  # distinct prompts: request i asks prompt i % PROMPTS
MAX_TOKENS = 96  # a request asks for 40 to MAX_TOKENS tokens

# prompt number -> the greedy answer of MAX_TOKENS tokens
Answers = dict[int, str]


@dataclass
class Outcome:
    kind: str  # "ok", "refused" or "failed"
    status: int
    detail: str = ""
    latency_s: float = 0.0


def prompt(k: int) -> list[dict]:
    return [{"role": "user", "content": f"load request {k} about llamas"}]


def body(i: int, stream: bool, rng: random.Random) -> dict:
    """Request ``i``: prompt ``i % PROMPTS``, greedy, exactly ``max_tokens`` tokens."""
    fields = {"stream": True, "stream_options": {"include_usage": True}} if stream else {}
    return {
        "model": MODEL,
        "messages": prompt(i % PROMPTS),
        "max_tokens": rng.randrange(40, MAX_TOKENS + 1),
        "temperature": 0.0,
        "ignore_eos": True,
        **fields,
    }


async def reference_answers(url: str) -> Answers:
    """Each prompt's greedy answer of ``MAX_TOKENS`` tokens."""

    # Eight at a time: below any app's capacity here (the overload test's is 8 running and 8
    # queued), so no reference request is ever refused; a connection pool of 16 was not,
    # since a slot frees only after its answer left the server.
    gate = asyncio.Semaphore(8)

    async def ask(c: httpx.AsyncClient, k: int) -> str:
        async with gate:
            response = await c.post("/v1/chat/completions", json={
                "model": MODEL, "messages": prompt(k), "max_tokens": MAX_TOKENS,
                "temperature": 0.0, "ignore_eos": True,
            })
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["message"]["content"]

    async with client(url, 16) as c:
        texts = await asyncio.gather(*(ask(c, k) for k in range(PROMPTS)))
    assert len(set(texts)) > PROMPTS // 2, texts  # the prompts tell the answers apart
    return dict(enumerate(texts))


def check_answer(
    i: int, payload: dict, text: str, finish: str | None, tokens: int | None, answers: Answers
) -> str:
    """'' when the answer is the one request ``i`` must get, else what is wrong."""
    reference = answers[i % PROMPTS]
    # a last token that ends inside a UTF-8 character decodes to U+FFFD
    if not text or not reference.startswith(text.rstrip("\ufffd")):
        return f"answer of request {i} is not its prompt's: {text[:80]!r} vs {reference[:80]!r}"
    if finish != "length":
        return f"finish_reason={finish!r}"
    if tokens != payload["max_tokens"]:
        return f"{tokens} completion tokens, request {i} asked {payload['max_tokens']}"
    return ""


def refused(response: httpx.Response) -> bool:
    return response.status_code in (429, 503) and bool(response.headers.get("Retry-After"))


async def send(
    client: httpx.AsyncClient, i: int, stream: bool, rng: random.Random, answers: Answers
) -> Outcome:
    start = time.monotonic()
    try:
        outcome = await asyncio.wait_for(
            _send(client, i, stream, rng, answers), CLIENT_TIMEOUT_S
        )
    except (asyncio.TimeoutError, httpx.TimeoutException):
        return Outcome("failed", 0, f"no answer within {CLIENT_TIMEOUT_S:.0f}s (a hang)")
    except httpx.HTTPError as exc:
        return Outcome("failed", 0, f"{type(exc).__name__}: {exc}")
    outcome.latency_s = time.monotonic() - start
    return outcome


async def _send(
    client: httpx.AsyncClient, i: int, stream: bool, rng: random.Random, answers: Answers
) -> Outcome:
    payload = body(i, stream, rng)
    if not stream:
        response = await client.post("/v1/chat/completions", json=payload)
        if response.status_code != 200:
            kind = "refused" if refused(response) else "failed"
            return Outcome(kind, response.status_code, response.text[:200])
        answer = response.json()
        choice = answer["choices"][0]
        wrong = check_answer(
            i, payload, choice["message"]["content"], choice["finish_reason"],
            answer["usage"]["completion_tokens"], answers,
        )
        return Outcome("failed" if wrong else "ok", 200, wrong)
    async with client.stream("POST", "/v1/chat/completions", json=payload) as response:
        if response.status_code != 200:
            await response.aread()
            kind = "refused" if refused(response) else "failed"
            return Outcome(kind, response.status_code, response.text[:200])
        text, finish, tokens, done = [], None, None, False
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
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    if not done:
        return Outcome("failed", 200, "the stream ended without [DONE]")
    wrong = check_answer(i, payload, "".join(text), finish, tokens, answers)
    return Outcome("failed" if wrong else "ok", 200, wrong)


def client(url: str, in_flight: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=in_flight, max_keepalive_connections=in_flight)
    return httpx.AsyncClient(base_url=url, limits=limits, timeout=CLIENT_TIMEOUT_S)


async def closed_loop(
    url: str, answers: Answers, n: int, in_flight: int, first: int = 0
) -> tuple[list[Outcome], float]:
    """``n`` requests, ``in_flight`` at a time; returns the outcomes and the wall time."""
    rng = random.Random(first)
    queue = list(range(first, first + n))
    outcomes: list[Outcome] = []
    async with client(url, in_flight) as c:

        async def worker() -> None:
            while queue:
                i = queue.pop()
                outcomes.append(await send(c, i, i % 2 == 0, rng, answers))

        start = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(in_flight)))
        return outcomes, time.monotonic() - start


async def open_loop(
    url: str, answers: Answers, n: int, rate: float, first: int = 0
) -> tuple[list[Outcome], float]:
    """``n`` requests arriving as a Poisson process of ``rate`` per second."""
    rng = random.Random(first)
    async with client(url, 512) as c:
        start = time.monotonic()
        tasks = []
        for i in range(first, first + n):
            tasks.append(asyncio.create_task(send(c, i, i % 2 == 0, rng, answers)))
            await asyncio.sleep(rng.expovariate(rate))
        outcomes = await asyncio.gather(*tasks)
        return list(outcomes), time.monotonic() - start
