"""Built-in filter ``valid``: keep only examples whose target the task still accepts.

Targets are parsed when a teacher answer is recorded, but a dataset can outlive that:
an import, a changed label set or JSON Schema, a task plugin upgrade. So the target is
rendered the way the student will be taught to answer and parsed back; an example
stays only if that succeeds and the result agrees with the target. A student trained
on it can then produce nothing the task would reject.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from gateway.hookspecs import hookimpl
from gateway.interfaces import Example, Filter, Task


class ValidOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    normalise: bool = Field(
        default=True,
        description="replace a kept target by the task's re-parsed form when that renders "
        "differently (e.g. trimmed text, canonical JSON), so the student learns one form",
    )


class ValidFilter(Filter):
    Options = ValidOptions
    options: ValidOptions

    def apply(self, example: Example, task: Task) -> Example | None:
        if example.target is None or not isinstance(example.input, str):
            return None
        try:
            rendered = task.render(example.target)
            reparsed = task.parse_target(rendered)
            agrees = task.agree(reparsed, example.target)
        except (ValueError, TypeError):
            # InvalidTarget is a ValueError; TypeError/ValueError also come from
            # rendering a target of the wrong shape (a set in a JSON target, say).
            return None
        if not agrees:
            return None
        if self.options.normalise and _renders_differently(task, reparsed, rendered):
            return dataclasses.replace(example, target=reparsed)
        return example


def _renders_differently(task: Task, reparsed: Any, rendered: str) -> bool:
    # Compare renderings, not objects: in Python True == 1 == 1.0, which JSON tells apart.
    try:
        return task.render(reparsed) != rendered
    except (ValueError, TypeError):
        return False


@hookimpl
def register_filters(register: Any) -> None:
    register("valid", ValidFilter)
