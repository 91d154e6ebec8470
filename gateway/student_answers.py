"""Student answers in the OpenAI response shapes, and audits of them against the teacher."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import orjson

from gateway.calibration import audit_breach
from gateway.drift import DriftGuard
from gateway.errors import GatewayError
from gateway.schemas import ChatCompletionRequest, first_content
from gateway.store import ExchangeRecord
from gateway.students import LoadedStudent

if TYPE_CHECKING:
    from gateway.cascade import Cascade
    from gateway.runtime import TaskRuntime

log = logging.getLogger("distill_gateway.audit")

MIN_AUDITS = 30  # audits before the live bound may move the threshold


def student_can_answer(request: ChatCompletionRequest) -> bool:
    """Requests a student cannot honour (tools, several choices, log-probabilities) go to
    the teacher, so every answer has the shape the client asked for."""
    return not (
        request.tools
        or request.tool_choice
        or (request.n or 1) > 1
        or request.logprobs
        or (request.model_extra or {}).get("functions")
    )


def completion_body(record_id: str, model: str, content: str) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{record_id}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": "distill-student",
        "choices": [
            {
                "index": 0,
                "finish_reason": "stop",
                "message": {"role": "assistant", "content": content},
            }
        ],
        # The student is free: no tokens are billed for its answers.
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    }


async def student_sse(response: dict[str, Any], include_usage: bool) -> AsyncIterator[bytes]:
    """A student answer as an SSE stream: role, the whole content, the finish."""
    base = {
        "id": response["id"],
        "object": "chat.completion.chunk",
        "created": response["created"],
        "model": response["model"],
        "system_fingerprint": response["system_fingerprint"],
    }
    content = response["choices"][0]["message"]["content"]
    for delta, finish in (
        ({"role": "assistant", "content": ""}, None),
        ({"content": content}, None),
        ({}, "stop"),
    ):
        chunk = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        yield b"data: " + orjson.dumps(chunk) + b"\n\n"
    if include_usage:
        yield (
            b"data: "
            + orjson.dumps({**base, "choices": [], "usage": response["usage"]})
            + (b"\n\n")
        )
    yield b"data: [DONE]\n\n"


class Auditor:
    """Sends a sampled share of student answers to the teacher, off the response path,
    records each as an ``audit`` exchange and keeps the live agreement estimate."""

    def __init__(self, cascade: Cascade) -> None:
        self.cascade = cascade
        self.guard = DriftGuard(cascade.runtime)
        self._running: set[asyncio.Task[None]] = set()

    def maybe_audit(
        self,
        request: ChatCompletionRequest,
        body: dict[str, Any],
        task: TaskRuntime,
        record: ExchangeRecord,
        loaded: LoadedStudent,
    ) -> None:
        runtime = self.cascade.runtime
        assert task.name is not None
        rate = runtime.settings.tasks[task.name].policy.audit_rate
        if rate <= 0 or random.random() >= rate:
            return
        if len(self._running) >= runtime.settings.server.max_concurrent_audits:
            self.cascade.metrics.audits.labels(task.metric_label, "skipped").inc()
            return
        job = asyncio.get_running_loop().create_task(
            self._audit(request, body, task, record, loaded)
        )
        self._running.add(job)
        job.add_done_callback(self._running.discard)

    async def _audit(
        self,
        request: ChatCompletionRequest,
        body: dict[str, Any],
        task: TaskRuntime,
        record: ExchangeRecord,
        loaded: LoadedStudent,
    ) -> None:
        cascade = self.cascade
        audit = ExchangeRecord(
            model=record.model,
            task=record.task,
            request=body,
            served_by="teacher",
            status=200,
            kind="audit",
            task_input=record.task_input,
            student_version=record.student_version,
            student_target=record.student_target,
            student_confidence=record.student_confidence,
        )
        started = time.perf_counter()
        params = request.teacher_params()
        params.pop("stream_options", None)
        label = task.metric_label
        try:
            result = await task.teacher.complete(request.message_dicts(), params)
        except GatewayError as exc:
            audit.status, audit.error = exc.status_code, exc.message
            audit.latency_ms = (time.perf_counter() - started) * 1000
            cascade.metrics.audits.labels(label, "error").inc()
            cascade.store.submit(audit)
            return
        audit.teacher_model = result.model
        audit.response = result.response
        audit.upstream_ms = result.upstream_ms
        cascade.judge(audit, task, first_content(result.response))
        if audit.target_valid:
            agree = task.task.agree(audit.target, record.student_target)
            loaded.stats.record_audit(agree, policy_window(cascade, loaded))
            cascade.metrics.audits.labels(label, "agree" if agree else "disagree").inc()
            self._publish(task, loaded)
        else:
            cascade.metrics.audits.labels(label, "invalid").inc()
        task.actual_usd += result.usage.cost_usd  # audits are teacher calls: they cost
        cascade.finish(audit, task, result.usage, started)

    def _publish(self, task: TaskRuntime, loaded: LoadedStudent) -> None:
        stats = loaded.stats
        rate = stats.audit_disagreements / stats.audits
        self.cascade.metrics.audited_agreement.labels(task.metric_label).set(
            1.0 - stats.share_served * rate
        )
        policy = self.cascade.runtime.settings.tasks[loaded.task].policy
        breach = audit_breach(
            stats.audits, stats.audit_disagreements, stats.share_served, policy.confidence_level
        )
        if stats.audits < MIN_AUDITS or breach <= 1.0 - policy.target_agreement:
            return
        self.guard.act(task, loaded, breach)


def policy_window(cascade: Cascade, loaded: LoadedStudent) -> int:
    return cascade.runtime.settings.tasks[loaded.task].policy.drift_window
