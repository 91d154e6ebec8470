"""The app factory: ``create_app(settings)`` builds one self-contained gateway."""

from __future__ import annotations

import asyncio
import gc
import inspect
import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from gateway import __version__
from gateway.api import chat, health, models
from gateway.api.fast_chat import GatewayApp
from gateway.cascade import Cascade
from gateway.config import Settings, load_settings
from gateway.errors import install_error_handlers
from gateway.loop import DistillationLoop
from gateway.runtime import Runtime

log = logging.getLogger("distill_gateway")


def create_app(settings: Settings | None = None) -> FastAPI:
    """A gateway app for ``settings`` (default: $DISTILL_CONFIG_FILE or embedded defaults)."""
    settings = settings if settings is not None else load_settings()
    runtime = Runtime(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = runtime.store
        try:
            await asyncio.to_thread(store.ensure_schema)
        except Exception as exc:
            log.warning(
                "database not reachable at start-up (%s); records will be spooled until it is",
                str(exc).splitlines()[0][:200],
            )
        store.start()
        try:
            await runtime.students.refresh()
        except Exception as exc:
            log.warning("could not read the model registry: %s", str(exc).splitlines()[0])
        poller = asyncio.create_task(runtime.students.poll(settings.server.registry_poll_s))
        background = [poller]
        loop = None
        if settings.loop.enabled and runtime.trainable_tasks():

            async def after_round(summary: dict[str, Any]) -> None:
                runtime.metrics.count_round(summary)
                await runtime.students.refresh()  # swap in a promotion at once

            loop = DistillationLoop(
                settings,
                store.engine,
                runtime.registry,
                runtime.trainable_tasks(),
                on_round=after_round,
            )
            background.append(asyncio.create_task(loop.run_forever()))
        for result in runtime.plugins.manager.hook.startup(app=app, settings=settings):
            if inspect.isawaitable(result):
                await result
        log.info(
            "distill-gateway ready: %d task(s): %s",
            len(runtime.tasks),
            ", ".join(runtime.tasks) or "none",
        )
        if not runtime.tasks and settings.default_teacher is None:
            log.warning("no task and no default_teacher is configured, so every request "
                        "will be refused: pass --config (examples/config.yaml is one)")
        # Everything loaded so far (litellm, pydantic schemas, plugins) lives for the whole
        # process: move it out of the collector's reach so that full collections stay
        # short and do not show up as latency spikes.
        gc.collect()
        gc.freeze()
        # Background threads (the store writer, student inference) must not hold the GIL
        # for the default 5 ms while a request waits: hand it back after at most 1 ms.
        sys.setswitchinterval(0.001)
        try:
            yield
        finally:
            for job in background:
                job.cancel()
            if loop is not None:
                loop.close()
            await runtime.aclose()
            await asyncio.to_thread(store.stop)

    app = GatewayApp(
        title="distill-gateway",
        version=__version__,
        summary="OpenAI-compatible gateway that distils the teacher into a student",
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    app.state.cascade = Cascade(runtime)
    install_error_handlers(app)
    app.include_router(chat.router)
    app.include_router(models.router)
    app.include_router(health.router)
    return app


def app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory`` and multi-worker serving: reads $DISTILL_CONFIG_FILE."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    return create_app(load_settings())
