"""The FastAPI application of one ingress replica: routers plus the error handlers that give
every failure the OpenAI error body (FastAPI's 422 becomes 400 naming the field)."""

from __future__ import annotations

import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from cluster.errors import MAIError
from deployments.errors import error_response, validation_error
from deployments.http.replica_header import ReplicaHeader, replica_id
from deployments.http.request_limits import DEFAULT_MAX_REQUEST_BYTES, BodySizeLimit
from deployments.protocol import ErrorResponse

API_DESCRIPTION = """OpenAI-compatible API of M-AI (Llama 2 on Ray Serve), with server-side
sessions: create one with `POST /v1/sessions`, then send `session_id` with each chat request
and only the new turn in `messages`. Authenticate with `Authorization: Bearer <key>` when the
server has API keys configured. Errors use the OpenAI format
`{"error": {"message", "type", "param", "code"}}`; 429 and 503 carry `Retry-After`."""


def create_http_app(ingress: Any) -> FastAPI:
    from deployments.http.routes import admin as routes_admin
    from deployments.http.routes import memories as routes_memories
    from deployments.http.routes import openai as routes_openai
    from deployments.http.routes import responses as routes_responses
    from deployments.http.routes import sessions as routes_sessions

    app = FastAPI(
        title="M-AI",
        version="0.1.0",
        description=API_DESCRIPTION,
        responses={
            413: {"model": ErrorResponse, "description": "a body above serving.max_request_bytes"},
            422: {"model": ErrorResponse, "description": "never sent: bad bodies get 400"},
        },
    )
    app.state.ingress = ingress
    retry_after = ingress.serving.retry_after_s if ingress is not None else 1.0
    max_bytes = ingress.serving.max_request_bytes if ingress is not None else DEFAULT_MAX_REQUEST_BYTES
    app.add_middleware(BodySizeLimit, max_bytes=max_bytes)  # 413 before any parsing
    replica = replica_id()
    if replica is not None:  # around the routes and the size limit: 4xx answers name it too
        app.add_middleware(ReplicaHeader, replica=replica)

    async def on_validation_error(request: Request, exc: RequestValidationError) -> Response:
        return error_response(validation_error(list(exc.errors())), retry_after)

    async def on_mai_error(request: Request, exc: MAIError) -> Response:
        return error_response(exc, retry_after)

    async def on_http_error(request: Request, exc: StarletteHTTPException) -> Response:
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(
            exc.status_code, "invalid_request_error"
        )
        body = {
            "error": {
                "message": f"{exc.detail}: {request.method} {request.url.path}",
                "type": kind,
                "param": None,
                "code": exc.status_code,
            }
        }
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(allowed_methods(app, request.url.path, request))
        return JSONResponse(body, status_code=exc.status_code, headers=headers or None)

    async def on_any_error(request: Request, exc: Exception) -> Response:
        return error_response(exc, retry_after)

    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(MAIError, on_mai_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_any_error)
    app.include_router(routes_openai.router)
    app.include_router(routes_responses.router)
    app.include_router(routes_sessions.router)
    app.include_router(routes_memories.router)
    app.include_router(routes_admin.router)
    return app


def allowed_methods(app: FastAPI, path: str, request: Request | None = None) -> list[str]:
    """Every method the API documents at ``path`` (a 405's ``Allow``), read from the app's
    OpenAPI spec: FastAPI makes one route per method, and Starlette's own 405 names only the
    first route whose path matched."""
    if request is not None:
        root = request.scope.get("root_path", "")
        path = path[len(root):] if root and path.startswith(root) else path
    table = getattr(app.state, "allowed_methods", None)
    if table is None:
        table = app.state.allowed_methods = [
            (re.compile("^" + re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template)) + "$"),
             {m.upper() for m in operations})
            for template, operations in app.openapi()["paths"].items()
        ]
    methods: set[str] = set()
    literal = [(p, d) for p, d in table if "[^/]+" not in p.pattern and p.match(path)]
    for pattern, documented in literal or table:  # /v1/memories/usage is not /{memory_id}
        if pattern.match(path):
            methods |= documented
    if "GET" in methods:
        methods.add("HEAD")
    order = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
    return sorted(methods, key=lambda m: (order.index(m) if m in order else len(order), m))


__all__ = ["create_http_app", "API_DESCRIPTION", "allowed_methods"]
