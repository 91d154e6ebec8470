"""One training round: recorded teacher answers → student → calibration → registry.

The split between training and held-out data is fixed by a hash of the task input, so an
input is held out for every version or for none: the held-out labels used to calibrate a
student (and to compare it with the active one) were never trained on by any version.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from gateway.calibration import Calibration, calibrate, naive_threshold
from gateway.config import Settings
from gateway.curation import curate, summary
from gateway.interfaces import Example, Prediction, Student, Task, Trainer
from gateway.plugins import Plugins, load_plugins
from gateway.registry import Registry, RegistryError, StudentVersion
from gateway.runtime import TaskRuntime, build_tasks
from gateway.store import database
from gateway.store.tables import exchanges
from gateway.students import write_held_out

log = logging.getLogger("distill_gateway.training")

PREDICT_BATCH = 64


class TrainingError(RuntimeError):
    pass


def is_held_out(text: str, fraction: float) -> bool:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def load_examples(engine: Engine, task: str) -> list[Example]:
    """Valid teacher targets recorded for ``task`` (requests and audits), one per input:
    the latest answer wins, so a teacher that changed its mind is followed."""
    query = (
        sa.select(exchanges.c.id, exchanges.c.task_input, exchanges.c.target, exchanges.c.request)
        .where(
            exchanges.c.task == task,
            exchanges.c.target_valid.is_(True),
            exchanges.c.task_input.is_not(None),
        )
        .order_by(exchanges.c.created_at)
    )
    latest: dict[str, Example] = {}
    with engine.connect() as conn:
        for row in conn.execute(query):
            messages = (
                (row.request or {}).get("messages") if isinstance(row.request, dict) else None
            )
            latest[row.task_input] = Example(
                input=row.task_input,
                target=row.target,
                source_id=row.id,
                meta={"messages": messages} if messages else {},
            )
    return list(latest.values())


def split(examples: list[Example], fraction: float) -> tuple[list[Example], list[Example]]:
    train: list[Example] = []
    held_out: list[Example] = []
    for example in examples:
        (held_out if is_held_out(example.input, fraction) else train).append(example)
    return train, held_out


def predict_all(student: Student, inputs: list[str]) -> list[Prediction]:
    out: list[Prediction] = []
    for start in range(0, len(inputs), PREDICT_BATCH):
        out.extend(student.predict(inputs[start : start + PREDICT_BATCH]))
    return out


def judge(
    task: Task, predictions: list[Prediction], examples: list[Example]
) -> tuple[list[float], list[bool]]:
    confidences = [p.confidence if p.target is not None else 0.0 for p in predictions]
    agrees = [
        p.target is not None and task.agree(p.target, e.target)
        for p, e in zip(predictions, examples, strict=True)
    ]
    return confidences, agrees


@dataclass
class Evaluation:
    calibration: Calibration
    naive_threshold: float | None
    confidences: list[float] = field(repr=False)
    agrees: list[bool] = field(repr=False)


def evaluate(
    student: Student, task: Task, held_out: list[Example], target: float, confidence_level: float
) -> Evaluation:
    predictions = predict_all(student, [e.input for e in held_out])
    confidences, agrees = judge(task, predictions, held_out)
    return Evaluation(
        calibrate(confidences, agrees, target, confidence_level),
        naive_threshold(confidences, agrees, target),
        confidences,
        agrees,
    )


@dataclass
class RoundResult:
    task: str
    version: StudentVersion | None
    promoted: bool
    reason: str
    evaluation: Evaluation | None = None
    active_evaluation: Evaluation | None = None
    curation: dict[str, Any] | None = None


class Workspace:
    """Settings, plugins, store and registry for commands that run outside the server."""

    def __init__(
        self, settings: Settings, plugins: Plugins | None = None, engine: Engine | None = None
    ) -> None:
        self.settings = settings
        self.plugins = plugins or load_plugins(settings.plugins)
        self.tasks, _ = build_tasks(settings, self.plugins)
        self.engine = engine or database.create_engine(settings.database)
        if engine is None and settings.store.run_migrations:
            database.migrate(self.engine)
        self.registry = Registry(self.engine, Path(settings.artifacts))

    def task(self, name: str) -> TaskRuntime:
        try:
            return self.tasks[name]
        except KeyError:
            known = ", ".join(self.tasks) or "none"
            raise TrainingError(f"unknown task {name!r} (configured: {known})") from None

    def trainer(
        self, task_name: str, trainer_name: str | None = None, options: dict[str, Any] | None = None
    ) -> tuple[str, Trainer]:
        config = self.settings.tasks[task_name].student
        task = self.task(task_name).task
        name = trainer_name or config.trainer or task.default_trainer
        if name is None:
            raise TrainingError(
                f"task {task_name!r}: no trainer configured (tasks.{task_name}.student.trainer)"
            )
        trainer_class = self.plugins.trainers.get(name)
        chosen = config.options if options is None else options
        return name, trainer_class(trainer_class.Options.model_validate(chosen))

    def load_student(self, version: StudentVersion) -> Student:
        _, trainer = self.trainer(version.task, version.trainer, version.options)
        return trainer.load(Path(version.artifact_path), self.task(version.task).task)

    def train_round(self, task_name: str, promote: str = "if-better") -> RoundResult:
        """Curate, train, evaluate and calibrate a candidate; promote it per ``promote``:
        ``always``, ``never`` or ``if-better`` (serves a larger share at the target on
        the same held-out labels than the active version, or none is active).

        The caller holds the task's training lock (gateway.locks), so a version still
        marked ``training`` was left by a round that died: it is marked failed first."""
        runtime = self.task(task_name)
        policy = self.settings.tasks[task_name].policy
        self.registry.fail_interrupted(task_name)
        recorded = load_examples(self.engine, task_name)
        curated = curate(recorded, runtime.filters, runtime.task)
        examples = curated.examples
        if len(examples) < policy.min_examples:
            return RoundResult(
                task_name,
                None,
                False,
                f"{len(examples)} curated examples, fewer than min_examples {policy.min_examples}",
                curation=summary(curated, len(recorded)),
            )
        if policy.calibration == "naive":
            train, held_out = examples, list[Example]()
        else:
            train, held_out = split(examples, policy.holdout_fraction)
            if not held_out or not train:
                return RoundResult(task_name, None, False, "nothing to hold out or to train on")
        trainer_name, trainer = self.trainer(task_name)
        version = self.registry.create(
            task_name, trainer_name, trainer.options.model_dump(), len(train), len(held_out)
        )
        started = time.perf_counter()
        try:
            directory = self.registry.partial_dir(version)
            if policy.calibration == "naive":
                evaluation = self._cross_validate(trainer, runtime.task, train, workdir=directory)
            figures = trainer.train(train, runtime.task, directory)
            student = trainer.load(directory, runtime.task)
            if policy.calibration != "naive":
                evaluation = evaluate(
                    student,
                    runtime.task,
                    held_out,
                    policy.target_agreement,
                    policy.confidence_level,
                )
            write_held_out(directory, evaluation.confidences, evaluation.agrees)
        except Exception as exc:
            self.registry.fail(version, f"{type(exc).__name__}: {exc}")
            log.exception("training %s %s failed", task_name, version.version)
            raise TrainingError(f"training {task_name} {version.version} failed: {exc}") from exc
        metrics = {
            **figures,
            "seconds": round(time.perf_counter() - started, 2),
            "calibration": evaluation.calibration.to_dict(),
            "naive_threshold": evaluation.naive_threshold,
            "curation": summary(curated, len(recorded)),
        }
        threshold = evaluation.calibration.threshold
        if policy.calibration == "naive":
            # The baseline: the point estimate, and the retrained student always serves.
            threshold = evaluation.naive_threshold
            promote = "always" if promote == "if-better" else promote
        version = self.registry.complete(version, threshold, metrics)
        result = self._gate(runtime, version, evaluation, held_out, promote)
        result.curation = metrics["curation"]
        self.registry.note(task_name, result.version or version, result.reason)
        self.registry.prune(task_name, keep=policy.keep_versions)
        return result

    def _cross_validate(
        self, trainer: Trainer, task: Task, examples: list[Example], workdir: Path, folds: int = 3
    ) -> Evaluation:
        """The naive baseline's threshold: out-of-fold predictions, point estimate."""
        policy = self.settings.tasks[task.name].policy
        confidences: list[float] = []
        agrees: list[bool] = []
        for fold in range(folds):
            held = [e for i, e in enumerate(examples) if i % folds == fold]
            rest = [e for i, e in enumerate(examples) if i % folds != fold]
            fold_dir = workdir / f"fold{fold}"
            fold_dir.mkdir()
            trainer.train(rest, task, fold_dir)
            predictions = predict_all(trainer.load(fold_dir, task), [e.input for e in held])
            c, a = judge(task, predictions, held)
            confidences += c
            agrees += a
            shutil.rmtree(fold_dir)
        return Evaluation(
            calibrate(confidences, agrees, policy.target_agreement, policy.confidence_level),
            naive_threshold(confidences, agrees, policy.target_agreement),
            confidences,
            agrees,
        )

    def _gate(
        self,
        runtime: TaskRuntime,
        version: StudentVersion,
        evaluation: Evaluation,
        held_out: list[Example],
        promote: str,
    ) -> RoundResult:
        task_name = version.task
        policy = self.settings.tasks[task_name].policy
        active = self.registry.active(task_name)
        active_evaluation = None
        if active is not None:
            try:
                active_evaluation = evaluate(
                    self.load_student(active),
                    runtime.task,
                    held_out,
                    policy.target_agreement,
                    policy.confidence_level,
                )
            except Exception:
                log.exception("could not evaluate the active version %s", active.version)
        new_share = evaluation.calibration.coverage
        old_share = active_evaluation.calibration.coverage if active_evaluation else 0.0
        if promote == "never":
            return RoundResult(
                task_name,
                version,
                False,
                "not promoted (--no-promote)",
                evaluation,
                active_evaluation,
            )
        better = active is None or new_share > old_share
        if promote == "if-better" and not better:
            return RoundResult(
                task_name,
                version,
                False,
                f"serves {new_share:.3f} at the target, the active "
                f"{active.version if active else '-'} serves {old_share:.3f}",
                evaluation,
                active_evaluation,
            )
        if evaluation.calibration.threshold is None and promote != "always":
            return RoundResult(
                task_name,
                version,
                False,
                "no threshold keeps the promise",
                evaluation,
                active_evaluation,
            )
        try:
            promoted = self.registry.promote(task_name, version.version)
        except RegistryError as exc:
            return RoundResult(task_name, version, False, str(exc), evaluation, active_evaluation)
        return RoundResult(
            task_name,
            promoted,
            True,
            f"promoted: serves {new_share:.3f} at the target (was {old_share:.3f})",
            evaluation,
            active_evaluation,
        )
