"""Built-in task ``rewrite``: the teacher answers with free text (a rewritten input).

Two answers agree when their normalised forms (case-folded, whitespace collapsed,
trailing punctuation dropped) are equal, or, with ``similarity`` set, when their
character-level similarity ratio reaches that bound: paraphrase-level differences such
as one changed article are then not counted as disagreements.
"""

from __future__ import annotations

import re
from difflib import SequenceMatcher
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from gateway.hookspecs import hookimpl
from gateway.interfaces import InvalidTarget, Task
from gateway.schemas import ChatCompletionRequest, content_text

_SPACES = re.compile(r"\s+")
# Trailing sentence punctuation and closing quotes carry no meaning for agreement.
_TRAILING = ".,;:!?\u2026\"'`\u201d\u2019 "


def normalise(text: str) -> str:
    """Case-folded, whitespace collapsed, trailing punctuation stripped."""
    return _SPACES.sub(" ", text.casefold()).strip().rstrip(_TRAILING)


def similarity(a: str, b: str) -> float:
    """Character-level similarity ratio of two normalised texts, in [0, 1]."""
    a, b = normalise(a), normalise(b)
    if a == b:
        return 1.0
    # autojunk would treat frequent characters (spaces, 'e') as junk past 200 characters.
    return SequenceMatcher(None, a, b, autojunk=False).ratio()


class RewriteOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    similarity: float | None = Field(
        default=None,
        gt=0.0,
        le=1.0,
        description="agreement when the character similarity ratio of the normalised "
        "texts reaches this bound; leave out for normalised exact match",
    )
    input: Literal["last_user", "conversation"] = Field(
        default="last_user",
        description="what the student sees: the last user message, "
        "or every non-system message as 'role: text' lines",
    )


class RewriteTask(Task):
    default_trainer = "lora-lm"
    Options = RewriteOptions
    options: RewriteOptions

    def task_input(self, request: ChatCompletionRequest) -> str:
        if self.options.input == "last_user":
            return request.last_user_text()
        return "\n".join(
            f"{m.role}: {content_text(m.content)}" for m in request.messages if m.role != "system"
        )

    def parse_target(self, answer: str) -> Any:
        text = answer.strip()
        if not text:
            raise InvalidTarget("empty answer")
        return text

    def render(self, target: Any) -> str:
        return str(target)

    def agree(self, a: Any, b: Any) -> bool:
        if not isinstance(a, str) or not isinstance(b, str):
            return False
        bound = self.options.similarity
        if bound is None:
            return normalise(a) == normalise(b)
        a_norm, b_norm = normalise(a), normalise(b)
        if a_norm == b_norm:
            return True
        matcher = SequenceMatcher(None, a_norm, b_norm, autojunk=False)
        # The quick upper bounds are cheap; skip the quadratic ratio when they already fail.
        if matcher.real_quick_ratio() < bound or matcher.quick_ratio() < bound:
            return False
        return matcher.ratio() >= bound


@hookimpl
def register_tasks(register: Any) -> None:
    register("rewrite", RewriteTask)
