"""Built-in task ``classify``: the teacher answers with one label (also used for routing)."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from gateway.hookspecs import hookimpl
from gateway.interfaces import InvalidTarget, Task
from gateway.schemas import ChatCompletionRequest, content_text

_SEPARATORS = re.compile(r"[\s_\-]+")
_WRAPPING = " \t\r\n\"'`*.,;:!"


class ClassifyOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    labels: list[str] | None = Field(
        default=None, description="closed label set; answers outside it are rejected"
    )
    input: Literal["last_user", "conversation"] = Field(
        default="last_user",
        description="what the student sees: the last user message, "
        "or every non-system message as 'role: text' lines",
    )
    max_label_chars: int = Field(
        default=64, gt=0, description="without a label set, longer answers are not labels"
    )

    @field_validator("labels")
    @classmethod
    def _distinct(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("give at least one label, or leave labels out")
        keys = [label_key(v) for v in value]
        if len(set(keys)) != len(keys):
            raise ValueError("labels must be distinct after case-folding and trimming")
        return value


def label_key(text: str) -> str:
    """Case-folded, trimmed, with spaces, hyphens and underscores treated alike."""
    return _SEPARATORS.sub("_", text.strip(_WRAPPING).casefold())


class ClassifyTask(Task):
    Options = ClassifyOptions
    default_trainer = "embedding-classifier"
    options: ClassifyOptions

    def __init__(self, name: str, options: BaseModel) -> None:
        super().__init__(name, options)
        labels = self.options.labels or []
        self._by_key = {label_key(label): label for label in labels}

    @property
    def labels(self) -> list[str] | None:
        return self.options.labels

    def task_input(self, request: ChatCompletionRequest) -> str:
        if self.options.input == "last_user":
            return request.last_user_text()
        return "\n".join(
            f"{m.role}: {content_text(m.content)}" for m in request.messages if m.role != "system"
        )

    def parse_target(self, answer: str) -> Any:
        key = label_key(answer)
        if not key:
            raise InvalidTarget("empty answer")
        if self._by_key:
            try:
                return self._by_key[key]
            except KeyError:
                raise InvalidTarget(f"{answer.strip()[:80]!r} is not one of the labels") from None
        if "\n" in answer.strip() or len(key) > self.options.max_label_chars:
            raise InvalidTarget("answer is not a single short label")
        return key

    def render(self, target: Any) -> str:
        return str(target)


@hookimpl
def register_tasks(register: Any) -> None:
    register("classify", ClassifyTask)
