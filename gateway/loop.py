"""The distillation loop: train the first student at ``min_examples``, retrain after every
``retrain_every`` new teacher answers (and optionally on a schedule), promote through
the gate, and let the serving students follow.

It runs in the background of each gateway (``loop.enabled``) or alone as
``distill-gateway worker``. Exactly one round per task runs at a time across all replicas
(gateway.locks). Each round trains in a child process at lower priority by default, so
serving keeps the GIL and most of the CPU; a crash or a kill of that process leaves the
registry consistent (the next round marks the half-done version failed).
"""

from __future__ import annotations

import asyncio
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import UTC
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from gateway.config import Settings
from gateway.events import record_event
from gateway.locks import TrainingLock
from gateway.registry import FAILED, Registry
from gateway.store.tables import exchanges

log = logging.getLogger("distill_gateway.loop")

FAILURE_BACKOFF_S = 300.0


def count_recorded(engine: Engine, task: str) -> int:
    """Valid teacher targets recorded for the task: the trigger counts these (cheap);
    curation and de-duplication happen inside the round."""
    query = (
        sa.select(sa.func.count())
        .select_from(exchanges)
        .where(exchanges.c.task == task, exchanges.c.target_valid.is_(True))
    )
    with engine.connect() as conn:
        return int(conn.execute(query).scalar_one())


@dataclass
class TaskState:
    # From the registry, shared by all replicas: what the newest version was trained on.
    recorded_at_last_round: int | None = None  # None: no version yet
    last_round_at: float = 0.0
    # This replica's own memory: rounds that made no version, and failures.
    attempted_at: int | None = None
    retry_after: int = 0  # new answers the last fruitless attempt asked to wait for
    failed_at: float = 0.0


def retry_wait(summary: dict[str, Any], min_examples: int, retrain_every: int) -> int:
    """New teacher answers to wait for after a round that made no version. Short of
    ``min_examples`` after curation (duplicates and invalid answers dropped): about as many
    answers as it lacked, scaled by the share curation keeps, so a stream that was short by
    a few examples does not wait half a retraining interval; otherwise half an interval."""
    curation = summary.get("curation") or {}
    recorded, kept = int(curation.get("recorded", 0)), int(curation.get("examples", 0))
    if summary.get("version") is None and 0 < kept < min_examples and recorded:
        return min(max(1, retrain_every // 2),
                   math.ceil((min_examples - kept) * recorded / kept))
    return max(1, retrain_every // 2)


def round_summary(result: Any) -> dict[str, Any]:
    """What crosses the process boundary: plain data only."""
    evaluation = result.evaluation
    return {
        "task": result.task,
        "version": result.version.version if result.version is not None else None,
        "promoted": result.promoted,
        "reason": result.reason,
        "curation": result.curation,
        "coverage": evaluation.calibration.coverage if evaluation is not None else None,
        "threshold": evaluation.calibration.threshold if evaluation is not None else None,
    }


def run_round(
    settings: Settings, task: str, promote: str = "if-better", nice: int = 0
) -> dict[str, Any]:
    """One round, in whatever process calls it (the child, or a thread)."""
    if nice:
        os.nice(nice)
        # Training shares the cores with serving: spinning OpenMP workers waiting for a core
        # make each step several times slower (measured 4-25 s instead of ~2.2 s).
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from gateway.training import Workspace

    workspace = Workspace(settings)
    try:
        return round_summary(workspace.train_round(task, promote=promote))
    finally:
        workspace.engine.dispose()


class DistillationLoop:
    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        registry: Registry,
        tasks: list[str],
        on_round: Any = None,
    ) -> None:
        self.settings = settings
        self._tasks = tasks  # the configured tasks that have a trainer
        self.engine = engine
        self.registry = registry
        self.on_round = on_round  # async callback(summary) after every round
        self.state: dict[str, TaskState] = {}
        self.running: set[str] = set()
        self._pool: ProcessPoolExecutor | None = None

    def tasks(self) -> list[str]:
        return list(self._tasks)

    def _sync(self, task: str, state: TaskState) -> None:
        """Read what the newest version was trained on: another replica may have trained
        since we last looked, and then this one must not train again."""
        versions = [v for v in self.registry.versions(task) if v.status != FAILED]
        if versions:
            curation = versions[-1].metrics.get("curation") or {}
            state.recorded_at_last_round = int(curation.get("recorded", 0))
            created = versions[-1].created_at
            state.last_round_at = (
                created if created.tzinfo else created.replace(tzinfo=UTC)
            ).timestamp()

    def due(self, task: str, recorded: int, state: TaskState, now: float) -> str | None:
        """Why a round is due now, or None."""
        policy = self.settings.tasks[task].policy
        if now - state.failed_at < FAILURE_BACKOFF_S:
            return None
        if state.attempted_at is not None and recorded - state.attempted_at < max(
            1, state.retry_after or policy.retrain_every // 2
        ):
            return None  # the last attempt here made nothing; wait for more data
        last = state.recorded_at_last_round
        if last is None:
            return "first student" if recorded >= policy.min_examples else None
        fresh = recorded - last
        if fresh >= policy.retrain_every:
            return f"{fresh} new teacher answers"
        interval = policy.retrain_interval_s
        if interval is not None and fresh > 0 and now - state.last_round_at >= interval:
            return f"schedule ({interval:.0f} s) with {fresh} new teacher answers"
        return None

    async def check(self, task: str) -> dict[str, Any] | None:
        """Run a round for ``task`` if one is due and no replica is running one."""
        if task in self.running:
            return None
        state = self.state.setdefault(task, TaskState())
        await asyncio.to_thread(self._sync, task, state)
        recorded = await asyncio.to_thread(count_recorded, self.engine, task)
        reason = self.due(task, recorded, state, time.time())
        if reason is None:
            return None
        self.running.add(task)
        try:
            return await self._round(task, reason, recorded, state)
        finally:
            self.running.discard(task)

    async def _round(
        self, task: str, reason: str, recorded: int, state: TaskState
    ) -> dict[str, Any] | None:
        lock = TrainingLock(self.engine, task)
        if not await asyncio.to_thread(lock.acquire):
            log.info("%s: another replica is training", task)
            return None
        started = time.time()
        try:
            log.info("%s: training round (%s)", task, reason)
            summary = await self._train(task)
        except Exception as exc:
            state.failed_at = time.time()
            state.recorded_at_last_round = recorded
            await asyncio.to_thread(
                record_event,
                self.engine,
                task,
                "training_failed",
                f"round failed: {exc}",
                {"trigger": reason},
            )
            return None
        finally:
            await asyncio.to_thread(lock.release)
        state.attempted_at = recorded if summary["version"] is None else None
        policy = self.settings.tasks[task].policy
        state.retry_after = retry_wait(summary, policy.min_examples, policy.retrain_every)
        summary["trigger"] = reason
        summary["seconds"] = round(time.time() - started, 1)
        await asyncio.to_thread(
            record_event,
            self.engine,
            task,
            "promoted" if summary["promoted"] else "trained",
            summary["reason"],
            summary,
        )
        if self.on_round is not None:
            await self.on_round(summary)
        return summary

    async def _train(self, task: str) -> dict[str, Any]:
        config = self.settings.loop
        if not config.subprocess:
            return await asyncio.to_thread(run_round, self.settings, task)
        if self._pool is None:
            # spawn, not fork: the serving process has threads and an event loop.
            self._pool = ProcessPoolExecutor(
                max_workers=1, mp_context=multiprocessing.get_context("spawn")
            )
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(
                self._pool, run_round, self.settings, task, "if-better", config.nice
            )
        except Exception:
            # A killed child breaks the pool; start a fresh one next time.
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
            raise

    async def run_forever(self) -> None:
        while True:
            for task in self.tasks():
                try:
                    await self.check(task)
                except Exception:
                    log.warning("loop check for %s failed", task, exc_info=True)
            await asyncio.sleep(self.settings.loop.interval_s)

    def close(self) -> None:
        """Stop a round in progress: killing it is safe by design (the registry stays
        consistent), and waiting could hold a shutdown for minutes. An idle worker is let
        exit by itself: killed, it leaks the semaphores its libraries made (the resource
        tracker warns about them at exit)."""
        if self._pool is not None:
            processes = list(getattr(self._pool, "_processes", {}).values())
            self._pool.shutdown(wait=False, cancel_futures=True)
            for process in processes:
                # The sentinel, not is_alive(): the executor's own thread may be reaping the
                # worker at this moment, and is_alive() then reads a dead worker as alive.
                exited = multiprocessing.connection.wait([process.sentinel],
                                                         timeout=0 if self.running else 5)
                if not exited:
                    process.terminate()
            self._pool = None
