"""One training round: recorded teacher answers → student → calibration → registry.

The split between training and held-out data is fixed by a hash of the task input, so an
input is held out for every version or for none: the held-out labels used to calibrate a
student (and to compare it with the active one) were never trained on by any version.
Cross-fitting (``policy.calibration: crossfit``) splits the inputs into folds by the same
hash and trains one model per fold on the others; the student answers each input with the
model of its fold, so every recorded label calibrates a model that never saw it.
"""

from __future__ import annotations

import logging
import os
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
from gateway.feature_cache import CACHE_ENV
from gateway.interfaces import (
    Example,
    Prediction,
    Student,
    Task,
    Trainer,
    input_bucket,
    options_to_load,
)
from gateway.plugins import Plugins, load_plugins
from gateway.registry import Registry, RegistryError, StudentVersion
from gateway.runtime import TaskRuntime, build_tasks, configured_trainer
from gateway.store import database
from gateway.store.tables import exchanges
from gateway.students import write_held_out

log = logging.getLogger("distill_gateway.training")


class TrainingError(RuntimeError):
    pass


def is_held_out(text: str, fraction: float) -> bool:
    return input_bucket(text) < fraction


def calibration_rows(
    version: StudentVersion, examples: list[Example], fraction: float
) -> list[int]:
    """Positions of the examples ``version`` is evaluated on: every one for a cross-fitted
    version (each answered by a model that never trained on it), else the held-out ones."""
    if version.metrics.get("calibration_method") == "crossfit":
        return list(range(len(examples)))
    return [i for i, e in enumerate(examples) if is_held_out(e.input, fraction)]


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
    predictions = student.predict_offline([e.input for e in held_out])
    return judged(task, predictions, held_out, target, confidence_level)


def judged(
    task: Task,
    predictions: list[Prediction],
    examples: list[Example],
    target: float,
    confidence_level: float,
) -> Evaluation:
    """Calibrate on predictions of ``examples`` made by a model that never trained on them."""
    confidences, agrees = judge(task, predictions, examples)
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
        # Plugins with `feature_cache: auto` keep features beside this config's artifacts
        # (read from the environment, so the round's child process inherits it too).
        os.environ.setdefault(CACHE_ENV, str(settings.feature_cache_dir))
        self.plugins = plugins or load_plugins(settings.plugins)
        self.tasks, _ = build_tasks(settings, self.plugins)
        self.engine = engine or database.create_engine(settings.database)
        if engine is None and settings.store.run_migrations:
            database.migrate(self.engine)
        self.registry = Registry(self.engine, settings.artifact_store())

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
        name = trainer_name or configured_trainer(self.settings, task_name,
                                                  self.task(task_name).task)
        if name is None:
            raise TrainingError(
                f"task {task_name!r}: no trainer configured (tasks.{task_name}.student.trainer)"
            )
        trainer_class = self.plugins.trainers.get(name)
        chosen = config.options if options is None else options
        return name, trainer_class(trainer_class.Options.model_validate(chosen))

    def configured_options(self, task_name: str, trainer_name: str) -> dict[str, Any] | None:
        """This config's options for the task's student, if it names ``trainer_name``."""
        named = configured_trainer(self.settings, task_name, self.task(task_name).task)
        return self.settings.tasks[task_name].student.options if named == trainer_name else None

    def load_student(self, version: StudentVersion) -> Student:
        trainer_class = self.plugins.trainers.get(version.trainer)
        options = options_to_load(trainer_class, version.options,
                                  self.configured_options(version.task, version.trainer))
        return trainer_class(options).load(self.registry.local_artifact(version),
                                           self.task(version.task).task)

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
        trainer_name, trainer = self.trainer(task_name)
        method = policy.calibration
        if method == "crossfit" and not trainer.can_cross_fit():
            method = "bound"  # e.g. lora-lm: a model per fold would cost as many trainings
        if method == "naive":
            train, held_out = examples, list[Example]()
        elif method == "crossfit":
            train, held_out = examples, examples  # every label calibrates, out of fold
        else:
            train, held_out = split(examples, policy.holdout_fraction)
            if not held_out or not train:
                return RoundResult(task_name, None, False, "nothing to hold out or to train on")
        version = self.registry.create(
            task_name, trainer_name, trainer.options.model_dump(), len(train), len(held_out)
        )
        started = time.perf_counter()
        try:
            directory = self.registry.partial_dir(version)
            if method == "crossfit":
                figures, out_of_fold = trainer.train_cross_fitted(
                    examples, runtime.task, directory, policy.calibration_folds
                )
                trainer.load(directory, runtime.task)  # it loads, before it can be promoted
                evaluation = judged(
                    runtime.task,
                    out_of_fold,
                    examples,
                    policy.target_agreement,
                    policy.confidence_level,
                )
            else:
                if method == "naive":
                    evaluation = self._cross_validate(
                        trainer, runtime.task, train, workdir=directory
                    )
                figures = trainer.train(train, runtime.task, directory)
                student = trainer.load(directory, runtime.task)
                if method != "naive":
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
            "calibration_method": method,
            "curation": summary(curated, len(recorded)),
        }
        if method == "crossfit":
            metrics["calibration_folds"] = policy.calibration_folds
        threshold = evaluation.calibration.threshold
        if method == "naive":
            # The baseline: the point estimate, and the retrained student always serves.
            threshold = evaluation.naive_threshold
            promote = "always" if promote == "if-better" else promote
        version = self.registry.complete(version, threshold, metrics)
        result = self._gate(runtime, version, evaluation, held_out, promote, method)
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
            predictions = trainer.load(fold_dir, task).predict_offline([e.input for e in held])
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
        method: str,
    ) -> RoundResult:
        task_name = version.task
        policy = self.settings.tasks[task_name].policy
        active = self.registry.active(task_name)
        new_share = evaluation.calibration.coverage
        keep = (
            calibration_rows(active, held_out, policy.holdout_fraction)
            if method == "crossfit" and active is not None
            else range(len(held_out))
        )
        if len(keep) < len(held_out):
            # A hold-out active version trained on everything outside the hold-out: compare
            # the two on the held-out labels alone, which neither trained on.
            held_out = [held_out[i] for i in keep]
            new_share = calibrate(
                [evaluation.confidences[i] for i in keep],
                [evaluation.agrees[i] for i in keep],
                policy.target_agreement,
                policy.confidence_level,
            ).coverage
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
