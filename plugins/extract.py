"""Built-in task ``extract``: the teacher answers with a JSON object (optionally schema-checked).

Teachers wrap JSON in prose or Markdown fences; the target is the first JSON object found
in the answer, canonicalised (keys sorted, strings trimmed, integral floats as integers)
so that two answers that mean the same object compare equal and render identically.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Literal

import jsonschema
from pydantic import BaseModel, ConfigDict, Field, field_validator

from gateway.hookspecs import hookimpl
from gateway.interfaces import InvalidTarget, Task
from gateway.schemas import ChatCompletionRequest, content_text

_FENCE = re.compile(r"```[A-Za-z0-9_-]*[ \t]*\n?(.*?)```", re.DOTALL)


def _reject_constant(name: str) -> Any:
    # NaN and Infinity are not JSON; accepting them would make targets unrenderable.
    raise ValueError(f"{name} is not valid JSON")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


class ExtractOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    json_schema: dict[str, Any] | None = Field(
        default=None,
        description="JSON Schema the answer object must validate against; "
        "answers that do not are rejected (and student outputs escalated)",
    )
    input: Literal["last_user", "conversation"] = Field(
        default="last_user",
        description="what the student sees: the last user message, "
        "or every non-system message as 'role: text' lines",
    )

    @field_validator("json_schema")
    @classmethod
    def _valid_schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return None
        validator = jsonschema.validators.validator_for(value)
        try:
            validator.check_schema(value)
        except jsonschema.SchemaError as exc:
            where = "/".join(str(p) for p in exc.path) or "(root)"
            raise ValueError(f"invalid JSON Schema at {where}: {exc.message}") from None
        return value


def canonical(value: Any) -> Any:
    """The canonical form of a JSON value: keys sorted recursively, strings trimmed, and
    integral floats as integers (so ``1.0`` and ``1`` agree and render alike)."""
    if isinstance(value, dict):
        items = ((str(k).strip(), canonical(v)) for k, v in value.items())
        return dict(sorted(items))
    if isinstance(value, list):
        return [canonical(v) for v in value]
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidTarget("non-finite number")
        if value.is_integer() and abs(value) < 2**53:
            return int(value)
    return value


def render_json(value: Any) -> str:
    """Compact, stable JSON text of a canonical value (one line, non-ASCII kept)."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(", ", ": "))


def find_json_object(text: str) -> dict[str, Any]:
    """The first JSON object in ``text``: fenced blocks first, then anywhere in prose."""
    candidates = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    for candidate in candidates:
        start = candidate.find("{")
        while start != -1:
            try:
                value, _ = _DECODER.raw_decode(candidate, start)
            except ValueError:
                value = None
            if isinstance(value, dict):
                return value
            # Not an object here (prose with a brace): try from the next brace.
            start = candidate.find("{", start + 1)
    raise InvalidTarget("no JSON object in the answer")


def _flatten(value: Any, path: str, out: set[tuple[str, str]]) -> None:
    if isinstance(value, dict):
        if not value:
            out.add((path, "{}"))
        for key, item in value.items():
            _flatten(item, f"{path}.{key}" if path else str(key), out)
    elif isinstance(value, list):
        if not value:
            out.add((path, "[]"))
        for item in value:  # list items share the path: lists compare as sets
            _flatten(item, f"{path}[]", out)
    else:
        out.add((path, render_json(canonical(value))))


def field_f1(pred: dict[str, Any] | None, gold: dict[str, Any]) -> float:
    """Field-level F1 between two objects, over flattened (key path, leaf value) pairs.

    Lists count as sets of their items; empty containers count as one field each, so
    ``{"slots": {}}`` matches itself. A missing prediction scores 0.
    """
    if pred is None:
        return 0.0
    predicted: set[tuple[str, str]] = set()
    expected: set[tuple[str, str]] = set()
    _flatten(canonical(pred), "", predicted)
    _flatten(canonical(gold), "", expected)
    if not predicted and not expected:
        return 1.0
    hits = len(predicted & expected)
    if hits == 0:
        return 0.0
    precision = hits / len(predicted)
    recall = hits / len(expected)
    return 2 * precision * recall / (precision + recall)


class ExtractTask(Task):
    default_trainer = "lora-lm"
    Options = ExtractOptions
    options: ExtractOptions

    def __init__(self, name: str, options: BaseModel) -> None:
        super().__init__(name, options)
        schema = self.options.json_schema
        self._validator: Any = None
        if schema is not None:
            self._validator = jsonschema.validators.validator_for(schema)(schema)

    @property
    def json_schema(self) -> dict[str, Any] | None:
        return self.options.json_schema

    def task_input(self, request: ChatCompletionRequest) -> str:
        if self.options.input == "last_user":
            return request.last_user_text()
        return "\n".join(
            f"{m.role}: {content_text(m.content)}" for m in request.messages if m.role != "system"
        )

    def parse_target(self, answer: str) -> Any:
        value = canonical(find_json_object(answer))
        if self._validator is not None:
            error = jsonschema.exceptions.best_match(self._validator.iter_errors(value))
            if error is not None:
                where = "/".join(str(p) for p in error.absolute_path) or "(root)"
                raise InvalidTarget(f"answer does not match the schema at {where}: "
                                    f"{error.message[:200]}")
        return value

    def render(self, target: Any) -> str:
        return render_json(target)

    def agree(self, a: Any, b: Any) -> bool:
        # Compare the canonical text, not the objects: in Python True == 1 and 1 == 1.0.
        if a is None or b is None:
            return False
        try:
            return render_json(canonical(a)) == render_json(canonical(b))
        except (InvalidTarget, TypeError, ValueError):
            return False


@hookimpl
def register_tasks(register: Any) -> None:
    register("extract", ExtractTask)
