from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import pytest
import sqlalchemy as sa

from gateway.app import create_app
from gateway.config import Settings, load_settings
from gateway.feature_cache import CACHE_ENV
from gateway.testing.teacher_server import TeacherServer
from tests.servers import GatewayServer

PG_ADMIN_URL = os.environ.get(
    "DISTILL_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
LABELS = ["card_arrival", "card_linking", "exchange_rate"]


@pytest.fixture(scope="session", autouse=True)
def _feature_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Trainers and the dedup filter keep features beside a round's artifacts (outside a
    round in ./artifacts/features): the tests share a cache of their own instead (CLI
    subprocesses inherit it)."""
    if CACHE_ENV in os.environ:
        yield
        return
    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("features"))
    yield
    del os.environ[CACHE_ENV]


@pytest.fixture(scope="session")
def teacher() -> Iterator[TeacherServer]:
    server = TeacherServer().start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _fresh_teacher(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "teacher" in request.fixturenames:
        request.getfixturevalue("teacher").reset()


def make_settings(tmp_path: Path, teacher: TeacherServer, **overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "database": f"sqlite:///{tmp_path / 'distill.db'}",
        "artifacts": str(tmp_path / "artifacts"),
        "default_teacher": {
            "model": "openai/teacher-model",
            "api_base": teacher.url,
            "api_key": "sk-test",
            "timeout_s": 5,
            "num_retries": 1,
            "price": {"input_per_mtok": 2.5, "output_per_mtok": 10.0},
        },
        "tasks": {"support-intents": {"plugin": "classify", "options": {"labels": LABELS}}},
        "store": {"flush_interval_ms": 5, "retry_interval_s": 0.2},
    }
    base.update(overrides)
    return load_settings(None, **base)


@pytest.fixture
def settings(tmp_path: Path, teacher: TeacherServer) -> Settings:
    return make_settings(tmp_path, teacher)


@pytest.fixture
def gateway(settings: Settings) -> Iterator[GatewayServer]:
    with GatewayServer(create_app(settings)) as server:
        yield server


@pytest.fixture(scope="session")
def postgres_admin() -> sa.Engine:
    engine = sa.create_engine(
        PG_ADMIN_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3}
    )
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except Exception as exc:
        pytest.fail(f"the Postgres server at {PG_ADMIN_URL} is required: {exc}")
    return engine


@pytest.fixture
def postgres_url(postgres_admin: sa.Engine) -> Iterator[str]:
    """A fresh database on the Postgres server, dropped afterwards."""
    name = f"distill_test_{uuid.uuid4().hex[:10]}"
    with postgres_admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    yield url
    with postgres_admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
