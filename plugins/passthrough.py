"""Built-in task ``passthrough``: proxy and record, the answer is kept as the teacher gave it.

It serves model names that are not tasks (sent to ``default_teacher``) and tasks that are
only recorded for now, so teams can see what traffic is worth distilling next.
"""

from __future__ import annotations

from typing import Any

from gateway.hookspecs import hookimpl
from gateway.interfaces import InvalidTarget, Task
from gateway.schemas import ChatCompletionRequest, content_text


class PassthroughTask(Task):
    def task_input(self, request: ChatCompletionRequest) -> str:
        return "\n".join(f"{m.role}: {content_text(m.content)}" for m in request.messages)

    def parse_target(self, answer: str) -> Any:
        if not answer.strip():
            raise InvalidTarget("empty answer")
        return answer

    def render(self, target: Any) -> str:
        return str(target)


@hookimpl
def register_tasks(register: Any) -> None:
    register("passthrough", PassthroughTask)
