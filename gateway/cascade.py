"""Answering one chat request: the student when it is confident, else the teacher.

For a task with an active student the student predicts first (micro-batched, off the
event loop); at or above the version's calibrated threshold it answers, and a sampled
share of its answers is also sent to the teacher off the response path (audits). Below
the threshold the request escalates to the teacher, and the student's guess is recorded
beside the teacher's answer.

Every answer, error or not, becomes one ExchangeRecord handed to the store without
waiting; metrics are updated in the same place so the two never disagree.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.errors import GatewayError, ModelNotFound
from gateway.events import record_event
from gateway.interfaces import InvalidTarget
from gateway.runtime import Runtime, TaskRuntime
from gateway.schemas import ChatCompletionRequest, first_content
from gateway.store import ExchangeRecord
from gateway.student_answers import Auditor, completion_body, student_can_answer, student_sse
from gateway.students import PROBE_EVERY, LoadedStudent
from gateway.teacher import TeacherStream, Usage

log = logging.getLogger("distill_gateway")

STUDENT_ERROR_LOG_S = 10.0  # a failing student's traceback, at most this often per task


@dataclass
class Answer:
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


def _headers(record: ExchangeRecord) -> dict[str, str]:
    headers = {
        "x-distill-served-by": record.served_by,
        "x-distill-cost-usd": f"{record.cost_usd:.8f}",
        "x-distill-request-id": record.id,
    }
    if record.student_version is not None:
        headers["x-distill-student-version"] = record.student_version
        headers["x-distill-confidence"] = f"{record.student_confidence or 0.0:.4f}"
    return headers


class Cascade:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.metrics = runtime.metrics
        self.store = runtime.store
        self.audits = Auditor(self)
        # task -> (when a failure was last logged, failures not logged since)
        self._student_failures: dict[str, tuple[float, int]] = {}

    def resolve(self, request: ChatCompletionRequest) -> TaskRuntime:
        runtime = self.runtime.resolve(request.model)
        if runtime is None:
            raise ModelNotFound(request.model)
        if runtime.name is None:
            log.info("pass-through model %r sent to the default teacher", request.model)
        return runtime

    def _new_record(
        self, request: ChatCompletionRequest, body: dict[str, Any], task: TaskRuntime
    ) -> ExchangeRecord:
        return ExchangeRecord(
            model=request.model,
            task=task.name,
            request=body,
            served_by="teacher",
            status=200,
            stream=request.stream,
            task_input=task.task.task_input(request),
        )

    async def complete(
        self, request: ChatCompletionRequest, body: dict[str, Any], started: float
    ) -> Answer:
        task = self.resolve(request)
        record = self._new_record(request, body, task)
        loaded = await self._ask_student(request, task, record)
        if loaded is not None:
            response = self._serve_student(request, body, task, record, loaded, started)
            return Answer(response, _headers(record))
        try:
            result = await task.teacher.complete(request.message_dicts(), request.teacher_params())
        except GatewayError as exc:
            self._finish_error(record, task, exc, started)
            raise
        response = result.response
        response["model"] = request.model
        record.teacher_model = result.model
        record.response = response
        record.upstream_ms = result.upstream_ms
        self.judge(record, task, first_content(response))
        self.finish(record, task, result.usage, started)
        return Answer(response, _headers(record))

    async def open_stream(
        self, request: ChatCompletionRequest, body: dict[str, Any], started: float
    ) -> tuple[AsyncIterator[bytes], dict[str, str]]:
        """Open the teacher's stream (errors before the first byte are plain HTTP errors),
        then return the SSE byte stream and the response headers."""
        task = self.resolve(request)
        record = self._new_record(request, body, task)
        loaded = await self._ask_student(request, task, record)
        if loaded is not None:
            response = self._serve_student(request, body, task, record, loaded, started)
            include_usage = bool((request.stream_options or {}).get("include_usage"))
            return student_sse(response, include_usage), _headers(record)
        try:
            stream = await task.teacher.stream(request.message_dicts(), request.teacher_params())
        except GatewayError as exc:
            self._finish_error(record, task, exc, started)
            raise
        record.teacher_model = stream.model
        include_usage = bool((request.stream_options or {}).get("include_usage"))
        headers = _headers(record)
        # Cost is only known at the end of a stream; the header says so honestly.
        headers["x-distill-cost-usd"] = "pending"
        return self._sse(stream, record, task, request.model, include_usage, started), headers

    async def _sse(
        self,
        stream: TeacherStream,
        record: ExchangeRecord,
        task: TaskRuntime,
        model: str,
        include_usage: bool,
        started: float,
    ) -> AsyncIterator[bytes]:
        finish_reason = None
        response_id = None
        try:
            async for chunk in stream.chunks():
                response_id = response_id or chunk.get("id")
                chunk["model"] = model
                for choice in chunk.get("choices", ()):
                    finish_reason = choice.get("finish_reason") or finish_reason
                if not include_usage:
                    if not chunk.get("choices"):
                        continue  # the usage-only chunk we asked for on our own behalf
                    chunk.pop("usage", None)
                yield b"data: " + orjson.dumps(chunk) + b"\n\n"
        except GatewayError as exc:
            record.error = exc.message
            record.status = exc.status_code
            yield b"data: " + orjson.dumps(exc.body()) + b"\n\n"
        finally:
            # Runs on normal end, on teacher errors and when the client goes away.
            content = "".join(stream.content)
            record.upstream_ms = stream.upstream_ms
            record.response = {
                "id": response_id,
                "object": "chat.completion",
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": finish_reason,
                        "message": {"role": "assistant", "content": content},
                    }
                ],
                "usage": {
                    "prompt_tokens": stream.usage.prompt_tokens,
                    "completion_tokens": stream.usage.completion_tokens,
                    "total_tokens": stream.usage.prompt_tokens + stream.usage.completion_tokens,
                },
            }
            if record.status == 200 and finish_reason is None:
                record.error = record.error or "stream ended early (client disconnected?)"
            if record.status == 200:
                self.judge(record, task, content)
            self.finish(record, task, stream.usage, started)
        yield b"data: [DONE]\n\n"

    # -- the student ---------------------------------------------------------------------
    async def _ask_student(
        self, request: ChatCompletionRequest, task: TaskRuntime, record: ExchangeRecord
    ) -> LoadedStudent | None:
        """The loaded student if it answers this request, else None (escalate)."""
        if task.name is None or not student_can_answer(request):
            return None
        loaded = self.runtime.students.get(task.name)
        if loaded is None or record.task_input is None:
            return None
        if loaded.backoff.skips(time.monotonic()) or not loaded.guard.ask():
            self.metrics.student_passed_over.labels(task.metric_label).inc()
            return None
        try:
            prediction = await loaded.batcher.predict(record.task_input)
        except Exception as exc:
            self._student_failed(loaded, exc)
            return None
        if loaded.backoff.failing:  # and now answered: recovered
            loaded.backoff.succeeded()
            self._store_event(loaded.task, "student_recovered",
                              f"student {loaded.version} answers again after failing",
                              {"version": loaded.version})
        record.student_version = loaded.version
        record.student_target = prediction.target
        record.student_confidence = prediction.confidence
        loaded.stats.seen += 1
        self.metrics.student_confidence.labels(task.metric_label).observe(prediction.confidence)
        serves = loaded.serves(prediction)
        self._guard(loaded, serves)
        if not serves:
            return None
        loaded.stats.served += 1
        return loaded

    def _student_failed(self, loaded: LoadedStudent, error: Exception) -> None:
        """Count the failure, back off from the student, and tell: the first failure of a
        run is stored as an event (``distill-gateway status`` shows it), the traceback
        logged at most every STUDENT_ERROR_LOG_S."""
        first = not loaded.backoff.failing
        loaded.backoff.failed(time.monotonic())
        self.metrics.student_errors.labels(loaded.task).inc()
        self._log_student_failure(loaded.task, loaded.version)
        # Not counted by the share guard: a failure says nothing of the share the student
        # answers, and counted it would keep a recovered student passed over.
        if first:
            self._store_event(loaded.task, "student_failing", (
                f"student {loaded.version} failed ({type(error).__name__}: {error}); its "
                f"requests go to the teacher, and it is asked again after "
                f"{loaded.backoff.period_s:g} s, twice as long after each failed retry"),
                {"version": loaded.version, "error": str(error)[:500]})

    def _log_student_failure(self, task: str, version: str) -> None:
        """The traceback at most once per task every STUDENT_ERROR_LOG_S: a student that
        fails (a generation server down) fails every request of every batch."""
        now = time.monotonic()
        last, quiet = self._student_failures.get(task, (-STUDENT_ERROR_LOG_S, 0))
        if now - last < STUDENT_ERROR_LOG_S:
            self._student_failures[task] = (last, quiet + 1)
            return
        self._student_failures[task] = (now, 0)
        more = f" ({quiet} more failures since the last report)" if quiet else ""
        log.exception("student %s %s failed; escalating%s", task, version, more)

    def _guard(self, loaded: LoadedStudent, served: bool) -> None:
        """Count the request for the share guard; a change of its state is logged and
        stored as an event (off the event loop), which ``distill-gateway status`` shows."""
        guard = loaded.guard
        if not guard.record(served):
            return
        details = {"version": loaded.version, "served": guard.served, "asked": guard.seen,
                   "min_share": guard.min_share}
        if guard.passing_over:
            kind = "student_passed_over"
            message = (
                f"student {loaded.version} answered {guard.served} of the last {guard.seen} "
                f"requests it was asked, under policy.min_share {guard.min_share}: asking it "
                f"one request in {PROBE_EVERY}, the rest go to the teacher"
            )
            log.warning("task %s: %s", loaded.task, message)
        else:
            kind = "student_asked_again"
            message = (f"student {loaded.version} answers again ({guard.served} of the last "
                       f"{guard.seen}): asking it every request")
        self._store_event(loaded.task, kind, message, details)

    def _store_event(self, task: str, kind: str, message: str, details: dict[str, Any]) -> None:
        """Store (and log) an event off the event loop."""
        asyncio.get_running_loop().run_in_executor(
            None, record_event, self.store.engine, task, kind, message, details
        )

    def _serve_student(
        self,
        request: ChatCompletionRequest,
        body: dict[str, Any],
        task: TaskRuntime,
        record: ExchangeRecord,
        loaded: LoadedStudent,
        started: float,
    ) -> dict[str, Any]:
        content = task.task.render(record.student_target)
        response = completion_body(record.id, request.model, content)
        record.served_by = "student"
        record.answer = content
        record.response = response
        self.audits.maybe_audit(request, body, task, record, loaded)
        self.finish(record, task, Usage(), started)
        return response

    # -- bookkeeping -------------------------------------------------------------------
    def judge(self, record: ExchangeRecord, task: TaskRuntime, answer: str | None) -> None:
        """Normalise the teacher's answer into the task's target (or mark it invalid)."""
        record.answer = answer
        if answer is None:
            record.target_valid = False
            return
        try:
            record.target = task.task.parse_target(answer)
            record.target_valid = True
        except InvalidTarget as exc:
            record.target_valid = False
            record.error = f"invalid target: {exc}"
            self.metrics.invalid_targets.labels(task.metric_label).inc()

    def finish(
        self, record: ExchangeRecord, task: TaskRuntime, usage: Usage, started: float
    ) -> None:
        record.prompt_tokens = usage.prompt_tokens
        record.completion_tokens = usage.completion_tokens
        record.cost_usd = usage.cost_usd
        record.latency_ms = (time.perf_counter() - started) * 1000
        label = task.metric_label
        m = self.metrics
        if record.kind == "request":
            m.requests.labels(label, record.served_by, str(record.status)).inc()
            m.latency.labels(label, record.served_by).observe(record.latency_ms / 1000)
            m.overhead.labels(label, record.served_by).observe(
                max(0.0, record.latency_ms - record.upstream_ms) / 1000
            )
            self._count_economics(record, task)
        if record.teacher_model is not None:
            m.teacher_tokens.labels(label, record.teacher_model, "prompt").inc(usage.prompt_tokens)
            m.teacher_tokens.labels(label, record.teacher_model, "completion").inc(
                usage.completion_tokens
            )
            m.teacher_cost.labels(label, record.teacher_model).inc(usage.cost_usd)
        if record.status >= 400:  # a stream that broke off after it started
            m.errors.labels(label, "upstream_error").inc()
        self.store.submit(record)

    def _count_economics(self, record: ExchangeRecord, task: TaskRuntime) -> None:
        """Student share, and what the teacher alone would have cost for this answer."""
        if record.status != 200:
            return
        label = task.metric_label
        task.requests += 1
        if record.served_by == "student":
            task.student_served += 1
            counterfactual = task.teacher_cost_ema or 0.0
        else:
            counterfactual = record.cost_usd
            task.observe_teacher_cost(record.cost_usd)
        task.counterfactual_usd += counterfactual
        task.actual_usd += record.cost_usd
        self.metrics.student_share.labels(label).set(task.student_served / task.requests)
        self.metrics.counterfactual_cost.labels(label).inc(counterfactual)
        self.metrics.savings.labels(label).set(task.counterfactual_usd - task.actual_usd)

    def _finish_error(
        self, record: ExchangeRecord, task: TaskRuntime, exc: GatewayError, started: float
    ) -> None:
        record.status = exc.status_code
        record.error = exc.message
        record.latency_ms = (time.perf_counter() - started) * 1000
        record.upstream_ms = record.latency_ms  # all of it was spent on the teacher
        m = self.metrics
        m.requests.labels(task.metric_label, record.served_by, str(record.status)).inc()
        m.errors.labels(task.metric_label, exc.error_type).inc()
        self.store.submit(record)
