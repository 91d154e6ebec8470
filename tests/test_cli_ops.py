"""import / export / status / worker as a user runs them."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import yaml
from typer.testing import CliRunner

from gateway.cli import app as cli
from gateway.config import Settings
from gateway.testing.teacher_server import TeacherServer
from tests.test_loop import QUESTIONS, loop_settings


def write_config(tmp_path: Path, settings: Settings) -> Path:
    data = settings.model_dump(mode="json", exclude_none=True)
    data["default_teacher"]["api_key"] = "sk-test"
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_import_train_status_export(tmp_path: Path, teacher: TeacherServer) -> None:
    config = write_config(tmp_path, loop_settings(tmp_path, teacher))
    logs = tmp_path / "logs.jsonl"
    rows = [{"text": text, "teacher": label} for text, label in QUESTIONS[:120]]
    rows += [
        {
            "messages": [
                {"role": "system", "content": "classify"},
                {"role": "user", "content": text},
                {"role": "assistant", "content": label},
            ]
        }
        for text, label in QUESTIONS[120:200]
    ]
    rows += [
        {"input": "what is this", "output": "not a label"},
        {"text": "no answer", "teacher": None},
    ]
    logs.write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
    runner = CliRunner()
    imported = runner.invoke(cli, ["import", "support-intents", str(logs), "--config", str(config)])
    assert imported.exit_code == 0, imported.output
    assert "203 rows read, 200 with a valid teacher answer, 2 invalid, 1 unreadable" in (
        imported.output
    )

    once = runner.invoke(cli, ["worker", "--once", "--config", str(config)])
    assert once.exit_code == 0, once.output
    assert "support-intents: promoted" in once.output
    again = runner.invoke(cli, ["worker", "--once", "--config", str(config)])
    assert "support-intents: nothing due" in again.output

    status = runner.invoke(cli, ["status", "--config", str(config)])
    assert status.exit_code == 0, status.output
    assert "v0001" in status.output and "200" in status.output

    jsonl = tmp_path / "out.jsonl"
    exported = runner.invoke(
        cli,
        [
            "export",
            "support-intents",
            "--format",
            "openai-jsonl",
            "--out",
            str(jsonl),
            "--config",
            str(config),
        ],
    )
    assert exported.exit_code == 0, exported.output
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert len(lines) == 200
    by_user = {line["messages"][-2]["content"]: line for line in lines}
    text, label = QUESTIONS[150]
    assert by_user[text]["messages"][0] == {"role": "system", "content": "classify"}
    assert by_user[text]["messages"][-1] == {"role": "assistant", "content": label}
    assert set(lines[0]) == {"messages"}

    parquet = tmp_path / "out.parquet"
    exported = runner.invoke(
        cli,
        [
            "export",
            "support-intents",
            "--format",
            "parquet",
            "--out",
            str(parquet),
            "--config",
            str(config),
        ],
    )
    assert exported.exit_code == 0, exported.output
    table = pq.read_table(parquet).to_pylist()
    assert len(table) == 200 and {"input", "target", "completion", "messages"} <= set(table[0])

    wrong = runner.invoke(
        cli,
        [
            "export",
            "support-intents",
            "--format",
            "csv",
            "--out",
            str(tmp_path / "x"),
            "--config",
            str(config),
        ],
    )
    assert wrong.exit_code == 1 and "--format must be one of" in wrong.output
