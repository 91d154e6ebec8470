"""Events: what the loop and the drift guard did, and why (the ``events`` table)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from gateway.store.tables import events

log = logging.getLogger("distill_gateway.events")


def record_event(
    engine: Engine, task: str, kind: str, message: str, details: dict[str, Any] | None = None
) -> None:
    """Store an event and log it; never raises (an event is not worth a failed round)."""
    log.info("%s %s: %s", task, kind, message)
    try:
        with engine.begin() as conn:
            conn.execute(
                events.insert().values(
                    created_at=datetime.now(UTC),
                    task=task,
                    kind=kind,
                    message=message,
                    details=details,
                )
            )
    except sa.exc.SQLAlchemyError as exc:
        log.warning("could not store the event: %s", str(exc).splitlines()[0])


def recent_events(engine: Engine, task: str, limit: int = 20) -> list[dict[str, Any]]:
    query = sa.select(events).where(events.c.task == task).order_by(events.c.id.desc()).limit(limit)
    with engine.connect() as conn:
        return [dict(row._mapping) for row in conn.execute(query)]
