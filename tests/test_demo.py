"""The demo, headless, as CI runs it: its summary figures must add up."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.serving import free_port


@pytest.mark.slow
def test_demo_headless(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "distill-gateway"),
            "demo",
            "--requests",
            "400",
            "--rate",
            "200",
            "--port",
            str(free_port()),
            "--workdir",
            str(workdir),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "/metrics" in result.stdout  # the dashboard URL is shown while it runs
    # Piped, each progress line stays whole (rich would wrap it at 80 columns).
    progress = [line for line in result.stdout.splitlines() if line.startswith("200/400 ")]
    assert len(progress) == 1 and progress[0].rstrip().endswith("student -"), result.stdout
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["requests"] == 400
    assert summary["student_served"] + summary["teacher_served"] == 400
    assert summary["teacher_calls"] == summary["teacher_served"] + summary["audit_calls"]
    assert summary["savings_usd"] == pytest.approx(
        summary["teacher_only_cost_usd"] - summary["cost_usd"]
    )
    assert summary["savings_pct"] == pytest.approx(
        100 * summary["savings_usd"] / summary["teacher_only_cost_usd"]
    )
    assert summary["student_share"] == pytest.approx(summary["student_served"] / 400)
    assert 0.0 <= summary["agreement_with_teacher"] <= 1.0
    assert summary["teacher_only_cost_usd"] > 0
    assert (workdir / "demo.png").read_bytes()[:4] == b"\x89PNG"
