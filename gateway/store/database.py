"""Engines and migrations: SQLite by default, Postgres (psycopg 3) by URL, the same code."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy as sa
from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine

from gateway.store.tables import exchanges

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"
# Any constant works; it only has to be the same in every replica.
_MIGRATION_LOCK_KEY = 0x64697374  # "dist"


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def _json(value: Any) -> str:
    # orjson: the writer thread holds the GIL far less than with the stdlib json module.
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()


def create_engine(url: str, *, connect_timeout_s: float = 5.0) -> Engine:
    if is_sqlite(url):
        database = sa.engine.make_url(url).database
        if database and database != ":memory:":
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(
            url,
            connect_args={"timeout": connect_timeout_s},
            json_serializer=_json,
            json_deserializer=orjson.loads,
        )

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            # WAL lets readers (dashboards, training) run while the writer inserts.
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        return engine
    return sa.create_engine(
        url,
        pool_pre_ping=True,
        json_serializer=_json,
        json_deserializer=orjson.loads,
        pool_size=5,
        max_overflow=5,
        connect_args={"connect_timeout": max(1, int(connect_timeout_s))},
    )


class _UpgradesOnly(logging.Filter):
    """alembic announces its context at every start ("Context impl SQLiteImpl.", "Will
    assume non-transactional DDL."); only the upgrades it runs are news."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(("Context impl", "Will assume"))


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision; safe to run from many replicas at once."""
    announcer = logging.getLogger("alembic.runtime.migration")
    if not any(isinstance(f, _UpgradesOnly) for f in announcer.filters):
        announcer.addFilter(_UpgradesOnly())
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            connection.execute(
                sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK_KEY}
            )
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


def insert_ignoring_duplicates(engine: Engine, rows: list[dict[str, Any]]) -> None:
    """Insert rows in one transaction; a row whose id is already stored is skipped, which
    makes replaying a spool file idempotent."""
    if not rows:
        return
    statement: Any
    if engine.dialect.name == "postgresql":
        statement = postgresql.insert(exchanges).on_conflict_do_nothing(index_elements=["id"])
    elif engine.dialect.name == "sqlite":
        statement = sqlite.insert(exchanges).on_conflict_do_nothing(index_elements=["id"])
    else:  # pragma: no cover - only the two supported dialects reach here
        statement = exchanges.insert()
    with engine.begin() as connection:
        connection.execute(statement, rows)


def ping(engine: Engine) -> None:
    with engine.connect() as connection:
        connection.execute(sa.text("SELECT 1"))
