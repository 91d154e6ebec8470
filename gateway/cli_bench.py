"""``distill-gateway bench cascade``: the economics of a stream, reproducibly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from gateway.cli_models import _fail, out

bench_app = typer.Typer(help="Benchmarks anyone can rerun.", no_args_is_help=True)


@bench_app.command("cascade")
def cascade(
    stream: Annotated[
        Path,
        typer.Option(help='JSONL rows {"text", "teacher", "gold"?}', exists=True, dir_okay=False),
    ],
    task: Annotated[str, typer.Option(help="classify | extract | rewrite")],
    labels: Annotated[
        Path | None,
        typer.Option(help="JSON list of labels (classify)", exists=True, dir_okay=False),
    ] = None,
    schema: Annotated[
        Path | None, typer.Option(help="JSON Schema file (extract)", exists=True, dir_okay=False)
    ] = None,
    target_agreement: Annotated[float, typer.Option(help="the promise")] = 0.97,
    seed: Annotated[int, typer.Option(help="shuffle seed")] = 0,
    limit: Annotated[int | None, typer.Option(help="first N rows after shuffling")] = None,
    priced_as: Annotated[str, typer.Option(help="model whose prices the teacher has")] = ("gpt-4o"),
    out_file: Annotated[Path | None, typer.Option("--out", help="report JSON")] = None,
    min_examples: Annotated[int | None, typer.Option(help="policy override")] = None,
    retrain_every: Annotated[int | None, typer.Option(help="policy override")] = None,
    min_share: Annotated[float | None, typer.Option(help="policy override (0: always ask "
                                                         "the student)")] = None,
    audit_rate: Annotated[float, typer.Option(help="share of student answers audited")] = 0.02,
    calibration: Annotated[
        str, typer.Option(help="crossfit | bound | naive (baseline)")
    ] = "crossfit",
    trainer: Annotated[str | None, typer.Option(help="trainer plugin override")] = None,
    trainer_options: Annotated[str, typer.Option(help="trainer options as JSON")] = "{}",
    plugin: Annotated[list[str] | None, typer.Option(help="extra plugin module")] = None,
    filter_name: Annotated[
        list[str] | None,
        typer.Option(
            "--filter", help="curation filter (repeat; default: the task's default chain)"
        ),
    ] = None,
) -> None:
    """Serve every row through the real gateway, training as the policy says, and report."""
    import logging

    from gateway.bench import BenchOptions, run_bench

    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )

    if task not in ("classify", "extract", "rewrite"):
        raise _fail("--task must be classify, extract or rewrite")
    if calibration not in ("crossfit", "bound", "naive"):
        raise _fail("--calibration must be crossfit, bound or naive")
    report = run_bench(
        BenchOptions(
            stream=stream,
            task=task,
            labels=labels,
            schema=schema,
            target_agreement=target_agreement,
            seed=seed,
            limit=limit,
            priced_as=priced_as,
            out=out_file,
            min_examples=min_examples,
            retrain_every=retrain_every,
            min_share=min_share,
            audit_rate=audit_rate,
            calibration=calibration,
            trainer=trainer,
            trainer_options=json.loads(trainer_options),
            plugins=plugin or [],
            filters=filter_name,
        )
    )
    table = Table(title=f"bench cascade: {stream.name} ({task}, target {target_agreement})")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key in (
        "requests",
        "teacher_calls",
        "audit_calls",
        "student_served",
        "student_share",
        "agreement_with_teacher",
        "student_agreement",
        "accuracy_vs_gold",
        "teacher_only_cost_usd",
        "cost_usd",
        "savings_pct",
        "promise_kept",
        "p50_ms",
        "p99_ms",
    ):
        value = report[key]
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    table.add_row("trainings", str(len(report["trainings"])))
    out.print(table)
    if out_file is not None:
        out.print(f"report written to {out_file}")


def register(app: typer.Typer) -> None:
    app.add_typer(bench_app, name="bench")
