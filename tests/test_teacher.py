"""The teacher client on both transports against a real local OpenAI-compatible server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import openai
import pytest

from gateway.app import create_app
from gateway.config import TeacherEndpoint
from gateway.providers import litellm, price_map, split_model
from gateway.teacher import resolve_price
from gateway.testing.teacher_server import TeacherServer
from gateway.transports import LiteLLMTransport, OpenAIHTTPTransport, make_transport
from tests.conftest import make_settings
from tests.servers import GatewayServer


def test_transport_choice() -> None:
    http = make_transport(TeacherEndpoint(model="openai/gpt-4o", api_base="http://h/v1"))
    assert isinstance(http, OpenAIHTTPTransport)
    assert isinstance(
        make_transport(TeacherEndpoint(model="hosted_vllm/m", api_base="http://h")),
        OpenAIHTTPTransport,
    )
    assert isinstance(
        make_transport(TeacherEndpoint(model="anthropic/claude-3-5-sonnet-20240620")),
        LiteLLMTransport,
    )
    forced = TeacherEndpoint(model="openai/gpt-4o", api_base="http://h/v1", transport="litellm")
    assert isinstance(make_transport(forced), LiteLLMTransport)
    with pytest.raises(ValueError, match="transport 'http'"):
        make_transport(
            TeacherEndpoint(model="anthropic/claude-3-5-sonnet-20240620", transport="http")
        )


def test_price_from_litellm_price_map() -> None:
    price = resolve_price(TeacherEndpoint(model="openai/gpt-4o"))
    prompt, completion = litellm().cost_per_token(
        model="openai/gpt-4o", prompt_tokens=1000, completion_tokens=100
    )
    assert price.cost(1000, 100) == pytest.approx(prompt + completion)
    assert price.cost(1000, 100) > 0
    configured = TeacherEndpoint(model="x/y", price={"input_per_mtok": 1, "output_per_mtok": 4})
    assert resolve_price(configured).cost(1_000_000, 1_000_000) == pytest.approx(5.0)
    assert resolve_price(TeacherEndpoint(model="openai/not-a-real-model")).cost(10, 10) == 0.0


@pytest.mark.parametrize("model", ["gpt-4o", "openai/gpt-4o-mini", "gpt-3.5-turbo",
                                   "anthropic/claude-sonnet-4-5", "claude-haiku-4-5"])
def test_price_map_read_without_litellm_agrees_with_litellm(model: str) -> None:
    assert model in price_map() or model.partition("/")[2] in price_map()
    prompt, completion = litellm().cost_per_token(
        model=model, prompt_tokens=1000, completion_tokens=100
    )
    assert resolve_price(TeacherEndpoint(model=model)).cost(1000, 100) == pytest.approx(
        prompt + completion
    )


def test_provider_split_without_litellm_agrees_with_litellm() -> None:
    for model in ["gpt-4o", "openai/gpt-4o", "hosted_vllm/llama-3"]:
        known = split_model(model)
        assert known is not None, model
        name, provider, _, _ = litellm().get_llm_provider(model=model, api_base="http://h/v1")
        assert known == (provider, name)
    # Anything else is left to litellm.
    assert split_model("anthropic/claude-3-5-sonnet-20240620") is None
    assert split_model("claude-haiku-4-5") is None
    assert split_model("text-embedding-3-small") is None  # an OpenAI model, not a chat one


def test_gateway_with_an_openai_compatible_teacher_never_imports_litellm(tmp_path: Path) -> None:
    """litellm costs ~190 MB and ~3 s per serving process; the direct path does not need it."""
    script = f"""
import sys
import httpx
from gateway.app import create_app
from gateway.config import load_settings
from gateway.testing.teacher_server import TeacherServer
from tests.servers import GatewayServer
teacher = TeacherServer().start()
settings = load_settings(None, database="sqlite:///{tmp_path / 'd.db'}",
                         artifacts="{tmp_path / 'artifacts'}",
                         default_teacher={{"model": "gpt-4o", "api_base": teacher.url,
                                           "api_key": "sk-test"}})
with GatewayServer(create_app(settings)) as gateway:
    answer = httpx.post(gateway.url + "/v1/chat/completions", json={{
        "model": "gpt-4o", "messages": [{{"role": "user", "content": "hi"}}]}})
    assert answer.status_code == 200, answer.text
    assert float(answer.headers["x-distill-cost-usd"]) > 0  # priced from the map
assert "litellm" not in sys.modules, "litellm was imported"
teacher.stop()
# A teacher that needs litellm loads it when the transport is made (at start-up), not on
# its first request, where a ~3 s import would stall the event loop.
from gateway.config import TeacherEndpoint
from gateway.transports import make_transport
make_transport(TeacherEndpoint(model="anthropic/claude-sonnet-4-5"))
assert "litellm" in sys.modules
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parents[1],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("transport", ["litellm", "auto"])
def test_both_transports_end_to_end(tmp_path: Path, teacher: TeacherServer, transport: str) -> None:
    """The litellm path is the real litellm client: same answers, errors and costs."""
    settings = make_settings(
        tmp_path,
        teacher,
        default_teacher={
            "model": "openai/gpt-4o",
            "api_base": teacher.url,
            "api_key": "sk-t",
            "num_retries": 1,
            "timeout_s": 2,
            "transport": transport,
        },
    )
    with GatewayServer(create_app(settings)) as gateway:
        client = openai.OpenAI(base_url=gateway.base_url, api_key="k", max_retries=0)
        raw = client.chat.completions.with_raw_response.create(
            model="support-intents",
            messages=[{"role": "user", "content": "card_arrival"}],
            temperature=0.5,
            max_tokens=7,
        )
        completion = raw.parse()
        assert completion.choices[0].message.content == "echo: card_arrival"
        assert teacher.requests[-1]["temperature"] == 0.5
        assert teacher.requests[-1]["max_tokens"] == 7
        assert teacher.requests[-1]["model"] == "gpt-4o"
        usage = completion.usage
        assert usage is not None
        prompt, completion_cost = litellm().cost_per_token(
            model="openai/gpt-4o",
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
        )
        assert float(raw.headers["x-distill-cost-usd"]) == pytest.approx(
            prompt + completion_cost, rel=1e-4
        )

        chunks = list(
            client.chat.completions.create(
                model="support-intents",
                stream=True,
                stream_options={"include_usage": True},
                messages=[{"role": "user", "content": "a b c d"}],
            )
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
            "echo: a b c d"
        )
        assert any(c.usage is not None and c.usage.completion_tokens == 5 for c in chunks)

        teacher.fail_next(5, status=500, message="down for maintenance")
        with pytest.raises(openai.APIStatusError) as info:
            client.chat.completions.create(
                model="support-intents", messages=[{"role": "user", "content": "x"}]
            )
        assert info.value.status_code == 502
        assert "down for maintenance" in info.value.message
        teacher.reset()

        teacher.fail_next(1, status=400, message="unsupported parameter foo")
        with pytest.raises(openai.BadRequestError) as bad:
            client.chat.completions.create(
                model="support-intents", messages=[{"role": "user", "content": "x"}]
            )
        assert "unsupported parameter foo" in bad.value.message

        teacher.hang_next(2)
        with pytest.raises(openai.APIStatusError) as slow:
            client.chat.completions.create(
                model="support-intents", messages=[{"role": "user", "content": "x"}]
            )
        assert slow.value.status_code == 504
