"""HTTP routes of the conversation memory (an M-AI extension): list, search, add, read and
delete one user's long-term memories, and the tenant's usage. Thin: the tenant comes from
the API key, and each route calls the ``Ingress`` method of the same name."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response

from deployments.http.routes.openai import ingress_of, tenant_of
from deployments.protocol import (
    ErrorResponse,
    MemoriesDeleted,
    Memory,
    MemoryAdded,
    MemoryCreateRequest,
    MemoryDeleted,
    MemoryList,
    MemorySearchRequest,
    MemoryTurnRequest,
    MemoryUsage,
)

ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 503)}
USER = Query(min_length=1, max_length=256, description="Whose memory (within the caller's tenant).")

router = APIRouter(prefix="/v1/memories", tags=["memories"])


@router.get("", responses={200: {"model": MemoryList}, **ERRORS}, summary="List a user's memories")
async def list_memories(
    request: Request,
    user: str = USER,
    include_history: bool = Query(False, description="Superseded memories too."),
    limit: int = Query(100, ge=1, le=1_000),
    offset: int = Query(0, ge=0),
    tenant: str = Depends(tenant_of),
) -> Response:
    ingress = ingress_of(request)
    return JSONResponse(await ingress.list_memories(user, tenant, include_history, limit, offset))


@router.post(
    "/search", responses={200: {"model": MemoryList}, **ERRORS}, summary="Search a user's memories"
)
async def search_memories(
    body: MemorySearchRequest, request: Request, tenant: str = Depends(tenant_of)
) -> Response:
    return JSONResponse(await ingress_of(request).search_memories(body, tenant))


@router.post(
    "",
    responses={200: {"model": MemoryAdded}, 429: {"model": ErrorResponse}, **ERRORS},
    summary="Add a memory (deduplicated: a paraphrase updates, a new slot value supersedes)",
)
async def add_memory(
    body: MemoryCreateRequest, request: Request, tenant: str = Depends(tenant_of)
) -> Response:
    return JSONResponse(await ingress_of(request).add_memory(body, tenant))


@router.post(
    "/turns",
    responses={200: {"model": dict}, **ERRORS},
    summary="Absorb a turn of a conversation held elsewhere (speaker names and dates kept)",
)
async def add_memory_turn(
    body: MemoryTurnRequest, request: Request, tenant: str = Depends(tenant_of)
) -> Response:
    return JSONResponse(await ingress_of(request).add_memory_turn(body, tenant))


@router.get(
    "/usage", responses={200: {"model": MemoryUsage}, **ERRORS}, summary="The tenant's memory usage"
)
async def memory_usage(request: Request, tenant: str = Depends(tenant_of)) -> Response:
    return JSONResponse(await ingress_of(request).memory_usage(tenant))


@router.get("/{memory_id}", responses={200: {"model": Memory}, **ERRORS}, summary="One memory")
async def get_memory(
    memory_id: str, request: Request, user: str = USER, tenant: str = Depends(tenant_of)
) -> Response:
    return JSONResponse(await ingress_of(request).get_memory(memory_id, user, tenant))


@router.delete(
    "/{memory_id}", responses={200: {"model": MemoryDeleted}, **ERRORS}, summary="Delete one memory"
)
async def delete_memory(
    memory_id: str, request: Request, user: str = USER, tenant: str = Depends(tenant_of)
) -> Response:
    return JSONResponse(await ingress_of(request).delete_memory(memory_id, user, tenant))


@router.delete(
    "",
    responses={200: {"model": MemoriesDeleted}, **ERRORS},
    summary="Forget a user: memories, history, sessions' windows and summaries",
)
async def delete_memories(
    request: Request, user: str = USER, tenant: str = Depends(tenant_of)
) -> Response:
    return JSONResponse(await ingress_of(request).delete_memories(user, tenant))
