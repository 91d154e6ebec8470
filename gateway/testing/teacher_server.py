"""A tiny, fast OpenAI-compatible chat-completions server used as the teacher in tests.

Raw asyncio (uvloop when importable) plus ``httptools`` - no web framework - so the
per-request path stays lean enough for benchmarks (thousands of requests/s on one core).

Endpoints: ``POST /v1/chat/completions`` (also ``/chat/completions``), JSON and
``stream: true`` SSE; ``GET /v1/models``; anything else is a 404 in OpenAI's error shape.

Fault injection for tests: :meth:`TeacherServer.fail_next`, :meth:`TeacherServer.hang_next`,
:meth:`TeacherServer.set_delay`.

Run in the foreground::

    python -m gateway.testing.teacher_server --host 127.0.0.1 --port 9000 [--answer TEXT]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from http import HTTPStatus
from types import TracebackType
from typing import Any, cast

import httptools
import orjson

__all__ = ["Responder", "TeacherServer", "echo_responder", "main"]

Responder = Callable[[dict[str, Any]], str]

_CHAT_PATHS = frozenset({b"/v1/chat/completions", b"/chat/completions"})
_MODELS_PATHS = frozenset({b"/v1/models", b"/models"})

_ID_PREFIX = "chatcmpl-" + os.urandom(6).hex()
_ids = itertools.count(1)


def _new_id() -> str:
    return f"{_ID_PREFIX}{next(_ids):08x}"


def _content_text(content: Any) -> str:
    """The text of a message ``content`` (a string or a list of content parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
        return " ".join(parts)
    return ""


def echo_responder(body: dict[str, Any]) -> str:
    """Default responder: ``"echo: "`` + the text of the last user message."""
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in reversed(messages):
            if isinstance(message, dict) and message.get("role") == "user":
                return "echo: " + _content_text(message.get("content"))
    return "echo: "


def _count_tokens(text: str) -> int:
    return max(1, len(text.split()))


def _prompt_tokens(body: dict[str, Any]) -> int:
    messages = body.get("messages")
    words = 0
    if isinstance(messages, list):
        for message in messages:
            if isinstance(message, dict):
                words += len(_content_text(message.get("content")).split())
    return max(1, words)


def _logprobs(content: str, top: int) -> dict[str, Any]:
    tokens = content.split(" ") if content else [""]
    items = []
    for i, word in enumerate(tokens):
        token = word if i == 0 else " " + word
        lp = -0.01 - 0.001 * i
        alts = [
            {"token": token, "logprob": lp, "bytes": list(token.encode())},
            *(
                {"token": f"alt{k}", "logprob": lp - 3.0 - k, "bytes": list(f"alt{k}".encode())}
                for k in range(max(0, top - 1))
            ),
        ][:top]
        items.append(
            {"token": token, "logprob": lp, "bytes": list(token.encode()), "top_logprobs": alts}
        )
    return {"content": items, "refusal": None}


def _split_pieces(content: str, pieces: int = 3) -> list[str]:
    """Split ``content`` into about ``pieces`` parts at word boundaries (joined == content)."""
    words = content.split(" ")
    if len(words) <= 1:
        return [content]
    size = max(1, -(-len(words) // pieces))
    out = []
    for start in range(0, len(words), size):
        chunk = " ".join(words[start : start + size])
        out.append(chunk if start == 0 else " " + chunk)
    return out


def _error_body(
    message: str, type_: str, code: str | None = None, param: str | None = None
) -> bytes:
    return orjson.dumps(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}
    )


def _status_line(status: int) -> bytes:
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Error"
    return f"HTTP/1.1 {status} {reason}\r\n".encode()


_JSON_200_KEEP = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
_SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n"
)


class _State:
    """Shared, lock-protected state between the caller's thread and the server loop."""

    def __init__(self, responder: Responder, model: str) -> None:
        self.responder = responder
        self.model = model
        self.lock = threading.Lock()
        self.requests: list[dict[str, Any]] = []
        self.fail: deque[tuple[int, str]] = deque()
        self.hang = 0
        self.delay = 0.0
        self.models_body = orjson.dumps(
            {
                "object": "list",
                "data": [{"id": model, "object": "model", "created": 0, "owned_by": "teacher"}],
            }
        )
        self.connections: set[_HttpProtocol] = set()


class _HttpProtocol(asyncio.Protocol):
    __slots__ = (
        "_body",
        "_busy",
        "_keep_alive",
        "_loop",
        "_parser",
        "_pending",
        "_state",
        "_tasks",
        "_transport",
        "_url",
    )

    def __init__(self, state: _State, loop: asyncio.AbstractEventLoop) -> None:
        self._state = state
        self._loop = loop
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._url = b""
        self._body: list[bytes] = []
        self._busy = False
        self._pending: deque[tuple[bytes, bytes, bytes, bool]] = deque()
        self._tasks: set[asyncio.Task[None]] = set()
        self._keep_alive = True

    # -- asyncio.Protocol ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._state.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._state.connections.discard(self)
        self._transport = None
        for task in self._tasks:
            task.cancel()

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._send_simple(400, _error_body("upgrade not supported", "invalid_request_error"))
            self.close()
        except httptools.HttpParserError:
            self._send_simple(400, _error_body("malformed HTTP request", "invalid_request_error"))
            self.close()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    # -- httptools callbacks ------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._url = b""
        self._body = []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        method = self._parser.get_method()
        path = self._url.split(b"?", 1)[0]
        request = (method, path, b"".join(self._body), self._parser.should_keep_alive())
        if self._busy:
            self._pending.append(request)
        else:
            self._handle(*request)

    # -- request handling ---------------------------------------------------------------
    def _handle(self, method: bytes, path: bytes, body: bytes, keep_alive: bool) -> None:
        self._keep_alive = keep_alive
        if path in _CHAT_PATHS:
            if method != b"POST":
                self._send_simple(405, _error_body("method not allowed", "invalid_request_error"))
                return
            self._chat(body)
        elif path in _MODELS_PATHS and method == b"GET":
            self._send_simple(200, self._state.models_body)
        else:
            self._send_simple(
                404,
                _error_body(
                    f"unknown path {path.decode('latin-1')}", "invalid_request_error", "not_found"
                ),
            )

    def _chat(self, raw: bytes) -> None:
        try:
            request = orjson.loads(raw)
        except orjson.JSONDecodeError:
            self._send_simple(400, _error_body("invalid JSON body", "invalid_request_error"))
            return
        if not isinstance(request, dict):
            self._send_simple(
                400, _error_body("body must be a JSON object", "invalid_request_error")
            )
            return
        state = self._state
        with state.lock:
            state.requests.append(request)
            fault = state.fail.popleft() if state.fail else None
            hang = False
            if fault is None and state.hang > 0:
                state.hang -= 1
                hang = True
            delay = state.delay
        if hang:
            self._busy = True  # never answer; later pipelined requests wait forever too
            return
        if delay > 0:
            self._busy = True
            task = self._loop.create_task(self._answer_later(delay, request, fault))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        self._answer(request, fault)

    async def _answer_later(
        self, delay: float, request: dict[str, Any], fault: tuple[int, str] | None
    ) -> None:
        await asyncio.sleep(delay)
        self._answer(request, fault)
        self._busy = False
        while self._pending and not self._busy and self._transport is not None:
            self._handle(*self._pending.popleft())

    def _answer(self, request: dict[str, Any], fault: tuple[int, str] | None) -> None:
        if fault is not None:
            status, message = fault
            type_ = "server_error" if status >= 500 else "invalid_request_error"
            self._send_simple(status, _error_body(message, type_, str(status)))
            return
        try:
            content = self._state.responder(request)
        except Exception as exc:
            self._send_simple(500, _error_body(f"responder failed: {exc}", "server_error"))
            return
        model = request.get("model") or self._state.model
        n = request.get("n") or 1
        if not isinstance(n, int) or n < 1:
            n = 1
        want_logprobs = request.get("logprobs") is True
        top = request.get("top_logprobs") or 0
        if not isinstance(top, int):
            top = 0
        completion_tokens = _count_tokens(content) * n
        prompt_tokens = _prompt_tokens(request)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        created = int(time.time())
        cid = _new_id()
        if request.get("stream") is True:
            self._stream(request, cid, created, model, content, n, usage, want_logprobs, top)
            return
        logprobs = _logprobs(content, top) if want_logprobs else None
        body = orjson.dumps(
            {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": i,
                        "message": {"role": "assistant", "content": content, "refusal": None},
                        "logprobs": logprobs,
                        "finish_reason": "stop",
                    }
                    for i in range(n)
                ],
                "usage": usage,
                "system_fingerprint": None,
            }
        )
        transport = self._transport
        if transport is None:
            return
        if self._keep_alive:
            transport.write(b"%s%d\r\n\r\n%s" % (_JSON_200_KEEP, len(body), body))
        else:
            transport.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
            )
            transport.close()

    def _stream(
        self,
        request: dict[str, Any],
        cid: str,
        created: int,
        model: str,
        content: str,
        n: int,
        usage: dict[str, int],
        want_logprobs: bool,
        top: int,
    ) -> None:
        transport = self._transport
        if transport is None:
            return
        base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            data = b"data: " + orjson.dumps({**base, "choices": choices, **extra}) + b"\n\n"
            return b"%x\r\n%s\r\n" % (len(data), data)

        out = [_SSE_HEAD + (b"\r\n" if self._keep_alive else b"connection: close\r\n\r\n")]
        out.append(
            chunk(
                [
                    {
                        "index": i,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                    for i in range(n)
                ]
            )
        )
        for piece in _split_pieces(content):
            out.append(
                chunk(
                    [
                        {
                            "index": i,
                            "delta": {"content": piece},
                            "logprobs": _logprobs(piece.strip(), top) if want_logprobs else None,
                            "finish_reason": None,
                        }
                        for i in range(n)
                    ]
                )
            )
        out.append(
            chunk(
                [
                    {"index": i, "delta": {}, "logprobs": None, "finish_reason": "stop"}
                    for i in range(n)
                ]
            )
        )
        options = request.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage"):
            out.append(chunk([], usage=usage))
        done = b"data: [DONE]\n\n"
        out.append(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
        transport.write(b"".join(out))
        if not self._keep_alive:
            transport.close()

    def _send_simple(self, status: int, body: bytes) -> None:
        transport = self._transport
        if transport is None:
            return
        head = _status_line(status) + b"content-type: application/json\r\n"
        if not self._keep_alive:
            head += b"connection: close\r\n"
        transport.write(b"%scontent-length: %d\r\n\r\n%s" % (head, len(body), body))
        if not self._keep_alive:
            transport.close()


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


class TeacherServer:
    """An in-process OpenAI-compatible teacher, served from a daemon thread."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        responder: Responder | None = None,
        model: str = "teacher-model",
    ) -> None:
        self.host = host
        self._port = port
        self.model = model
        self._default_responder = responder or echo_responder
        self._state = _State(self._default_responder, model)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None

    # -- addresses ----------------------------------------------------------------------
    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        """Base URL for an OpenAI client, e.g. ``http://127.0.0.1:PORT/v1``."""
        if self._server is None:
            raise RuntimeError("TeacherServer is not started")
        return f"http://{self.host}:{self._port}/v1"

    @property
    def requests(self) -> list[dict[str, Any]]:
        """Every chat request body received, in order (the live list)."""
        return self._state.requests

    # -- lifecycle ----------------------------------------------------------------------
    async def serve(self) -> asyncio.AbstractServer:
        """Start listening on the running loop (used by :meth:`start` and the CLI)."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        state = self._state
        server = await loop.create_server(
            lambda: _HttpProtocol(state, loop), self.host, self._port, backlog=2048
        )
        self._server = server
        self._port = server.sockets[0].getsockname()[1]
        return server

    def start(self) -> TeacherServer:
        """Run the server on its own event loop in a daemon thread; return once listening."""
        if self._thread is not None:
            return self
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = _new_loop()
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.serve())
            except BaseException as exc:
                errors.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                with contextlib.suppress(Exception):
                    loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        thread = threading.Thread(target=run, name=f"teacher-server-{id(self):x}", daemon=True)
        thread.start()
        ready.wait()
        if errors:
            thread.join()
            raise RuntimeError(f"teacher server failed to start: {errors[0]}") from errors[0]
        self._thread = thread
        return self

    def stop(self) -> None:
        """Stop listening, close every connection (hung ones too) and join the thread."""
        loop, thread, server = self._loop, self._thread, self._server
        if loop is None or thread is None or server is None:
            return

        def shutdown() -> None:
            server.close()
            for conn in list(self._state.connections):
                conn.close()
            loop.call_later(0.01, loop.stop)

        if not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(shutdown)
        thread.join(timeout=5)
        self._thread = None
        self._server = None
        self._loop = None

    def __enter__(self) -> TeacherServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- fault injection ----------------------------------------------------------------
    def fail_next(self, n: int, status: int = 500, message: str = "teacher exploded") -> None:
        """The next ``n`` chat requests get an OpenAI-shaped error with ``status``."""
        with self._state.lock:
            self._state.fail.extend([(status, message)] * n)

    def hang_next(self, n: int) -> None:
        """The next ``n`` chat requests are never answered (until the connection closes)."""
        with self._state.lock:
            self._state.hang += n

    def set_delay(self, seconds: float) -> None:
        """Wait ``seconds`` before every answer (not blocking other connections)."""
        with self._state.lock:
            self._state.delay = max(0.0, float(seconds))

    def reset(self) -> None:
        """Clear faults, delay and the recorded requests."""
        with self._state.lock:
            self._state.fail.clear()
            self._state.hang = 0
            self._state.delay = 0.0
            self._state.requests.clear()
            self._state.responder = self._default_responder

    @property
    def responder(self) -> Responder:
        """What the teacher answers; assign to change it (``reset`` restores the original)."""
        return self._state.responder

    @responder.setter
    def responder(self, responder: Responder) -> None:
        with self._state.lock:
            self._state.responder = responder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fast local OpenAI-compatible teacher server.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--model", default="teacher-model")
    parser.add_argument("--answer", default=None, help="fixed content instead of echoing")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before every answer")
    args = parser.parse_args(argv)
    answer: str | None = args.answer
    responder: Responder | None = None
    if answer is not None:
        fixed: str = answer

        def responder(_body: dict[str, Any]) -> str:
            return fixed

    server = TeacherServer(args.host, args.port, responder, args.model)
    server.set_delay(args.delay)

    async def run() -> None:
        srv = await server.serve()
        print(f"teacher server listening on http://{server.host}:{server.port}/v1", flush=True)
        async with srv:
            await srv.serve_forever()

    loop = _new_loop()
    asyncio.set_event_loop(loop)
    with contextlib.suppress(KeyboardInterrupt):
        loop.run_until_complete(run())
    loop.close()


if __name__ == "__main__":
    main()
