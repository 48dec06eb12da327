"""Heavy per-request CPU work in a separate process, so one large request never stalls every other caller.

Parsing an 8 MiB body (a protobuf of a million `google.protobuf.Value`s, then its conversion and validation)
or printing 2048 vectors as JSON takes hundreds of milliseconds of pure CPU that holds Python's GIL; done on
the event loop (or in a thread of this process: the parsers are C calls that never release the GIL) it held a
concurrent one-text request for 1.9 s. Below `INLINE_BYTES` the work is microseconds and runs inline; above
it, it runs here, in a small pool of worker processes started with the server (spawned, not forked: the
parent runs inference threads).

What crosses the process boundary is plain data: raw request bytes in, `EmbedRequest`s (token ids as numpy
arrays, which pickle as a copy of their buffer) or response bytes out. A worker that dies takes only its
own request with it; the pool is rebuilt.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, TypeVar

import grpc

from . import errors

log = logging.getLogger(__name__)
T = TypeVar("T")

# Work on a body up to this size (or a response up to INLINE_FLOATS numbers) stays inline: well under a millisecond.
INLINE_BYTES = 64 * 1024
INLINE_FLOATS = 64 * 1024

_pool: ProcessPoolExecutor | None = None
_workers = 0


def _worker_init() -> None:
    # The parent decides when workers end (it shuts the pool down); a Ctrl-C meant for it must not print tracebacks here.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # Parsing a huge body yields the CPU to everything else: a one-text request must not wait behind it.
    try:
        os.nice(10)
    except OSError:
        pass
    # And a parent that is killed (SIGKILL, OOM) takes its workers with it: Linux signals the orphan at once.
    try:
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() == 1:  # the parent was already gone before prctl took effect
            os._exit(0)
    except (OSError, AttributeError):
        pass


def _noop() -> None:
    return None


def start(workers: int) -> None:
    """Starts the pool (idempotent); its processes spawn in the background, warmed by one no-op each."""
    global _pool, _workers
    if _pool is not None or workers < 1:
        return
    _workers = workers
    _pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init)
    for _ in range(workers):
        _pool.submit(_noop)


def stop() -> None:
    global _pool
    if _pool is not None:
        _pool.shutdown(wait=False, cancel_futures=True)
        _pool = None


def running() -> bool:
    return _pool is not None


async def run(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` in a worker process (module-level `fn`, picklable args); inline when no pool runs.

    A worker that dies (killed, out of memory) breaks the pool for everyone waiting on it: the pool is rebuilt once (the
    first caller to notice does it), and each call that was waiting is tried once more on the new pool; a request that
    kills its worker again fails alone."""
    for attempt in (1, 2):
        pool = _pool
        if pool is None:
            return fn(*args)
        try:
            return await asyncio.wrap_future(pool.submit(fn, *args))
        except BrokenProcessPool:
            _restart(pool)
            if attempt == 2:
                break
    raise errors.ServiceError(
        grpc.StatusCode.UNAVAILABLE, "The server could not process this request; retry it.", reason="WORKER_FAILED",
        retry_after=1.0, retry_elsewhere=True,
    )


def _restart(broken: ProcessPoolExecutor) -> None:
    """Replaces the pool, unless another caller already did (a broken pool is reported to every call it held)."""
    global _pool
    if _pool is not broken:
        return
    log.error("an offload worker died; restarting the pool")
    _pool = None
    broken.shutdown(wait=False, cancel_futures=True)
    start(_workers)
