"""The model registry: student versions per task, in the store plus the artifact store
(a directory or object storage, gateway.artifacts).

A version is ``training`` while its artifact is written (staged, and put in place whole
when complete), then ``candidate``; ``promote`` makes it ``active`` and retires the one
before, in one transaction; ``rollback`` re-activates the previously promoted version.
The database refuses two active versions of a task (a partial unique index), so
concurrent promotions cannot leave the registry inconsistent.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from gateway.artifacts import ArtifactStore
from gateway.store.tables import student_versions as sv

TRAINING, CANDIDATE, ACTIVE, RETIRED, FAILED = (
    "training",
    "candidate",
    "active",
    "retired",
    "failed",
)
ROLLED_BACK = "rolled back"  # a retired version's note: never a rollback target again


class RegistryError(RuntimeError):
    """A promotion or rollback that cannot be done, with the reason."""


@dataclass(frozen=True)
class StudentVersion:
    task: str
    version: str
    trainer: str
    status: str
    created_at: datetime
    promoted_at: datetime | None
    train_examples: int
    holdout_examples: int
    threshold: float | None
    metrics: dict[str, Any]
    options: dict[str, Any]
    artifact_path: str
    error: str | None

    @classmethod
    def from_row(cls, row: Any) -> StudentVersion:
        data = dict(row._mapping)
        data.pop("id", None)
        data["metrics"] = data.get("metrics") or {}
        data["options"] = data.get("options") or {}
        return cls(**data)


class Registry:
    def __init__(self, engine: Engine, artifacts: Path | str | ArtifactStore) -> None:
        self.engine = engine
        self.store = (artifacts if isinstance(artifacts, ArtifactStore)
                      else ArtifactStore(artifacts))

    @property
    def artifacts(self) -> Path:
        """The artifact directory (local stores)."""
        return Path(self.store.location)

    def artifact_dir(self, task: str, version: str) -> str:
        """Where the version's artifact lives: a directory, or its URL."""
        return self.store.path_of(task, version)

    def local_artifact(self, version: StudentVersion) -> Path:
        """A local directory with the version's artifact, for a trainer to load."""
        return self.store.local(version.artifact_path)

    # -- reads ---------------------------------------------------------------------------
    def versions(self, task: str) -> list[StudentVersion]:
        query = sa.select(sv).where(sv.c.task == task).order_by(sv.c.id)
        with self.engine.connect() as conn:
            return [StudentVersion.from_row(r) for r in conn.execute(query)]

    def get(self, task: str, version: str) -> StudentVersion:
        query = sa.select(sv).where(sv.c.task == task, sv.c.version == version)
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        if row is None:
            raise RegistryError(f"task {task!r} has no version {version!r}")
        return StudentVersion.from_row(row)

    def active(self, task: str) -> StudentVersion | None:
        query = sa.select(sv).where(sv.c.task == task, sv.c.status == ACTIVE)
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        return StudentVersion.from_row(row) if row is not None else None

    def active_versions(self) -> dict[str, tuple[str, float | None]]:
        """``{task: (version, threshold)}`` for every task with an active student: the one
        query a serving replica polls to notice promotions made elsewhere."""
        query = sa.select(sv.c.task, sv.c.version, sv.c.threshold).where(sv.c.status == ACTIVE)
        with self.engine.connect() as conn:
            return {r.task: (r.version, r.threshold) for r in conn.execute(query)}

    # -- writes --------------------------------------------------------------------------
    def create(
        self,
        task: str,
        trainer: str,
        options: dict[str, Any],
        train_examples: int,
        holdout_examples: int,
    ) -> StudentVersion:
        """A new version in state ``training``; its artifact goes to ``partial_dir``."""
        with self.engine.begin() as conn:
            count = conn.execute(
                sa.select(sa.func.count()).select_from(sv).where(sv.c.task == task)
            ).scalar_one()
            version = f"v{count + 1:04d}"
            conn.execute(
                sv.insert().values(
                    task=task,
                    version=version,
                    trainer=trainer,
                    status=TRAINING,
                    created_at=datetime.now(UTC),
                    train_examples=train_examples,
                    holdout_examples=holdout_examples,
                    options=options,
                    artifact_path=str(self.artifact_dir(task, version)),
                )
            )
        return self.get(task, version)

    def partial_dir(self, version: StudentVersion) -> Path:
        """An empty local directory for the trainer to write the artifact into."""
        return self.store.staging(version.artifact_path)

    def complete(
        self, version: StudentVersion, threshold: float | None, metrics: dict[str, Any]
    ) -> StudentVersion:
        """The artifact is fully written: put it in place (never half visible), then mark
        the version candidate."""
        self.store.publish(version.artifact_path)
        self._update(version, status=CANDIDATE, threshold=threshold, metrics=metrics)
        return self.get(version.task, version.version)

    def fail(self, version: StudentVersion, error: str) -> None:
        self.store.discard(version.artifact_path)
        self._update(version, status=FAILED, error=error[:2000])

    def fail_interrupted(self, task: str) -> list[str]:
        """Mark versions left in ``training`` by a round that died as failed (the caller
        holds the task's training lock, so no live round owns them)."""
        stale = [v for v in self.versions(task) if v.status == TRAINING]
        for version in stale:
            self.fail(version, "interrupted: the training process ended before finishing")
        return [v.version for v in stale]

    def note(self, task: str, version: StudentVersion, outcome: str) -> None:
        """Keep the gate's decision with the version, for ``models`` and ``status``."""
        metrics = {**version.metrics, "outcome": outcome}
        self._update(version, metrics=metrics)

    def set_threshold(self, task: str, version: str, threshold: float | None) -> None:
        """A live correction from audits; None sends the version's traffic to the teacher."""
        with self.engine.begin() as conn:
            conn.execute(
                sv.update()
                .where(sv.c.task == task, sv.c.version == version)
                .values(threshold=threshold)
            )

    def promote(self, task: str, version: str) -> StudentVersion:
        target = self.get(task, version)
        if target.status not in (CANDIDATE, RETIRED, ACTIVE):
            raise RegistryError(
                f"{task} {version} is {target.status}; only a candidate or a "
                "retired version can be promoted"
            )
        if not self.store.exists(target.artifact_path):
            raise RegistryError(f"{task} {version}: artifact {target.artifact_path} is missing")
        with self.engine.begin() as conn:
            conn.execute(
                sv.update().where(sv.c.task == task, sv.c.status == ACTIVE).values(status=RETIRED)
            )
            conn.execute(
                sv.update()
                .where(sv.c.task == task, sv.c.version == version)
                .values(status=ACTIVE, promoted_at=datetime.now(UTC), error=None)
            )
        return self.get(task, version)

    def rollback(self, task: str) -> StudentVersion | None:
        """Retire the active version and re-activate the one promoted before it; with none
        before it, the task goes back to teacher-only (returns None)."""
        current = self.active(task)
        if current is None:
            raise RegistryError(f"task {task!r} has no active version to roll back")
        earlier = [
            v
            for v in self.versions(task)
            if v.status == RETIRED
            and v.promoted_at is not None
            and v.error != ROLLED_BACK
            and self.store.exists(v.artifact_path)
            and _before(v.promoted_at, current.promoted_at)
        ]
        previous = max(earlier, key=lambda v: _aware(v.promoted_at)) if earlier else None
        with self.engine.begin() as conn:
            conn.execute(
                sv.update()
                .where(sv.c.task == task, sv.c.version == current.version)
                .values(status=RETIRED, error=ROLLED_BACK)
            )
            if previous is not None:
                conn.execute(
                    sv.update()
                    .where(sv.c.task == task, sv.c.version == previous.version)
                    .values(status=ACTIVE, promoted_at=datetime.now(UTC))
                )
        return self.get(task, previous.version) if previous is not None else None

    def prune(self, task: str, keep: int) -> list[str]:
        """Delete the artifacts of all but the newest ``keep`` inactive versions."""
        removed = []
        inactive = [v for v in self.versions(task) if v.status in (RETIRED, CANDIDATE, FAILED)]
        for version in inactive[:-keep] if keep else inactive:
            if self.store.delete(version.artifact_path):
                removed.append(version.version)
        return removed

    def _update(self, version: StudentVersion, **values: Any) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                sv.update()
                .where(sv.c.task == version.task, sv.c.version == version.version)
                .values(**values)
            )


def _aware(moment: datetime | None) -> datetime:
    # SQLite hands back naive datetimes for timezone=True columns; we only store UTC.
    assert moment is not None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _before(a: datetime | None, b: datetime | None) -> bool:
    return b is None or (a is not None and _aware(a) <= _aware(b))
