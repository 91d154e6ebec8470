"""Exactly one trainer per task across replicas.

On Postgres a session-level advisory lock, held on a dedicated connection for the whole
round: if the holder dies, its session ends and the lock with it. On SQLite (one machine,
possibly several processes) a lease row with an expiry that the holder keeps extending.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
import uuid
from types import TracebackType
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from gateway.store.tables import training_locks


def _key(task: str) -> int:
    # A signed 64-bit key per task, the same in every replica.
    return int.from_bytes(
        hashlib.sha256(f"distill:{task}".encode()).digest()[:8], "big", signed=True
    )


class TrainingLock:
    def __init__(self, engine: Engine, task: str, lease_s: float = 60.0) -> None:
        self.engine = engine
        self.task = task
        self.lease_s = lease_s
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._connection: Any = None
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self.held = False

    def acquire(self) -> bool:
        if self.engine.dialect.name == "postgresql":
            connection = self.engine.connect()
            got = bool(
                connection.execute(
                    sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": _key(self.task)}
                ).scalar_one()
            )
            connection.commit()
            if not got:
                connection.close()
                return False
            self._connection = connection
        else:
            if not self._take_lease():
                return False
            self._heartbeat = threading.Thread(
                target=self._renew, daemon=True, name=f"distill-lease-{self.task}"
            )
            self._heartbeat.start()
        self.held = True
        return True

    def _take_lease(self) -> bool:
        now = time.time()
        with self.engine.begin() as conn:
            row = conn.execute(
                sa.select(training_locks).where(training_locks.c.task == self.task)
            ).first()
            if row is None:
                try:
                    conn.execute(
                        training_locks.insert().values(
                            task=self.task, holder=self.holder, expires_at=now + self.lease_s
                        )
                    )
                except sa.exc.IntegrityError:
                    return False
                return True
            if row.holder != self.holder and row.expires_at > now:
                return False
            # Take over an expired lease only if nobody else did in between.
            result = conn.execute(
                training_locks.update()
                .where(
                    training_locks.c.task == self.task,
                    training_locks.c.holder == row.holder,
                    training_locks.c.expires_at == row.expires_at,
                )
                .values(holder=self.holder, expires_at=now + self.lease_s)
            )
            return result.rowcount == 1

    def _renew(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                with self.engine.begin() as conn:
                    conn.execute(
                        training_locks.update()
                        .where(
                            training_locks.c.task == self.task,
                            training_locks.c.holder == self.holder,
                        )
                        .values(expires_at=time.time() + self.lease_s)
                    )
            except sa.exc.SQLAlchemyError:
                pass  # retried at the next beat; the lease outlives a short outage

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        if self._connection is not None:
            try:
                self._connection.execute(
                    sa.text("SELECT pg_advisory_unlock(:k)"), {"k": _key(self.task)}
                )
                self._connection.commit()
            finally:
                self._connection.close()
                self._connection = None
            return
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=5)
        with self.engine.begin() as conn:
            conn.execute(
                training_locks.delete().where(
                    training_locks.c.task == self.task, training_locks.c.holder == self.holder
                )
            )

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
