"""POST /v1/chat/completions: JSON, or Server-Sent Events with ``stream: true``."""

from __future__ import annotations

import time

import orjson
from fastapi import APIRouter, Request
from starlette.requests import ClientDisconnect
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope

from gateway.api.deps import CascadeDep, RuntimeDep
from gateway.errors import InvalidRequest, PayloadTooLarge
from gateway.schemas import ChatCompletionRequest, parse_chat_request

router = APIRouter(tags=["chat"])

_REQUEST_SCHEMA = ChatCompletionRequest.model_json_schema()


class ClientGone(ClientDisconnect):
    """The client disconnected before its request body was read."""


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The request body, refusing more than ``limit`` bytes before reading them all (at
    once when Content-Length says so, else while reading)."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                size = int(value)
            except ValueError:
                raise InvalidRequest("Invalid Content-Length header.") from None
            if size > limit:
                raise PayloadTooLarge(f"The request body is {size} bytes; the limit is {limit}.",
                                      code="request_too_large")
    chunks: list[bytes] = []
    received = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        received += len(chunk)
        if received > limit:
            raise PayloadTooLarge(f"The request body exceeds the limit of {limit} bytes.",
                                  code="request_too_large")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


@router.post(
    "/v1/chat/completions",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": _REQUEST_SCHEMA}},
        }
    },
    summary="Create a chat completion (OpenAI-compatible)",
)
async def chat_completions(request: Request, runtime: RuntimeDep, cascade: CascadeDep) -> Response:
    started = time.perf_counter()
    body = await read_body(request.scope, request.receive,
                           runtime.settings.server.max_body_bytes)
    chat, raw = parse_chat_request(body)  # raw is recorded exactly as the client sent it
    if chat.stream:
        events, headers = await cascade.open_stream(chat, raw, started)
        return StreamingResponse(
            events,
            media_type="text/event-stream",
            headers={**headers, "cache-control": "no-cache", "x-accel-buffering": "no"},
        )
    answer = await cascade.complete(chat, raw, started)
    return Response(
        orjson.dumps(answer.body), media_type="application/json", headers=answer.headers
    )
