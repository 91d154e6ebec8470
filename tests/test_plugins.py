"""Every hook, exercised through a third-party plugin installed the way pip installs one."""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from gateway import hookspecs
from gateway.app import create_app
from gateway.interfaces import Task
from gateway.plugins import PluginError, Registry, load_plugins
from gateway.testing.teacher_server import TeacherServer
from tests.conftest import make_settings
from tests.servers import GatewayServer

DOCS = Path(__file__).resolve().parent.parent / "docs" / "plugins.md"

PLUGIN_SOURCE = '''
from pathlib import Path
from typing import Any

from gateway.hookspecs import hookimpl
from gateway.interfaces import Example, Filter, InvalidTarget, Student, Task, Trainer

EVENTS: list[Any] = []


class ShoutTask(Task):
    """Answers are upper-case words; targets are their lower-case form."""

    def task_input(self, request):
        return request.last_user_text()

    def parse_target(self, answer):
        if not answer.isupper():
            raise InvalidTarget("not shouted")
        return answer.lower()

    def render(self, target):
        return str(target).upper()


class DropShortFilter(Filter):
    def apply(self, example, task):
        return example if len(example.input) > 3 else None


class MemoTrainer(Trainer):
    def train(self, examples, task, out_dir):
        return {"n": len(examples)}

    def load(self, artifact_dir, task):
        raise NotImplementedError


@hookimpl
def register_tasks(register):
    register("shout", ShoutTask)


@hookimpl
def register_filters(register):
    register("drop-short", DropShortFilter)


@hookimpl
def register_trainers(register):
    register("memo", MemoTrainer)


@hookimpl
async def startup(app, settings):
    EVENTS.append(("startup", app.title, sorted(settings.tasks)))


@hookimpl
def exchange_recorded(record):
    EVENTS.append(("recorded", record.id, record.task, record.target))
'''


@pytest.fixture
def installed_plugin(tmp_path: Path) -> Iterator[object]:
    """Install a plugin distribution (module + dist-info with an entry point) on sys.path."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "shout_plugin.py").write_text(PLUGIN_SOURCE)
    dist = site / "shout_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: shout-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[distill_gateway]\nshout = shout_plugin\n")
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    try:
        yield importlib.import_module("shout_plugin")
    finally:
        sys.path.remove(str(site))
        sys.modules.pop("shout_plugin", None)
        importlib.invalidate_caches()


def test_builtins_come_through_the_entry_point_group() -> None:
    plugins = load_plugins()
    names = {name for name, _ in plugins.manager.list_name_plugin()}
    assert {"classify", "extract", "passthrough", "rewrite"} <= names
    assert list(plugins.tasks) == ["classify", "extract", "passthrough", "rewrite"]


def test_third_party_task_through_the_api(
    installed_plugin: object, tmp_path: Path, teacher: TeacherServer
) -> None:
    events = installed_plugin.EVENTS  # type: ignore[attr-defined]
    teacher.responder = lambda body: "HELLO WORLD"
    settings = make_settings(tmp_path, teacher, tasks={"shouting": {"plugin": "shout"}})
    app = create_app(settings)
    plugins = app.state.runtime.plugins
    assert "drop-short" in plugins.filters and "memo" in plugins.trainers
    with GatewayServer(app) as gateway:
        assert ("startup", "distill-gateway", ["shouting"]) in events
        client = openai.OpenAI(base_url=gateway.base_url, api_key="k", max_retries=0)
        raw = client.chat.completions.with_raw_response.create(
            model="shouting", messages=[{"role": "user", "content": "hi"}]
        )
        assert raw.parse().choices[0].message.content == "HELLO WORLD"
        assert app.state.runtime.store.flush(10)
        recorded = [e for e in events if e[0] == "recorded"]
        assert recorded == [
            ("recorded", raw.headers["x-distill-request-id"], "shouting", "hello world")
        ]
        row = app.state.runtime.store.fetch(task="shouting")[0]
        assert row["target"] == "hello world"


def test_plugin_from_config_list(
    tmp_path: Path, installed_plugin: object, teacher: TeacherServer
) -> None:
    # The same module named in `plugins:` is not registered twice.
    settings = make_settings(tmp_path, teacher, plugins=["shout_plugin"])
    assert "shout" in create_app(settings).state.runtime.plugins.tasks
    with pytest.raises(PluginError, match="cannot import 'no_such_plugin'"):
        load_plugins(["no_such_plugin"])


def test_misnamed_hook_is_refused(tmp_path: Path) -> None:
    (tmp_path / "typo_plugin.py").write_text(
        "from gateway.hookspecs import hookimpl\n\n@hookimpl\ndef register_task(register):\n"
        "    pass\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        with pytest.raises(PluginError, match="register_task"):
            load_plugins(["typo_plugin"])
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("typo_plugin", None)


def test_registry_owns_names() -> None:
    registry: Registry[Task] = Registry("task", Task)
    from plugins.classify import ClassifyTask
    from plugins.passthrough import PassthroughTask

    registry.register("x", ClassifyTask)
    registry.register("x", ClassifyTask)  # the same object again is harmless
    with pytest.raises(PluginError, match="registered twice"):
        registry.register("x", PassthroughTask)
    with pytest.raises(PluginError, match="subclass of Task"):
        registry.register("y", dict)  # type: ignore[arg-type]
    with pytest.raises(KeyError, match="registered: x"):
        registry.get("z")


def test_every_hook_is_documented_with_its_signature() -> None:
    import inspect

    text = DOCS.read_text()
    specs = [
        name
        for name, value in vars(hookspecs).items()
        if callable(value) and hasattr(value, "distill_gateway_spec")
    ]
    assert {
        "register_tasks",
        "register_filters",
        "register_trainers",
        "startup",
        "exchange_recorded",
    } <= set(specs)
    for name in specs:
        signature = f"{name}{inspect.signature(getattr(hookspecs, name))}"
        signature = re.sub(r"\s+", " ", signature.replace("'", ""))
        assert signature in text, f"docs/plugins.md lacks `{signature}`"
