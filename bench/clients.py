"""Load generators for the benchmark: in-process engine, native gRPC, REST through Envoy.

Each runs the same workload: the corpus cut into requests of N texts, sent by C concurrent workers,
timing every request. The clients are kept cheap (grpc.aio's C core, a bare keep-alive HTTP/1.1 client)
because on a 2-core machine the load generator competes with the server for the same cores.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import orjson


@dataclass
class Run:
    """The outcome of one workload."""

    seconds: float
    latencies: list[float] = field(default_factory=list)
    errors: int = 0


async def drive(requests: list[list[str]], concurrency: int, send: Callable[[list[str]], Awaitable[None]], progress=None) -> Run:
    queue: asyncio.Queue[list[str]] = asyncio.Queue()
    for r in requests:
        queue.put_nowait(r)
    run = Run(0.0)

    async def worker() -> None:
        while True:
            try:
                texts = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            t0 = time.perf_counter()
            try:
                await send(texts)
            except Exception:
                run.errors += 1
            run.latencies.append(time.perf_counter() - t0)
            if progress is not None:
                progress.update(len(texts))

    started = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(concurrency)])
    run.seconds = time.perf_counter() - started
    return run


class HttpClient:
    """A minimal keep-alive HTTP/1.1 client (a pool of connections) for POSTing JSON to Envoy."""

    def __init__(self, host: str, port: int, path: str = "/") -> None:
        self.host, self.port, self.path = host, port, path
        self._pool: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def post(self, body: dict) -> bytes:
        """POSTs to the client's path; anything but a 200 raises."""
        status, payload = await self.request(self.path, body)
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {payload[:200]!r}")
        return payload

    async def request(self, path: str, body: dict | bytes, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        """POSTs `body` (a dict as JSON, or bytes as they are); returns the status and the body."""
        status, payload, _ = await self.request_with_headers(path, body, headers)
        return status, payload

    async def request_with_headers(self, path: str, body: dict | bytes, headers: dict[str, str] | None = None) -> tuple[int, bytes, dict[str, str]]:
        """`request`, with the response's headers (lowercased names)."""
        data = body if isinstance(body, bytes) else orjson.dumps(body)
        got: dict[str, str] = {}
        conn = self._pool.pop() if self._pool else await asyncio.open_connection(self.host, self.port)
        reader, writer = conn
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n{extra}"
            f"Content-Length: {len(data)}\r\n\r\n"
        ).encode()
        try:
            writer.write(head + data)
            status_line = await reader.readline()
            length, close = 0, False
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b""):
                    break
                name, _, value = line.partition(b":")
                got[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
                if name.lower() == b"content-length":
                    length = int(value)
                elif name.lower() == b"connection" and b"close" in value.lower():
                    close = True
            payload = await reader.readexactly(length)
        except (OSError, asyncio.IncompleteReadError):
            writer.close()
            raise
        if close:
            writer.close()
        else:
            self._pool.append(conn)
        return int(status_line.split()[1]), payload, got

    async def close(self) -> None:
        for _, writer in self._pool:
            writer.close()
        self._pool.clear()
