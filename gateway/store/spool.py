"""An append-only spool of records waiting for the database.

Each process appends to a file of its own and holds an exclusive ``flock`` on it, so a
replica replays only files nobody is writing: its own after rotating, or those left by a
process that died. Records carry their id, so a replay interrupted half-way and run
again inserts nothing twice.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import orjson

from gateway.store.records import ExchangeRecord

log = logging.getLogger("distill_gateway.store")


class Spool:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._lock = threading.Lock()
        self._file: IO[bytes] | None = None
        self._path: Path | None = None
        self._pending = 0  # records in this process's current file
        # Files from other (dead) processes may exist until the first full replay.
        self._scan_needed = True

    def _open(self) -> IO[bytes]:
        if self._file is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            name = f"spool-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
            self._path = self.directory / name
            self._file = open(self._path, "ab")  # noqa: SIM115 - held open while spooling
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return self._file

    def append(self, records: list[ExchangeRecord], *, sync: bool = True) -> None:
        """Append records durably (one write, then fsync unless ``sync`` is False)."""
        if not records:
            return
        data = b"".join(orjson.dumps(r.to_json_dict()) + b"\n" for r in records)
        with self._lock:
            file = self._open()
            file.write(data)
            file.flush()
            if sync:
                os.fsync(file.fileno())
            self._pending += len(records)

    def sync(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.flush()
                os.fsync(self._file.fileno())

    def rotate(self) -> None:
        """Close this process's current file so that it can be replayed."""
        with self._lock:
            if self._file is not None:
                self._file.flush()
                os.fsync(self._file.fileno())
                self._file.close()  # closing releases the flock
                self._file = None
                self._pending = 0

    def has_backlog(self) -> bool:
        """Whether anything may wait for replay (cheap: no directory scan per call)."""
        return self._pending > 0 or self._scan_needed

    @contextmanager
    def _claim(self, path: Path) -> Iterator[IO[bytes] | None]:
        try:
            file = open(path, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            yield None
            return
        try:
            try:
                fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield None  # another live process is writing or replaying it
                return
            yield file
        finally:
            file.close()

    def replay(self, insert: Callable[[list[ExchangeRecord]], None], batch_size: int) -> int:
        """Insert every record of every claimable spool file, deleting each file once it
        is fully stored. Raises what ``insert`` raises; the file then stays for next time."""
        self.rotate()
        replayed = 0
        skipped = False
        for path in sorted(self.directory.glob("spool-*.jsonl")):
            with self._claim(path) as file:
                if file is None:
                    skipped = True  # a live process owns it; look again later
                    continue
                records = list(_read_records(file.read(), path))
                for start in range(0, len(records), batch_size):
                    insert(records[start : start + batch_size])
                path.unlink()
                replayed += len(records)
        self._scan_needed = skipped
        if replayed:
            log.info("replayed %d spooled records into the database", replayed)
        return replayed


def _read_records(data: bytes, path: Path) -> Iterator[ExchangeRecord]:
    lines = data.split(b"\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield ExchangeRecord.from_json_dict(orjson.loads(line))
        except (orjson.JSONDecodeError, TypeError, KeyError, ValueError):
            # Only a crash in the middle of a write leaves a torn last line.
            log.error("spool %s line %d is unreadable; skipped", path.name, number)
