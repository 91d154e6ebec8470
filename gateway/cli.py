"""The ``distill-gateway`` command."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from gateway import cli_bench, cli_models, cli_ops

if TYPE_CHECKING:
    from gateway.config import Settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
# transformers draws a progress bar for every model load (each promotion, each training
# round), which tears through the demo's live lines and the server's log; 0 shows them.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

app = typer.Typer(
    name="distill-gateway",
    help="OpenAI-compatible gateway that answers with a distilled student and falls back "
    "to the teacher.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",  # docstring paragraphs reflow to the terminal width
)
console = Console(stderr=True, soft_wrap=True)  # error lines stay whole, e.g. for grep

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="YAML config file (default: embedded defaults)",
        exists=False,
        dir_okay=False,
    ),
]


def _load(config: Path | None) -> Settings:
    """Settings with every task built once, so that any config error stops us here."""
    from gateway.config import ConfigError, load_settings
    from gateway.plugins import PluginError, load_plugins
    from gateway.runtime import build_tasks

    try:
        settings = load_settings(config)
        plugins = load_plugins(settings.plugins)
        build_tasks(settings, plugins)
    except (ConfigError, PluginError) as exc:
        console.print(f"[red]error:[/red] {exc}", markup=True, highlight=False)
        raise typer.Exit(2) from None
    return settings


@app.command("check-config")
def check_config(path: Annotated[Path, typer.Argument(help="YAML config file")]) -> None:
    """Validate a config file (keys, types, task plugins and their options)."""
    settings = _load(path)
    table = Table(title=f"{path}: valid", show_lines=False)
    table.add_column("task")
    table.add_column("plugin")
    table.add_column("teacher")
    for name, task in settings.tasks.items():
        teacher = task.teacher or settings.default_teacher
        chain = " → ".join(t.model for t in teacher.chain()) if teacher else "-"
        table.add_row(name, task.plugin, chain)
    if settings.default_teacher is not None:
        table.add_row("(pass-through)", "passthrough", settings.default_teacher.model)
    Console().print(table)
    Console().print(f"database: {_redact(settings.database)}   artifacts: {settings.artifacts}")


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


@app.command()
def serve(
    config: ConfigOption = None,
    host: Annotated[str | None, typer.Option(help="bind address (default from config)")] = None,
    port: Annotated[int | None, typer.Option(help="port (default from config)")] = None,
    workers: Annotated[int | None, typer.Option(help="worker processes")] = None,
    access_log: Annotated[bool, typer.Option(help="log every request")] = False,
) -> None:
    """Serve the gateway with uvicorn (uvloop + httptools)."""
    import uvicorn

    settings = _load(config)
    if config is not None:
        os.environ["DISTILL_CONFIG_FILE"] = str(config.resolve())
    server = settings.server
    workers = workers or server.workers
    if workers > 1 and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        console.print("note: several workers; set PROMETHEUS_MULTIPROC_DIR to aggregate metrics")
    uvicorn.run(
        "gateway.app:app_from_env",
        factory=True,
        host=host or server.host,
        port=port if port is not None else server.port,
        workers=workers,
        loop="uvloop",
        http="httptools",
        log_level=server.log_level,
        access_log=access_log,
        timeout_graceful_shutdown=30,
    )


@app.command()
def demo(
    requests: Annotated[int | None, typer.Option(help="replay only the first N requests")] = None,
    rate: Annotated[float, typer.Option(help="requests per second")] = 12.0,
    port: Annotated[int, typer.Option(help="gateway port")] = 8000,
    workdir: Annotated[Path, typer.Option(help="fresh folder for the demo's data")] = Path(
        "distill-demo"
    ),
    priced_as: Annotated[str, typer.Option(help="model whose prices the teacher has")] = ("gpt-4o"),
    keep_serving: Annotated[bool, typer.Option(help="keep serving after the replay")] = False,
) -> None:
    """Watch a student take over Banking77 traffic (no API key, nothing downloaded).

    Replays Banking77 through the gateway with a real GPT model's recorded answers as the
    teacher, while the loop trains, calibrates and promotes students."""
    from gateway.demo import run_demo

    run_demo(
        requests=requests,
        rate=rate,
        port=port,
        workdir=workdir,
        priced_as=priced_as,
        keep_serving=keep_serving,
    )


cli_models.register(app)
cli_ops.register(app)
cli_bench.register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
