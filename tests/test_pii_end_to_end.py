"""PII never reaches the dataset tables, the spool or the exports when `pii` is in the chain."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import sqlalchemy as sa
from typer.testing import CliRunner

from gateway.app import create_app
from gateway.cli import app as cli
from gateway.testing.teacher_server import TeacherServer
from tests.conftest import LABELS, make_settings
from tests.servers import GatewayServer
from tests.test_cli_ops import write_config

SECRETS = [
    "jane.doe@example.com",
    "4111 1111 1111 1111",
    "GB82 WEST 1234 5698 7654 32",
    "+44 20 7946 0958",
]


def test_pii_is_redacted_in_records_and_exports(tmp_path: Path, teacher: TeacherServer) -> None:
    teacher.responder = lambda body: "card_arrival"
    settings = make_settings(
        tmp_path,
        teacher,
        tasks={
            "support-intents": {
                "plugin": "classify",
                "options": {"labels": LABELS},
                "filters": ["valid", "pii", "length"],
            }
        },
    )
    app = create_app(settings)
    with GatewayServer(app) as gateway:
        client = openai.OpenAI(base_url=gateway.base_url, api_key="k", max_retries=0)
        for i, secret in enumerate(SECRETS):
            answer = client.chat.completions.create(
                model="support-intents",
                messages=[
                    {"role": "system", "content": "classify"},
                    {"role": "user", "content": f"my card {i} never came, reach me at {secret}"},
                ],
            )
            # the client gets its answer untouched; only what is stored is redacted
            assert answer.choices[0].message.content == "card_arrival"
        assert app.state.runtime.store.flush(10)
    engine = sa.create_engine(settings.database)
    with engine.connect() as conn:
        stored = json.dumps(
            [
                dict(r._mapping)
                for r in conn.execute(
                    sa.text("SELECT request, task_input, response, answer, target FROM exchanges")
                )
            ]
        )
    engine.dispose()
    for secret in SECRETS:
        assert secret not in stored
    for placeholder in ("[EMAIL]", "[CARD]", "[IBAN]", "[PHONE]"):
        assert placeholder in stored

    out = tmp_path / "export.jsonl"
    config = write_config(tmp_path, settings)
    result = CliRunner().invoke(
        cli,
        [
            "export",
            "support-intents",
            "--format",
            "openai-jsonl",
            "--out",
            str(out),
            "--config",
            str(config),
        ],
    )
    assert result.exit_code == 0, result.output
    exported = out.read_text()
    assert len(exported.splitlines()) == len(SECRETS)
    for secret in SECRETS:
        assert secret not in exported
    assert "[EMAIL]" in exported
