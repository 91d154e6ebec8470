"""The direct JSON path for POST /v1/chat/completions answers exactly as FastAPI's route:
the same requests, sent to one gateway with the path on and to one with it off."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from gateway.api.fast_chat import GatewayApp
from gateway.app import create_app
from gateway.testing.teacher_server import TeacherServer
from tests.conftest import make_settings
from tests.servers import GatewayServer

GOOD = {"model": "support-intents", "messages": [{"role": "user", "content": "card_arrival"}]}
REQUESTS: list[tuple[str, Any]] = [
    ("answer", orjson.dumps(GOOD)),
    ("invalid JSON", b"{not json"),
    ("not an object", b"[1, 2]"),
    ("missing messages", orjson.dumps({"model": "support-intents"})),
    ("wrong type", orjson.dumps({**GOOD, "temperature": "hot"})),
    ("another model (the default teacher)", orjson.dumps({**GOOD, "model": "gpt-x"})),
    ("over the limit", orjson.dumps({**GOOD, "messages": [
        {"role": "user", "content": "x" * 3000}]})),
]


def chunked() -> Iterator[bytes]:  # no Content-Length: the limit applies while reading
    for _ in range(5):
        yield b"x" * 1000


def answers(gateway: GatewayServer) -> dict[str, tuple[int, str, Any, list[str]]]:
    url = gateway.base_url + "/chat/completions"
    out = {}
    with httpx.Client(timeout=30) as client:
        for name, body in REQUESTS:
            response = client.post(url, content=body,
                                   headers={"content-type": "application/json"})
            data = response.json()
            if response.status_code == 200:  # ids and times differ between two answers
                data = {"content": data["choices"][0]["message"]["content"],
                        "object": data["object"], "model": data["model"]}
            out[name] = (response.status_code, response.headers["content-type"], data,
                         sorted(h for h in response.headers if h.startswith("x-distill-")))
        response = client.post(url, content=chunked())
        out["chunked over the limit"] = (response.status_code,
                                         response.headers["content-type"], response.json(), [])
        with client.stream("POST", url, json={**GOOD, "stream": True}) as stream:
            lines = [line for line in stream.iter_lines() if line.startswith("data: ")]
            out["stream"] = (stream.status_code, stream.headers["content-type"],
                             len(lines) > 1 and lines[-1] == "data: [DONE]", [])
    return out


def test_direct_path_answers_like_the_fastapi_route(
        tmp_path: Path, teacher: TeacherServer, monkeypatch: pytest.MonkeyPatch) -> None:
    direct_calls = []
    original = GatewayApp._chat

    async def counted(self: GatewayApp, *args: Any) -> None:
        direct_calls.append(1)
        await original(self, *args)

    monkeypatch.setattr(GatewayApp, "_chat", counted)
    results, stored = [], []
    for fast in (True, False):
        settings = make_settings(tmp_path / str(fast), teacher, server={"max_body_bytes": 2000})
        app = create_app(settings)
        assert isinstance(app, GatewayApp)
        app.fast_chat = fast
        with GatewayServer(app) as gateway:
            results.append(answers(gateway))
            store = app.state.runtime.store
            assert store.flush(10)
            stored.append([(r["task"], r["served_by"], r["status"])
                           for r in store.fetch(limit=100)])
    assert len(direct_calls) == len(REQUESTS) + 2  # on: every POST; off: none
    direct, route = results
    assert direct == route
    assert stored[0] == stored[1] and len(stored[0]) >= 2  # recorded alike
    assert direct["answer"][0] == 200 and direct["answer"][3]  # x-distill-* headers
    assert direct["over the limit"][0] == direct["chunked over the limit"][0] == 413
    assert direct["stream"] == (200, "text/event-stream; charset=utf-8", True, [])
    for name in ("invalid JSON", "not an object", "missing messages", "wrong type"):
        status, _, body, _ = direct[name]
        assert 400 <= status < 500 and body["error"]["message"], name
