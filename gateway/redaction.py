"""Redacting raw traffic records with a task's redacting filter (the ``pii`` plugin).

The core knows no PII rules: any filter object of a task's chain that has a
``redact_value(value) -> value`` method (strings, and the strings inside lists and
dicts) is used to redact that task's records before they are stored, unless the task
sets ``redact_records: false``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from gateway.interfaces import Filter
from gateway.store import ExchangeRecord

Redact = Callable[[Any], Any]


def redactor_of(chain: list[tuple[str, Filter]]) -> Redact | None:
    functions = [f.redact_value for _, f in chain if callable(getattr(f, "redact_value", None))]  # type: ignore[attr-defined]
    if not functions:
        return None

    def redact(value: Any) -> Any:
        for function in functions:
            value = function(value)
        return value

    return redact


REDACTED_FIELDS = ("request", "task_input", "response", "answer", "target", "student_target")


def redact_record(record: ExchangeRecord, redact: Redact) -> ExchangeRecord:
    """The record with its free-text fields redacted; the record itself when nothing in it
    is (most records: the writer then builds no copy)."""
    changed = {}
    for name in REDACTED_FIELDS:
        value = getattr(record, name)
        if value is not None:
            new = redact(value)
            if new is not value:
                changed[name] = new
    return dataclasses.replace(record, **changed) if changed else record


def record_transform(
    redactors: dict[str, Redact],
) -> Callable[[ExchangeRecord], ExchangeRecord] | None:
    """The store's per-record transform: redact records of the tasks that ask for it."""
    if not redactors:
        return None

    def transform(record: ExchangeRecord) -> ExchangeRecord:
        redact = redactors.get(record.task or "")
        return redact_record(record, redact) if redact is not None else record

    return transform
