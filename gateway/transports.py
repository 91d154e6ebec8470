"""How a teacher request travels: litellm for any provider, or direct HTTP for endpoints
that already speak the OpenAI chat API.

``litellm.acompletion`` costs about 6 ms of CPU per call on these 2-core machines (cost
calculation, logging payloads, the provider SDK), more than the whole latency budget of
the gateway. For OpenAI-compatible endpoints (``openai/…``, ``hosted_vllm/…`` and the
like) the request the client sent is already what the provider expects, so the default
``transport: auto`` posts it over a pooled aiohttp connection (about 0.15 ms) and keeps
litellm for every other provider, where its request and response translation is the
point. ``transport: litellm`` forces litellm everywhere.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import orjson

from gateway.config import TeacherEndpoint
from gateway.providers import OPENAI_COMPATIBLE, litellm, split_model

log = logging.getLogger("distill_gateway.teacher")

OPENAI_DEFAULT_BASE = "https://api.openai.com/v1"


class TeacherCallError(Exception):
    """One failed attempt, classified so the client knows whether to try again."""

    def __init__(
        self,
        message: str,
        *,
        retryable: bool = True,
        timeout: bool = False,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        self.timeout = timeout
        self.status = status


class Transport(Protocol):
    model: str  # the configured litellm model string, for records and metrics

    async def complete(
        self, messages: list[dict[str, Any]], params: dict[str, Any]
    ) -> dict[str, Any]: ...

    async def stream(
        self, messages: list[dict[str, Any]], params: dict[str, Any]
    ) -> AsyncIterator[dict[str, Any]]: ...

    async def close(self) -> None: ...


def _classify_status(status: int, message: str) -> TeacherCallError:
    # A request the provider calls malformed will not get better by trying again.
    retryable = status not in (400, 413, 422)
    return TeacherCallError(message, retryable=retryable, timeout=status == 408, status=status)


def _error_message(body: bytes, status: int) -> str:
    try:
        data = orjson.loads(body)
        error = data.get("error", data) if isinstance(data, dict) else data
        message = error.get("message") if isinstance(error, dict) else str(error)
    except orjson.JSONDecodeError:
        message = body[:300].decode("utf-8", "replace")
    return f"HTTP {status}: {message}"


@dataclass
class _Target:
    url: str
    model: str
    headers: dict[str, str]


class OpenAIHTTPTransport:
    """POSTs the OpenAI body to ``{api_base}/chat/completions`` on a pooled connection."""

    def __init__(self, endpoint: TeacherEndpoint, provider_model: str, api_base: str) -> None:
        self.model = endpoint.model
        self.endpoint = endpoint
        headers = {"content-type": "application/json"}
        key = endpoint.resolve_api_key()
        if key is None and endpoint.model.startswith("openai/"):
            key = os.environ.get("OPENAI_API_KEY")
        if key:
            headers["authorization"] = f"Bearer {key}"
        self._target = _Target(api_base.rstrip("/") + "/chat/completions", provider_model, headers)
        self._session: aiohttp.ClientSession | None = None
        self._timeout = aiohttp.ClientTimeout(total=endpoint.timeout_s)

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=512, keepalive_timeout=30, ttl_dns_cache=300)
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=self._timeout,
                json_serialize=lambda o: orjson.dumps(o).decode(),
            )
        return self._session

    def _body(self, messages: list[dict[str, Any]], params: dict[str, Any], stream: bool) -> bytes:
        body: dict[str, Any] = {
            **self.endpoint.extra_params,
            **params,
            "model": self._target.model,
            "messages": messages,
        }
        if stream:
            body["stream"] = True
        return orjson.dumps(body)

    async def complete(
        self, messages: list[dict[str, Any]], params: dict[str, Any]
    ) -> dict[str, Any]:
        try:
            async with self._client().post(
                self._target.url,
                data=self._body(messages, params, False),
                headers=self._target.headers,
            ) as response:
                raw = await response.read()
                if response.status != 200:
                    raise _classify_status(response.status, _error_message(raw, response.status))
        except TimeoutError:
            raise TeacherCallError("timed out", timeout=True) from None
        except aiohttp.ClientError as exc:
            raise TeacherCallError(f"connection failed: {exc}") from None
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise TeacherCallError("the teacher's answer is not JSON") from None
        if not isinstance(data, dict) or "choices" not in data:
            raise TeacherCallError("the teacher's answer is not a chat completion")
        return data

    async def stream(
        self, messages: list[dict[str, Any]], params: dict[str, Any]
    ) -> AsyncIterator[dict[str, Any]]:
        try:
            response = await self._client().post(
                self._target.url,
                data=self._body(messages, params, True),
                headers=self._target.headers,
            )
        except TimeoutError:
            raise TeacherCallError("timed out", timeout=True) from None
        except aiohttp.ClientError as exc:
            raise TeacherCallError(f"connection failed: {exc}") from None
        if response.status != 200:
            raw = await response.read()
            response.release()
            raise _classify_status(response.status, _error_message(raw, response.status))
        return self._events(response)

    async def _events(self, response: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
        try:
            async for line in response.content:
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    break
                data = orjson.loads(payload)
                if isinstance(data, dict) and "error" in data and "choices" not in data:
                    error = data["error"]
                    raise TeacherCallError(
                        str(error.get("message") if isinstance(error, dict) else error)
                    )
                yield data
        except TimeoutError:
            raise TeacherCallError("timed out mid-stream", timeout=True) from None
        except aiohttp.ClientError as exc:
            raise TeacherCallError(f"stream broken: {exc}") from None
        finally:
            response.release()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _from_litellm(exc: Exception) -> TeacherCallError:
    text = str(getattr(exc, "message", None) or exc or type(exc).__name__).splitlines()[0][:500]
    module = litellm()
    if isinstance(exc, module.Timeout | asyncio.TimeoutError | TimeoutError):
        return TeacherCallError(text, timeout=True)
    # litellm exceptions that mean the request itself is wrong.
    if isinstance(exc, module.BadRequestError | module.UnprocessableEntityError):
        return TeacherCallError(text, retryable=False, status=400)
    return TeacherCallError(text, status=getattr(exc, "status_code", None))


def _plain(data: dict[str, Any]) -> dict[str, Any]:
    """litellm's objects carry extra keys; keep the OpenAI shape."""
    data.pop("provider_specific_fields", None)
    for choice in data.get("choices", ()):
        choice.pop("provider_specific_fields", None)
        for key in ("message", "delta"):
            if isinstance(choice.get(key), dict):
                choice[key].pop("provider_specific_fields", None)
    return data


class LiteLLMTransport:
    """``litellm.acompletion``: any provider litellm knows, translated both ways."""

    def __init__(self, endpoint: TeacherEndpoint) -> None:
        self.model = endpoint.model
        self.endpoint = endpoint
        litellm()  # imported now, at start-up: ~3 s that must not stall the first request

    def _kwargs(self, messages: list[dict[str, Any]], params: dict[str, Any]) -> dict[str, Any]:
        e = self.endpoint
        return {
            **e.extra_params,
            **params,
            "model": e.model,
            "messages": messages,
            "api_base": e.api_base,
            "api_key": e.resolve_api_key(),
            # One attempt per call: retries and fallbacks are the TeacherClient's.
            "timeout": e.timeout_s,
            "max_retries": 0,
            "num_retries": 0,
        }

    async def complete(
        self, messages: list[dict[str, Any]], params: dict[str, Any]
    ) -> dict[str, Any]:
        try:
            response = await asyncio.wait_for(
                litellm().acompletion(**self._kwargs(messages, params)),
                timeout=self.endpoint.timeout_s + 1.0,
            )  # in case a provider ignores timeout
        except Exception as exc:
            raise _from_litellm(exc) from None
        return _plain(response.model_dump(exclude_none=True))

    async def stream(
        self, messages: list[dict[str, Any]], params: dict[str, Any]
    ) -> AsyncIterator[dict[str, Any]]:
        kwargs = self._kwargs(messages, params)
        kwargs["stream"] = True
        try:
            stream = await asyncio.wait_for(
                litellm().acompletion(**kwargs), timeout=self.endpoint.timeout_s + 1.0
            )
        except Exception as exc:
            raise _from_litellm(exc) from None
        return self._events(stream)

    async def _events(self, stream: Any) -> AsyncIterator[dict[str, Any]]:
        try:
            async for chunk in stream:
                yield _plain(chunk.model_dump(exclude_none=True))
        except Exception as exc:
            raise _from_litellm(exc) from None

    async def close(self) -> None:
        return None


def make_transport(endpoint: TeacherEndpoint) -> Transport:
    if endpoint.model.startswith("replay/"):
        from gateway.replay import register_replay_provider

        register_replay_provider()
        return LiteLLMTransport(endpoint)
    if endpoint.transport == "litellm":
        return LiteLLMTransport(endpoint)
    known = split_model(endpoint.model)  # the common case, answered without litellm
    if known is not None:
        (provider, model), api_base = known, endpoint.api_base
    else:
        try:
            model, provider, _, api_base = litellm().get_llm_provider(
                model=endpoint.model, api_base=endpoint.api_base
            )
        except Exception:
            provider, model, api_base = "", endpoint.model, None
    if provider == "openai" and not api_base:
        api_base = os.environ.get("OPENAI_BASE_URL") or OPENAI_DEFAULT_BASE
    if provider in OPENAI_COMPATIBLE and api_base:
        return OpenAIHTTPTransport(endpoint, model, api_base)
    if endpoint.transport == "http":
        raise ValueError(
            f"{endpoint.model}: transport 'http' needs an OpenAI-compatible "
            "provider and an api_base"
        )
    return LiteLLMTransport(endpoint)
