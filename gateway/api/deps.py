"""Typed dependencies: the app's runtime and cascade, reached from the request."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from gateway.cascade import Cascade
from gateway.runtime import Runtime


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


def get_cascade(request: Request) -> Cascade:
    cascade: Cascade = request.app.state.cascade
    return cascade


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
CascadeDep = Annotated[Cascade, Depends(get_cascade)]
