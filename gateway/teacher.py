"""The teacher client: per-task timeout, retries and fallback teachers, usage and cost.

Each attempt goes through a transport (gateway.transports): litellm.acompletion for any
provider, or direct HTTP for OpenAI-compatible endpoints. Retries are ours, never the
transport's, so the number of attempts and the error the client finally sees are
exactly as configured.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.config import TeacherConfig, TeacherEndpoint
from gateway.errors import GatewayError, InvalidRequest, UpstreamError, UpstreamTimeout
from gateway.providers import litellm, price_per_token
from gateway.transports import TeacherCallError, Transport, make_transport

log = logging.getLogger("distill_gateway.teacher")


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0


@dataclass(frozen=True)
class Price:
    """USD per token, resolved once per teacher (the price map lookup is slow)."""

    input: float
    output: float

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return prompt_tokens * self.input + completion_tokens * self.output


_UNPRICED: set[str] = set()  # warn once per model, not once per app


def resolve_price(endpoint: TeacherEndpoint) -> Price:
    """The configured price, else litellm's price map, else zero (with a warning)."""
    if endpoint.price is not None:
        return Price(endpoint.price.input_per_mtok / 1e6, endpoint.price.output_per_mtok / 1e6)
    # A replayed teacher costs what the model it replays would have cost.
    model = endpoint.model.removeprefix("replay/")
    flat = price_per_token(model)  # litellm's price map, read without importing litellm
    if flat is not None:
        return Price(*flat)
    try:
        prompt, _ = litellm().cost_per_token(
            model=model, prompt_tokens=1_000_000, completion_tokens=0
        )
        _, completion = litellm().cost_per_token(
            model=model, prompt_tokens=0, completion_tokens=1_000_000
        )
    except Exception:
        if endpoint.model in _UNPRICED:
            return Price(0.0, 0.0)
        _UNPRICED.add(endpoint.model)
        log.warning("no price known for %s; set teacher.price to count its cost", endpoint.model)
        return Price(0.0, 0.0)
    return Price(float(prompt) / 1e6, float(completion) / 1e6)


def usage_of(data: dict[str, Any] | None) -> tuple[int, int]:
    usage = (data or {}).get("usage") or {}
    return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)


@dataclass
class TeacherResult:
    response: dict[str, Any]
    model: str
    usage: Usage
    upstream_ms: float
    attempts: int


@dataclass
class TeacherStream:
    """An opened streaming answer: iterate ``chunks()``; usage and content are complete
    once it is exhausted (or closed)."""

    model: str
    attempts: int
    upstream_ms: float
    price: Price
    events: AsyncIterator[dict[str, Any]]
    usage: Usage = field(default_factory=Usage)
    content: list[str] = field(default_factory=list)

    async def chunks(self) -> AsyncIterator[dict[str, Any]]:
        started = time.perf_counter()
        try:
            async for data in self.events:
                for choice in data.get("choices") or ():
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        self.content.append(piece)
                if data.get("usage"):
                    prompt, completion = usage_of(data)
                    self.usage.prompt_tokens, self.usage.completion_tokens = prompt, completion
                yield data
        except TeacherCallError as exc:
            raise UpstreamError(
                f"The teacher's stream broke off: {exc.message}", code="upstream_error"
            ) from None
        finally:
            self.upstream_ms += (time.perf_counter() - started) * 1000
            self.usage.cost_usd = self.price.cost(
                self.usage.prompt_tokens, self.usage.completion_tokens
            )


@dataclass
class _Teacher:
    endpoint: TeacherEndpoint
    transport: Transport
    price: Price


class TeacherClient:
    """Calls one task's teacher chain; raises GatewayError subclasses the API answers."""

    def __init__(
        self, config: TeacherConfig, on_attempt: Callable[[str, str], None] | None = None
    ) -> None:
        self.config = config
        self.chain = [_Teacher(e, make_transport(e), resolve_price(e)) for e in config.chain()]
        self._on_attempt = on_attempt  # (model, outcome) for metrics

    async def complete(
        self, messages: list[dict[str, Any]], params: dict[str, Any]
    ) -> TeacherResult:
        started = time.perf_counter()

        async def attempt(teacher: _Teacher) -> dict[str, Any]:
            return await teacher.transport.complete(messages, params)

        teacher, data, attempts = await self._with_retries(attempt)
        prompt, completion = usage_of(data)
        return TeacherResult(
            response=data,
            model=teacher.endpoint.model,
            usage=Usage(prompt, completion, teacher.price.cost(prompt, completion)),
            upstream_ms=(time.perf_counter() - started) * 1000,
            attempts=attempts,
        )

    async def stream(self, messages: list[dict[str, Any]], params: dict[str, Any]) -> TeacherStream:
        started = time.perf_counter()
        # Ask for usage so streamed answers are priced; whether the usage chunk reaches
        # the client is decided by the client's own stream_options.
        params = {
            **params,
            "stream_options": {**(params.get("stream_options") or {}), "include_usage": True},
        }

        async def attempt(teacher: _Teacher) -> AsyncIterator[dict[str, Any]]:
            return await teacher.transport.stream(messages, params)

        teacher, events, attempts = await self._with_retries(attempt)
        return TeacherStream(
            model=teacher.endpoint.model,
            attempts=attempts,
            upstream_ms=(time.perf_counter() - started) * 1000,
            price=teacher.price,
            events=events,
        )

    async def _with_retries(self, attempt: Callable[[_Teacher], Any]) -> tuple[_Teacher, Any, int]:
        attempts = 0
        last: TeacherCallError | None = None
        for teacher in self.chain:
            for retry in range(teacher.endpoint.num_retries + 1):
                if retry:
                    # Exponential backoff with jitter; short, the client is waiting.
                    await asyncio.sleep(min(1.0, 0.05 * 2**retry) * (0.5 + random.random()))
                attempts += 1
                try:
                    result = await attempt(teacher)
                except TeacherCallError as exc:
                    last = exc
                    outcome = "timeout" if exc.timeout else "error"
                    self._count(teacher, outcome)
                    log.warning(
                        "teacher %s attempt %d failed: %s",
                        teacher.endpoint.model,
                        attempts,
                        exc.message,
                    )
                    if not exc.retryable:
                        raise InvalidRequest(
                            f"The teacher rejected the request: {exc.message}",
                            code="upstream_bad_request",
                        ) from None
                    continue
                self._count(teacher, "ok")
                return teacher, result, attempts
        raise _final_error(last, attempts)

    def _count(self, teacher: _Teacher, outcome: str) -> None:
        if self._on_attempt is not None:
            self._on_attempt(teacher.endpoint.model, outcome)

    async def close(self) -> None:
        for teacher in self.chain:
            await teacher.transport.close()


def _final_error(error: TeacherCallError | None, attempts: int) -> GatewayError:
    if error is not None and error.timeout:
        return UpstreamTimeout(
            f"The teacher did not answer in time after {attempts} attempt(s).",
            code="upstream_timeout",
        )
    detail = error.message if error is not None else "no teacher configured"
    return UpstreamError(
        f"The teacher failed after {attempts} attempt(s): {detail}", code="upstream_error"
    )
