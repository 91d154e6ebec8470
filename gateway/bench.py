"""``distill-gateway bench cascade``: replay a stream through the real gateway, cold.

Every row of the stream becomes a chat request sent with the ``openai`` client to the
gateway on loopback; the teacher is the replay provider over the same rows, so the
student is judged against what the teacher answered. The run starts with a fresh store
and no student; rounds run at the policy's triggers synchronously — traffic waits while
a round trains — so that results are reproducible. The report counts every answer in
``agreement_with_teacher`` (a teacher answer agrees by definition; audit calls are
teacher calls and count in ``teacher_calls`` and in the cost).
"""

from __future__ import annotations

import asyncio
import json
import platform
import random
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai

from gateway.config import Settings, TeacherEndpoint, load_settings
from gateway.interfaces import InvalidTarget, Task
from gateway.providers import litellm
from gateway.replay import answer_text
from gateway.serving import ServerThread
from gateway.teacher import resolve_price

TASK = "bench"
PROMISE_TOLERANCE = 0.005  # a stream is finite: 0.97 promised, >= 0.965 delivered counts
SYSTEM = {
    "classify": "Classify the customer's message: answer with exactly one intent label.",
    "extract": "Extract the intents and slots of the message as a JSON object.",
    "rewrite": "Rewrite the question without its disfluencies.",
}


@dataclass
class BenchOptions:
    stream: Path
    task: str
    labels: Path | None = None
    schema: Path | None = None
    target_agreement: float = 0.97
    seed: int = 0
    limit: int | None = None
    priced_as: str = "gpt-4o"
    out: Path | None = None
    min_examples: int | None = None
    retrain_every: int | None = None
    min_share: float | None = None
    audit_rate: float = 0.02
    calibration: str = "crossfit"
    trainer: str | None = None
    trainer_options: dict[str, Any] = field(default_factory=dict)
    filters: list[str] | None = None
    plugins: list[str] = field(default_factory=list)
    windows: int = 20
    quiet: bool = False


def load_rows(options: BenchOptions) -> list[dict[str, Any]]:
    rows = [
        json.loads(line)
        for line in options.stream.read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    for number, row in enumerate(rows, start=1):
        if not isinstance(row.get("text"), str) or "teacher" not in row:
            raise ValueError(
                f"{options.stream} line {number}: expected "
                '{"text": str, "teacher": ..., "gold": optional}'
            )
    random.Random(options.seed).shuffle(rows)
    # One row per text: the replay teacher answers by text, so duplicates would be judged
    # against an answer the gateway never saw.
    seen: set[str] = set()
    unique = [r for r in rows if not (r["text"] in seen or seen.add(r["text"]))]  # type: ignore[func-returns-value]
    return unique[: options.limit] if options.limit else unique


def bench_settings(options: BenchOptions, workdir: Path, stream: Path, rows: int) -> Settings:
    task_options: dict[str, Any] = {}
    if options.labels is not None:
        task_options["labels"] = json.loads(options.labels.read_text())
    if options.schema is not None:
        task_options["json_schema"] = json.loads(options.schema.read_text())
    price = resolve_price(TeacherEndpoint(model=options.priced_as))
    policy: dict[str, Any] = {
        "target_agreement": options.target_agreement,
        "audit_rate": options.audit_rate,
        "min_examples": options.min_examples or max(100, min(400, rows // 20)),
        "retrain_every": options.retrain_every or max(200, rows // 10),
        "calibration": options.calibration,
    }
    if options.min_share is not None:
        policy["min_share"] = options.min_share
    task: dict[str, Any] = {
        "plugin": options.task,
        "options": task_options,
        "policy": policy,
        "student": {"trainer": options.trainer, "options": options.trainer_options},
    }
    if options.filters is not None:
        task["filters"] = options.filters
    return load_settings(
        None,
        database=f"sqlite:///{workdir / 'bench.db'}",
        artifacts=str(workdir / "artifacts"),
        default_teacher=None,
        tasks={
            TASK: {
                **task,
                "teacher": {
                    "model": f"replay/{options.priced_as}",
                    "api_base": str(stream),
                    "num_retries": 0,
                    "timeout_s": 30,
                    "price": {
                        "input_per_mtok": price.input * 1e6,
                        "output_per_mtok": price.output * 1e6,
                    },
                },
            }
        },
        plugins=options.plugins,
        server={"registry_poll_s": 0.05, "log_level": "warning"},
        # Rounds run in this process, between requests: traffic waits (reproducible).
        loop={"enabled": False, "subprocess": False},
        store={"flush_interval_ms": 1},
    )


def _parse(task: Task, value: Any) -> Any:
    if value is None:
        return None
    try:
        return task.parse_target(answer_text(value))
    except InvalidTarget:
        return None


@dataclass
class Outcome:
    served_by: str
    agrees: bool
    correct: bool | None
    teacher_only_cost: float
    ms: float


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def figures(
    outcomes: list[Outcome], cost: float, teacher_calls: int, audits: int
) -> dict[str, Any]:
    n = len(outcomes)
    student = [o for o in outcomes if o.served_by == "student"]
    graded = [o.correct for o in outcomes if o.correct is not None]
    teacher_only = sum(o.teacher_only_cost for o in outcomes)
    return {
        "requests": n,
        "teacher_calls": teacher_calls,
        "audit_calls": audits,
        "student_served": len(student),
        "student_share": len(student) / n if n else 0.0,
        "agreement_with_teacher": sum(o.agrees for o in outcomes) / n if n else 1.0,
        "student_agreement": (sum(o.agrees for o in student) / len(student)) if student else None,
        "accuracy_vs_gold": (sum(graded) / len(graded)) if graded else None,
        "teacher_only_cost_usd": teacher_only,
        "cost_usd": cost,
        "savings_pct": 100.0 * (teacher_only - cost) / teacher_only if teacher_only else 0.0,
    }


def run_bench(options: BenchOptions) -> dict[str, Any]:
    from gateway.app import create_app
    from gateway.loop import DistillationLoop
    from gateway.plugins import load_plugins
    from gateway.runtime import build_tasks

    rows = load_rows(options)
    with tempfile.TemporaryDirectory(prefix="distill-bench-") as tmp:
        workdir = Path(tmp)
        stream = workdir / "stream.jsonl"
        stream.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        settings = bench_settings(options, workdir, stream, len(rows))
        tasks, _ = build_tasks(settings, load_plugins(settings.plugins))
        task = tasks[TASK].task
        price = resolve_price(TeacherEndpoint(model=options.priced_as))
        app = create_app(settings)
        runtime = app.state.runtime
        outcomes: list[Outcome] = []
        trainings: list[dict[str, Any]] = []
        curve: list[dict[str, Any]] = []
        window = max(1, len(rows) // max(1, options.windows))
        started = time.perf_counter()
        with ServerThread(app) as server:
            client = openai.OpenAI(base_url=server.base_url, api_key="bench", max_retries=0)
            loop = DistillationLoop(settings, runtime.store.engine, runtime.registry, [TASK])
            for index, row in enumerate(rows, start=1):
                messages = [
                    {"role": "system", "content": SYSTEM.get(options.task, "")},
                    {"role": "user", "content": row["text"]},
                ]
                sent = time.perf_counter()
                raw = client.chat.completions.with_raw_response.create(
                    model=TASK,
                    messages=messages,  # type: ignore[arg-type]
                )
                ms = (time.perf_counter() - sent) * 1000
                answer = raw.parse().choices[0].message.content or ""
                served_by = raw.headers["x-distill-served-by"]
                teacher_target = _parse(task, row["teacher"])
                given = _parse(task, answer)
                agrees = served_by == "teacher" or (
                    teacher_target is not None
                    and given is not None
                    and task.agree(given, teacher_target)
                )
                gold = _parse(task, row.get("gold")) if row.get("gold") is not None else None
                correct = (
                    (given is not None and task.agree(given, gold)) if gold is not None else None
                )
                prompt = litellm().token_counter(model=options.priced_as, messages=messages)
                completion = litellm().token_counter(
                    model=options.priced_as, text=answer_text(row["teacher"])
                )
                outcomes.append(
                    Outcome(served_by, agrees, correct, price.cost(prompt, completion), ms)
                )
                runtime.store.flush(30)
                summary = asyncio.run(loop.check(TASK))
                if summary is not None:
                    summary["at_request"] = index
                    trainings.append(summary)
                    _wait_for(runtime, summary)
                    if not options.quiet:
                        print(f"[{index}/{len(rows)}] round: {summary['reason']}", flush=True)
                if index % window == 0 or index == len(rows):
                    curve.append({"end": index, **_window_figures(outcomes[-window:])})
            runtime.store.flush(30)
            cost, teacher_calls, audits = teacher_costs(runtime)
        report = {
            **figures(outcomes, cost, teacher_calls, audits),
            "target_agreement": options.target_agreement,
            "promise_tolerance": PROMISE_TOLERANCE,
            "p50_ms": statistics.median([o.ms for o in outcomes]) if outcomes else 0.0,
            "p99_ms": percentile([o.ms for o in outcomes], 0.99),
            "trainings": trainings,
            "curve": curve,
            "task": options.task,
            "stream": str(options.stream),
            "seed": options.seed,
            "priced_as": options.priced_as,
            "calibration": options.calibration,
            "seconds": round(time.perf_counter() - started, 1),
            "note": "training rounds run synchronously at the policy's triggers (traffic "
            "waits while a round trains), so the run is reproducible",
            "machine": {
                "python": platform.python_version(),
                "cpus": _cpus(),
                "processor": platform.processor() or platform.machine(),
            },
        }
        report["promise_kept"] = bool(
            report["agreement_with_teacher"] >= options.target_agreement - PROMISE_TOLERANCE
        )
    if options.out is not None:
        options.out.parent.mkdir(parents=True, exist_ok=True)
        options.out.write_text(json.dumps(report, indent=2))
    return report


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _window_figures(outcomes: list[Outcome]) -> dict[str, Any]:
    n = len(outcomes)
    return {
        "student_share": sum(o.served_by == "student" for o in outcomes) / n,
        "agreement_with_teacher": sum(o.agrees for o in outcomes) / n,
        "p50_ms": statistics.median([o.ms for o in outcomes]),
    }


def _wait_for(runtime: Any, summary: dict[str, Any], timeout: float = 60) -> None:
    """After a promotion, wait until the serving app has swapped the new student in."""
    if not summary.get("promoted"):
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        loaded = runtime.students.get(TASK)
        if loaded is not None and loaded.version == summary["version"]:
            return
        time.sleep(0.02)
    raise RuntimeError(f"the gateway did not load {summary['version']} in {timeout:.0f}s")


def teacher_costs(runtime: Any) -> tuple[float, int, int]:
    """Teacher cost in USD, teacher calls and audit calls, as stored."""
    import sqlalchemy as sa

    from gateway.store.tables import exchanges as ex

    query = sa.select(
        sa.func.coalesce(sa.func.sum(ex.c.cost_usd), 0.0),
        sa.func.count(),
        sa.func.sum(sa.case((ex.c.kind == "audit", 1), else_=0)),
    ).where(ex.c.teacher_model.is_not(None))
    with runtime.store.engine.connect() as conn:
        cost, calls, audits = conn.execute(query).one()
    return float(cost), int(calls), int(audits or 0)
