"""The background writer: a bounded queue drained in batches by one thread.

The request path only calls ``submit`` (a non-blocking put). The writer thread inserts
batches; when the database fails, batches go to the spool and are replayed once it is
back. A graceful ``stop`` drains the queue first, so nothing recorded is lost.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError

from gateway.config import StoreConfig
from gateway.store import database
from gateway.store.records import ExchangeRecord
from gateway.store.spool import Spool
from gateway.store.tables import exchanges

log = logging.getLogger("distill_gateway.store")

_STOP = object()


class TrafficStore:
    def __init__(
        self,
        url: str,
        spool_dir: Path,
        config: StoreConfig | None = None,
        on_recorded: Callable[[ExchangeRecord], None] | None = None,
        transform: Callable[[ExchangeRecord], ExchangeRecord] | None = None,
    ) -> None:
        self.url = url
        self.config = config or StoreConfig()
        self.engine = database.create_engine(url)
        self.spool = Spool(spool_dir)
        self._on_recorded = on_recorded
        # Applied in the writer thread, before anything reaches the database or the spool
        # (PII redaction): off the response path.
        self._transform = transform
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=self.config.queue_size)
        self._thread: threading.Thread | None = None
        self._schema_ready = False
        self._db_down_until = 0.0  # monotonic time before which we do not retry the database
        # Counters read by the metrics collector.
        self.written = 0
        self.spooled = 0
        self.replayed = 0
        self.db_errors = 0
        # Called by the writer thread after each batch (and each idle second): metrics that
        # must be pushed rather than read at scrape time (Prometheus multiprocess mode).
        self.after_batch: Callable[[], None] | None = None

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="distill-store-writer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Drain the queue into the database (or the spool), then stop the thread."""
        if self._thread is None:
            return
        self._queue.put(_STOP)
        self._thread.join(timeout)
        if self._thread.is_alive():  # pragma: no cover - a hung database driver
            log.error("store writer did not stop in %.0fs; spooling what is left", timeout)
        self._spool_leftovers()
        self.spool.rotate()
        self._thread = None
        self.engine.dispose()

    # -- the request path --------------------------------------------------------------
    def submit(self, record: ExchangeRecord) -> None:
        """Hand a record to the writer without blocking; when the queue is full (the
        database is far behind), append it to the spool instead of dropping it."""
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            record = self._prepare([record])[0]
            self.spool.append([record], sync=False)
            self.spooled += 1
            self._notify([record])

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every submitted record is stored or spooled (for tests, shutdown)."""
        deadline = time.monotonic() + timeout
        done = self._queue.all_tasks_done
        with done:
            while self._queue.unfinished_tasks:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                done.wait(min(left, 0.05))
        return True

    # -- reads used by health checks and tools -----------------------------------------
    def ping(self) -> None:
        database.ping(self.engine)

    def ensure_schema(self) -> None:
        if not self._schema_ready:
            if self.config.run_migrations:
                database.migrate(self.engine)
            self._schema_ready = True

    def count(self, **where: Any) -> int:
        query = sa.select(sa.func.count()).select_from(exchanges)
        for column, value in where.items():
            query = query.where(exchanges.c[column] == value)
        with self.engine.connect() as connection:
            return int(connection.execute(query).scalar_one())

    def fetch(self, limit: int = 100, **where: Any) -> list[dict[str, Any]]:
        query = sa.select(exchanges).order_by(exchanges.c.created_at).limit(limit)
        for column, value in where.items():
            query = query.where(exchanges.c[column] == value)
        with self.engine.connect() as connection:
            return [dict(row._mapping) for row in connection.execute(query)]

    # -- the writer thread -------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._try_replay()
        except Exception:
            log.exception("store writer: first replay failed")
        stopping = False
        while not stopping:
            taken = self._next_batch()
            batch = self._prepare([item for item in taken if item is not _STOP])
            stopping = len(batch) < len(taken)
            try:
                if batch:
                    self._store(batch)
                if time.monotonic() >= self._db_down_until and self.spool.has_backlog():
                    self._try_replay()
            except Exception:
                log.exception("store writer: unexpected error; spooling the batch")
                self._spool_batch(batch)
            finally:
                for _ in taken:
                    self._queue.task_done()
                self._after_batch()

    def _after_batch(self) -> None:
        if self.after_batch is not None:
            try:
                self.after_batch()
            except Exception:  # metrics must never stop the writer
                log.exception("store writer: after_batch failed")

    def _next_batch(self) -> list[Any]:
        """Up to batch_size items, waiting at most flush_interval after the first; a stop
        marker makes it take everything left."""
        wait = self.config.retry_interval_s if self.spool.has_backlog() else 1.0
        try:
            first = self._queue.get(timeout=wait)
        except queue.Empty:
            return []
        taken = [first]
        if first is _STOP:
            return taken + self._drain_rest()
        deadline = time.monotonic() + self.config.flush_interval_ms / 1000
        while len(taken) < self.config.batch_size:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            taken.append(item)
            if item is _STOP:
                return taken + self._drain_rest()
        return taken

    def _prepare(self, records: list[ExchangeRecord]) -> list[ExchangeRecord]:
        if self._transform is None:
            return records
        out = []
        for record in records:
            try:
                out.append(self._transform(record))
            except Exception:
                log.exception("record transform failed; storing the record unchanged")
                out.append(record)
        return out

    def _drain_rest(self) -> list[Any]:
        rest: list[Any] = []
        while True:
            try:
                rest.append(self._queue.get_nowait())
            except queue.Empty:
                return rest

    def _insert(self, records: list[ExchangeRecord]) -> None:
        self.ensure_schema()
        database.insert_ignoring_duplicates(self.engine, [r.to_row() for r in records])

    def _store(self, batch: list[ExchangeRecord]) -> None:
        if time.monotonic() < self._db_down_until:
            self._spool_batch(batch)
            return
        try:
            # Chunks keep a final drain of a large queue within sane statement sizes.
            for start in range(0, len(batch), self.config.batch_size):
                self._insert(batch[start : start + self.config.batch_size])
        except SQLAlchemyError as exc:
            self._database_failed(exc)
            self._spool_batch(batch)  # duplicates of rows that did get in are ignored later
            return
        self.written += len(batch)
        self._notify(batch)

    def _spool_batch(self, batch: list[ExchangeRecord]) -> None:
        if not batch:
            return
        self.spool.append(batch)
        self.spooled += len(batch)
        self._notify(batch)

    def _spool_leftovers(self) -> None:
        taken = self._drain_rest()
        self._spool_batch(self._prepare([item for item in taken if item is not _STOP]))
        for _ in taken:
            self._queue.task_done()

    def _try_replay(self) -> None:
        if not self.spool.has_backlog():
            return
        try:
            count = self.spool.replay(self._insert, self.config.batch_size)
        except SQLAlchemyError as exc:
            self._database_failed(exc)
            return
        self.replayed += count

    def _database_failed(self, exc: SQLAlchemyError) -> None:
        self.db_errors += 1
        self._db_down_until = time.monotonic() + self.config.retry_interval_s
        # The driver's message can include the URL; SQLAlchemy hides the password in it.
        log.warning("database unavailable, spooling records: %s", str(exc).splitlines()[0])

    def _notify(self, records: list[ExchangeRecord]) -> None:
        if self._on_recorded is None:
            return
        for record in records:
            try:
                self._on_recorded(record)
            except Exception:
                log.exception("exchange_recorded hook failed")
