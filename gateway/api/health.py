"""Liveness, readiness (the store is reachable) and Prometheus metrics."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from starlette.responses import JSONResponse, Response

from gateway.api.deps import RuntimeDep

router = APIRouter(tags=["operations"])


@router.get("/healthz", summary="The process is up")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="The store is reachable")
async def readyz(runtime: RuntimeDep) -> Response:
    store = runtime.store
    try:
        await asyncio.wait_for(asyncio.to_thread(store.ping), timeout=5.0)
    except Exception as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        return JSONResponse(
            {
                "status": "unavailable",
                "store": "unreachable",
                "reason": reason,
                "queued": store.queue_depth,
            },
            status_code=503,
        )
    return JSONResponse({"status": "ready", "store": "ok", "queued": store.queue_depth})


@router.get("/metrics", summary="Prometheus metrics")
async def metrics(runtime: RuntimeDep) -> Response:
    body, content_type = runtime.metrics.render()
    return Response(body, media_type=content_type)
