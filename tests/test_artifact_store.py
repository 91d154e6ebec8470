"""Artifacts on object storage, through fsspec's in-memory object store (the same calls
s3fs answers for s3://). A round publishes a version to the store; another replica, with
nothing on its disk but the database, downloads it once and serves it."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from gateway.app import create_app
from gateway.artifacts import COMPLETE_MARKER, ArtifactStore
from gateway.config import ConfigError, Settings, load_settings
from gateway.registry import ACTIVE
from gateway.testing.teacher_server import TeacherServer
from gateway.training import Workspace
from tests.conftest import LABELS, make_settings
from tests.servers import GatewayServer


@pytest.fixture
def bucket() -> Iterator[str]:
    """A fresh bucket URL; memory:// is one store per process, shared by every instance."""
    url = f"memory://students-{uuid.uuid4().hex[:8]}"
    yield url
    from fsspec.implementations.memory import MemoryFileSystem

    MemoryFileSystem().rm(url.removeprefix("memory://"), recursive=True)


def test_a_version_is_visible_only_whole_and_downloads_once(bucket: str, tmp_path: Path
                                                             ) -> None:
    writer = ArtifactStore(f"{bucket}/unit", tmp_path / "writer")
    path = writer.path_of("t", "v0001")
    key = path.removeprefix("memory://")
    assert path == f"memory:///{bucket.removeprefix('memory://')}/unit/t/v0001"
    staged = writer.staging(path)
    (staged / "weights.safetensors").write_bytes(b"w" * 1000)
    (staged / "adapter").mkdir()
    (staged / "adapter" / "config.json").write_text("{}")
    assert not writer.exists(path)  # staged, not published
    writer.publish(path)
    assert writer.exists(path)
    assert writer._fs.exists(f"{key}/{COMPLETE_MARKER}")

    # another replica: nothing local until it loads the version
    reader = ArtifactStore(f"{bucket}/unit", tmp_path / "reader")
    local = reader.local(path)
    assert local == tmp_path / "reader" / "t" / "v0001"
    assert (local / "weights.safetensors").read_bytes() == b"w" * 1000
    assert (local / "adapter" / "config.json").read_text() == "{}"
    assert reader.local(path) == local  # cached: no second download
    assert [p.name for p in local.parent.iterdir()] == ["v0001"]  # no temporary left

    # a version whose upload never finished (no marker) is not there
    half = writer.path_of("t", "v0002")
    writer._fs.pipe_file(f"{half.removeprefix('memory://')}/weights.safetensors", b"half")
    assert not reader.exists(half)
    with pytest.raises(FileNotFoundError, match="missing or incomplete"):
        reader.local(half)

    assert reader.delete(path) and not writer.exists(path) and not local.exists()
    assert not reader.delete(path)

    # a version pruned elsewhere leaves this replica's cache when it next downloads one
    old, new = writer.path_of("t", "v0003"), writer.path_of("t", "v0004")
    for version in (old, new):
        (writer.staging(version) / "w").write_bytes(b"x")
        writer.publish(version)
    assert reader.local(old).is_dir()
    writer.delete(old)
    assert reader.local(new).is_dir()
    assert sorted(p.name for p in (tmp_path / "reader" / "t").iterdir()) == ["v0004"]


def remote_settings(tmp_path: Path, teacher: TeacherServer, bucket: str, cache: str,
                    **overrides: Any) -> Settings:
    return make_settings(
        tmp_path, teacher,
        artifacts=f"{bucket}/e2e", artifacts_cache=str(tmp_path / cache),
        plugins=["tests.word_vote_trainer"],
        loop={"enabled": False},
        server={"registry_poll_s": 0.1},
        tasks={"support-intents": {
            "plugin": "classify", "options": {"labels": LABELS},
            "student": {"trainer": "word-vote"}, "filters": ["valid"],
            "policy": {"target_agreement": 0.9, "min_examples": 100, "audit_rate": 0.0,
                       "calibration": "bound", "holdout_fraction": 0.3}}},
        **overrides,
    )


def test_a_replica_serves_a_student_another_process_trained_into_the_bucket(
    bucket: str, tmp_path: Path, teacher: TeacherServer
) -> None:
    questions = {f"help with my {LABELS[i % 3].replace('_', ' ')} please {i}": LABELS[i % 3]
                 for i in range(200)}
    teacher.responder = lambda body: questions.get(body["messages"][-1]["content"], LABELS[0])
    trainer_side = remote_settings(tmp_path, teacher, bucket, "trainer-cache")
    with GatewayServer(create_app(trainer_side)) as gateway:
        client = openai.OpenAI(base_url=gateway.base_url, api_key="k", max_retries=0)
        for text in questions:
            client.chat.completions.create(model="support-intents",
                                           messages=[{"role": "user", "content": text}])
    result = Workspace(trainer_side).train_round("support-intents", promote="always")
    assert result.promoted and result.version is not None
    assert result.version.threshold is not None, result.reason
    assert result.version.artifact_path.startswith("memory://")
    assert result.version.artifact_path.endswith(f"/e2e/support-intents/{result.version.version}")

    # a fresh replica: the same database, an empty local cache
    replica = remote_settings(tmp_path, teacher, bucket, "replica-cache")
    app = create_app(replica)
    with GatewayServer(app) as gateway:
        assert app.state.runtime.registry.active("support-intents").status == ACTIVE
        deadline = time.monotonic() + 30
        while app.state.runtime.students.get("support-intents") is None:  # loads in the back
            assert time.monotonic() < deadline, "the replica never loaded the student"
            time.sleep(0.05)
        client = openai.OpenAI(base_url=gateway.base_url, api_key="k", max_retries=0)
        raw = client.chat.completions.with_raw_response.create(
            model="support-intents",
            messages=[{"role": "user", "content": "help with my card arrival please"}])
        assert raw.headers["x-distill-served-by"] == "student"
        assert raw.headers["x-distill-student-version"] == result.version.version
        assert raw.parse().choices[0].message.content == "card_arrival"
    assert (tmp_path / "replica-cache" / "support-intents" / result.version.version).is_dir()
    # the spool stays local when the artifacts are remote
    assert replica.spool_dir == tmp_path / "replica-cache" / "spool"


def test_an_artifacts_url_without_a_backend_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"artifacts.*nosuchfs"):
        load_settings(None, artifacts="nosuchfs://bucket/x")
