"""train / models / promote / rollback / eval as a user runs them."""

from __future__ import annotations

from pathlib import Path

import openai
import yaml
from typer.testing import CliRunner

from gateway.app import create_app
from gateway.cli import app as cli
from gateway.testing.teacher_server import TeacherServer
from tests.servers import GatewayServer
from tests.test_cascade import QUESTIONS, cascade_settings, label_teacher


def test_registry_commands(tmp_path: Path, teacher: TeacherServer) -> None:
    teacher.responder = label_teacher
    settings = cascade_settings(tmp_path, teacher)
    config = tmp_path / "config.yaml"
    data = settings.model_dump(mode="json", exclude_none=True)
    data["default_teacher"]["api_key"] = "sk-test"
    config.write_text(yaml.safe_dump(data))
    runner = CliRunner()
    nothing = runner.invoke(cli, ["train", "support-intents", "--config", str(config)])
    assert nothing.exit_code == 1 and "fewer than min_examples" in nothing.output

    app = create_app(settings)
    with GatewayServer(app) as gateway:
        client = openai.OpenAI(base_url=gateway.base_url, api_key="k", max_retries=0)
        for text in QUESTIONS:
            client.chat.completions.create(
                model="support-intents", messages=[{"role": "user", "content": text}]
            )
        assert app.state.runtime.store.flush(10)

    trained = runner.invoke(cli, ["train", "support-intents", "--config", str(config)])
    assert trained.exit_code == 0, trained.output
    assert "v0001: promoted" in trained.output
    assert "share served at the threshold" in trained.output
    second = runner.invoke(
        cli, ["train", "support-intents", "--config", str(config), "--promote", "never"]
    )
    assert second.exit_code == 0 and "v0002: not promoted" in second.output

    listed = runner.invoke(cli, ["models", "support-intents", "--config", str(config)])
    assert listed.exit_code == 0
    assert "v0001" in listed.output and "active" in listed.output
    assert "candidate" in listed.output

    promoted = runner.invoke(cli, ["promote", "support-intents", "v0002", "--config", str(config)])
    assert promoted.exit_code == 0 and "v0002 is active" in promoted.output
    missing = runner.invoke(cli, ["promote", "support-intents", "v0009", "--config", str(config)])
    assert missing.exit_code == 1 and "no version 'v0009'" in missing.output

    plot = tmp_path / "curve.png"
    evaluated = runner.invoke(
        cli, ["eval", "support-intents", "--config", str(config), "--plot", str(plot)]
    )
    assert evaluated.exit_code == 0, evaluated.output
    assert "coverage" in evaluated.output and "disagreement bound" in evaluated.output
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    back = runner.invoke(cli, ["rollback", "support-intents", "--config", str(config)])
    assert back.exit_code == 0 and "v0001 is active again" in back.output
