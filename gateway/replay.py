"""A teacher that replays recorded answers: a litellm custom provider named ``replay``.

``model: replay/gpt-4o`` with ``api_base: path/to/stream.jsonl`` answers each request
with the recorded ``teacher`` field of the row whose ``text`` is the last user message,
so the demo and ``bench cascade`` run the real teacher path (litellm, retries, costs)
with a real model's answers and no API key. Tokens are counted with litellm's bundled
tokenizer for the priced model; rows whose teacher answer is null answer "".
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from litellm.llms.custom_llm import CustomLLM, CustomLLMError
from litellm.types.utils import GenericStreamingChunk, ModelResponse

from gateway.providers import litellm as load_litellm
from gateway.schemas import content_text

litellm = load_litellm()  # configured for a server; replay is only imported to be used

PROVIDER = "replay"
_lock = threading.Lock()
_streams: dict[str, dict[str, Any]] = {}


def answer_text(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def load_stream(path: str) -> dict[str, Any]:
    """``{text: teacher answer}`` for a JSONL stream, read once per process."""
    key = str(Path(path.removeprefix("file://")).resolve())
    with _lock:
        if key not in _streams:
            index: dict[str, Any] = {}
            with open(key, encoding="utf-8") as file:
                for line in file:
                    if line.strip():
                        row = json.loads(line)
                        index[row["text"]] = row.get("teacher")
            _streams[key] = index
        return _streams[key]


def _question(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            return content_text(message.get("content"))
    return ""


class ReplayLLM(CustomLLM):
    def _answer(
        self, model: str, messages: list[dict[str, Any]], api_base: str
    ) -> tuple[str, int, int]:
        if not api_base:
            raise CustomLLMError(400, "replay: set api_base to the JSONL stream file")
        stream = load_stream(api_base)
        question = _question(messages)
        if question not in stream:
            raise CustomLLMError(404, f"replay: no recorded answer for {question[:80]!r}")
        answer = answer_text(stream[question])
        priced = model.split("/", 1)[-1]
        prompt = litellm.token_counter(model=priced, messages=messages)
        completion = litellm.token_counter(model=priced, text=answer) if answer else 0
        return answer, prompt, completion

    def completion(self, *args: Any, **kwargs: Any) -> ModelResponse:
        answer, prompt, completion = self._answer(
            kwargs["model"], kwargs["messages"], kwargs.get("api_base") or ""
        )
        return litellm.ModelResponse(
            model=kwargs["model"],
            choices=[
                {
                    "index": 0,
                    "finish_reason": "stop",
                    "message": {"role": "assistant", "content": answer},
                }
            ],
            usage={
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            },
            created=int(time.time()),
        )

    async def acompletion(self, *args: Any, **kwargs: Any) -> ModelResponse:
        return self.completion(*args, **kwargs)

    def streaming(self, *args: Any, **kwargs: Any) -> Iterator[GenericStreamingChunk]:
        answer, prompt, completion = self._answer(
            kwargs["model"], kwargs["messages"], kwargs.get("api_base") or ""
        )
        yield {
            "text": answer,
            "is_finished": True,
            "finish_reason": "stop",
            "index": 0,
            "tool_use": None,
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            },
        }

    async def astreaming(self, *args: Any, **kwargs: Any) -> AsyncIterator[GenericStreamingChunk]:  # type: ignore[override]
        for chunk in self.streaming(*args, **kwargs):
            yield chunk


_registered = False


def register_replay_provider() -> None:
    """Add ``replay`` to litellm's custom providers (litellm keeps them process-wide)."""
    global _registered
    with _lock:
        if _registered:
            return
        providers = [
            p for p in (litellm.custom_provider_map or []) if p.get("provider") != PROVIDER
        ]
        providers.append({"provider": PROVIDER, "custom_handler": ReplayLLM()})
        litellm.custom_provider_map = providers
        from litellm.utils import custom_llm_setup

        custom_llm_setup()
        _registered = True
