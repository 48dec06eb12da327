"""One queue per model and the thread that runs its forward passes, in batches cut by a token budget.

Why this shape:
- Padding is paid for: a batch costs `len(batch) * width` tokens (its longest input rounded up to the
  runtime's multiple), so pending inputs are kept sorted by length and a batch takes neighbours of similar
  width, never a 10-token text beside a 150-token one when it can avoid it.
- Latency stays bounded and fair: each batch is built around the oldest pending input of the next request
  in turn (round robin over requests), so a 2048-input request cannot hold back a one-text request by more
  than a batch, a long queue of short texts cannot starve a long one, and a lone request runs at once (no
  timer, no waiting for company).
- A large request is just many inputs in the queue: they spread over several batches, interleave with
  other requests' inputs, and are reassembled in order in the request's `Job`.
- A cancelled or expired request's inputs are dropped before they are computed.
- A runtime with several streams gets one thread per stream: under load that many batches run at once;
  a batch with nothing queued behind it and nothing beside it runs `alone`, on every core.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

import grpc
import numpy as np
from sortedcontainers import SortedKeyList

from .. import errors
from ..runtimes.base import Runtime
from .tokenizer import Tokens

log = logging.getLogger(__name__)

# pooled = head(token_embeddings [B, L, H], attention_mask [B, L], prompt_lengths [B])
Head = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


class Job:
    """One request's inputs for one model: filled in by the batcher thread, awaited on the event loop."""

    __slots__ = (
        "items", "want_tokens", "loop", "future", "pooled", "token_embeddings", "remaining", "cancelled",
        "deadline", "enqueued_at", "started_at", "inference_seconds", "batches", "pending",
    )

    def __init__(self, items: list[Tokens], want_tokens: bool, loop: asyncio.AbstractEventLoop, deadline: float | None = None):
        self.items = items
        self.want_tokens = want_tokens
        self.loop = loop
        self.future: asyncio.Future[None] = loop.create_future()
        self.pooled: np.ndarray | None = None
        self.token_embeddings: list[np.ndarray | None] | None = [None] * len(items) if want_tokens else None
        self.remaining = len(items)
        self.cancelled = False
        self.deadline = deadline  # time.monotonic() after which the caller no longer waits
        self.enqueued_at = 0.0
        self.started_at: float | None = None
        self.inference_seconds = 0.0
        self.batches = 0
        self.pending: collections.deque[_Entry] = collections.deque()  # its queued inputs, in order

    def _resolve(self) -> None:
        if not self.future.done():
            self.future.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


def _resolve_all(jobs: list[Job]) -> None:
    for job in jobs:
        job._resolve()


@dataclass(slots=True)
class _Entry:
    key: tuple[int, int]  # (length, arrival sequence): the sort order of the queue
    job: Job
    index: int  # position of the input in its request
    taken: bool = False


def _entry_key(entry: _Entry) -> tuple[int, int]:
    return entry.key


@dataclass
class BatchStats:
    size: int
    tokens: int  # real tokens
    padded_tokens: int  # size * longest
    seconds: float


class Batcher:
    def __init__(
        self,
        name: str,
        runtime: Runtime,
        head: Head,
        output_dim: int,
        pad_id: int,
        max_batch_tokens: int,
        max_batch_size: int,
        on_batch: Callable[[BatchStats], None] | None = None,
        max_width: int = 512,
        max_padding: float | None = None,
        on_failure: Callable[[bool], None] | None = None,
        on_recovery: Callable[[], None] | None = None,
        max_restarts: int = 3,
        restart_window: float = 60.0,
    ) -> None:
        self.name = name
        self.runtime = runtime
        self.head = head
        self.output_dim = output_dim
        self.pad_id = pad_id
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        self.on_batch = on_batch
        self.max_width = max_width  # the model's max_seq_length: padding to a multiple never goes past it
        # Most of a batch's tokens that may be padding (a 10-token text waits for the next batch rather than join a batch
        # of 150-token ones), counted in widths: padding up to an input's own width is paid when it runs alone too
        # (counted in tokens, 32 × 32 ran at 17% padding and 29.5k tokens/s; in widths 13% and 32.5k, runs interleaved).
        # Tight, because with one text per request the queue holds few texts of mixed lengths, and two streams running
        # tighter batches side by side beat one looser batch. Measured, runs interleaved, 32 clients × 1 text: in
        # process 0.3 21.8k tokens/s, 0.2 23.1-23.5k, 0.1 24.4-25.4k, 0 (one width a batch) 25.3-25.7k; REST through
        # Envoy 0.2 17.5-17.9k, 0.1 18.7-18.9k (128 × 1: 20.7k, 21.0-21.7k); 32 × 32 the same throughout.
        # So 0 (one width a batch) where the runtime pads to a multiple: its widths are few (16 up to 256), so each still
        # gathers inputs, and where the forward pass is bound by arithmetic (fp32 on AVX2) mixing widths costs CPU
        # outright. Server CPU per text (bench/cpu.py, two rounds each): 0.1 → 0 took 32 × 1 from 26.98 to 25.59 ms and
        # 128 × 1 from 28.52 to 23.95 (32 × 32: 22.53 and 22.82), padding 18.9 % → 12.2 %, and in process 32 × 1's
        # p50 392-426 → 371-377 ms. A runtime that pads to the longest input (a multiple of 1) keeps 0.1: there every
        # length is a width of its own.
        self.max_padding = (0.0 if runtime.seq_multiple > 1 else 0.1) if max_padding is None else max_padding
        self._cond = threading.Condition()
        # The queue, sorted by (length, arrival): logarithmic to insert into and to take a run of neighbours from (a
        # list's insert moved the whole queue: a 2,048-input request of short texts in front of a full queue held the
        # lock, and the event loop, 270 ms).
        self._queue: SortedKeyList = SortedKeyList(key=_entry_key)
        self._rotation: collections.deque[Job] = collections.deque()  # requests with queued inputs, in turn
        self._seq = 0
        self._queued_tokens = 0
        # Recent throughput (tokens/s over all streams), for Retry-After estimates.
        self.tokens_per_second = 0.0
        self._stopping = False
        self._busy = 0  # forward passes running
        self._alone = False  # one of them runs alone, on every core: nothing may start beside it
        # A batcher thread that dies outside a forward pass fails what is queued, reports it (the model's health goes
        # NOT_SERVING), and starts over; past `max_restarts` within `restart_window` seconds it stays down, and reports
        # that as permanent (`on_failure(True)`: the replica then needs replacing).
        self.on_failure = on_failure
        self.on_recovery = on_recovery
        self.max_restarts = max_restarts
        self.restart_window = restart_window
        self._deaths: collections.deque[float] = collections.deque()
        self._dying: list[Job] = []  # the jobs of a batch whose thread died holding it, for `_recover`
        self._down: errors.ServiceError | None = None
        self._threads = [
            threading.Thread(target=self._thread_main, name=f"batcher:{name}:{i}", daemon=True) for i in range(max(1, runtime.streams))
        ]

    # -- event-loop side -------------------------------------------------------------------------

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self, timeout: float | None = None) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout)

    @property
    def queued_tokens(self) -> int:
        return self._queued_tokens

    @property
    def queued_inputs(self) -> int:
        return len(self._queue)

    def submit(self, job: Job) -> None:
        job.enqueued_at = time.perf_counter()
        # Allocated here, once, before any batcher thread can write a row of it (threads finishing batches of the
        # same request must never race to allocate it).
        job.pooled = np.empty((len(job.items), self.output_dim), dtype=np.float32)
        with self._cond:
            if self._down is not None:
                raise self._down
            for i, tokens in enumerate(job.items):
                self._seq += 1
                entry = _Entry((len(tokens), self._seq), job, i)
                job.pending.append(entry)
                self._queued_tokens += len(tokens)
            self._queue.update(job.pending)
            self._rotation.append(job)
            self._cond.notify()

    # -- batcher thread ---------------------------------------------------------------------------

    def _thread_main(self) -> None:
        while True:
            try:
                self._run()
                return
            except BaseException:  # noqa: BLE001 - whatever killed the loop, the requests must not hang
                log.exception("batcher thread failed; failing its queued requests", extra={"model": self.name})
                if not self._recover():
                    return

    def _recover(self) -> bool:
        """After a thread died: fail everything queued, report, and say whether to start over."""
        now = time.monotonic()
        failure = errors.ServiceError(
            grpc.StatusCode.UNAVAILABLE, f"The model {self.name} failed while this request waited; retry it.",
            reason="BATCHER_FAILED", retry_after=1.0, retry_elsewhere=True,
        )
        with self._cond:
            self._deaths.append(now)
            while self._deaths and now - self._deaths[0] > self.restart_window:
                self._deaths.popleft()
            give_up = len(self._deaths) > self.max_restarts
            # The batch in hand when the thread died fails as INTERNAL, not to be retried elsewhere: it may hold the
            # request that kills a batcher, and would go on to take every replica down.
            poisoned = {id(j): j for j in self._dying}
            self._dying.clear()
            doomed = {id(e.job): e.job for e in self._queue if id(e.job) not in poisoned}
            doomed.update({id(j): j for j in self._rotation if id(j) not in poisoned})
            for entry in self._queue:
                entry.taken = True
            self._queue.clear()
            self._rotation.clear()
            self._queued_tokens = 0
            self._alone = False
            if give_up:
                self._down = errors.ServiceError(
                    grpc.StatusCode.UNAVAILABLE, f"The model {self.name} is out of service on this replica.",
                    reason="MODEL_FAILED", retry_after=1.0, retry_elsewhere=True,
                )
            self._cond.notify_all()
        if self.on_failure is not None:  # health first (NOT_SERVING), then the callers hear of it
            self.on_failure(give_up)
        internal = errors.internal(f"The model {self.name} failed on this request's batch.")
        for job in poisoned.values():
            job.loop.call_soon_threadsafe(job._fail, internal)
        for job in doomed.values():
            job.loop.call_soon_threadsafe(job._fail, failure)
        if give_up:
            log.error("batcher failed too often; the model stays out of service", extra={"model": self.name, "deaths": len(self._deaths)})
            return False
        if self.on_recovery is not None:
            self.on_recovery()
        return not self._stopping

    def _run(self) -> None:
        while True:
            with self._cond:
                while (not self._queue or self._alone) and not self._stopping:
                    self._cond.wait()
                if self._stopping and not self._queue:
                    return
                batch = self._take_batch()
                if not batch:
                    continue
                alone = self._busy == 0 and not self._queue
                self._busy += 1
                self._alone = alone
                if self._queue:  # work left: wake another stream now, not when this batch is done
                    self._cond.notify()
            try:
                self._execute(batch, alone)
            except BaseException:
                # Died in the middle of this batch, outside the forward pass's own guard: its requests were taken off
                # the queue, so `_recover` would not see them; hand them over, or they wait for ever.
                with self._cond:
                    self._dying.extend(e.job for e in batch)
                raise
            finally:
                with self._cond:
                    self._busy -= 1
                    if alone:
                        self._alone = False
                    self._cond.notify_all()

    def _live(self, entry: _Entry, now: float) -> bool:
        job = entry.job
        if job.cancelled or job.future.done():
            return False
        if job.deadline is not None and now > job.deadline:
            job.loop.call_soon_threadsafe(
                job._fail, errors.ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, "The request's deadline passed while it waited in the queue.", reason="DEADLINE_EXCEEDED")
            )
            job.cancelled = True
            return False
        return True

    def _take_batch(self) -> list[_Entry]:
        """Removes and returns the next batch (called with the lock held)."""
        now = time.monotonic()
        # The anchor: the oldest queued input of the next request in turn that still wants it.
        while self._rotation:
            job = self._rotation[0]
            while job.pending and job.pending[0].taken:
                job.pending.popleft()
            if not job.pending:
                self._rotation.popleft()
                continue
            anchor = job.pending[0]
            if not self._live(anchor, now):
                self._purge_dead(now)
                continue
            self._rotation.rotate(-1)
            break
        else:
            return []
        queue = self._queue
        pos = queue.bisect_key_left(anchor.key)
        lo = hi = pos
        width = self.width
        # In widths, not lengths: a batch runs at its longest input's width, and an input shorter than that width costs
        # what it would alone (its own width) plus the padding up to the batch's. So inputs of one width join each
        # other for nothing, and the padding cap counts only what mixing widths adds.
        longest = own = width(queue[pos].key[0])
        n = 1
        budget, cap, keep = self.max_batch_tokens, self.max_batch_size, 1.0 - self.max_padding
        # Grow the window [lo, hi] over the sorted queue, each step adding the neighbour that adds the least padding,
        # while the batch fits the token budget and stays mostly real tokens (what doesn't fit forms the next batch,
        # which another stream can run beside this one).
        while n < cap:
            left_cost = right_cost = None
            if lo > 0 and (n + 1) * longest <= budget:
                left = width(queue[lo - 1].key[0])
                if own + left >= keep * (n + 1) * longest:
                    left_cost = longest - left
            if hi + 1 < len(queue):
                new_longest = width(queue[hi + 1].key[0])
                if (n + 1) * new_longest <= budget and own + new_longest >= keep * (n + 1) * new_longest:
                    right_cost = (new_longest - longest) * n
            if left_cost is None and right_cost is None:
                break
            if right_cost is None or (left_cost is not None and left_cost <= right_cost):
                lo -= 1
                own += width(queue[lo].key[0])
            else:
                hi += 1
                longest = width(queue[hi].key[0])
                own += longest
            n += 1
        window = queue[lo : hi + 1]
        del queue[lo : hi + 1]
        batch = []
        for e in window:
            e.taken = True
            self._queued_tokens -= e.key[0]
            if e is anchor or self._live(e, now):
                batch.append(e)
        return batch

    def width(self, length: int) -> int:
        """The width a batch whose longest input has `length` tokens runs at: padded up to the runtime's multiple
        (what it computes in anyway: measured flat within each 16-token step), never past the model's limit."""
        multiple = self.runtime.seq_multiple
        if multiple <= 1:
            return length
        return min(-(-length // multiple) * multiple, max(length, self.max_width))

    def _purge_dead(self, now: float) -> None:
        """Drops every input of cancelled or expired requests from the queue: each such request's own inputs, found
        through the requests in turn, not a rebuild of the whole queue (27 ms for a full one, under the lock)."""
        for job in list(self._rotation):
            left = [e for e in job.pending if not e.taken]
            if left and not self._live(left[0], now):
                for e in left:
                    self._queue.discard(e)
                    e.taken = True
                    self._queued_tokens -= e.key[0]

    def _execute(self, batch: list[_Entry], alone: bool = True) -> None:
        started = time.perf_counter()
        n = len(batch)
        longest = max(e.key[0] for e in batch)
        width = self.width(longest)
        if alone and n == 1:  # a lone input runs on the runtime's model for the narrowest lone width that holds it
            width = next((w for w in self.runtime.lone_widths if longest <= w <= width), width)
        ids = np.full((n, width), self.pad_id, dtype=np.int64)
        mask = np.zeros((n, width), dtype=np.int64)
        types = np.zeros((n, width), dtype=np.int64)
        prompt_lengths = np.zeros(n, dtype=np.int64)
        for r, e in enumerate(batch):
            tokens = e.job.items[e.index]
            k = len(tokens)
            ids[r, :k] = tokens.ids
            mask[r, :k] = 1
            types[r, :k] = tokens.type_ids
            prompt_lengths[r] = tokens.prompt_length
            if e.job.started_at is None:
                e.job.started_at = started
        try:
            token_embeddings = self.runtime.forward(ids, mask, types, alone=alone)
            pooled = self.head(token_embeddings, mask, prompt_lengths)
        except Exception as exc:  # a failed batch fails its requests, never the thread
            log.exception("forward pass failed", extra={"model": self.name, "batch_size": n, "longest": longest})
            failure = errors.internal(f"The model failed on this batch: {type(exc).__name__}")
            for job in {id(e.job): e.job for e in batch}.values():
                job.loop.call_soon_threadsafe(job._fail, failure)
            return
        elapsed = time.perf_counter() - started
        # Rows first (each input has its own row, written by exactly one thread) ...
        for r, e in enumerate(batch):
            e.job.pooled[e.index] = pooled[r]
            if e.job.token_embeddings is not None:
                e.job.token_embeddings[e.index] = token_embeddings[r, : e.key[0]].copy()
        # ... then the counts, under the lock: two threads finishing batches of one request must not lose a decrement.
        finished = []
        with self._cond:
            seen: set[int] = set()
            for e in batch:
                job = e.job
                if id(job) not in seen:
                    seen.add(id(job))
                    job.inference_seconds += elapsed
                    job.batches += 1
                job.remaining -= 1
                if job.remaining == 0:
                    finished.append(job)
        # One wake-up per event loop for all the requests this batch finished, not one each: a cross-thread call writes
        # to the loop's wake-up socket and the loop reads it back, a syscall pair per call.
        by_loop: dict[asyncio.AbstractEventLoop, list[Job]] = {}
        for job in finished:
            by_loop.setdefault(job.loop, []).append(job)
        for loop, jobs in by_loop.items():
            loop.call_soon_threadsafe(_resolve_all, jobs)
        rate = int(mask.sum()) / elapsed * max(1, self.runtime.streams) if elapsed > 0 else 0.0
        self.tokens_per_second = rate if not self.tokens_per_second else 0.8 * self.tokens_per_second + 0.2 * rate
        if self.on_batch is not None:
            self.on_batch(BatchStats(n, int(mask.sum()), n * width, elapsed))
