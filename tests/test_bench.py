"""`bench cascade` on a small stream: every key, and figures that agree with each other."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gateway.cli import app as cli
from tests.conftest import LABELS

KEYS = {
    "requests",
    "teacher_calls",
    "audit_calls",
    "student_served",
    "student_share",
    "agreement_with_teacher",
    "student_agreement",
    "accuracy_vs_gold",
    "teacher_only_cost_usd",
    "cost_usd",
    "savings_pct",
    "target_agreement",
    "promise_kept",
    "p50_ms",
    "p99_ms",
    "trainings",
    "curve",
}


def test_bench_cascade_report(tmp_path: Path) -> None:
    rows = []
    for i in range(360):
        label = LABELS[i % 3]
        teacher = label if i % 50 else None  # now and then no usable answer
        rows.append(
            {
                "text": f"please help with my {label.replace('_', ' ')} issue {i}",
                "teacher": teacher,
                "gold": label,
            }
        )
    stream = tmp_path / "stream.jsonl"
    stream.write_text("\n".join(json.dumps(r) for r in rows))
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps(LABELS))
    out = tmp_path / "report.json"
    result = CliRunner().invoke(
        cli,
        [
            "bench",
            "cascade",
            "--stream",
            str(stream),
            "--task",
            "classify",
            "--labels",
            str(labels),
            "--target-agreement",
            "0.9",
            "--seed",
            "1",
            "--limit",
            "300",
            "--priced-as",
            "gpt-4o",
            "--out",
            str(out),
            "--min-examples",
            "150",
            "--retrain-every",
            "100",
            "--audit-rate",
            "0.1",
            "--trainer",
            "word-vote",
            "--plugin",
            "tests.word_vote_trainer",
            "--filter",
            "valid",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert set(report) >= KEYS
    assert report["requests"] == 300
    assert report["student_served"] == round(report["student_share"] * 300)
    assert report["student_served"] > 0 and report["trainings"]
    assert report["teacher_calls"] == 300 - report["student_served"] + report["audit_calls"]
    assert report["savings_pct"] == pytest.approx(
        100
        * (report["teacher_only_cost_usd"] - report["cost_usd"])
        / report["teacher_only_cost_usd"]
    )
    assert report["promise_kept"] == (
        report["agreement_with_teacher"] >= report["target_agreement"] - 0.005
    )
    assert sum(1 for _ in report["curve"]) >= 10
    assert report["curve"][0]["student_share"] == 0.0  # it starts cold
    assert 0.9 < report["accuracy_vs_gold"] <= 1.0
