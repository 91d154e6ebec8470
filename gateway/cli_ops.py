"""``distill-gateway worker | status | export | import``: running the loop and the data."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import sqlalchemy as sa
import typer
from rich.table import Table

from gateway.cli_models import ConfigOption, _fail, _workspace, out
from gateway.store.tables import exchanges

if TYPE_CHECKING:
    from gateway.metrics import GatewayMetrics

STATUS_WINDOW = 1000  # recent answers the share and the audited agreement are read from


def serve_round_metrics(metrics: GatewayMetrics, port: int, host: str = "0.0.0.0"
                        ) -> Callable[[dict[str, Any]], Awaitable[None]]:
    """Serve the worker's metrics (training rounds, curation filters) on ``port`` at
    /metrics, and return the callback that counts a round into them."""
    from prometheus_client import start_http_server

    start_http_server(port, addr=host, registry=metrics.registry)

    async def count(summary: dict[str, Any]) -> None:
        metrics.count_round(summary)

    return count


def worker(
    config: ConfigOption = None,
    once: Annotated[bool, typer.Option(help="check every task once, then exit")] = False,
    metrics_port: Annotated[
        int | None,
        typer.Option(help="serve the rounds' metrics (distill_training_rounds_total, "
                     "distill_filter_examples_total) on this port at /metrics"),
    ] = None,
) -> None:
    """Run the distillation loop without serving.

    One per deployment is enough; the training lock keeps it to one round per task
    anyway."""
    from gateway.loop import DistillationLoop
    from gateway.runtime import Runtime

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    workspace = _workspace(config)
    runtime = Runtime(workspace.settings, workspace.plugins)
    tasks = runtime.trainable_tasks()
    if not tasks:
        raise _fail("no task has a trainer")
    on_round = (serve_round_metrics(runtime.metrics, metrics_port)
                if metrics_port is not None else None)
    loop = DistillationLoop(workspace.settings, workspace.engine, workspace.registry, tasks,
                            on_round=on_round)

    async def run() -> None:
        if once:
            for task in tasks:
                summary = await loop.check(task)
                out.print(f"{task}: {summary['reason'] if summary else 'nothing due'}")
            return
        await loop.run_forever()

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass
    finally:
        loop.close()


def _recent(engine: sa.Engine, task: str, kind: str, limit: int) -> list[Any]:
    query = (
        sa.select(
            exchanges.c.served_by,
            exchanges.c.target,
            exchanges.c.student_target,
            exchanges.c.target_valid,
        )
        .where(exchanges.c.task == task, exchanges.c.kind == kind, exchanges.c.status == 200)
        .order_by(exchanges.c.created_at.desc())
        .limit(limit)
    )
    with engine.connect() as conn:
        return list(conn.execute(query))


def task_status(workspace: Any, task: str) -> dict[str, Any]:
    from gateway.events import recent_events
    from gateway.loop import count_recorded

    runtime = workspace.task(task)
    engine = workspace.engine
    answers = _recent(engine, task, "request", STATUS_WINDOW)
    share = sum(r.served_by == "student" for r in answers) / len(answers) if answers else 0.0
    audits = [r for r in _recent(engine, task, "audit", STATUS_WINDOW) if r.target_valid]
    agreed = sum(runtime.task.agree(r.target, r.student_target) for r in audits)
    audited = (1.0 - share * (1.0 - agreed / len(audits))) if audits else None
    versions = workspace.registry.versions(task)
    active = workspace.registry.active(task)
    last = versions[-1] if versions else None
    events = recent_events(engine, task, limit=1)
    return {
        "task": task,
        "active": active.version if active else None,
        "threshold": active.threshold if active else None,
        "share_served": share,
        "answers": len(answers),
        "audited_agreement": audited,
        "audits": len(audits),
        "dataset": count_recorded(engine, task),
        "last_training": last.created_at.isoformat(timespec="seconds") if last else None,
        "last_outcome": (last.error or last.metrics.get("outcome") or last.status)
        if last
        else None,
        "last_event": f"{events[0]['kind']}: {events[0]['message']}" if events else None,
    }


def status(config: ConfigOption = None) -> None:
    """Per task: active version, share served, audited agreement, dataset, last training."""
    workspace = _workspace(config)
    table = Table(title=f"distill-gateway status (last {STATUS_WINDOW} answers per task)")
    for column in (
        "task",
        "active",
        "share served",
        "audited agreement",
        "dataset",
        "last training",
        "outcome",
    ):
        table.add_column(column)
    for name in workspace.tasks:
        s = task_status(workspace, name)
        table.add_row(
            name,
            s["active"] or "teacher only",
            f"{s['share_served']:.3f}",
            "-"
            if s["audited_agreement"] is None
            else f"{s['audited_agreement']:.4f} ({s['audits']} audits)",
            str(s["dataset"]),
            s["last_training"] or "never",
            s["last_outcome"] or "-",
        )
    out.print(table)


def export_command(
    task: Annotated[str, typer.Argument(help="configured task name")],
    out_file: Annotated[Path, typer.Option("--out", help="file to write")],
    fmt: Annotated[str, typer.Option("--format", help="openai-jsonl | parquet")] = ("openai-jsonl"),
    config: ConfigOption = None,
) -> None:
    """Write the curated examples (PII redacted) as OpenAI fine-tuning JSONL or Parquet."""
    from gateway.datasets import FORMATS, export

    if fmt not in FORMATS:
        raise _fail(f"--format must be one of {', '.join(FORMATS)}")
    workspace = _workspace(config)
    workspace.task(task)
    count = export(workspace, task, fmt, out_file)
    out.print(f"{task}: {count} curated examples written to {out_file}")


def import_command(
    task: Annotated[str, typer.Argument(help="configured task name")],
    file: Annotated[
        Path,
        typer.Argument(
            help="JSONL: text/input or messages, and the teacher's output",
            exists=True,
            dir_okay=False,
        ),
    ],
    config: ConfigOption = None,
) -> None:
    """Seed a task from existing logs; rows pass the same filters as live traffic."""
    from gateway.datasets import import_file

    workspace = _workspace(config)
    workspace.task(task)
    counts = import_file(workspace, task, file)
    out.print(
        f"{task}: {counts['rows']} rows read, {counts['valid']} with a valid teacher "
        f"answer, {counts['invalid']} invalid, {counts['unreadable']} unreadable"
    )


def register(app: typer.Typer) -> None:
    app.command("worker")(worker)
    app.command("status")(status)
    app.command("export")(export_command)
    app.command("import")(import_command)
