"""Typed dependencies: the app's runtime and cascade, reached from the request.

They are ``async def`` although they do not await: FastAPI runs a plain ``def``
dependency in its thread pool, two thread hand-offs per request (measured with a classify
student under 32 connections: 246 -> 282 req/s, both under a sampling profiler).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from gateway.cascade import Cascade
from gateway.runtime import Runtime


async def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


async def get_cascade(request: Request) -> Cascade:
    cascade: Cascade = request.app.state.cascade
    return cascade


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
CascadeDep = Annotated[Cascade, Depends(get_cascade)]
