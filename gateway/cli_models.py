"""``distill-gateway train | models | promote | rollback | eval``: the registry by hand.

A running gateway notices promotions and rollbacks made here within
``server.registry_poll_s`` and swaps students without a restart.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from gateway.training import Evaluation, Workspace

ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML config file", dir_okay=False)
]
out = Console()
if not out.is_terminal:
    out = Console(width=160)  # piped or captured: do not squeeze tables to 80 columns
err = Console(stderr=True, soft_wrap=True)  # error lines stay whole, e.g. for grep


def _workspace(config: Path | None) -> Workspace:
    from gateway.config import ConfigError, load_settings
    from gateway.plugins import PluginError
    from gateway.training import Workspace

    try:
        return Workspace(load_settings(config))
    except (ConfigError, PluginError) as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from None


def _fail(message: str) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}", highlight=False)
    return typer.Exit(1)


def train(
    task: Annotated[str, typer.Argument(help="configured task name")],
    config: ConfigOption = None,
    promote: Annotated[str, typer.Option(help="always | never | if-better")] = "if-better",
) -> None:
    """Train a student on the recorded teacher answers, calibrate it, register it."""
    from gateway.training import TrainingError

    if promote not in ("always", "never", "if-better"):
        raise _fail("--promote must be always, never or if-better")
    workspace = _workspace(config)
    try:
        workspace.task(task)
        with err.status(f"training a student for {task}…"):
            result = workspace.train_round(task, promote=promote)
    except TrainingError as exc:
        raise _fail(str(exc)) from None
    if result.version is None:
        raise _fail(f"{task}: nothing trained: {result.reason}")
    if result.evaluation is not None:
        _print_evaluation(task, result.version.version, result.evaluation)
    out.print(f"{task} {result.version.version}: {result.reason}")


def models(
    task: Annotated[str, typer.Argument(help="configured task name")], config: ConfigOption = None
) -> None:
    """List a task's student versions."""
    workspace = _workspace(config)
    table = Table(title=f"student versions of {task}")
    for column in (
        "version",
        "status",
        "trainer",
        "train",
        "held out",
        "threshold",
        "share at target",
        "created",
    ):
        table.add_column(column)
    for v in workspace.registry.versions(task):
        calibration = v.metrics.get("calibration") or {}
        table.add_row(
            v.version,
            v.status,
            v.trainer,
            str(v.train_examples),
            str(v.holdout_examples),
            "-" if v.threshold is None else f"{v.threshold:.4f}",
            f"{calibration.get('coverage', 0.0):.3f}" if calibration else "-",
            v.created_at.strftime("%Y-%m-%d %H:%M:%S"),
        )
    out.print(table)


def promote_version(
    task: Annotated[str, typer.Argument(help="configured task name")],
    version: Annotated[str, typer.Argument(help="version, e.g. v0003")],
    config: ConfigOption = None,
) -> None:
    """Make VERSION the active student of TASK (atomically retiring the current one)."""
    from gateway.registry import RegistryError

    workspace = _workspace(config)
    try:
        promoted = workspace.registry.promote(task, version)
    except RegistryError as exc:
        raise _fail(str(exc)) from None
    out.print(f"{task}: {promoted.version} is active (threshold {promoted.threshold})")


def rollback(
    task: Annotated[str, typer.Argument(help="configured task name")], config: ConfigOption = None
) -> None:
    """Retire the active student and re-activate the previous one (or teacher only)."""
    from gateway.registry import RegistryError

    workspace = _workspace(config)
    try:
        previous = workspace.registry.rollback(task)
    except RegistryError as exc:
        raise _fail(str(exc)) from None
    out.print(
        f"{task}: "
        + (
            f"{previous.version} is active again"
            if previous
            else "no earlier version; the teacher answers everything"
        )
    )


def eval_version(
    task: Annotated[str, typer.Argument(help="configured task name")],
    config: ConfigOption = None,
    version: Annotated[str | None, typer.Option(help="default: the active version")] = None,
    plot: Annotated[
        Path | None, typer.Option(help="write the coverage-agreement curve to this PNG")
    ] = None,
) -> None:
    """Held-out agreement, the coverage-agreement curve, the threshold and its margin."""
    from gateway.registry import RegistryError
    from gateway.training import calibration_rows, evaluate, load_examples

    workspace = _workspace(config)
    try:
        chosen = (
            workspace.registry.get(task, version) if version else workspace.registry.active(task)
        )
    except RegistryError as exc:
        raise _fail(str(exc)) from None
    if chosen is None:
        raise _fail(f"{task} has no active version; pass --version")
    policy = workspace.settings.tasks[task].policy
    examples = load_examples(workspace.engine, task)
    held_out = [examples[i] for i in calibration_rows(chosen, examples, policy.holdout_fraction)]
    if not held_out:
        raise _fail(f"{task}: no held-out teacher labels recorded yet")
    with err.status(f"evaluating {task} {chosen.version} on {len(held_out)} held-out labels…"):
        evaluation = evaluate(
            workspace.load_student(chosen),
            workspace.task(task).task,
            held_out,
            policy.target_agreement,
            policy.confidence_level,
        )
    _print_evaluation(task, chosen.version, evaluation)
    if plot is not None:
        write_plot(evaluation, plot, f"{task} {chosen.version}")
        out.print(f"curve written to {plot}")


def _print_evaluation(task: str, version: str, evaluation: Evaluation) -> None:
    c = evaluation.calibration
    table = Table(title=f"{task} {version}: {c.n} held-out teacher labels")
    table.add_column("figure")
    table.add_column("value", justify="right")
    rows = [
        ("student agreement (all held-out)", f"{c.student_agreement:.4f}"),
        ("target agreement", f"{c.target:.3f}"),
        ("threshold", "teacher only" if c.threshold is None else f"{c.threshold:.4f}"),
        ("share served at the threshold", f"{c.coverage:.4f}"),
        ("end-to-end agreement (held-out)", f"{c.agreement:.4f}"),
        (f"disagreement bound ({c.confidence_level:.0%})", f"{c.disagreement_bound:.4f}"),
        ("margin over the point estimate", f"{c.margin:.4f}"),
        (
            "naive threshold (no margin)",
            "-" if evaluation.naive_threshold is None else f"{evaluation.naive_threshold:.4f}",
        ),
    ]
    for name, value in rows:
        table.add_row(name, value)
    out.print(table)
    curve = Table(title="coverage-agreement curve")
    for column in ("threshold", "share served", "agreement", "agreement bound"):
        curve.add_column(column, justify="right")
    for point in c.curve[:: max(1, len(c.curve) // 12)]:
        curve.add_row(
            f"{point['threshold']:.4f}",
            f"{point['coverage']:.3f}",
            f"{point['agreement']:.4f}",
            f"{point['agreement_bound']:.4f}",
        )
    out.print(curve)


def write_plot(evaluation: Evaluation, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = evaluation.calibration
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(
        [p["coverage"] for p in c.curve],
        [p["agreement"] for p in c.curve],
        label="end-to-end agreement",
    )
    ax.plot(
        [p["coverage"] for p in c.curve],
        [p["agreement_bound"] for p in c.curve],
        linestyle="--",
        label=f"lower bound ({c.confidence_level:.0%})",
    )
    ax.axhline(c.target, color="grey", linewidth=0.8, label=f"target {c.target}")
    if c.threshold is not None:
        ax.axvline(
            c.coverage, color="green", linewidth=0.8, label=f"chosen: share {c.coverage:.2f}"
        )
    ax.set_xlabel("share served by the student")
    ax.set_ylabel("agreement with the teacher")
    ax.set_title(title)
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def register(app: typer.Typer) -> None:
    app.command("train")(train)
    app.command("models")(models)
    app.command("promote")(promote_version)
    app.command("rollback")(rollback)
    app.command("eval")(eval_version)
