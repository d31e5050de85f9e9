"""HTTP routes of the Responses API (``/v1/responses``), conversations (``/v1/conversations``)
and embeddings (``/v1/embeddings``). Thin: authenticate, validate, call the ``Ingress``.

A streamed response is Server-Sent Events with the event type named twice, as OpenAI sends
them: ``event: response.output_text.delta`` then ``data: {"type": ..., ...}``; no ``[DONE]``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Body, Depends, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from cluster.errors import MAIError
from deployments.errors import error_event, error_response
from deployments.http.routes.openai import ingress_of, tenant_of
from deployments.http.streaming import SSE_HEADERS
from deployments.protocol import ErrorResponse
from deployments.protocol_responses import (
    ConversationCreateRequest,
    ConversationItemsRequest,
    EmbeddingRequest,
    ResponseCreateRequest,
)

ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 429, 503)}
OBJECT = {"content": {"application/json": {"schema": {"type": "object"}}}}
STREAM = {
    "text/event-stream": {"schema": {"type": "string"}, "description": "with stream=true: typed events"}
}

router = APIRouter(tags=["responses"])


def _typed_event(event: dict[str, Any]) -> str:
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"


async def _typed_events(first: dict[str, Any], rest: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
    try:
        yield _typed_event(first)
        async for event in rest:
            yield _typed_event(event)
    except MAIError as exc:
        body = error_event(exc)["error"]
        yield _typed_event({"type": "error", "code": body.get("type"), "message": body.get("message"),
                            "param": body.get("param")})
    finally:
        await rest.aclose()


@router.post(
    "/v1/responses",
    responses={200: {**OBJECT, "content": {**OBJECT["content"], **STREAM}}, **ERRORS},
    summary="Create a response (on a server-side session; streamed with stream=true)",
)
async def create_response(
    body: ResponseCreateRequest, request: Request, tenant: str = Depends(tenant_of)
) -> Response:
    ingress = ingress_of(request)
    if not body.stream:
        return JSONResponse(await ingress.create_response(body, tenant))
    events = ingress.create_response_stream(body, tenant)
    try:
        first = await events.__anext__()
    except MAIError as exc:
        await events.aclose()
        return error_response(exc, ingress.serving.retry_after_s)
    return StreamingResponse(_typed_events(first, events), media_type="text/event-stream", headers=SSE_HEADERS)


@router.get("/v1/responses/{response_id}", responses={200: OBJECT, **ERRORS}, summary="A stored response")
async def get_response(response_id: str, request: Request, tenant: str = Depends(tenant_of)) -> Response:
    return JSONResponse(await ingress_of(request).get_response(response_id, tenant))


@router.delete("/v1/responses/{response_id}", responses={200: OBJECT, **ERRORS}, summary="Delete a stored response")
async def delete_response(response_id: str, request: Request, tenant: str = Depends(tenant_of)) -> Response:
    return JSONResponse(await ingress_of(request).delete_response(response_id, tenant))


@router.post("/v1/conversations", responses={200: OBJECT, **ERRORS}, summary="Create a conversation")
async def create_conversation(
    request: Request,
    body: ConversationCreateRequest | None = Body(None),
    tenant: str = Depends(tenant_of),
) -> Response:
    return JSONResponse(await ingress_of(request).create_conversation(body, tenant))


@router.get("/v1/conversations/{conversation_id}", responses={200: OBJECT, **ERRORS}, summary="A conversation")
async def get_conversation(conversation_id: str, request: Request, tenant: str = Depends(tenant_of)) -> Response:
    return JSONResponse(await ingress_of(request).get_conversation(conversation_id, tenant))


@router.delete(
    "/v1/conversations/{conversation_id}", responses={200: OBJECT, **ERRORS}, summary="Delete a conversation"
)
async def delete_conversation(conversation_id: str, request: Request, tenant: str = Depends(tenant_of)) -> Response:
    return JSONResponse(await ingress_of(request).delete_conversation(conversation_id, tenant))


@router.get(
    "/v1/conversations/{conversation_id}/items", responses={200: OBJECT, **ERRORS},
    summary="The items of a conversation",
)
async def list_conversation_items(
    conversation_id: str,
    request: Request,
    limit: int = Query(20, ge=1, le=100),
    order: Literal["asc", "desc"] = Query("desc"),
    after: str | None = Query(None),
    tenant: str = Depends(tenant_of),
) -> Response:
    page = await ingress_of(request).list_conversation_items(conversation_id, tenant, limit, order, after)
    return JSONResponse(page)


@router.post(
    "/v1/conversations/{conversation_id}/items", responses={200: OBJECT, **ERRORS},
    summary="Add items to a conversation",
)
async def add_conversation_items(
    conversation_id: str, body: ConversationItemsRequest, request: Request, tenant: str = Depends(tenant_of)
) -> Response:
    return JSONResponse(await ingress_of(request).add_conversation_items(conversation_id, body, tenant))


@router.post("/v1/embeddings", responses={200: OBJECT, **ERRORS}, summary="Embed texts")
async def embeddings(body: EmbeddingRequest, request: Request, tenant: str = Depends(tenant_of)) -> Response:
    return JSONResponse(await ingress_of(request).embed(body, tenant))


__all__ = ["router"]
