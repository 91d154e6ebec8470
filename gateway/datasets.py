"""Export curated examples, import existing logs: the dataset leaves and enters here.

Exports go through the task's curation chain (PII redacted when ``pii`` is in it,
original conversations included). Imports become ordinary recorded exchanges
(``kind = import``), redacted like live traffic, and pass the same chain when a round
builds its training set.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from gateway.curation import curate
from gateway.interfaces import Example, InvalidTarget, Task
from gateway.redaction import redact_record, redactor_of
from gateway.schemas import ChatCompletionRequest
from gateway.store import ExchangeRecord, database
from gateway.training import Workspace, load_examples

log = logging.getLogger("distill_gateway.datasets")

FORMATS = ("openai-jsonl", "parquet")
BATCH = 500


@contextmanager
def progress(description: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on a terminal; a structured log line every few seconds
    otherwise (CI, services, pipes)."""
    if sys.stderr.isatty():
        from rich.progress import Progress

        with Progress(transient=False) as bar:
            task_id = bar.add_task(description, total=total)
            yield lambda n: bar.advance(task_id, n)
        return
    done = 0
    last = time.monotonic()

    def advance(n: int) -> None:
        nonlocal done, last
        done += n
        if time.monotonic() - last >= 2.0:
            last = time.monotonic()
            log.info("%s: %d/%s", description, done, total if total is not None else "?")

    yield advance
    log.info("%s: done, %d", description, done)


def export_rows(
    task: Task, examples: list[Example], redact: Callable[[Any], Any] | None
) -> list[dict[str, Any]]:
    rows = []
    for example in examples:
        messages = [
            m for m in example.meta.get("messages") or [] if m.get("role") != "assistant"
        ] or [{"role": "user", "content": example.input}]
        if redact is not None:
            messages = redact(messages)
        rows.append(
            {
                "messages": [
                    *messages,
                    {"role": "assistant", "content": task.render(example.target)},
                ],
                "input": example.input,
                "target": example.target,
                "source_id": example.source_id,
            }
        )
    return rows


def export(workspace: Workspace, task_name: str, fmt: str, out: Path) -> int:
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}")
    runtime = workspace.task(task_name)
    recorded = load_examples(workspace.engine, task_name)
    curated = curate(recorded, runtime.filters, runtime.task)
    rows = export_rows(runtime.task, curated.examples, redactor_of(runtime.filters))
    out.parent.mkdir(parents=True, exist_ok=True)
    with progress(f"export {task_name}", len(rows)) as advance:
        if fmt == "openai-jsonl":
            with out.open("w", encoding="utf-8") as file:
                for row in rows:
                    # OpenAI's fine-tuning format is exactly {"messages": [...]}.
                    file.write(json.dumps({"messages": row["messages"]}, ensure_ascii=False) + "\n")
                    advance(1)
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.table(
                {
                    "input": [r["input"] for r in rows],
                    "target": [json.dumps(r["target"], ensure_ascii=False) for r in rows],
                    "completion": [r["messages"][-1]["content"] for r in rows],
                    "messages": [json.dumps(r["messages"], ensure_ascii=False) for r in rows],
                    "source_id": [r["source_id"] for r in rows],
                }
            )
            pq.write_table(table, out)
            advance(len(rows))
    return len(rows)


def _answer_text(value: Any) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def row_to_record(task: Task, task_name: str, row: dict[str, Any]) -> ExchangeRecord:
    """One import row → one exchange. Accepted shapes: {"text"|"input", "teacher"|"output"},
    {"messages", "output"|"completion"|"teacher"}, or OpenAI fine-tuning rows whose last
    message is the assistant's answer."""
    messages = row.get("messages")
    answer: Any = next((row[k] for k in ("teacher", "output", "completion") if k in row), None)
    if messages is None:
        text = row.get("text", row.get("input"))
        if not isinstance(text, str):
            raise ValueError("a row needs 'text', 'input' or 'messages'")
        messages = [{"role": "user", "content": text}]
    elif answer is None and messages and messages[-1].get("role") == "assistant":
        answer = messages[-1].get("content")
        messages = messages[:-1]
    request = ChatCompletionRequest.model_validate({"model": task_name, "messages": messages})
    record = ExchangeRecord(
        model=task_name,
        task=task_name,
        request={"messages": messages},
        served_by="teacher",
        status=200,
        kind="import",
        task_input=task.task_input(request),
        teacher_model="import",
    )
    text = _answer_text(answer)
    record.answer = text
    if text is None:
        record.target_valid = False
        record.error = "no teacher answer"
        return record
    try:
        record.target = task.parse_target(text)
        record.target_valid = True
    except InvalidTarget as exc:
        record.target_valid = False
        record.error = f"invalid target: {exc}"
    return record


def import_file(workspace: Workspace, task_name: str, path: Path) -> dict[str, int]:
    runtime = workspace.task(task_name)
    redact = (
        redactor_of(runtime.filters) if workspace.settings.tasks[task_name].redact_records else None
    )
    lines = path.read_text(encoding="utf-8").splitlines()
    counts = {"rows": 0, "valid": 0, "invalid": 0, "unreadable": 0}
    batch: list[dict[str, Any]] = []
    with progress(f"import {task_name}", len(lines)) as advance:
        for number, line in enumerate(lines, start=1):
            advance(1)
            if not line.strip():
                continue
            counts["rows"] += 1
            try:
                record = row_to_record(runtime.task, task_name, json.loads(line))
            except (ValueError, TypeError) as exc:
                counts["unreadable"] += 1
                log.warning("%s line %d skipped: %s", path.name, number, exc)
                continue
            counts["valid" if record.target_valid else "invalid"] += 1
            if redact is not None:
                record = redact_record(record, redact)
            batch.append(record.to_row())
            if len(batch) >= BATCH:
                database.insert_ignoring_duplicates(workspace.engine, batch)
                batch = []
        database.insert_ignoring_duplicates(workspace.engine, batch)
    return counts
