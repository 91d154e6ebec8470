"""Every hook a distill-gateway plugin can implement (pluggy project ``distill_gateway``).

A plugin is a module or object with functions decorated by ``@hookimpl`` and named like
the specs below; it is found through the ``distill_gateway`` entry-point group (built-ins
too) or the ``plugins:`` list of the config file. See docs/plugins.md.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from fastapi import FastAPI

    from gateway.config import Settings
    from gateway.interfaces import Filter, Task, Trainer
    from gateway.store.records import ExchangeRecord

PROJECT = "distill_gateway"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_tasks(register: Callable[[str, type[Task]], None]) -> None:
    """Register task classes: ``register("classify", ClassifyTask)``.

    The name is what a config's ``tasks.<name>.plugin`` refers to. Registering a name
    twice (in any plugin) is an error at start-up.
    """


@hookspec
def register_filters(register: Callable[[str, type[Filter]], None]) -> None:
    """Register data filter classes: ``register("pii", PiiFilter)``."""


@hookspec
def register_trainers(register: Callable[[str, type[Trainer]], None]) -> None:
    """Register trainer classes: ``register("embedding-classifier", EmbeddingTrainer)``."""


@hookspec
def startup(app: FastAPI, settings: Settings) -> Awaitable[None] | None:
    """Called once when the app starts serving; may return an awaitable, which is awaited."""


@hookspec
def exchange_recorded(record: ExchangeRecord) -> None:
    """Called after an exchange is durably recorded (in the database or the spool file).

    Runs in the store's writer thread, never on the event loop: keep it quick, and do not
    touch the event loop from it. Exceptions are logged and ignored.
    """
