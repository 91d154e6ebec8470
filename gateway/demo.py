"""``distill-gateway demo``: the whole product on embedded defaults, no API key.

The teacher is a real GPT model's recorded answers on Banking77 (shipped with the
package), replayed through the litellm ``replay`` provider so the real teacher path
runs. The gateway serves on loopback (SQLite and artifacts under ``./distill-demo``);
the ``openai`` client replays the traffic; the loop trains, calibrates and promotes
students in the background while a live view shows the share served by the student,
agreement with the teacher and the money saved.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from gateway.bench import teacher_costs
from gateway.config import TeacherEndpoint, load_settings
from gateway.providers import litellm
from gateway.serving import ServerThread
from gateway.teacher import resolve_price

TASK = "support-intents"
SYSTEM = "Classify the customer's banking message: answer with exactly one intent label."


def banking77_rows(seed: int = 0) -> tuple[list[dict[str, Any]], list[str]]:
    data = resources.files("gateway") / "data" / "banking77"
    rows = []
    for name in ("test_llm_labels.jsonl", "extra_llm_labels.jsonl"):
        rows += [json.loads(line) for line in (data / name).read_text().splitlines() if line]
    random.Random(seed).shuffle(rows)
    seen: set[str] = set()
    unique = []
    for row in rows:
        if row["text"] not in seen:
            seen.add(row["text"])
            unique.append({"text": row["text"], "teacher": row["teacher"], "gold": row["gold"]})
    return unique, json.loads((data / "categories.json").read_text())


@dataclass
class DemoStats:
    requests: int = 0
    student: int = 0
    agree: int = 0
    teacher_only_usd: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)
    window: list[tuple[bool, bool]] = field(default_factory=list)  # (student, agrees)

    def add(self, student: bool, agrees: bool, teacher_only: float) -> None:
        self.requests += 1
        self.student += student
        self.agree += agrees
        self.teacher_only_usd += teacher_only
        self.window = [*self.window[-199:], (student, agrees)]

    def recent(self) -> tuple[float, float]:
        n = len(self.window) or 1
        return (sum(s for s, _ in self.window) / n, sum(a for _, a in self.window) / n)


def run_demo(
    requests: int | None = None,
    rate: float = 12.0,
    port: int = 8000,
    workdir: Path = Path("distill-demo"),
    priced_as: str = "gpt-4o",
    keep_serving: bool = False,
) -> dict[str, Any]:
    import openai

    from gateway.app import create_app

    console = Console(soft_wrap=True)  # a piped or logged run keeps each line whole
    rows, labels = banking77_rows()
    rows = rows[:requests] if requests else rows
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    stream = workdir / "teacher-answers.jsonl"
    stream.write_text("".join(json.dumps(r) + "\n" for r in rows))
    price = resolve_price(TeacherEndpoint(model=priced_as))
    settings = load_settings(
        None,
        database=f"sqlite:///{workdir / 'distill.db'}",
        artifacts=str(workdir / "artifacts"),
        tasks={
            TASK: {
                "plugin": "classify",
                "options": {"labels": labels},
                "teacher": {
                    "model": f"replay/{priced_as}",
                    "api_base": str(stream),
                    "num_retries": 0,
                    "price": {
                        "input_per_mtok": price.input * 1e6,
                        "output_per_mtok": price.output * 1e6,
                    },
                },
                "policy": {
                    "target_agreement": 0.97,
                    "audit_rate": 0.05,
                    "min_examples": 400,
                    "retrain_every": 600,
                },
            }
        },
        server={"port": port, "registry_poll_s": 0.5, "log_level": "warning"},
        loop={"enabled": True, "interval_s": 1.0},
    )
    app = create_app(settings)
    runtime = app.state.runtime
    stats = DemoStats()
    started = time.monotonic()
    with ServerThread(app, port=port) as server:
        console.print(
            f"[bold]distill-gateway demo[/bold]: {len(rows)} Banking77 requests, "
            f"teacher = recorded GPT answers priced as {priced_as}\n"
            f"gateway {server.base_url}   dashboard (Prometheus) "
            f"{server.url}/metrics   data {workdir}/"
        )
        client = openai.OpenAI(base_url=server.base_url, api_key="demo", max_retries=1)
        task = runtime.tasks[TASK]
        live = Live(console=console, refresh_per_second=4) if sys.stdout.isatty() else None
        if live is not None:
            live.start()
        try:
            for index, row in enumerate(rows, start=1):
                due = started + index / rate
                if due > time.monotonic():
                    time.sleep(due - time.monotonic())
                messages = [
                    {"role": "system", "content": SYSTEM},
                    {"role": "user", "content": row["text"]},
                ]
                raw = client.chat.completions.with_raw_response.create(
                    model=TASK,
                    messages=messages,  # type: ignore[arg-type]
                )
                answer = raw.parse().choices[0].message.content or ""
                student = raw.headers["x-distill-served-by"] == "student"
                agrees = (not student) or _same(task.task, answer, row["teacher"])
                tokens = litellm().token_counter(model=priced_as, messages=messages)
                out = litellm().token_counter(model=priced_as, text=row["teacher"] or "")
                stats.add(student, agrees, price.cost(tokens, out))
                if index % 50 == 0 or index == len(rows):
                    stats.history.append(
                        {
                            "requests": index,
                            "share": stats.recent()[0],
                            "agreement": stats.recent()[1],
                        }
                    )
                if live is not None and index % 5 == 0:
                    live.update(_view(stats, runtime, len(rows)))
                elif live is None and index % 200 == 0:
                    _line(console, stats, runtime, len(rows))
        finally:
            if live is not None:
                live.update(_view(stats, runtime, len(rows)))
                live.stop()
        runtime.store.flush(30)
        summary = _summary(stats, runtime, time.monotonic() - started, priced_as)
        console.print(_summary_table(summary))
        plot = workdir / "demo.png"
        _plot(stats, plot)
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
        console.print(f"plot: {plot}   summary: {workdir / 'summary.json'}")
        if keep_serving:
            console.print(f"still serving on {server.base_url}; Ctrl-C to stop")
            try:
                while True:
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
    return summary


def _same(task: Any, answer: str, teacher: Any) -> bool:
    from gateway.interfaces import InvalidTarget

    if teacher is None:
        return False
    try:
        return bool(task.agree(task.parse_target(answer), task.parse_target(str(teacher))))
    except InvalidTarget:
        return False


def _summary(stats: DemoStats, runtime: Any, seconds: float, priced_as: str) -> dict[str, Any]:
    cost, teacher_calls, audits = teacher_costs(runtime)
    active = runtime.registry.active(TASK)
    teacher_only = stats.teacher_only_usd
    return {
        "requests": stats.requests,
        "student_served": stats.student,
        "teacher_served": stats.requests - stats.student,
        "teacher_calls": teacher_calls,
        "audit_calls": audits,
        "student_share": stats.student / stats.requests if stats.requests else 0.0,
        "agreement_with_teacher": stats.agree / stats.requests if stats.requests else 1.0,
        "teacher_only_cost_usd": teacher_only,
        "cost_usd": cost,
        "savings_usd": teacher_only - cost,
        "savings_pct": 100.0 * (teacher_only - cost) / teacher_only if teacher_only else 0.0,
        "priced_as": priced_as,
        "active_version": active.version if active else None,
        "versions": len(runtime.registry.versions(TASK)),
        "seconds": round(seconds, 1),
    }


def _view(stats: DemoStats, runtime: Any, total: int) -> Table:
    share, agreement = stats.recent()
    loaded = runtime.students.get(TASK)
    table = Table(title="distill-gateway demo (live)", show_header=False)
    table.add_column("figure")
    table.add_column("value", justify="right")
    cost = runtime.tasks[TASK].actual_usd
    for name, value in (
        ("requests", f"{stats.requests} / {total}"),
        ("served by the student (last 200)", f"{share:.1%}"),
        ("served by the student (all)", f"{stats.student / max(1, stats.requests):.1%}"),
        ("agreement with the teacher (last 200)", f"{agreement:.2%}"),
        ("agreement with the teacher (all)", f"{stats.agree / max(1, stats.requests):.2%}"),
        ("teacher-only cost", f"${stats.teacher_only_usd:.4f}"),
        ("actual cost (audits included)", f"${cost:.4f}"),
        ("savings", f"${stats.teacher_only_usd - cost:.4f}"),
        (
            "student",
            f"{loaded.version} (threshold {loaded.threshold:.3f})"
            if loaded is not None and loaded.threshold is not None
            else "none yet: teacher only",
        ),
    ):
        table.add_row(name, value)
    return table


def _line(console: Console, stats: DemoStats, runtime: Any, total: int) -> None:
    share, agreement = stats.recent()
    loaded = runtime.students.get(TASK)
    console.print(
        f"{stats.requests}/{total} requests  student share {share:.1%} (last 200)  "
        f"agreement {agreement:.2%}  teacher-only ${stats.teacher_only_usd:.4f}  "
        f"actual ${runtime.tasks[TASK].actual_usd:.4f}  "
        f"student {loaded.version if loaded else '-'}"
    )


def _summary_table(summary: dict[str, Any]) -> Table:
    table = Table(title="demo summary")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    return table


def _plot(stats: DemoStats, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [h["requests"] for h in stats.history]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(x, [h["share"] for h in stats.history], label="share served by the student")
    ax.plot(x, [h["agreement"] for h in stats.history], label="agreement with the teacher")
    ax.axhline(0.97, color="grey", linewidth=0.8, linestyle="--", label="promise 0.97")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("requests (Banking77 stream)")
    ax.set_title("distill-gateway demo (rolling 200 requests)")
    ax.legend(loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
