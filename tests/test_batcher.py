"""The batcher's policy: token budget, length-sorted batches, anchor on the oldest, order, cancellation."""

from __future__ import annotations

import asyncio
import random
import threading
import time

import grpc
import numpy as np
import pytest

from service.engine.batcher import Batcher, Job
from service.engine.tokenizer import Tokens
from service.runtimes.base import Runtime


class GatedRuntime(Runtime):
    """A stand-in transformer whose output encodes its input ids, and which can be held at a gate.

    The batcher is the unit under test here: this lets a test queue work while the thread is busy and see
    exactly which inputs each forward pass received.
    """

    name, precision, hidden_size = "gated", "fp32", 2

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.batches: list[tuple[int, int, list[int]]] = []  # (rows, longest, first ids)
        self.entered = threading.Event()

    def forward(self, input_ids, attention_mask, token_type_ids, *, alone=True):
        self.entered.set()
        self.gate.wait(10)
        self.batches.append((input_ids.shape[0], input_ids.shape[1], input_ids[:, 0].tolist()))
        out = np.zeros((*input_ids.shape, 2), dtype=np.float32)
        out[:, :, 0] = input_ids  # token embedding = its id
        out[:, :, 1] = attention_mask.sum(axis=1, keepdims=True)
        return out


def first_token_head(token_embeddings, mask, prompt_lengths):
    return token_embeddings[:, 0, :].copy()


def tokens(first_id: int, length: int) -> Tokens:
    ids = np.full(length, 7, dtype=np.int64)
    ids[0] = first_id
    return Tokens(ids, np.zeros(length, dtype=np.int64))


@pytest.fixture
def runtime():
    return GatedRuntime()


@pytest.fixture
def batcher(runtime):
    b = Batcher("test", runtime, first_token_head, 2, 0, max_batch_tokens=64, max_batch_size=8)
    b.start()
    yield b
    runtime.gate.set()
    b.stop(5)


async def hold_worker(batcher, runtime, loop):
    """Occupies the batcher thread with one input so that the next submissions queue up together."""
    runtime.gate.clear()
    blocker = Job([tokens(999, 1)], False, loop)
    batcher.submit(blocker)
    await loop.run_in_executor(None, runtime.entered.wait, 5)
    return blocker


async def test_a_lone_request_runs_at_once_and_keeps_order(batcher, runtime):
    loop = asyncio.get_running_loop()
    job = Job([tokens(1, 9), tokens(2, 10), tokens(3, 9)], False, loop)  # 28 real tokens of 30: within max_padding
    batcher.submit(job)
    await asyncio.wait_for(job.future, 5)
    assert job.pooled[:, 0].tolist() == [1, 2, 3]  # reassembled in input order
    assert job.pooled[:, 1].tolist() == [9, 10, 9]  # each row saw its own length
    assert len(runtime.batches) == 1


async def test_batches_respect_budget_and_group_similar_lengths(batcher, runtime):
    loop = asyncio.get_running_loop()
    blocker = await hold_worker(batcher, runtime, loop)
    # Two requests, interleaved short and long inputs.
    lengths = [2, 30, 3, 28, 2, 31, 4, 29]
    a = Job([tokens(100 + i, n) for i, n in enumerate(lengths[:4])], False, loop)
    b = Job([tokens(200 + i, n) for i, n in enumerate(lengths[4:])], False, loop)
    batcher.submit(a)
    batcher.submit(b)
    runtime.gate.set()
    await asyncio.wait_for(asyncio.gather(blocker.future, a.future, b.future), 5)
    for rows, longest, _ in runtime.batches[1:]:
        assert rows * longest <= 64  # the token budget counts padding
    # Short inputs travel together, long ones together: no batch mixes a 2-token and a 30-token text.
    for _, longest, firsts in runtime.batches[1:]:
        lens = [dict(zip([100, 101, 102, 103, 200, 201, 202, 203], lengths))[f] for f in firsts]
        assert max(lens) - min(lens) <= 3, runtime.batches
    assert a.pooled[:, 0].tolist() == [100, 101, 102, 103]
    assert b.pooled[:, 0].tolist() == [200, 201, 202, 203]


async def test_a_large_request_spreads_over_batches(batcher, runtime):
    loop = asyncio.get_running_loop()
    job = Job([tokens(i, 10) for i in range(40)], False, loop)
    batcher.submit(job)
    await asyncio.wait_for(job.future, 5)
    assert len(runtime.batches) >= 7  # 64-token budget: at most 6 ten-token inputs per batch
    assert job.pooled[:, 0].tolist() == list(range(40))


async def test_cancelled_requests_are_never_computed(batcher, runtime):
    loop = asyncio.get_running_loop()
    blocker = await hold_worker(batcher, runtime, loop)
    doomed = Job([tokens(500 + i, 4) for i in range(5)], False, loop)
    kept = Job([tokens(600, 4)], False, loop)
    batcher.submit(doomed)
    batcher.submit(kept)
    doomed.cancelled = True
    runtime.gate.set()
    await asyncio.wait_for(asyncio.gather(blocker.future, kept.future), 5)
    computed = [f for _, _, firsts in runtime.batches for f in firsts]
    assert 600 in computed
    assert not any(500 <= f < 505 for f in computed)
    assert batcher.queued_inputs == 0 and batcher.queued_tokens == 0


async def test_expired_requests_fail_with_deadline_exceeded(batcher, runtime):
    loop = asyncio.get_running_loop()
    blocker = await hold_worker(batcher, runtime, loop)
    late = Job([tokens(700, 4)], False, loop, deadline=time.monotonic() - 1)
    batcher.submit(late)
    runtime.gate.set()
    with pytest.raises(Exception) as e:
        await asyncio.wait_for(late.future, 5)
    assert "deadline" in str(e.value)
    await blocker.future
    assert 700 not in [f for _, _, firsts in runtime.batches for f in firsts]


async def test_token_embeddings_are_returned_unpadded(batcher):
    loop = asyncio.get_running_loop()
    job = Job([tokens(1, 3), tokens(2, 6)], True, loop)
    batcher.submit(job)
    await asyncio.wait_for(job.future, 5)
    assert [t.shape for t in job.token_embeddings] == [(3, 2), (6, 2)]


class TwoStreamRuntime(GatedRuntime):
    """Two streams: records which passes ran alone and how many ran at once."""

    streams = 2

    def __init__(self) -> None:
        super().__init__()
        self.alone_flags: list[bool] = []
        self.running = 0
        self.max_running = 0
        self._lock = threading.Lock()

    def forward(self, input_ids, attention_mask, token_type_ids, *, alone=True):
        with self._lock:
            self.running += 1
            self.max_running = max(self.max_running, self.running)
            self.alone_flags.append(alone)
        try:
            time.sleep(0.02)
            return super().forward(input_ids, attention_mask, token_type_ids, alone=alone)
        finally:
            with self._lock:
                self.running -= 1


async def test_streams_run_batches_side_by_side_and_a_lone_batch_alone():
    runtime = TwoStreamRuntime()
    b = Batcher("streams", runtime, first_token_head, 2, 0, max_batch_tokens=64, max_batch_size=8)
    b.start()
    try:
        loop = asyncio.get_running_loop()
        lone = Job([tokens(1, 4)], False, loop)
        b.submit(lone)
        await asyncio.wait_for(lone.future, 5)
        assert runtime.alone_flags == [True]  # nothing queued, nothing beside it: all cores
        busy = Job([tokens(i, 30) for i in range(12)], False, loop)  # 2 per batch: 6 batches
        b.submit(busy)
        await asyncio.wait_for(busy.future, 5)
        assert runtime.max_running == 2  # two streams at once under load
        assert False in runtime.alone_flags[1:]
        assert busy.pooled[:, 0].tolist() == list(range(12))
    finally:
        b.stop(5)


async def test_a_huge_request_does_not_hold_back_a_small_one(batcher, runtime):
    loop = asyncio.get_running_loop()
    blocker = await hold_worker(batcher, runtime, loop)
    huge = Job([tokens(1000 + i, 30) for i in range(40)], False, loop)  # 2 inputs per batch: 20 batches
    small = Job([tokens(5, 30)], False, loop)
    batcher.submit(huge)
    batcher.submit(small)
    runtime.gate.set()
    await asyncio.wait_for(asyncio.gather(blocker.future, huge.future, small.future), 10)
    firsts = [firsts for _, _, firsts in runtime.batches[1:]]
    served_in = next(i for i, f in enumerate(firsts) if 5 in f)
    assert served_in <= 1, firsts  # its turn comes within a batch, not after the huge request's 20


async def test_mostly_padding_batches_are_split_even_within_budget(runtime):
    b = Batcher("pad", runtime, first_token_head, 2, 0, max_batch_tokens=100_000, max_batch_size=64)
    b.start()
    try:
        loop = asyncio.get_running_loop()
        blocker = await hold_worker(b, runtime, loop)
        job = Job([tokens(10, 10), tokens(11, 12), tokens(12, 11), tokens(99, 150)], False, loop)
        b.submit(job)
        runtime.gate.set()
        await asyncio.wait_for(asyncio.gather(blocker.future, job.future), 5)
        assert sorted(sorted(f) for _, _, f in runtime.batches[1:]) == [[10, 11, 12], [99]]
    finally:
        b.stop(5)


class SixteenRuntime(GatedRuntime):
    """Pads batches to a multiple of 16 tokens, as OpenVINO's runtime does."""

    seq_multiple = 16


async def test_padding_is_counted_in_widths_so_inputs_of_one_width_always_join(runtime):
    """A batch runs at its longest input's width rounded up to the runtime's multiple: a 17-token input costs 32 alone,
    so it joins a 32-token one for nothing (47% padding in real tokens, which a cap in tokens refused; none in widths).
    An input 16 wide would add 16 of padding to the 96 of a third row (17%, over the cap of 10%): the 16-wide inputs
    run together at their own width."""
    rt = SixteenRuntime()
    b = Batcher("widths", rt, first_token_head, 2, 0, max_batch_tokens=100_000, max_batch_size=64, max_width=256, max_padding=0.1)
    b.start()
    try:
        loop = asyncio.get_running_loop()
        blocker = await hold_worker(b, rt, loop)
        job = Job([tokens(20, 17), tokens(21, 32), tokens(10, 9), tokens(11, 12), tokens(12, 16)], False, loop)
        b.submit(job)
        rt.gate.set()
        await asyncio.wait_for(asyncio.gather(blocker.future, job.future), 5)
        batches = sorted((sorted(f), width) for _, width, f in rt.batches[1:])
        assert batches == [([10, 11, 12], 16), ([20, 21], 32)]
        assert job.pooled[:, 0].tolist() == [20, 21, 10, 11, 12]
    finally:
        b.stop(5)


async def test_a_runtime_that_pads_to_a_multiple_batches_one_width_at_a_time_by_default():
    """Where the runtime pads to a multiple of 16, inputs of different widths never share a pass (their mixing costs
    CPU outright); where it pads to the longest input, inputs within 10 % join."""
    assert Batcher("w", SixteenRuntime(), first_token_head, 2, 0, 100_000, 64).max_padding == 0.0
    assert Batcher("w", GatedRuntime(), first_token_head, 2, 0, 100_000, 64).max_padding == 0.1
    rt = SixteenRuntime()
    b = Batcher("one-width", rt, first_token_head, 2, 0, max_batch_tokens=100_000, max_batch_size=64, max_width=256)
    b.start()
    try:
        loop = asyncio.get_running_loop()
        blocker = await hold_worker(b, rt, loop)
        # 48-wide, 48-wide, 48-wide and a 32: under a 10 % cap in widths the 32 would join (176 of 192); here it waits
        job = Job([tokens(1, 40), tokens(2, 45), tokens(3, 48), tokens(4, 30)], False, loop)
        b.submit(job)
        rt.gate.set()
        await asyncio.wait_for(asyncio.gather(blocker.future, job.future), 5)
        assert sorted((sorted(f), width) for _, width, f in rt.batches[1:]) == [([1, 2, 3], 48), ([4], 32)]
    finally:
        b.stop(5)


class LoneWidthsRuntime(SixteenRuntime):
    """Pads to 16, with models compiled for a lone input of width 16, 24 or 32, as OpenVINO's runtime has."""

    lone_widths = (16, 24, 32)

    def forward(self, input_ids, attention_mask, token_type_ids, *, alone=True):
        self.alone = alone
        return super().forward(input_ids, attention_mask, token_type_ids, alone=alone)


async def test_a_lone_input_runs_at_the_narrowest_lone_width_that_holds_it_and_a_batch_at_the_multiple():
    """A 20-token query alone is padded to 24 (a model compiled for [1, 24]), not 32; 33 tokens alone has no lone width
    and runs at 48; two inputs together run at the multiple of 16 even when one lone width would hold both."""
    rt = LoneWidthsRuntime()
    b = Batcher("lone", rt, first_token_head, 2, 0, max_batch_tokens=100_000, max_batch_size=64, max_width=256)
    b.start()
    try:
        loop = asyncio.get_running_loop()
        for first, length, width in ((1, 20, 24), (2, 9, 16), (3, 24, 24), (4, 25, 32), (5, 33, 48)):
            job = Job([tokens(first, length)], False, loop)
            b.submit(job)
            await asyncio.wait_for(job.future, 5)
            assert rt.batches[-1] == (1, width, [first]) and rt.alone
            assert job.pooled[0].tolist() == [first, length]  # the padding is masked: the row saw its own length
        blocker = await hold_worker(b, rt, loop)
        job = Job([tokens(6, 20), tokens(7, 22)], False, loop)
        b.submit(job)
        rt.gate.set()
        await asyncio.wait_for(asyncio.gather(blocker.future, job.future), 5)
        assert rt.batches[-1] == (2, 32, [6, 7])
    finally:
        b.stop(5)


class FastTwoStreamRuntime(GatedRuntime):
    """Two streams, no sleep: batches of one request finish on both threads at nearly the same moment."""

    streams = 2

    def forward(self, input_ids, attention_mask, token_type_ids, *, alone=True):
        out = np.zeros((*input_ids.shape, 2), dtype=np.float32)
        out[:, :, 0] = input_ids
        out[:, :, 1] = attention_mask.sum(axis=1, keepdims=True)
        return out


class BarrierRuntime(FastTwoStreamRuntime):
    """Two streams whose forward passes end at the same instant: the two batches of one request complete together."""

    def __init__(self) -> None:
        super().__init__()
        self.barrier = threading.Barrier(2)

    def forward(self, input_ids, attention_mask, token_type_ids, *, alone=True):
        out = super().forward(input_ids, attention_mask, token_type_ids, alone=alone)
        try:
            self.barrier.wait(2)
        except threading.BrokenBarrierError:
            self.barrier.reset()
        return out


def _yield_on_every_line(frame, event, arg):
    """A tracer for the batcher's threads that gives up the GIL between lines of its code at random: forced thread
    switches (CPython alone rarely switches inside a few lines), so an unguarded check-then-act between two threads
    shows up within a few hundred tries."""
    if not frame.f_code.co_filename.endswith("batcher.py"):
        return None

    def local(frame, event, arg):
        if event == "line" and random.random() < 0.5:  # random interleavings, not a strict alternation
            time.sleep(0.0001 * random.random())
        return local

    return local


async def test_two_batches_of_one_request_finishing_together_lose_nothing():
    import sys

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    b = Batcher("race2", BarrierRuntime(), first_token_head, 2, 0, max_batch_tokens=64, max_batch_size=2)
    threading.settrace(_yield_on_every_line)  # the batcher's threads start traced
    try:
        b.start()
    finally:
        threading.settrace(None)
    try:
        loop = asyncio.get_running_loop()
        for r in range(200):
            want = [1 + r * 10 + i for i in range(4)]  # never the same twice: freed memory can't pass for a right answer
            job = Job([tokens(i, 8) for i in want], False, loop)  # two batches, one per stream, side by side
            b.submit(job)
            await asyncio.wait_for(job.future, 10)
            assert job.pooled[:, 0].tolist() == want, (r, job.pooled[:, 0].tolist())
    finally:
        sys.setswitchinterval(old)
        b.stop(5)


async def test_completion_is_thread_safe_under_many_streams_and_batches():
    """Many requests, each spread over many batches run by two threads at once: every row is the request's own,
    none is lost (uninitialised memory) and no request waits for a decrement that was lost."""
    import sys

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # force thread switches inside the completion code
    runtime = FastTwoStreamRuntime()
    b = Batcher("race", runtime, first_token_head, 2, 0, max_batch_tokens=64, max_batch_size=2)
    b.start()
    try:
        loop = asyncio.get_running_loop()
        for _ in range(5):
            jobs = [Job([tokens(1 + r * 1000 + i, 8 + (i % 3)) for i in range(40)], False, loop) for r in range(24)]
            for job in jobs:
                b.submit(job)
            await asyncio.wait_for(asyncio.gather(*(j.future for j in jobs)), 30)
            for r, job in enumerate(jobs):
                assert job.pooled[:, 0].tolist() == [1 + r * 1000 + i for i in range(40)]
    finally:
        sys.setswitchinterval(old)
        b.stop(5)


async def test_a_batcher_thread_that_dies_fails_its_requests_reports_and_restarts(runtime):
    failures, recoveries = [], []
    b = Batcher("dies", runtime, first_token_head, 2, 0, max_batch_tokens=64, max_batch_size=8,
                on_failure=failures.append, on_recovery=lambda: recoveries.append(1), max_restarts=1)
    original = b._take_batch
    boom = {"left": 1}

    def take_batch():
        if boom["left"]:
            boom["left"] -= 1
            raise RuntimeError("bug outside the forward pass")
        return original()

    b._take_batch = take_batch
    b.start()
    try:
        loop = asyncio.get_running_loop()
        doomed = Job([tokens(1, 4)], False, loop)
        b.submit(doomed)
        with pytest.raises(Exception) as e:
            await asyncio.wait_for(doomed.future, 5)  # fails at once, never hangs
        assert e.value.code == grpc.StatusCode.UNAVAILABLE and e.value.retry_elsewhere
        assert failures == [False]  # reported (health NOT_SERVING, for now) before its requests were failed
        after = Job([tokens(2, 4)], False, loop)  # restarted: the next request is served
        b.submit(after)
        await asyncio.wait_for(after.future, 5)
        assert after.pooled[0, 0] == 2 and recoveries == [1]
        boom["left"] = 5  # dies again and again: past max_restarts it stays down, and says so at once
        for _ in range(2):
            job = Job([tokens(3, 4)], False, loop)
            try:
                b.submit(job)
                with pytest.raises(Exception):
                    await asyncio.wait_for(job.future, 5)
            except Exception as refused:
                assert refused.code == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(Exception) as down:
            b.submit(Job([tokens(4, 4)], False, loop))
        assert down.value.code == grpc.StatusCode.UNAVAILABLE
        assert failures == [False, True]  # past max_restarts (1), the death is reported as for good: the replica needs replacing
    finally:
        b.stop(5)


async def test_a_thread_that_dies_mid_batch_fails_that_batch_not_to_be_retried_elsewhere(runtime):
    # The head answers a row too wide once: writing the rows (outside the forward pass's guard) kills the thread
    # with the batch already off the queue. Its requests must fail at once, and not as "retry on another replica"
    # (a request that kills a batcher would go on to kill every replica's).
    failures, calls = [], {"n": 0}

    def head(token_embeddings, mask, prompt_lengths):
        calls["n"] += 1
        pooled = first_token_head(token_embeddings, mask, prompt_lengths)
        return np.concatenate([pooled, pooled], axis=1) if calls["n"] == 1 else pooled

    b = Batcher("mid-batch", runtime, head, 2, 0, max_batch_tokens=64, max_batch_size=8, on_failure=failures.append)
    b.start()
    try:
        loop = asyncio.get_running_loop()
        poison = Job([tokens(1, 4), tokens(2, 4)], False, loop)
        b.submit(poison)
        with pytest.raises(Exception) as e:
            await asyncio.wait_for(poison.future, 5)  # never hangs
        assert e.value.code == grpc.StatusCode.INTERNAL and not e.value.retry_elsewhere
        assert failures == [False]
        after = Job([tokens(3, 4)], False, loop)  # restarted
        b.submit(after)
        await asyncio.wait_for(after.future, 5)
        assert after.pooled[0, 0] == 3
    finally:
        b.stop(5)


def test_a_large_request_in_front_of_a_full_queue_holds_the_event_loop_briefly(runtime):
    """Issue 27.5: the queue was a sorted list: each input's insert moved the queue behind it, on the event loop under
    the batcher's lock, so a 2,048-input request of texts shorter than everything queued, in front of a full queue
    (75k short inputs), held every caller 270 ms; a request gone dead made the next batch rebuild the whole queue
    (27 ms). Now a sorted structure with logarithmic inserts (7 ms here), and only the dead request's own inputs go."""
    rng = random.Random(1)
    b = Batcher("m", runtime, first_token_head, 4, 0, 2048, 256)  # threads not started: the queue only fills

    async def main():
        loop = asyncio.get_running_loop()
        total = 0
        jobs = []
        while total < 262_144:
            items = [tokens(5, rng.randrange(3, 5)) for _ in range(64)]
            total += sum(len(t) for t in items)
            jobs.append(Job(items, False, loop))
            b.submit(jobs[-1])
        started = time.perf_counter()
        b.submit(Job([tokens(5, 2) for _ in range(2048)], False, loop))  # each one shorter than all queued
        held = time.perf_counter() - started
        queued = b.queued_inputs
        jobs[0].cancelled = True  # the next batch's anchor is dead: its inputs leave the queue, nothing else
        with b._cond:
            batch = b._take_batch()
        return held, queued, b.queued_inputs, batch

    held, queued, after, batch = asyncio.run(main())
    print(f"\n2,048 inputs in front of {queued - 2048:,}: the event loop held {held * 1000:.1f} ms")
    assert held < 0.05, held
    assert after == queued - 64 - len(batch) and all(not e.job.cancelled for e in batch)
