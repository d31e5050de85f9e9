"""Admin routes: ``GET /v1/diagnostics``, the bottleneck report of the cluster's requests, and
``GET /metrics``, the engines' state now in Prometheus text (vLLM's names)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response

from deployments.http.routes.openai import ingress_of, tenant_of
from deployments.protocol import ErrorResponse

router = APIRouter()


@router.get(
    "/v1/diagnostics",
    responses={code: {"model": ErrorResponse} for code in (400, 401, 404)},  # 404: unknown model
    summary="Where requests spend their time, the dominant stage and a recommendation",
)
async def diagnostics(
    request: Request,
    model: str | None = Query(None, description="One model; default (absent or empty): all of them."),
    window_s: float = Query(300.0, gt=0, description="Look-back: the report covers about this long."),
    tenant: str = Depends(tenant_of),
) -> Response:
    return JSONResponse(await ingress_of(request).diagnostics(model or None, window_s))


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    summary="Running and waiting requests of every model replica now (Prometheus text, vLLM names)",
)
async def metrics(request: Request) -> Response:
    from deployments.ingress.engine_metrics import CONTENT_TYPE

    text = await ingress_of(request).engine_metrics()
    return Response(text, media_type=CONTENT_TYPE)
