"""The loop by itself: traffic in → first student trained and promoted → share rises."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from gateway.app import create_app
from gateway.config import Settings
from gateway.events import recent_events
from gateway.locks import TrainingLock
from gateway.loop import retry_wait, run_round
from gateway.registry import ACTIVE, FAILED
from gateway.testing.teacher_server import TeacherServer
from gateway.training import Workspace
from tests.conftest import LABELS, make_settings
from tests.servers import GatewayServer

QUESTIONS = [
    (f"please help with my {LABELS[i % 3].replace('_', ' ')} issue {i}", LABELS[i % 3])
    for i in range(400)
]
ANSWERS = dict(QUESTIONS)


def loop_settings(
    tmp_path: Path, teacher: TeacherServer, database: str | None = None, **student_options: Any
) -> Settings:
    overrides: dict[str, Any] = {}
    if database is not None:
        overrides["database"] = database
    return make_settings(
        tmp_path,
        teacher,
        plugins=["tests.word_vote_trainer"],
        server={"registry_poll_s": 0.2},
        loop={"enabled": True, "interval_s": 0.2, "subprocess": True},
        tasks={
            "support-intents": {
                "plugin": "classify",
                "options": {"labels": LABELS},
                "student": {"trainer": "word-vote", "options": student_options},
                "filters": ["valid", "length"],  # the test sentences are near-duplicates
                # 0.9 and 150: enough held-out labels (~37) for the bound to allow serving
                "policy": {
                    "target_agreement": 0.9,
                    "min_examples": 150,
                    "retrain_every": 100,
                    "holdout_fraction": 0.25,
                    "audit_rate": 0.0,
                },
            }
        },
        **overrides,
    )


AGREED: list[bool] = []  # per answer: what the teacher would have said?


def served_by(client: openai.OpenAI, text: str) -> str:
    raw = client.chat.completions.with_raw_response.create(
        model="support-intents", messages=[{"role": "user", "content": text}]
    )
    AGREED.append(raw.parse().choices[0].message.content == ANSWERS.get(text, "card_arrival"))
    return raw.headers["x-distill-served-by"]


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'loop.db'}"
    return str(request.getfixturevalue("postgres_url"))


def test_the_loop_trains_and_promotes_by_itself(
    tmp_path: Path, teacher: TeacherServer, database: str
) -> None:
    teacher.responder = lambda body: ANSWERS.get(body["messages"][-1]["content"], "card_arrival")
    AGREED.clear()
    settings = loop_settings(tmp_path, teacher, database)
    app = create_app(settings)
    windows: list[float] = []
    with GatewayServer(app) as gateway:
        client = openai.OpenAI(base_url=gateway.base_url, api_key="k", max_retries=0)
        for start in range(0, len(QUESTIONS), 50):
            answers = [served_by(client, text) for text, _ in QUESTIONS[start : start + 50]]
            windows.append(answers.count("student") / len(answers))
            app.state.runtime.store.flush(10)
            if start == 150:  # give the first round time to finish (spawn + train)
                deadline = time.monotonic() + 60
                while app.state.runtime.students.get("support-intents") is None:
                    assert time.monotonic() < deadline, "no student was promoted"
                    time.sleep(0.2)
        registry = app.state.runtime.registry
        versions = registry.versions("support-intents")
        metrics = httpx.get(gateway.url + "/metrics").text
    assert 'distill_training_rounds_total{outcome="promoted",task="support-intents"}' in metrics
    assert windows[0] == 0.0  # cold start: the teacher answers everything
    assert windows[-1] > 0.9  # the student took over
    assert sum(AGREED) / len(AGREED) >= 0.9  # while the promise (target 0.9) held
    assert versions[0].status in (ACTIVE, "retired")
    assert any(v.status == ACTIVE for v in versions)
    kinds = [e["kind"] for e in recent_events(app.state.runtime.store.engine, "support-intents")]
    assert "promoted" in kinds


def test_one_trainer_per_task(tmp_path: Path, teacher: TeacherServer, postgres_url: str) -> None:
    settings = loop_settings(tmp_path, teacher, postgres_url)
    workspace = Workspace(settings)
    first = TrainingLock(workspace.engine, "support-intents")
    second = TrainingLock(workspace.engine, "support-intents")
    assert first.acquire()
    assert not second.acquire()
    first.release()
    assert second.acquire()
    second.release()
    sqlite = Workspace(loop_settings(tmp_path / "s", teacher))
    a, b = (TrainingLock(sqlite.engine, "support-intents", lease_s=0.5) for _ in range(2))
    assert a.acquire() and not b.acquire()
    a.release()
    assert b.acquire()
    b._stop.set()  # its holder "dies": the heartbeat stops and the lease runs out
    time.sleep(0.6)
    assert a.acquire()
    a.release()


def _train_slowly(settings: Settings) -> None:
    run_round(settings, "support-intents")


def test_kill_during_training_leaves_the_registry_consistent(
    tmp_path: Path, teacher: TeacherServer
) -> None:
    teacher.responder = lambda body: ANSWERS.get(body["messages"][-1]["content"], "card_arrival")
    quick = loop_settings(tmp_path, teacher)
    app = create_app(
        quick.model_copy(update={"loop": quick.loop.model_copy(update={"enabled": False})})
    )
    with GatewayServer(app) as gateway:
        client = openai.OpenAI(base_url=gateway.base_url, api_key="k", max_retries=0)
        for text, _ in QUESTIONS[:160]:
            served_by(client, text)
        app.state.runtime.store.flush(10)
    workspace = Workspace(quick)
    assert workspace.train_round("support-intents").promoted
    slow = loop_settings(tmp_path, teacher, sleep_s=30)
    child = multiprocessing.get_context("spawn").Process(target=_train_slowly, args=(slow,))
    child.start()
    deadline = time.monotonic() + 60
    while not any(v.status == "training" for v in workspace.registry.versions("support-intents")):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    os.kill(child.pid or 0, signal.SIGKILL)
    child.join()
    versions = workspace.registry.versions("support-intents")
    assert versions[0].status == ACTIVE  # the active version stayed active
    assert workspace.registry.active("support-intents").version == versions[0].version  # type: ignore[union-attr]
    # the next round cleans up after the dead one and never promotes its partial artifact
    workspace.train_round("support-intents", promote="never")
    statuses = {v.version: v.status for v in workspace.registry.versions("support-intents")}
    assert statuses["v0002"] == FAILED and statuses["v0001"] == ACTIVE
    assert not Path(versions[1].artifact_path).exists()


def test_two_replicas_on_postgres_train_once_and_both_serve(
    tmp_path: Path, teacher: TeacherServer, postgres_url: str
) -> None:
    teacher.responder = lambda body: ANSWERS.get(body["messages"][-1]["content"], "card_arrival")
    settings = loop_settings(tmp_path, teacher, postgres_url)
    first, second = create_app(settings), create_app(settings)
    with GatewayServer(first) as one, GatewayServer(second) as two:
        clients = [
            openai.OpenAI(base_url=g.base_url, api_key="k", max_retries=0) for g in (one, two)
        ]
        for i, (text, _) in enumerate(QUESTIONS[:200]):
            served_by(clients[i % 2], text)
        for app in (first, second):
            app.state.runtime.store.flush(10)
        deadline = time.monotonic() + 90
        while not all(app.state.runtime.students.get("support-intents") for app in (first, second)):
            assert time.monotonic() < deadline, "both replicas should serve the new student"
            time.sleep(0.2)
        versions = first.state.runtime.registry.versions("support-intents")
        time.sleep(2)  # both loops keep checking; neither may train again without new data
        assert len(first.state.runtime.registry.versions("support-intents")) == len(versions)
        assert len(versions) == 1
        text = "my card arrival question"
        assert served_by(clients[0], text) == served_by(clients[1], text) == "student"


def test_retry_wait_after_a_round_short_of_examples() -> None:
    def short(recorded: int, kept: int) -> dict[str, Any]:
        return {"version": None, "curation": {"recorded": recorded, "examples": kept}}

    # 202 of 204 answers kept, 2 short: retry after about 2 more, not half an interval.
    assert retry_wait(short(204, 202), 204, 408) == 3
    # Curation keeps half: twice the shortfall in new answers.
    assert retry_wait(short(200, 100), 150, 1000) == 100
    # Never longer than half an interval, and half an interval for other fruitless rounds.
    assert retry_wait(short(200, 10), 400, 100) == 50
    assert retry_wait({"version": None, "curation": None}, 200, 500) == 250
    assert retry_wait({"version": None, "reason": "no better"}, 200, 1) == 1


def test_closing_lets_an_idle_worker_exit_and_kills_a_busy_one(
    tmp_path: Path, teacher: TeacherServer
) -> None:
    """The training worker process is stopped at shutdown: an idle one exits by itself
    (killed, it would leak its libraries' semaphores and the resource tracker would warn),
    one in the middle of a round is terminated at once."""
    from concurrent.futures import ProcessPoolExecutor

    from gateway.loop import DistillationLoop
    from gateway.registry import Registry
    from gateway.store import database

    settings = loop_settings(tmp_path, teacher)
    engine = database.create_engine(settings.database)
    exit_codes = []
    for busy in (False, True):
        loop = DistillationLoop(settings, engine, Registry(engine, tmp_path / "artifacts"),
                                ["support-intents"])
        pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        pool.submit(time.sleep, 0).result()  # the worker is up
        (worker,) = pool._processes.values()
        if busy:
            pool.submit(time.sleep, 60)
            loop.running.add("support-intents")
            time.sleep(0.5)
        loop._pool = pool
        started = time.monotonic()
        loop.close()
        assert time.monotonic() - started < 6
        # The executor's own thread may reap the worker between a join and a read of
        # exitcode (a waitpid race that leaves it None a moment), so poll for it.
        deadline = time.monotonic() + 10
        while worker.exitcode is None and time.monotonic() < deadline:
            worker.join(timeout=0.1)
        exit_codes.append(worker.exitcode)
    assert exit_codes == [0, -signal.SIGTERM]
