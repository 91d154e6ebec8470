"""Tests for the fast local teacher server used by the other tests and the benchmarks."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from gateway.testing.teacher_server import TeacherServer


@pytest.fixture(scope="module")
def server() -> Iterator[TeacherServer]:
    with TeacherServer() as srv:
        yield srv


@pytest.fixture(autouse=True)
def _reset(server: TeacherServer) -> None:
    server.reset()


@pytest.fixture
def client(server: TeacherServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.url, api_key="x", max_retries=0, timeout=5) as c:
        yield c


def test_url_and_port(server: TeacherServer) -> None:
    assert server.port > 0
    assert server.url == f"http://127.0.0.1:{server.port}/v1"


def test_non_stream_echo(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model="support-intents",
        messages=[
            {"role": "system", "content": "classify"},
            {"role": "user", "content": "where is my card"},
        ],
    )
    assert resp.id.startswith("chatcmpl-")
    assert resp.object == "chat.completion"
    assert resp.model == "support-intents"
    assert len(resp.choices) == 1
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == "echo: where is my card"
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage is not None
    assert resp.usage.prompt_tokens == 5
    assert resp.usage.completion_tokens == 5
    assert resp.usage.total_tokens == 10


def test_n_and_logprobs(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "hi there"}],
        n=3,
        logprobs=True,
        top_logprobs=2,
    )
    assert [c.index for c in resp.choices] == [0, 1, 2]
    for choice in resp.choices:
        assert choice.message.content == "echo: hi there"
        assert choice.logprobs is not None and choice.logprobs.content
        tokens = [t.token for t in choice.logprobs.content]
        assert "".join(tokens) == "echo: hi there"
        assert all(t.logprob < 0 for t in choice.logprobs.content)
        assert len(choice.logprobs.content[0].top_logprobs) == 2


def test_stream_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="support-intents",
        messages=[{"role": "user", "content": "one two three four five"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: one two three four five"
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content_chunks) >= 2
    finish = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finish[-1] == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 6
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1


def test_stream_without_usage(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}], stream=True
        )
    )
    assert all(c.choices for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_fail_next(server: TeacherServer, client: openai.OpenAI) -> None:
    server.fail_next(2)
    for _ in range(2):
        with pytest.raises(openai.InternalServerError) as info:
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "a"}])
        assert info.value.status_code == 500
        assert "teacher exploded" in info.value.message
    ok = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "a"}])
    assert ok.choices[0].message.content == "echo: a"


def test_fail_next_custom_status(server: TeacherServer, client: openai.OpenAI) -> None:
    server.fail_next(1, status=429, message="slow down")
    with pytest.raises(openai.RateLimitError, match="slow down"):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "a"}])


def test_requests_recorded(server: TeacherServer, client: openai.OpenAI) -> None:
    for i in range(3):
        client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": f"q{i}"}], temperature=0.5
        )
    assert [r["messages"][0]["content"] for r in server.requests] == ["q0", "q1", "q2"]
    assert server.requests[0]["temperature"] == 0.5
    server.reset()
    assert server.requests == []


def test_custom_responder() -> None:
    with TeacherServer(responder=lambda body: "card_arrival") as srv:
        with openai.OpenAI(base_url=srv.url, api_key="x", max_retries=0) as c:
            resp = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
        assert resp.choices[0].message.content == "card_arrival"


def test_models(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == ["teacher-model"]


def test_unknown_path_404(server: TeacherServer) -> None:
    resp = httpx.get(f"http://127.0.0.1:{server.port}/nope")
    assert resp.status_code == 404
    assert set(resp.json()["error"]) == {"message", "type", "param", "code"}


def test_invalid_json_400(server: TeacherServer) -> None:
    resp = httpx.post(f"{server.url}/chat/completions", content=b"{not json")
    assert resp.status_code == 400
    assert resp.json()["error"]["type"] == "invalid_request_error"


def test_keep_alive_and_chunked_body(server: TeacherServer) -> None:
    """Many requests, streamed and not, reuse one connection; chunked bodies are accepted."""
    body = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}
    ports = set()

    def track(response: httpx.Response) -> None:
        stream = response.extensions["network_stream"]
        ports.add(stream.get_extra_info("client_addr")[1])

    with httpx.Client(base_url=server.url, event_hooks={"response": [track]}) as http:
        for i in range(20):
            if i % 5 == 4:
                r = http.post("/chat/completions", json={**body, "stream": True})
                assert r.text.endswith("data: [DONE]\n\n")
            else:
                r = http.post("/chat/completions", json=body)
                assert r.json()["choices"][0]["message"]["content"] == "echo: hello"
        r = http.post(
            "/chat/completions",
            content=iter([b'{"model": "m", "messages": [{"role": "user",', b' "content": "ch"}]}']),
        )
        assert r.json()["choices"][0]["message"]["content"] == "echo: ch"
    assert len(ports) == 1


def test_hang_next_and_delay(server: TeacherServer) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "z"}]}
    server.hang_next(1)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/chat/completions", json=body, timeout=0.3)
    assert httpx.post(f"{server.url}/chat/completions", json=body).status_code == 200

    server.set_delay(0.2)
    start = time.perf_counter()
    assert httpx.post(f"{server.url}/chat/completions", json=body).status_code == 200
    assert time.perf_counter() - start >= 0.2


def test_stop_closes_hung_connections() -> None:
    srv = TeacherServer().start()
    srv.hang_next(1)
    start = time.perf_counter()
    errors: list[Exception] = []

    def call() -> None:
        try:
            httpx.post(f"{srv.url}/chat/completions", json={"messages": []}, timeout=10)
        except Exception as exc:
            errors.append(exc)

    t = threading.Thread(target=call)
    t.start()
    time.sleep(0.2)
    srv.stop()
    t.join(5)
    assert not t.is_alive()
    assert errors
    assert time.perf_counter() - start < 5
