"""The registry on SQLite and Postgres: versions, atomic promotion, rollback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from gateway.registry import ACTIVE, CANDIDATE, FAILED, RETIRED, Registry, RegistryError
from gateway.store import database
from gateway.store.tables import student_versions


@pytest.fixture(params=["sqlite", "postgres"])
def registry(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Registry]:
    url = (
        f"sqlite:///{tmp_path / 'r.db'}"
        if request.param == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    engine = database.create_engine(url)
    database.migrate(engine)
    yield Registry(engine, tmp_path / "artifacts")
    engine.dispose()


def trained(registry: Registry, task: str = "t", threshold: float = 0.8) -> str:
    version = registry.create(task, "lookup", {"a": 1}, 10, 2)
    directory = registry.partial_dir(version)
    (directory / "weights.safetensors").write_bytes(b"x")
    return registry.complete(version, threshold, {"calibration": {"coverage": 0.5}}).version


def test_versions_promote_and_rollback(registry: Registry) -> None:
    v1 = trained(registry)
    assert v1 == "v0001"
    assert registry.get("t", v1).status == CANDIDATE
    assert (registry.artifacts / "t" / v1 / "weights.safetensors").is_file()
    assert not (registry.artifacts / "t" / (v1 + ".partial")).exists()
    registry.promote("t", v1)
    v2 = trained(registry, threshold=0.9)
    registry.promote("t", v2)
    assert registry.active("t").version == v2  # type: ignore[union-attr]
    assert registry.get("t", v1).status == RETIRED
    assert registry.active_versions() == {"t": (v2, 0.9)}
    back = registry.rollback("t")
    assert back is not None and back.version == v1 and back.status == ACTIVE
    assert registry.get("t", v2).status == RETIRED
    assert registry.rollback("t") is None  # nothing before v1: teacher only
    assert registry.active("t") is None
    with pytest.raises(RegistryError, match="no active version"):
        registry.rollback("t")
    assert [v.version for v in registry.versions("t")] == [v1, v2]


def test_unfinished_or_failed_versions_cannot_be_promoted(registry: Registry) -> None:
    version = registry.create("t", "lookup", {}, 10, 2)
    registry.partial_dir(version)
    with pytest.raises(RegistryError, match="training"):
        registry.promote("t", version.version)
    registry.fail(version, "boom")
    assert registry.get("t", version.version).status == FAILED
    assert not Path(version.artifact_path + ".partial").exists()
    with pytest.raises(RegistryError, match="failed"):
        registry.promote("t", version.version)


def test_database_refuses_two_active_versions(registry: Registry) -> None:
    registry.promote("t", trained(registry))
    v2 = trained(registry)
    with pytest.raises(sa.exc.IntegrityError), registry.engine.begin() as conn:
        conn.execute(
            student_versions.update().where(student_versions.c.version == v2).values(status=ACTIVE)
        )
    assert registry.active("t") is not None


def test_prune_keeps_the_newest(registry: Registry) -> None:
    versions = [trained(registry) for _ in range(4)]
    registry.promote("t", versions[-1])
    removed = registry.prune("t", keep=1)
    assert removed == versions[:2]
    assert Path(registry.get("t", versions[2]).artifact_path).is_dir()


def test_versions_survive_a_moved_artifact_directory(
        registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Recorded paths are absolute (the directory `train` ran in does not matter), and a
    store whose artifacts moved elsewhere still finds, loads and prunes its versions."""
    monkeypatch.chdir(tmp_path)
    relative = Registry(registry.engine, "./relative-artifacts")
    v1, v2 = trained(relative), trained(relative)
    relative.promote("t", v1)
    relative.promote("t", v2)
    recorded = relative.get("t", v1).artifact_path
    assert Path(recorded).is_absolute()
    monkeypatch.chdir(tmp_path.parent)  # another working directory: same artifact
    assert (relative.local_artifact(relative.get("t", v1)) / "weights.safetensors").is_file()

    (tmp_path / "relative-artifacts").rename(tmp_path / "moved")
    moved = Registry(registry.engine, tmp_path / "moved")
    local = moved.local_artifact(moved.get("t", v1))
    assert local == tmp_path / "moved" / "t" / v1
    assert (local / "weights.safetensors").is_file()
    moved.rollback("t")  # v2 retired, v1 active again: needs v1's artifact to exist
    assert moved.active("t").version == v1  # type: ignore[union-attr]
    assert moved.prune("t", keep=0) == [v2]
    assert not (tmp_path / "moved" / "t" / v2).exists()
    assert (tmp_path / "moved" / "t" / v1).is_dir()
