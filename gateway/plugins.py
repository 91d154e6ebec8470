"""A plugin manager per app, and the registries the ``register_*`` hooks fill."""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import pluggy

from gateway import hookspecs
from gateway.interfaces import Filter, Task, Trainer

T = TypeVar("T")

# The built-ins register through this same entry-point group (see pyproject.toml).
ENTRY_POINT_GROUP = hookspecs.PROJECT
BUILTIN_TASKS = ("classify", "extract", "passthrough", "rewrite")


class PluginError(RuntimeError):
    """A plugin that cannot be loaded, or that registers something invalid."""


class Registry(Generic[T]):
    """Named plugin objects of one kind; the core owns the names and rejects duplicates."""

    def __init__(self, kind: str, base: type) -> None:
        self.kind = kind
        self._base = base
        self._items: dict[str, type[T]] = {}

    def register(self, name: str, item: type[T]) -> None:
        if not isinstance(name, str) or not name:
            raise PluginError(f"{self.kind} names must be non-empty strings, got {name!r}")
        if not (isinstance(item, type) and issubclass(item, self._base)):
            raise PluginError(
                f"{self.kind} {name!r} must be a subclass of {self._base.__qualname__}"
            )
        if name in self._items and self._items[name] is not item:
            raise PluginError(f"{self.kind} {name!r} is registered twice")
        self._items[name] = item

    def get(self, name: str) -> type[T]:
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "none"
            raise KeyError(f"unknown {self.kind} {name!r} (registered: {known})") from None

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))


@dataclass
class Plugins:
    """Everything plugins contributed to one app."""

    manager: pluggy.PluginManager
    tasks: Registry[Task] = field(default_factory=lambda: Registry("task", Task))
    filters: Registry[Filter] = field(default_factory=lambda: Registry("filter", Filter))
    trainers: Registry[Trainer] = field(default_factory=lambda: Registry("trainer", Trainer))


def build_plugin_manager(extra_modules: Iterable[str] = ()) -> pluggy.PluginManager:
    """A fresh manager: entry-point plugins (built-ins included), then ``extra_modules``."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    for module_name in extra_modules:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise PluginError(f"plugins: cannot import {module_name!r}: {exc}") from exc
        if pm.is_registered(module):
            continue  # also installed through an entry point
        pm.register(module, name=module_name)
    # A hookimpl whose name matches no spec is a typo in a plugin: fail loudly at start-up.
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(str(exc)) from exc
    return pm


def load_plugins(extra_modules: Iterable[str] = ()) -> Plugins:
    pm = build_plugin_manager(extra_modules)
    plugins = Plugins(manager=pm)
    pm.hook.register_tasks(register=plugins.tasks.register)
    pm.hook.register_filters(register=plugins.filters.register)
    pm.hook.register_trainers(register=plugins.trainers.register)
    missing = [name for name in BUILTIN_TASKS if name not in plugins.tasks]
    if missing:
        raise PluginError(
            f"built-in task plugins {missing} are not registered: is distill-gateway installed "
            "(pip install -e .)? Built-ins load through the 'distill_gateway' entry points."
        )
    return plugins
