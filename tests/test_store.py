"""The traffic store on SQLite and Postgres: batching, draining, spooling, replay."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from gateway.app import create_app
from gateway.config import StoreConfig
from gateway.store import ExchangeRecord, TrafficStore
from gateway.store.spool import Spool
from gateway.testing.teacher_server import TeacherServer
from tests.conftest import make_settings
from tests.servers import GatewayServer, TcpProxy


def record(i: int, task: str = "t") -> ExchangeRecord:
    return ExchangeRecord(
        model=task,
        task=task,
        request={"messages": [{"role": "user", "content": f"q{i}"}]},
        served_by="teacher",
        status=200,
        answer=f"a{i}",
        target={"label": f"a{i}", "n": i},
        target_valid=True,
        prompt_tokens=i,
        completion_tokens=1,
        cost_usd=i / 1e6,
    )


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
    else:
        yield request.getfixturevalue("postgres_url")


def make_store(url: str, tmp_path: Path, **config: object) -> TrafficStore:
    options = {"flush_interval_ms": 5, "retry_interval_s": 0.1, **config}
    return TrafficStore(url, tmp_path / "spool", StoreConfig(**options))  # type: ignore[arg-type]


def test_records_round_trip(db_url: str, tmp_path: Path) -> None:
    store = make_store(db_url, tmp_path)
    store.ensure_schema()
    store.start()
    records = [record(i) for i in range(300)]
    for r in records:
        store.submit(r)
    assert store.flush(20)
    assert store.count() == 300 and store.written == 300
    rows = {row["id"]: row for row in store.fetch(limit=1000)}
    sample = records[123]
    row = rows[sample.id]
    assert row["target"] == {"label": "a123", "n": 123}
    assert row["request"]["messages"][0]["content"] == "q123"
    assert row["cost_usd"] == pytest.approx(123e-6)
    assert row["student_target"] is None
    store.stop()


def test_record_ids_are_uuid7_in_the_order_they_were_made() -> None:
    """Ids sort by creation time (inserts append to the primary-key index instead of
    landing on random pages of it) and stay unique within a millisecond."""
    first = [ExchangeRecord(model="t", task="t", request={}, served_by="teacher", status=200)
             for _ in range(2000)]
    time.sleep(0.002)
    later = ExchangeRecord(model="t", task="t", request={}, served_by="teacher", status=200)
    ids = [r.id for r in first]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 32 and uuid.UUID(i).version == 7 for i in ids)
    assert all(uuid.UUID(i).variant == uuid.RFC_4122 for i in ids)
    assert max(ids) < later.id
    made_ms = int(later.id[:12], 16)
    assert abs(made_ms - later.created_at.timestamp() * 1000) < 50


def test_migrations_are_idempotent(db_url: str, tmp_path: Path,
                                   caplog: pytest.LogCaptureFixture) -> None:
    store = make_store(db_url, tmp_path)
    with caplog.at_level("INFO", logger="alembic"):
        store.ensure_schema()
    # The upgrades it ran are logged; alembic's per-start context lines are not.
    assert "Running upgrade 0002 -> 0003" in caplog.text
    assert "Context impl" not in caplog.text and "Will assume" not in caplog.text
    caplog.clear()
    store._schema_ready = False
    with caplog.at_level("INFO", logger="alembic"):
        store.ensure_schema()
    assert "Running upgrade" not in caplog.text  # nothing to do the second time
    with store.engine.connect() as conn:
        version = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar_one()
    assert version == "0003"
    store.engine.dispose()


def test_graceful_stop_drains_the_queue(db_url: str, tmp_path: Path) -> None:
    store = make_store(db_url, tmp_path, batch_size=50)
    store.start()
    for i in range(2000):
        store.submit(record(i))
    store.stop()  # no flush first: stop itself must drain
    reader = make_store(db_url, tmp_path)
    assert reader.count() == 2000
    reader.engine.dispose()


def test_full_queue_spills_to_spool_and_nothing_is_lost(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    seen: list[str] = []
    store = TrafficStore(
        url,
        tmp_path / "spool",
        StoreConfig(queue_size=2, retry_interval_s=0.1),
        on_recorded=lambda r: seen.append(r.id),
    )
    records = [record(i) for i in range(10)]
    for r in records:  # writer not started yet: the queue fills up
        store.submit(r)
    assert store.spooled == 8
    store.start()
    assert store.flush(10)
    deadline = time.monotonic() + 10
    while store.count() < 10 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sorted(row["id"] for row in store.fetch(limit=100)) == sorted(r.id for r in records)
    assert sorted(seen) == sorted(r.id for r in records)  # the hook fired once each
    store.stop()
    assert not list((tmp_path / "spool").glob("spool-*.jsonl"))


def test_replay_is_idempotent_after_a_partial_replay(db_url: str, tmp_path: Path) -> None:
    records = [record(i) for i in range(100)]
    spool = Spool(tmp_path / "spool")
    spool.append(records)
    spool.rotate()  # as if the process that wrote it had died
    store = make_store(db_url, tmp_path)
    store.ensure_schema()
    # half of them made it into the database before the crash
    from gateway.store.database import insert_ignoring_duplicates

    insert_ignoring_duplicates(store.engine, [r.to_row() for r in records[:50]])
    store.start()  # replays leftover spool files on start
    assert store.flush(10)
    deadline = time.monotonic() + 10
    # The writer counts the replay once it has returned, after the rows are in.
    while (store.count() < 100 or store.replayed < 100) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert store.count() == 100 and store.replayed == 100
    store.stop()


def test_torn_last_line_is_skipped(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.append([record(1), record(2)])
    spool.rotate()
    path = next((tmp_path / "spool").glob("spool-*.jsonl"))
    with open(path, "ab") as file:
        file.write(b'{"model": "t", "ta')  # a crash in the middle of a write
    got: list[ExchangeRecord] = []
    assert spool.replay(got.extend, 10) == 2
    assert [r.answer for r in got] == ["a1", "a2"]


def test_database_cut_mid_run_spools_then_replays_exactly_once(
    tmp_path: Path, teacher: TeacherServer, postgres_url: str
) -> None:
    """Gateway on Postgres behind a TCP proxy; the proxy drops mid-run; every exchange
    is answered and ends up in the database exactly once."""
    url = sa.engine.make_url(postgres_url)
    with TcpProxy(url.host or "127.0.0.1", url.port or 5432) as proxy:
        proxied = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
        settings = make_settings(
            tmp_path,
            teacher,
            database=proxied,
            store={"flush_interval_ms": 5, "retry_interval_s": 0.2},
        )
        app = create_app(settings)
        store = app.state.runtime.store
        ids: list[str] = []
        with GatewayServer(app) as gateway, httpx.Client(base_url=gateway.base_url) as http:

            def send(n: int) -> None:
                for i in range(n):
                    response = http.post(
                        "/chat/completions",
                        json={
                            "model": "support-intents",
                            "messages": [{"role": "user", "content": f"message {len(ids)} {i}"}],
                        },
                    )
                    assert response.status_code == 200
                    ids.append(response.headers["x-distill-request-id"])

            send(20)
            assert store.flush(10) and store.count() == 20
            proxy.cut()
            send(30)  # the database is unreachable: answers still flow
            assert store.flush(20)
            assert store.spooled >= 30
            ready = http.get(gateway.url + "/readyz")
            assert ready.status_code == 503 and ready.json()["store"] == "unreachable"
            proxy.restore()
            send(10)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                if store.flush(1) and not store.spool.has_backlog():
                    break
                time.sleep(0.1)
            assert http.get(gateway.url + "/readyz").status_code == 200
    check = sa.create_engine(postgres_url)
    with check.connect() as conn:
        stored = [row[0] for row in conn.execute(sa.text("SELECT id FROM exchanges"))]
    check.dispose()
    assert len(stored) == len(set(stored)) == 60
    assert sorted(stored) == sorted(ids)
    assert not list(settings.spool_dir.glob("spool-*.jsonl"))
