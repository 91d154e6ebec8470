"""A closed-loop HTTP/1.1 load generator for the benchmarks, for machines without wrk.

Each connection sends the next prebuilt request as soon as the previous answer is
complete. Requests are bytes built once and answers are only framed (Content-Length), so
the client costs a few microseconds of CPU per request, as wrk does, and leaves the cores
to the server it measures — an httpx or aiohttp client on the same 2 cores costs more
than the gateway's own overhead.
"""

from __future__ import annotations

import asyncio
import functools
import time
from typing import NamedTuple, cast


class Load(NamedTuple):
    ok: int  # answers with status 200
    other: int  # answers with any other status
    seconds: float  # from the first connection to the last answer


def raw_load(port: int, bodies: list[bytes], duration: float, connections: int,
             path: str = "/v1/chat/completions", host: str = "127.0.0.1",
             headers: dict[str, str] | None = None) -> Load:
    """``connections`` keep-alive connections cycling through ``bodies`` for ``duration``."""
    import uvloop

    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    requests = [(f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                 f"Content-Type: application/json\r\n{extra}Content-Length: {len(body)}"
                 "\r\n\r\n").encode() + body for body in bodies]
    ok = other = 0

    class Connection(asyncio.Protocol):
        def __init__(self, first: int, deadline: float, closed: asyncio.Future[None]) -> None:
            self.next, self.deadline, self.closed = first, deadline, closed
            self.buffer = b""
            self.transport: asyncio.Transport | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            # uvloop's transports do not subclass asyncio.Transport; they implement it.
            self.transport = cast(asyncio.Transport, transport)
            self.send()

        def send(self) -> None:
            assert self.transport is not None
            self.transport.write(requests[self.next % len(requests)])
            self.next += 1

        def data_received(self, data: bytes) -> None:
            nonlocal ok, other
            self.buffer += data
            while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
                head = self.buffer[:end].lower()
                at = head.find(b"content-length:")
                length = int(head[at + 15:].split(b"\r\n", 1)[0]) if at >= 0 else 0
                if len(self.buffer) < end + 4 + length:
                    return
                if head.startswith(b"http/1.1 200"):
                    ok += 1
                else:
                    other += 1
                self.buffer = self.buffer[end + 4 + length:]
                if time.perf_counter() < self.deadline:
                    self.send()
                elif self.transport is not None:
                    self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            if not self.closed.done():
                self.closed.set_result(None)

    async def run() -> float:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        closed: list[asyncio.Future[None]] = []
        for c in range(connections):
            future: asyncio.Future[None] = loop.create_future()
            await loop.create_connection(
                functools.partial(Connection, c * 7, started + duration, future), host, port)
            closed.append(future)
        await asyncio.gather(*closed)
        return time.perf_counter() - started

    elapsed = uvloop.run(run())
    return Load(ok, other, elapsed)
