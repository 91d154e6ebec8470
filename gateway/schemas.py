"""The OpenAI chat-completions request, validated just enough to name a bad ``param``.

Fields the gateway does not use are kept as they came (``extra="allow"``) and reach the
teacher unchanged, so new OpenAI parameters work without a gateway release.
"""

from __future__ import annotations

from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.errors import InvalidRequest


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    n: int | None = Field(default=None, ge=1, le=128)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    seed: int | None = None
    user: str | None = None

    def teacher_params(self) -> dict[str, Any]:
        """Every client parameter as sent (minus model/messages/stream), for the teacher."""
        return self.model_dump(exclude={"model", "messages", "stream"}, exclude_unset=True)

    def message_dicts(self) -> list[dict[str, Any]]:
        return [m.model_dump(exclude_unset=True) for m in self.messages]

    def last_user_text(self) -> str:
        """The text of the last user message (content parts of type text joined)."""
        for message in reversed(self.messages):
            if message.role == "user":
                return content_text(message.content)
        return ""


def content_text(content: str | list[dict[str, Any]] | None) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(str(part.get("text", "")) for part in content if part.get("type") == "text")


def first_content(response: dict[str, Any]) -> str | None:
    """The assistant text of a chat completion's first choice, if it has one."""
    choices = response.get("choices") or []
    content = (choices[0].get("message") or {}).get("content") if choices else None
    return content if isinstance(content, str) else None


def _param_name(loc: tuple[int | str, ...]) -> str:
    out = ""
    for item in loc:
        if isinstance(item, int):
            out += f"[{item}]"
        elif item in ("str", "list[dict[str,any]]", "list[str]", "dict[str,any]", "literal"):
            continue  # union branch names pydantic puts in the location
        else:
            out += ("." if out else "") + item
    return out


def parse_chat_request(body: bytes) -> tuple[ChatCompletionRequest, dict[str, Any]]:
    """Parse and validate a request body; raise an OpenAI-shaped 400 naming the bad param.

    Returns the validated request and the JSON object exactly as the client sent it."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    try:
        return ChatCompletionRequest.model_validate(data), data
    except ValidationError as exc:
        first = exc.errors()[0]
        param = _param_name(tuple(first["loc"]))
        if first["type"] == "missing":
            message = f"Missing required parameter: '{param}'."
        else:
            message = f"Invalid value for '{param}': {first['msg']}."
        raise InvalidRequest(message, param=param, code="invalid_value") from None
