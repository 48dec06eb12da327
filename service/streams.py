"""Bidirectional streams (today TEI's gRPC `EmbedStream` and its kin): one response per request, in request order,
many requests worked on at once, and bounded in every way a caller could use to hold the server:

- work: at most WINDOW groups of up to GROUP requests in flight per stream (TEI's GRPC_MAX_PARALLEL_STREAM_REQUESTS
  is 1024), and a caller that reads slowly stops the stream reading, so gRPC's flow control pushes back on it;
- memory: the bytes a stream holds (requests read and not yet answered, answers not yet sent) are bounded per stream
  (`limits.max_stream_bytes`) and over every stream of the server (`limits.max_streams_bytes`); past either bound
  the stream stops reading, it never buffers more (two streams of 1,200 never-read 200,000-character requests grew
  the server by 400 MiB before);
- time: a stream that sends nothing while nothing of its is in flight, or that reads none of its answers, for
  `limits.stream_idle_seconds` is ended (idle streams counted toward the server's calls for everyone);
- numbers: at most `limits.max_streams` streams at once, `limits.max_streams_per_credential` of them per credential.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator, TypeVar

import grpc
from google.protobuf.message import DecodeError

from . import errors
from .config import LimitsConfig

T = TypeVar("T")

# A stream keeps up to WINDOW groups of up to GROUP requests in flight: ~1000 inputs before the batcher at once, as
# TEI's GRPC_MAX_PARALLEL_STREAM_REQUESTS (1024) does, and never more, whatever the client sends.
GROUP = 128
WINDOW = 8
# A stream waits (as TEI's do) rather than fail when the server is at its limits; it polls this often.
OVERLOAD_POLL = 0.05

_END = object()
# What a group's work returns: its responses in order, and the failure that ends the stream after them (or None).
Group = tuple[list[Any], "errors.ServiceError | None"]


class ByteBudget:
    """Bytes that may be held at once. `acquire` waits (first come, first served) until they are free; one holder
    never asks for more than the whole budget (a larger request is counted as the whole budget)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.held = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future]] = collections.deque()

    async def acquire(self, n: int) -> int:
        n = min(n, self.total)
        if not self._waiters and self.held + n <= self.total:
            self.held += n
            return n
        woken = asyncio.get_running_loop().create_future()
        waiter = (n, woken)
        self._waiters.append(waiter)
        try:
            await woken
        except asyncio.CancelledError:
            if woken.done() and not woken.cancelled():  # granted as it was cancelled: give it back
                self.release(n)
            else:
                with contextlib.suppress(ValueError):  # `_wake` may have dropped it already
                    self._waiters.remove(waiter)
                self._wake()
            raise
        return n

    def force(self, n: int) -> int:
        """Counts `n` bytes that already exist (answers made), over the bound if need be: readers then wait."""
        self.held += n
        return n

    def release(self, n: int) -> None:
        self.held -= n
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.held + self._waiters[0][0] <= self.total:
            n, woken = self._waiters.popleft()
            if not woken.done():
                self.held += n
                woken.set_result(None)


class Streams:
    """The server's streams: the byte budget they share and how many each credential holds."""

    def __init__(self, limits: LimitsConfig) -> None:
        self.limits = limits
        self.budget = ByteBudget(limits.max_streams_bytes)
        self.open = 0
        self.by_credential: collections.Counter[str] = collections.Counter()

    @contextlib.contextmanager
    def opened(self, credential: str) -> Iterator[None]:
        """A stream's place, refused (RESOURCE_EXHAUSTED) past `max_streams` or `max_streams_per_credential`."""
        if self.open >= self.limits.max_streams:
            raise errors.ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"The server holds {self.limits.max_streams} streams; retry shortly.",
                                      reason="TOO_MANY_STREAMS", retry_after=1.0)
        if self.by_credential[credential] >= self.limits.max_streams_per_credential:
            raise errors.ServiceError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"This credential holds {self.limits.max_streams_per_credential} streams, as many as one may; end one first.",
                reason="TOO_MANY_STREAMS", retry_after=1.0,
            )
        self.open += 1
        self.by_credential[credential] += 1
        try:
            yield
        finally:
            self.open -= 1
            self.by_credential[credential] -= 1
            if not self.by_credential[credential]:
                del self.by_credential[credential]


_streams: Streams | None = None


def configure(limits: LimitsConfig) -> None:
    """At the server's start: the limits every stream follows (the server's config)."""
    global _streams
    _streams = Streams(limits)


def server_streams() -> Streams:
    global _streams
    if _streams is None:
        _streams = Streams(LimitsConfig())
    return _streams


def idle_error(seconds: float, what: str) -> errors.ServiceError:
    return errors.ServiceError(
        grpc.StatusCode.DEADLINE_EXCEEDED,
        f"The stream {what} for {seconds:g} s; it is closed (limits.stream_idle_seconds).",
        reason="STREAM_IDLE",
    )


def _size(message: Any) -> int:
    return len(message) if isinstance(message, bytes) else message.ByteSize()


async def in_order(requests: AsyncIterator[Any], run: Callable[[list[Any]], Awaitable[Group]], group_size: int = GROUP,
                   streams: Streams | None = None, size: Callable[[Any], int] = _size) -> AsyncIterator[Any]:
    """One response per request, in request order, with up to WINDOW groups of requests worked on at once.

    A reader task takes requests off the stream into a small inbox, once their bytes fit in the stream's budget and
    the server's; a dispatcher starts a group's work (as many requests as are waiting, up to `group_size`) whenever
    fewer than WINDOW groups are unanswered; this generator yields each group's responses in turn, then frees the
    group's bytes. Everything is bounded: when the caller reads slowly the window stays full, the dispatcher stops
    taking requests, the inbox and the budgets fill and the reader stops reading, so gRPC's flow control pushes back
    on the caller. The first failure ends the stream (with the responses before it sent), as in TEI. `size` is what a
    message or an answer weighs (its serialized size).
    """
    streams = streams or server_streams()
    limits = streams.limits
    mine = ByteBudget(limits.max_stream_bytes)
    idle = limits.stream_idle_seconds
    inbox: asyncio.Queue = asyncio.Queue(maxsize=group_size)
    started: asyncio.Queue = asyncio.Queue()  # (group's task, its requests, its Held), in order (at most WINDOW: the semaphore)
    window = asyncio.Semaphore(WINDOW)
    unanswered = [0]  # requests read and not yet answered (the reader's idle clock runs only at 0)

    async def take(n: int) -> int:
        n = min(n, mine.total, streams.budget.total)  # one message counts as at most the smaller budget
        await mine.acquire(n)
        try:
            await streams.budget.acquire(n)
        except BaseException:
            mine.release(n)
            raise
        return n

    def give(n: int) -> None:
        mine.release(n)
        streams.budget.release(n)

    def retrieve(fut: asyncio.Future) -> None:  # a read left pending when the stream ended: its error is nobody's
        if not fut.cancelled():
            fut.exception()

    async def read() -> None:
        iterator = requests.__aiter__()
        nxt: asyncio.Future | None = None
        try:
            while True:
                nxt = asyncio.ensure_future(iterator.__anext__())
                nxt.add_done_callback(retrieve)
                while True:
                    done, _ = await asyncio.wait({nxt}, timeout=idle)
                    if done:
                        break
                    if unanswered[0] == 0:  # nothing in flight: the caller is not waiting for us
                        nxt.cancel()
                        await inbox.put(idle_error(idle, "sent no request while nothing of its was in flight"))
                        return
                try:
                    message = nxt.result()
                except StopAsyncIteration:
                    break
                n = await take(size(message))
                try:
                    await inbox.put((message, n))
                except BaseException:  # the stream ended while this one waited for room: its bytes go back
                    give(n)
                    raise
                unanswered[0] += 1
        except DecodeError:  # a message that is not the method's request: the caller's fault, not the backend's
            await inbox.put(errors.invalid_argument("A message of the stream could not be parsed.", None, "MALFORMED_REQUEST"))
            return
        except asyncio.CancelledError:
            if nxt is not None and not nxt.done():
                nxt.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - a broken request stream ends the responses with its error
            await inbox.put(exc)
            return
        await inbox.put(_END)

    async def dispatch() -> None:
        while True:
            await window.acquire()
            first = await inbox.get()
            if first is _END or isinstance(first, BaseException):
                await started.put(first)
                return
            group, n, end = [first[0]], first[1], None
            while len(group) < group_size and not inbox.empty():
                m = inbox.get_nowait()
                if m is _END or isinstance(m, BaseException):
                    end = m
                    break
                group.append(m[0])
                n += m[1]
            held = Held(n)
            await started.put((asyncio.ensure_future(work(group, held)), len(group), held))
            if end is not None:
                await started.put(end)
                return

    class Held:
        """The bytes a group holds: its requests' until its work is done, then its answers' until they are sent."""

        def __init__(self, n: int) -> None:
            self.n = n

        def swap(self, n: int) -> None:
            give(self.n)
            self.n = mine.force(n)
            streams.budget.force(n)

        def free(self) -> None:
            give(self.n)
            self.n = 0

    async def work(group: list[Any], held: Held) -> tuple[list[Any], Any]:
        responses, failure = await run(group)
        held.swap(sum(size(r) for r in responses))
        return responses, failure

    tasks = [asyncio.ensure_future(read()), asyncio.ensure_future(dispatch())]
    current: Held | None = None
    try:
        while True:
            item = await started.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            task, count, current = item
            try:
                responses, failure = await task
            finally:
                window.release()
            for response in responses:
                yield response
            unanswered[0] -= count
            current.free()
            current = None
            if failure is not None:
                raise failure
    finally:
        if current is not None:
            current.free()
        for t in tasks:
            t.cancel()
        while not started.empty():
            item = started.get_nowait()
            if isinstance(item, tuple):
                item[0].cancel()
                item[2].free()
        while not inbox.empty():
            item = inbox.get_nowait()
            if isinstance(item, tuple):
                give(item[1])


async def waiting(call: Callable[[], Awaitable[T]], deadline: float | None) -> T:
    """`call()`, again every OVERLOAD_POLL seconds while the server is at its limits: a stream's requests wait, as in
    TEI, rather than end the stream (its groups run several at once, each holding a place, so a fast stream would
    otherwise refuse itself). Until the deadline, which ends the wait with the overload error."""
    while True:
        try:
            return await call()
        except errors.ServiceError as err:
            if err.code != grpc.StatusCode.RESOURCE_EXHAUSTED or (deadline is not None and time.monotonic() + OVERLOAD_POLL > deadline):
                raise
        await asyncio.sleep(OVERLOAD_POLL)


def runs(group: list[Any], key: Callable[[Any], Any]) -> list[list[Any]]:
    """Consecutive requests with the same options, which one core request can serve together."""
    out: list[list[Any]] = []
    last = object()
    for m in group:
        k = key(m)
        if not out or k != last:
            out.append([])
            last = k
        out[-1].append(m)
    return out
