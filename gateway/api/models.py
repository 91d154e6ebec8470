"""GET /v1/models: the configured tasks and the pass-through model."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from gateway.api.deps import RuntimeDep

router = APIRouter(tags=["models"])


@router.get("/v1/models", summary="List the models (tasks) this gateway serves")
async def list_models(runtime: RuntimeDep) -> dict[str, Any]:
    data: list[dict[str, Any]] = [
        {
            "id": name,
            "object": "model",
            "created": 0,
            "owned_by": "distill-gateway",
            "task": task.task.__class__.__name__,
        }
        for name, task in runtime.tasks.items()
    ]
    default = runtime.settings.default_teacher
    if default is not None and default.model not in runtime.tasks:
        data.append(
            {
                "id": default.model,
                "object": "model",
                "created": 0,
                "owned_by": "distill-gateway",
                "task": None,
            }
        )
    return {"object": "list", "data": data}
