"""HTTP routes of server-side sessions (an M-AI extension): create, list, read, delete, and a
preview of the prompt the next turn would give the model. A chat request with ``session_id``
then sends only its new turn."""

from __future__ import annotations

from fastapi import APIRouter, Body, Depends, Request
from fastapi.responses import JSONResponse, Response

from deployments.http.routes.openai import ERRORS as CHAT_ERRORS
from deployments.http.routes.openai import ingress_of, tenant_of
from deployments.protocol import (
    ErrorResponse,
    SessionContextPreview,
    SessionCreateRequest,
    SessionDeleted,
    SessionInfo,
    SessionList,
    SessionTurnRequest,
)

ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404)}

router = APIRouter(prefix="/v1/sessions", tags=["sessions"])


@router.post(
    "",
    status_code=201,
    responses={201: {"model": SessionInfo}, **ERRORS},
    summary="Start a session (optionally with a system prompt)",
)
async def create_session(
    request: Request,
    body: SessionCreateRequest | None = Body(None),
    tenant: str = Depends(tenant_of),
) -> Response:
    info = await ingress_of(request).create_session(body or SessionCreateRequest(), tenant)
    return JSONResponse(info.model_dump(mode="json"), status_code=201)


@router.get(
    "", responses={200: {"model": SessionList}, **ERRORS}, summary="List the caller's sessions"
)
async def list_sessions(request: Request, tenant: str = Depends(tenant_of)) -> Response:
    return JSONResponse((await ingress_of(request).list_sessions(tenant)).model_dump(mode="json"))


@router.get(
    "/{session_id}",
    responses={200: {"model": SessionInfo}, **ERRORS},
    summary="A session with its messages",
)
async def get_session(
    session_id: str, request: Request, tenant: str = Depends(tenant_of)
) -> Response:
    return JSONResponse(
        (await ingress_of(request).get_session(session_id, tenant)).model_dump(mode="json")
    )


@router.delete(
    "/{session_id}",
    responses={200: {"model": SessionDeleted}, **ERRORS},
    summary="Delete a session",
)
async def delete_session(
    session_id: str, request: Request, tenant: str = Depends(tenant_of)
) -> Response:
    return JSONResponse(
        (await ingress_of(request).delete_session(session_id, tenant)).model_dump(mode="json")
    )


@router.post(
    "/{session_id}/context",
    # as a chat turn's: 404 an unknown session or model, 429 and 503 the model's queue or state
    responses={200: {"model": SessionContextPreview}, **CHAT_ERRORS},
    summary="Preview the prompt of the session's next turn (nothing generated or stored)",
)
async def preview_context(
    session_id: str,
    body: SessionTurnRequest,
    request: Request,
    tenant: str = Depends(tenant_of),
) -> Response:
    preview = await ingress_of(request).preview_context(session_id, body, tenant)
    return JSONResponse(preview.model_dump(mode="json"))
