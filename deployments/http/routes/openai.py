"""HTTP routes of the OpenAI-compatible API: completions, models, health. Thin: each one
authenticates, lets FastAPI validate the body, and calls the ``Ingress`` method."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse, Response

from deployments.errors import error_response
from deployments.http.streaming import stream_response
from deployments.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelList,
)

ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 429, 503)}  # 404: unknown model
STREAM = {
    "text/event-stream": {
        "schema": {"type": "string"},
        "description": "with stream=true: SSE chunks",
    }
}

router = APIRouter()


def ingress_of(request: Request):
    return request.app.state.ingress


async def tenant_of(request: Request, authorization: str | None = Header(None)) -> str:
    """The caller's tenant from ``Authorization: Bearer <key>`` (401 without a valid key).

    ``async`` because it never blocks (a hash and a dict lookup): FastAPI runs a plain ``def``
    dependency in its thread pool, a thread hand-off on every request's path."""
    return ingress_of(request).auth.tenant(authorization)


def _json(model) -> JSONResponse:
    return JSONResponse(model.model_dump(mode="json"))


@router.post(
    "/v1/chat/completions",
    responses={200: {"model": ChatCompletionResponse, "content": STREAM}, **ERRORS},
    summary="Create a chat completion (streamed with stream=true)",
)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, tenant: str = Depends(tenant_of)
) -> Response:
    ingress = ingress_of(request)
    if body.stream:
        return await stream_response(
            ingress.chat_stream(body, tenant), ingress.serving.retry_after_s
        )
    return _json(await ingress.chat(body, tenant))


@router.post(
    "/v1/completions",
    responses={200: {"model": CompletionResponse, "content": STREAM}, **ERRORS},
    summary="Create a text completion (streamed with stream=true)",
)
async def completions(
    body: CompletionRequest, request: Request, tenant: str = Depends(tenant_of)
) -> Response:
    ingress = ingress_of(request)
    if body.stream:
        return await stream_response(
            ingress.complete_stream(body, tenant), ingress.serving.retry_after_s
        )
    return _json(await ingress.complete(body, tenant))


@router.get(
    "/v1/models",
    responses={200: {"model": ModelList}, 401: {"model": ErrorResponse}},
    summary="List the served models",
)
async def models(request: Request, tenant: str = Depends(tenant_of)) -> Response:
    return _json(ingress_of(request).list_models())


@router.get(
    "/health",
    responses={503: {"model": ErrorResponse}},
    summary="200 when every model's engine serves, 503 when one is dead",
)
async def health(request: Request) -> Response:
    ingress = ingress_of(request)
    try:
        return JSONResponse(await ingress.health())
    except Exception as exc:
        return error_response(exc, ingress.serving.retry_after_s)
