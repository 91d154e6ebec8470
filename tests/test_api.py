"""End to end with the official openai SDK against the gateway served by uvicorn."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest

from gateway.app import create_app
from gateway.config import Settings, load_settings
from gateway.testing.teacher_server import TeacherServer
from tests.servers import GatewayServer


def client(gateway: GatewayServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key="client-key", max_retries=0)


def store_of(gateway: GatewayServer):  # type: ignore[no-untyped-def]
    store = gateway.app.state.runtime.store
    assert store.flush(10)
    return store


def test_sync_completion_returns_teacher_answer_and_records_it(
    gateway: GatewayServer, teacher: TeacherServer
) -> None:
    raw = client(gateway).chat.completions.with_raw_response.create(
        model="support-intents",
        messages=[
            {"role": "system", "content": "label it"},
            {"role": "user", "content": "card_arrival"},
        ],
        temperature=0.3,
        max_tokens=5,
        user="u-1",
        seed=7,
        response_format={"type": "text"},
        logprobs=True,
        top_logprobs=2,
        extra_body={"vendor_flag": "kept"},
    )
    completion = raw.parse()
    assert completion.choices[0].message.content == "echo: card_arrival"
    assert completion.model == "support-intents"
    assert raw.headers["x-distill-served-by"] == "teacher"
    usage = completion.usage
    assert usage is not None
    expected_cost = (usage.prompt_tokens * 2.5 + usage.completion_tokens * 10.0) / 1e6
    assert float(raw.headers["x-distill-cost-usd"]) == pytest.approx(expected_cost, rel=1e-6)
    # every client parameter reached the teacher unchanged
    sent = teacher.requests[-1]
    assert sent["model"] == "teacher-model"
    for key, value in {
        "temperature": 0.3,
        "max_tokens": 5,
        "user": "u-1",
        "seed": 7,
        "response_format": {"type": "text"},
        "logprobs": True,
        "top_logprobs": 2,
        "vendor_flag": "kept",
    }.items():
        assert sent[key] == value, key
    rows = store_of(gateway).fetch(task="support-intents")
    assert len(rows) == 1
    row = rows[0]
    assert row["id"] == raw.headers["x-distill-request-id"]
    assert row["served_by"] == "teacher" and row["status"] == 200
    assert row["teacher_model"] == "openai/teacher-model"
    assert row["request"]["messages"][1]["content"] == "card_arrival"
    assert row["task_input"] == "card_arrival"
    assert row["answer"] == "echo: card_arrival"
    # "echo: card_arrival" is not one of the labels: recorded, but marked invalid
    assert row["target_valid"] is False and row["target"] is None
    assert row["prompt_tokens"] == usage.prompt_tokens
    assert row["cost_usd"] == pytest.approx(expected_cost)
    assert row["latency_ms"] >= row["upstream_ms"] > 0


def test_label_answer_is_normalised_into_target(
    gateway: GatewayServer, teacher: TeacherServer
) -> None:
    teacher.responder = lambda body: "  Card Arrival. "
    client(gateway).chat.completions.create(
        model="support-intents", messages=[{"role": "user", "content": "where is my card"}]
    )
    row = store_of(gateway).fetch()[0]
    assert row["target"] == "card_arrival" and row["target_valid"] is True


async def test_async_client_and_concurrency(gateway: GatewayServer) -> None:
    import asyncio

    async_client = openai.AsyncOpenAI(base_url=gateway.base_url, api_key="k", max_retries=0)
    results = await asyncio.gather(
        *[
            async_client.chat.completions.create(
                model="support-intents", messages=[{"role": "user", "content": f"q{i}"}]
            )
            for i in range(40)
        ]
    )
    assert sorted(r.choices[0].message.content for r in results) == sorted(
        f"echo: q{i}" for i in range(40)
    )
    await async_client.close()
    assert store_of(gateway).count(task="support-intents") == 40


def test_stream_forwards_chunks_and_records_the_whole_answer(gateway: GatewayServer) -> None:
    stream = client(gateway).chat.completions.create(
        model="support-intents",
        stream=True,
        messages=[{"role": "user", "content": "one two three four five"}],
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: one two three four five"
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 2
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks)  # the client did not ask for usage
    assert all(c.model == "support-intents" for c in chunks)
    row = store_of(gateway).fetch()[0]
    assert row["stream"] is True and row["status"] == 200
    assert row["answer"] == text
    assert row["completion_tokens"] > 0 and row["cost_usd"] > 0


async def test_async_stream_with_usage(gateway: GatewayServer) -> None:
    async_client = openai.AsyncOpenAI(base_url=gateway.base_url, api_key="k", max_retries=0)
    stream = await async_client.chat.completions.create(
        model="support-intents",
        stream=True,
        stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "alpha beta"}],
    )
    chunks = [c async for c in stream]
    await async_client.close()
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        "echo: alpha beta"
    )
    usage = [c.usage for c in chunks if c.usage is not None]
    assert usage and usage[-1].completion_tokens == 3


def test_raw_sse_ends_with_done(gateway: GatewayServer) -> None:
    with httpx.stream(
        "POST",
        gateway.base_url + "/chat/completions",
        json={
            "model": "support-intents",
            "stream": True,
            "messages": [{"role": "user", "content": "hi"}],
        },
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)


def test_passthrough_model_goes_to_default_teacher(
    gateway: GatewayServer, teacher: TeacherServer
) -> None:
    completion = client(gateway).chat.completions.create(
        model="gpt-unknown-to-us", messages=[{"role": "user", "content": "hello"}]
    )
    assert completion.choices[0].message.content == "echo: hello"
    assert teacher.requests[-1]["model"] == "teacher-model"
    row = store_of(gateway).fetch(model="gpt-unknown-to-us")[0]
    assert row["task"] is None and row["status"] == 200


def test_models_health_ready_and_metrics(gateway: GatewayServer) -> None:
    models = client(gateway).models.list()
    ids = [m.id for m in models.data]
    assert ids == ["support-intents", "openai/teacher-model"]
    assert httpx.get(gateway.url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(gateway.url + "/readyz")
    assert ready.status_code == 200 and ready.json()["store"] == "ok"
    client(gateway).chat.completions.create(
        model="support-intents", messages=[{"role": "user", "content": "x"}]
    )
    store_of(gateway)
    text = httpx.get(gateway.url + "/metrics").text
    assert (
        'distill_requests_total{served_by="teacher",status="200",task="support-intents"} 1.0'
        in text
    )
    assert "distill_gateway_overhead_seconds_bucket" in text
    assert (
        'distill_teacher_cost_usd_total{model="openai/teacher-model",task="support-intents"}'
        in text
    )
    assert 'distill_teacher_tokens_total{kind="completion",model="openai/teacher-model"' in text
    assert "distill_store_written_total 1.0" in text


def test_a_gateway_with_nothing_to_serve_says_so(
        tmp_path: Path, settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    empty = load_settings(None, database=f"sqlite:///{tmp_path / 'empty.db'}",
                          artifacts=str(tmp_path / "empty-artifacts"))
    with (caplog.at_level("WARNING", logger="distill_gateway"),
          GatewayServer(create_app(empty)) as server):
        reply = httpx.post(f"{server.base_url}/chat/completions", json={
            "model": "anything", "messages": [{"role": "user", "content": "hi"}]})
    assert reply.status_code == 404
    assert "no task and no default_teacher is configured" in caplog.text
    caplog.clear()
    with (caplog.at_level("WARNING", logger="distill_gateway"),
          GatewayServer(create_app(settings))):  # a task and a teacher: nothing to say
        pass
    assert "no task and no default_teacher" not in caplog.text
