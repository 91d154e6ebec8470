"""Built-in filter ``length``: bounds on the input length and the target length.

Very short inputs carry no signal ("hi", "?"), very long ones are truncated by the
student's encoder anyway and dominate training time; a target that renders very long is
usually a teacher that rambled. Lengths are in characters, not counting surrounding
whitespace; the target's is that of ``task.render(target)``, what the student learns to
say. Leave a maximum out (null) for no upper bound.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from gateway.hookspecs import hookimpl
from gateway.interfaces import Example, Filter, Task


class LengthOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    min_input_chars: int = Field(
        default=1, ge=0, description="drop examples whose input is shorter than this"
    )
    max_input_chars: int | None = Field(
        default=4000, ge=0, description="drop examples whose input is longer; null: no bound"
    )
    min_target_chars: int = Field(
        default=1, ge=0, description="drop examples whose rendered target is shorter than this"
    )
    max_target_chars: int | None = Field(
        default=4000,
        ge=0,
        description="drop examples whose rendered target is longer; null: no bound",
    )

    @model_validator(mode="after")
    def _ordered(self) -> LengthOptions:
        for what in ("input", "target"):
            low = getattr(self, f"min_{what}_chars")
            high = getattr(self, f"max_{what}_chars")
            if high is not None and low > high:
                raise ValueError(f"min_{what}_chars ({low}) exceeds max_{what}_chars ({high})")
        return self


def _within(length: int, low: int, high: int | None) -> bool:
    return length >= low and (high is None or length <= high)


class LengthFilter(Filter):
    Options = LengthOptions
    options: LengthOptions

    def apply(self, example: Example, task: Task) -> Example | None:
        o = self.options
        if not _within(len(str(example.input).strip()), o.min_input_chars, o.max_input_chars):
            return None
        if example.target is None:
            target_chars = 0  # nothing to learn: as short as a target gets
        else:
            try:
                target_chars = len(task.render(example.target).strip())
            except (ValueError, TypeError):
                return None  # a target the task cannot render cannot be taught either
        if not _within(target_chars, o.min_target_chars, o.max_target_chars):
            return None
        return example


@hookimpl
def register_filters(register: Any) -> None:
    register("length", LengthFilter)
