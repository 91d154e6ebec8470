"""Serving students: micro-batched inference off the event loop, and hot swaps.

Inference runs on one dedicated thread. The first request of an idle period is predicted
at once (no batching delay); requests that arrive while a batch is running wait and go
together in the next batch, so the batch size follows the load by itself.

A replica polls the registry for the active version of each task; when it changes, the
new student is loaded beside the old one and the reference swapped. Requests already
holding the old student finish with it; none waits on a load or fails because of it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

from gateway.interfaces import Deliver, Prediction, Student, options_to_load
from gateway.plugins import Plugins
from gateway.registry import Registry, StudentVersion

log = logging.getLogger("distill_gateway.students")

CALIBRATION_FILE = "calibration.json"  # held-out (confidence, agree) pairs, for audits


P = ParamSpec("P")
R = TypeVar("R")

GATHER_POLL_S = 0.0005
GATHER_QUIET_S = 0.010


class MicroBatcher:
    """Batches of pending requests through ``predict_parts`` (a student's
    ``Student.predict_parts``): each part's requests are answered as soon as it is ready."""

    def __init__(
        self,
        predict_parts: Callable[[list[str], Deliver], None],
        executor: ThreadPoolExecutor,
        max_batch: int = 64,
        gather_ms: float = 20.0,
    ) -> None:
        self._predict_parts = predict_parts
        self._executor = executor
        self._max_batch = max_batch
        self._gather_s = gather_ms / 1000
        self._pending: list[tuple[str, asyncio.Future[Prediction]]] = []
        self._running = False
        self._drainer: asyncio.Task[None] | None = None  # held so it is not collected

    async def predict(self, text: str) -> Prediction:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Prediction] = loop.create_future()
        self._pending.append((text, future))
        if not self._running:
            self._running = True
            self._drainer = loop.create_task(self._drain(loop))
        return await future

    async def _gather(self, loop: asyncio.AbstractEventLoop, expected: int) -> None:
        """After a batch of several requests, wait for as many new ones as it held while
        they keep arriving (none for ``GATHER_QUIET_S``: stop) and at most ``gather_ms``.

        Under concurrency the clients of the batch just answered send their next requests
        within a few milliseconds; together they make one full batch instead of a string
        of single ones that fight the event loop for the cores (measured with 32 clients
        on 2 cores: about four single-text batches, at ~100 texts/s, per batch of 31 and
        302 req/s; gathered, only batches of 32 and 328 req/s). One client at a time
        never waits.
        """
        now = loop.time()
        deadline, last_arrival = now + self._gather_s, now
        want = min(expected, self._max_batch)
        seen = len(self._pending)
        while (seen < want and now < deadline and now - last_arrival < GATHER_QUIET_S):
            await asyncio.sleep(GATHER_POLL_S)
            now = loop.time()
            if len(self._pending) != seen:
                seen, last_arrival = len(self._pending), now

    async def _drain(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            while self._pending:
                batch = self._pending[: self._max_batch]
                del self._pending[: self._max_batch]
                futures = [future for _, future in batch]
                try:
                    await self._run(loop, [text for text, _ in batch], futures)
                except Exception as exc:
                    for future in futures:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                if len(batch) > 1 and self._gather_s > 0:
                    await self._gather(loop, len(batch))
        finally:
            self._running = False

    async def _run(self, loop: asyncio.AbstractEventLoop, texts: list[str],
                   futures: list[asyncio.Future[Prediction]]) -> None:
        def deliver(positions: list[int], predictions: list[Prediction]) -> None:
            loop.call_soon_threadsafe(_resolve, futures, positions, predictions)

        await loop.run_in_executor(self._executor, self._predict_parts, texts, deliver)
        # Every part was handed to the loop before the executor's own completion was, so
        # the parts have been resolved by now; a student that skipped a position did not.
        if not all(future.done() for future in futures):
            raise RuntimeError("the student returned no prediction for some requests")


def _resolve(futures: list[asyncio.Future[Prediction]], positions: list[int],
             predictions: list[Prediction]) -> None:
    if len(positions) != len(predictions):
        error = RuntimeError("the student returned a wrong number of predictions")
        for position in positions:
            if not futures[position].done():
                futures[position].set_exception(error)
        return
    for position, prediction in zip(positions, predictions, strict=True):
        if not futures[position].done():
            futures[position].set_result(prediction)


@dataclass
class LiveStats:
    """What this replica saw of a version: shares served and audited agreement."""

    seen: int = 0
    served: int = 0
    audits: int = 0
    audit_disagreements: int = 0

    def record_audit(self, agree: bool, window: int) -> None:
        self.audits += 1
        self.audit_disagreements += 0 if agree else 1
        if self.audits > window:
            # Forget the older half: the estimate follows drift instead of averaging it away.
            self.audits //= 2
            self.audit_disagreements //= 2
            self.seen //= 2
            self.served //= 2

    @property
    def share_served(self) -> float:
        return self.served / self.seen if self.seen else 0.0


PROBE_EVERY = 10  # while a student is passed over, it is still asked one request in this many


@dataclass
class ShareGuard:
    """Passes over a student that hardly ever answers (``policy.min_share``).

    Every request a student is asked waits for its prediction, and one that escalates pays
    for the teacher on top: with a generative student (~0.6 s a request on 2 cores) that
    answers almost nothing, all traffic gets that much slower for nothing. Once the student
    answered less than ``min_share`` of the last ``window`` or more requests it was asked,
    only one request in ``PROBE_EVERY`` is put to it (so a recovery is seen: a lower
    threshold after audits, other traffic) and the rest go straight to the teacher, until
    its share over the probes is back at ``min_share``.
    """

    min_share: float = 0.0  # 0: never passed over
    window: int = 1
    seen: int = 0
    served: int = 0
    passed_over: int = 0  # requests sent straight to the teacher since the last probe

    @property
    def passing_over(self) -> bool:
        return (self.min_share > 0 and self.seen >= self.window
                and self.served < self.min_share * self.seen)

    def ask(self) -> bool:
        """Whether to put this request to the student."""
        if not self.passing_over:
            return True
        self.passed_over += 1
        if self.passed_over >= PROBE_EVERY:
            self.passed_over = 0
            return True
        return False

    def record(self, served: bool) -> bool:
        """Count one request the student was asked; True when that started or ended its
        being passed over."""
        before = self.passing_over
        self.seen += 1
        self.served += served
        if self.seen >= 2 * self.window:  # forget the older half: follow the recent traffic
            self.seen //= 2
            self.served //= 2
        return self.passing_over != before

    def reset(self) -> None:
        self.seen = self.served = self.passed_over = 0


@dataclass
class FailureBackoff:
    """After a student fails, requests skip it for a while: 1 s, doubling with each failed
    retry up to 30 s, back to nothing on a success. A generation server that is down or
    hung then costs one failed batch per period instead of every request its timeout
    (batches run one at a time, so a hung server would otherwise queue them all)."""

    first_s: float = 1.0
    max_s: float = 30.0
    period_s: float = 0.0
    until: float = 0.0  # time.monotonic() before which the student is skipped

    @property
    def failing(self) -> bool:
        """In a run of failures (a success ends it)."""
        return self.period_s > 0

    def skips(self, now: float) -> bool:
        return now < self.until

    def failed(self, now: float) -> None:
        if now < self.until:
            return  # the other requests of a batch that failed together
        self.period_s = min(self.max_s, 2 * self.period_s if self.period_s else self.first_s)
        self.until = now + self.period_s

    def succeeded(self) -> None:
        self.period_s = self.until = 0.0


@dataclass
class LoadedStudent:
    task: str
    version: str
    threshold: float | None
    student: Student
    batcher: MicroBatcher
    held_out: tuple[list[float], list[bool]] | None = None
    stats: LiveStats = field(default_factory=LiveStats)
    guard: ShareGuard = field(default_factory=ShareGuard)
    backoff: FailureBackoff = field(default_factory=FailureBackoff)

    def serves(self, prediction: Prediction) -> bool:
        return (
            self.threshold is not None
            and prediction.target is not None
            and prediction.confidence >= self.threshold
        )


def write_held_out(directory: Path, confidences: list[float], agrees: list[bool]) -> None:
    (directory / CALIBRATION_FILE).write_text(
        json.dumps({"confidences": confidences, "agrees": agrees})
    )


def read_held_out(directory: Path) -> tuple[list[float], list[bool]] | None:
    path = directory / CALIBRATION_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return [float(c) for c in data["confidences"]], [bool(a) for a in data["agrees"]]


SMALL_BATCH = 8  # batches smaller than this run on one intra-op thread (see sized_threads)
_ALL_THREADS: int | None = None  # see all_threads


def all_threads() -> int:
    """The cores inference may use: ``OMP_NUM_THREADS`` when set, else the CPUs this
    process may run on. Read from the environment, not from torch, whose per-thread value
    depends on which thread asks and on the last ``set_num_threads`` anywhere (the
    encoder's pass threads set 1 for themselves)."""
    global _ALL_THREADS
    if _ALL_THREADS is None:
        try:
            _ALL_THREADS = int(os.environ.get("OMP_NUM_THREADS", "").split(",")[0])
        except ValueError:
            _ALL_THREADS = 0
        if _ALL_THREADS <= 0:
            _ALL_THREADS = len(os.sched_getaffinity(0))
    return _ALL_THREADS


def sized_threads(predict: Callable[Concatenate[list[str], P], R]
                  ) -> Callable[Concatenate[list[str], P], R]:
    """Wrap a torch student's ``predict`` (called on the inference thread) so that a small
    batch runs on one intra-op thread and a large one on all of them.

    One sentence through int8 MiniLM on 2 cores took 12.2 ms with torch's 2 (passive)
    OpenMP threads against 5.5 ms with one: waking the second thread for each of the
    encoder's ~100 small operations costs more than it saves, and the second core is the
    event loop's. A larger batch gets every core (the MiniLM encoder then runs its passes
    on concurrent threads of one each). The setting is per thread for OpenMP, so only the
    inference thread is affected.
    """
    def run(texts: list[str], *args: P.args, **kwargs: P.kwargs) -> R:
        torch = sys.modules.get("torch")  # a student that does not use torch is left alone
        if torch is not None:
            want = 1 if len(texts) < SMALL_BATCH else all_threads()
            if torch.get_num_threads() != want:  # set_num_threads also drops oneDNN caches
                torch.set_num_threads(want)
        return predict(texts, *args, **kwargs)

    return run


def limit_blas_threads() -> None:
    """Keep NumPy's BLAS single-threaded in a serving process. Its idle threads spin after
    every call (a student head's small matrix products) and steal the cores torch's
    OpenMP threads need: measured 32-44 ms instead of 14 ms for one classify prediction."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        return
    threadpool_limits(limits=1, user_api="blas")


class StudentPool:
    """The active student of each task on this replica."""

    def __init__(self, registry: Registry, plugins: Plugins, tasks: dict[str, Any],
                 guards: dict[str, tuple[float, int]] | None = None,
                 students: dict[str, tuple[str | None, dict[str, Any]]] | None = None
                 ) -> None:
        self.registry = registry
        self.plugins = plugins
        self.tasks = tasks  # name -> TaskRuntime
        self.guards = guards or {}  # name -> (policy.min_share, policy.min_share_window)
        # name -> (trainer, options) as this replica's config gives them: the source of
        # a version's serving options (Trainer.serving_options)
        self.students = students or {}
        self.current: dict[str, LoadedStudent] = {}
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="distill-student")
        limit_blas_threads()
        # Idle OpenMP workers sleep instead of spinning for the event loop's core (read when
        # torch first runs a parallel region, so before any student loads): measured p50
        # 19.1 -> 16.7 ms for a classify request on 2 cores.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="distill-loader")
        self._lock = asyncio.Lock()
        self.on_swap: Callable[[str, str | None], None] | None = None

    def get(self, task: str) -> LoadedStudent | None:
        return self.current.get(task)

    def load(self, version: StudentVersion) -> LoadedStudent:
        """Load a version's artifact (blocking; called in the loader thread)."""
        runtime = self.tasks[version.task]
        trainer_class = self.plugins.trainers.get(version.trainer)
        named, configured = self.students.get(version.task, (None, {}))
        trainer = trainer_class(options_to_load(
            trainer_class, version.options, configured if named == version.trainer else None))
        directory = self.registry.local_artifact(version)  # downloaded once if remote
        student = trainer.load(directory, runtime.task)
        return LoadedStudent(
            task=version.task,
            version=version.version,
            threshold=version.threshold,
            student=student,
            batcher=MicroBatcher(sized_threads(student.predict_parts), self.executor),
            held_out=read_held_out(directory),
            guard=ShareGuard(*self.guards.get(version.task, ())),
        )

    async def refresh(self) -> None:
        """Match this replica to the registry: load new active versions, drop retired."""
        async with self._lock:
            loop = asyncio.get_running_loop()
            active = await loop.run_in_executor(self._loader, self.registry.active_versions)
            for task, (version, threshold) in active.items():
                if task not in self.tasks:
                    continue
                loaded = self.current.get(task)
                if loaded is not None and loaded.version == version:
                    if loaded.threshold != threshold:
                        loaded.threshold = threshold  # recalibrated in place
                        loaded.guard.reset()  # its share is another one now
                    continue
                try:
                    record = await loop.run_in_executor(
                        self._loader, self.registry.get, task, version
                    )
                    new = await loop.run_in_executor(self._loader, self.load, record)
                except Exception:
                    log.exception(
                        "could not load %s %s; keeping the current student", task, version
                    )
                    continue
                self.current[task] = new  # the swap: one reference assignment
                log.info(
                    "task %s now served by student %s (threshold %s)", task, version, threshold
                )
                if self.on_swap is not None:
                    self.on_swap(task, version)
            for task in [t for t in self.current if t not in active]:
                old = self.current.pop(task)
                log.info("task %s: student %s retired; teacher only", task, old.version)
                if self.on_swap is not None:
                    self.on_swap(task, None)

    async def poll(self, interval_s: float) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:
                log.warning("registry poll failed", exc_info=True)
            await asyncio.sleep(interval_s)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        self._loader.shutdown(wait=False, cancel_futures=True)
