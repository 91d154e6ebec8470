"""The replay teacher: recorded answers through the real litellm path."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest

from gateway.app import create_app
from gateway.providers import litellm
from gateway.testing.teacher_server import TeacherServer
from tests.conftest import make_settings
from tests.servers import GatewayServer


def test_replay_teacher_through_the_gateway(tmp_path: Path, teacher: TeacherServer) -> None:
    stream = tmp_path / "stream.jsonl"
    rows = [
        {"text": "where is my card", "teacher": "card_arrival", "gold": "card_arrival"},
        {"text": "link it", "teacher": "card_linking"},
        {"text": "no idea", "teacher": None},
    ]
    stream.write_text("\n".join(json.dumps(r) for r in rows))
    settings = make_settings(
        tmp_path,
        teacher,
        default_teacher={"model": "replay/gpt-4o", "api_base": str(stream), "num_retries": 0},
    )
    with GatewayServer(create_app(settings)) as gateway:
        client = openai.OpenAI(base_url=gateway.base_url, api_key="k", max_retries=0)
        raw = client.chat.completions.with_raw_response.create(
            model="support-intents", messages=[{"role": "user", "content": "where is my card"}]
        )
        answer = raw.parse()
        assert answer.choices[0].message.content == "card_arrival"
        usage = answer.usage
        assert usage is not None and usage.prompt_tokens > 0
        prompt, completion = litellm().cost_per_token(
            model="gpt-4o",
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
        )
        assert float(raw.headers["x-distill-cost-usd"]) == pytest.approx(prompt + completion)
        chunks = list(
            client.chat.completions.create(
                model="support-intents",
                stream=True,
                messages=[{"role": "user", "content": "link it"}],
            )
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
            "card_linking"
        )
        empty = client.chat.completions.create(
            model="support-intents", messages=[{"role": "user", "content": "no idea"}]
        )
        assert empty.choices[0].message.content == ""
        with pytest.raises(openai.APIStatusError) as missing:
            client.chat.completions.create(
                model="support-intents", messages=[{"role": "user", "content": "unknown"}]
            )
        assert missing.value.status_code == 502
        assert "no recorded answer" in missing.value.message
