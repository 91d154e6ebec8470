"""The promise on real teacher labels: a round trained on the first 2,000 Banking77 rows
answered by a real GPT model, its threshold calibrated by the gateway's own method, then
applied to the next 2,081 rows the student never saw (real bundled encoder, real store)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from gateway.config import load_settings
from gateway.datasets import import_file
from gateway.training import Workspace

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "banking77"
FILES = [DATA / "test_llm_labels.jsonl", DATA / "extra_llm_labels.jsonl"]
TARGET = 0.97
N_TRAIN = 2000

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not all(f.is_file() for f in FILES), reason="Banking77 data missing"),
]


def test_bounded_threshold_keeps_the_promise_on_the_next_rows(tmp_path: Path) -> None:
    rows = [json.loads(line) for f in FILES for line in f.read_text().splitlines()
            if line.strip()]
    random.Random(0).shuffle(rows)
    past, future = rows[:N_TRAIN], rows[N_TRAIN:]
    labels = json.loads((DATA / "categories.json").read_text())
    settings = load_settings(None, **{
        "database": f"sqlite:///{tmp_path / 'distill.db'}",
        "artifacts": str(tmp_path / "artifacts"),
        "default_teacher": {"model": "openai/unused", "api_base": "http://127.0.0.1:9"},
        "tasks": {"intents": {"plugin": "classify", "options": {"labels": labels},
                              "policy": {"target_agreement": TARGET, "min_examples": 100}}},
    })
    workspace = Workspace(settings)
    stream = tmp_path / "past.jsonl"
    stream.write_text("".join(json.dumps({"text": r["text"], "teacher": r["teacher"]}) + "\n"
                              for r in past))
    assert import_file(workspace, "intents", stream)["valid"] == N_TRAIN

    result = workspace.train_round("intents")
    assert result.promoted and result.version is not None
    version = workspace.registry.active("intents")
    assert version is not None and version.threshold is not None
    student = workspace.load_student(version)

    predictions = student.predict([r["text"] for r in future])
    served = [p.confidence >= version.threshold for p in predictions]
    wrong = sum(s and p.target != r["teacher"]
                for s, p, r in zip(served, predictions, future, strict=True))
    share = sum(served) / len(future)
    agreement = 1 - wrong / len(future)
    # The promise on traffic the calibration never saw (measured: see the README); the
    # 0.005 is the same tolerance bench cascade reports promise_kept with.
    assert agreement >= TARGET - 0.005, (agreement, share)
    # And the bound is not so loose that the student never serves (oracle: ~0.64).
    assert share > 0.3, (share, agreement)
