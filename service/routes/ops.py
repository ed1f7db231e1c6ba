"""Operations routes: liveness, readiness, what is served, metrics.

Liveness and readiness answer HEAD like GET (status and headers, no body): load balancers probe with HEAD. /info
and /readyz are unauthenticated, so they carry names and sha256 hashes, never server paths (service.redact)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from service.deps import EngineDep, MetricsDep
from service.metrics import CONTENT_TYPE_LATEST
from service.redact import redact_paths

__all__ = ["router"]

router = APIRouter(tags=["operations"])


@router.get("/healthz", summary="Liveness: the process answers and its batcher is alive")
@router.head("/healthz", include_in_schema=False)  # the same answer without a body
async def healthz(engine: EngineDep) -> JSONResponse:
    alive = engine.alive
    return JSONResponse(
        {"status": "alive" if alive else "dead", "model_status": engine.status}, status_code=200 if alive else 503
    )


@router.head("/readyz", include_in_schema=False)
@router.get(
    "/readyz",
    summary="Readiness: loaded, warmed up, self-checked, not draining",
    responses={503: {"description": "loading, failed, or draining"}},
)
async def readyz(engine: EngineDep) -> JSONResponse:
    ready = engine.ready
    body: dict[str, Any] = {"status": engine.status if not ready else "ready", "reason": redact_paths(engine.reason)}
    if engine.golden is not None:
        body["self_check"] = engine.golden.status
    return JSONResponse(body, status_code=200 if ready else 503, headers={} if ready else {"Retry-After": "1"})


@router.get("/info", summary="Model, backend, limits, self-check result and embedding recipes")
async def info(engine: EngineDep) -> JSONResponse:
    return JSONResponse(redact_paths(engine.describe()))


@router.get("/metrics", summary="Prometheus exposition", response_class=Response)
async def metrics(metrics: MetricsDep, engine: EngineDep) -> Response:
    if engine.batcher is not None:
        metrics.queue_depth.set(engine.batcher.queue_depth)
    return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
