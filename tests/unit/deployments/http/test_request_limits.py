"""The body size limit, as an ASGI middleware in front of a small FastAPI app: 413 in the
OpenAI error format before the body is parsed, whether the size is declared or streamed."""

from __future__ import annotations

import asyncio

import httpx
from fastapi import FastAPI, Request

from deployments.http.request_limits import BodySizeLimit

LIMIT = 1000


def make_app() -> tuple[BodySizeLimit, list[bytes]]:
    seen: list[bytes] = []
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request) -> dict:
        body = await request.body()
        seen.append(body)
        return {"bytes": len(body)}

    @app.get("/ping")
    async def ping() -> dict:
        return {"ok": True}

    return BodySizeLimit(app, LIMIT), seen


async def call(method: str, path: str, **kwargs) -> httpx.Response:
    app, _ = make_app()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        return await c.request(method, path, **kwargs)


def test_a_body_within_the_limit_reaches_the_app_unchanged():
    app, seen = make_app()

    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.post("/echo", content=b"x" * LIMIT)

    response = asyncio.run(go())
    assert response.status_code == 200 and response.json() == {"bytes": LIMIT}
    assert seen == [b"x" * LIMIT]


def test_a_declared_size_above_the_limit_is_a_413_before_the_app_runs():
    app, seen = make_app()

    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.post("/echo", content=b"x" * (LIMIT + 1))

    response = asyncio.run(go())
    assert response.status_code == 413
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == 413
    assert f"{LIMIT + 1} bytes" in error["message"] and "max_request_bytes" in error["message"]
    assert seen == []


def test_a_streamed_body_is_cut_off_once_it_passes_the_limit():
    async def chunks():
        for _ in range(50):
            yield b"y" * 100

    response = asyncio.run(call("POST", "/echo", content=chunks()))
    assert response.status_code == 413
    assert f"limit of {LIMIT} bytes" in response.json()["error"]["message"]


def test_requests_without_a_body_pass():
    assert asyncio.run(call("GET", "/ping")).json() == {"ok": True}
