"""What a request costs the server's CPU, by request shape: is a lone text little more than its share of a batch?

Through Envoy REST (OpenAI route, base64, as the SDKs ask), the same corpus sent as C clients × N texts a request, in
rounds that alternate the shapes (this shared host drifts between runs minutes apart; the median of the rounds is
reported). Accounted from /proc, never from wall time: the server's process tree (user + system, its offload workers
included) per text, split by thread — the event loop (gRPC aio, interceptors, parsing, the fast-path tokenizer,
futures, serialization), the tokenizer pool, the batcher threads (batching, pooling), the runtime's own worker threads
(the forward pass), gRPC's poller — and Envoy's and the client's own beside it. The server's metrics say how many
forward passes ran and how much of their tokens were padding.

Then one pass per shape under py-spy (not counted in the rounds: sampling costs CPU too) splits the event loop's CPU by
what its Python code was doing, so a lone request's extra cost has names.

Run by `make bench` (its "Per server CPU" section), or with the other two per-CPU targets beside it (a short text against
plain encode, a 100,000-text stream against the engine in process) by `make bench-cpu` / `python -m bench.cpu`, which
writes bench/CPU.md.
"""

from __future__ import annotations

import asyncio
import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

SHAPES = ((32, 32), (32, 1), (128, 1))  # (concurrent clients, texts per request); the first is the reference
ROUNDS = 3
TICK = os.sysconf("SC_CLK_TCK")

# The server's threads, by what runs on them (Python names from py-spy; native threads by their kernel name).
GROUPS = ("event loop", "tokenizer pool", "batcher threads", "forward pass (runtime threads)", "gRPC poller and core", "offload workers", "other")

# The event loop's Python code by what it does: the deepest frame that matches names the sample (first rule wins at
# that depth). A sample with no frame of ours below the loop is gRPC aio's own (Cython coroutines, sends, polling).
CATEGORIES = (
    ("interceptors", ("service/interceptors.py",)),
    ("metrics and logs", ("service/metrics.py", "prometheus_client/", "logging/")),
    ("tokenizing (fast path)", ("service/engine/wordpiece.py", "service/engine/tokenizer.py", "service/engine/tokenization.py",
                                "service/engine/long_inputs.py")),
    ("parsing the request", ("service/rpc.py:_parse", "_parse (service/rpc.py", "parse (service/rpc.py", "to_core (", "parse_input (",
                             "json_object (", "json_body (", "FromString")),
    ("serializing the answer", ("service/engine/encoding.py", "respond (service/rpc.py", "result_headers (", "to_body", "_writer.",
                                "SerializeToString", "send_initial_metadata")),
    ("queueing and futures", ("service/engine/batcher.py", "service/engine/pipeline.py", "service/engine/cache.py",
                              "service/engine/pooling.py")),
    ("the dialect and handle()", ("service/dialects/", "service/rpc.py", "service/streams.py")),
)


def thread_seconds(pid: int) -> dict[int, tuple[str, float]]:
    """{tid: (kernel name, CPU seconds so far)} for every thread of `pid`."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat.rsplit(")", 1)[1].split()
        out[int(task.name)] = (name, (int(fields[11]) + int(fields[12])) / TICK)
    return out


def process_seconds(pid: int | str) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def py_spy() -> str | None:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    return found if Path(found).exists() else None


def python_threads(pid: int) -> dict[int, str]:
    """{tid: Python thread name} from `py-spy dump` (empty without py-spy: every thread is then grouped by its kernel name)."""
    spy = py_spy()
    if spy is None:
        return {}
    try:
        out = subprocess.run([spy, "dump", "--nonblocking", "-p", str(pid)], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return {int(m.group(1)): m.group(2) for m in re.finditer(r'^Thread (\d+) \([^)]*\): "([^"]*)"', out, re.M)}


def group_of(tid: int, pid: int, kernel: str, python: dict[int, str]) -> str:
    name = python.get(tid)
    if tid == pid or name == "MainThread":
        return "event loop"
    if name is not None:
        if name.startswith("tokenize"):
            return "tokenizer pool"
        if name.startswith("batcher:"):
            return "batcher threads"
        if "_poll_wrapper" in name:
            return "gRPC poller and core"
        return "other"
    if kernel.startswith(("grpc", "event_engine", "default-executo", "resolver", "timer")):
        return "gRPC poller and core"
    if python:
        # Not a Python thread, not one of gRPC's: the runtime's (OpenVINO's TBB workers, onnxruntime's, torch's).
        return "forward pass (runtime threads)"
    return "other"


def scrape(url: str | None) -> dict[str, float]:
    """The server's counters that tell how its batches ran (sums over every model)."""
    wanted = {"embedding_batch_size_count": "batches", "embedding_batch_size_sum": "inputs", "embedding_batch_tokens_sum": "padded_tokens"}
    out = dict.fromkeys(wanted.values(), 0.0)
    if url is None:
        return out
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in wanted:
            out[wanted[name]] += float(line.rsplit(" ", 1)[1])
        elif name == "embedding_tokens_total":
            out["tokens"] = out.get("tokens", 0.0) + float(line.rsplit(" ", 1)[1])
    return out


class Accounting:
    """CPU seconds of every party from one moment to another: the server by thread group, its workers, Envoy, the client."""

    def __init__(self, server_pid: int, worker_pids: list[int], envoy_pid: int) -> None:
        self.pid, self.workers, self.envoy = server_pid, worker_pids, envoy_pid
        self.python = python_threads(server_pid)

    def snapshot(self) -> dict[str, float]:
        out: dict[str, float] = collections.defaultdict(float)
        for tid, (kernel, secs) in thread_seconds(self.pid).items():
            out[group_of(tid, self.pid, kernel, self.python)] += secs
        for pid in self.workers:
            try:
                out["offload workers"] += process_seconds(pid)
            except OSError:
                pass
        out["Envoy"] = process_seconds(self.envoy)
        out["client (the bench)"] = process_seconds("self")
        return out

    @staticmethod
    def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        return {k: after.get(k, 0.0) - before.get(k, 0.0) for k in set(before) | set(after)}


def categorize(raw: str, thread: str = "MainThread") -> collections.Counter:
    """Samples of `thread` in py-spy's raw output, by CATEGORIES (the rest: gRPC aio and the event loop itself)."""
    counts: collections.Counter = collections.Counter()
    for line in raw.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        frames = stack.split(";")
        if thread not in frames[0]:
            continue
        label = "gRPC aio and the event loop"
        for frame in reversed(frames[1:]):
            hit = next((name for name, marks in CATEGORIES if any(m in frame for m in marks)), None)
            if hit:
                label = hit
                break
        counts[label] += int(n)
    return counts


async def _send_all(client, model: str, corpus: list[str], c: int, n: int):
    from .clients import drive

    async def send(texts):
        await client.post({"input": texts, "model": model, "encoding_format": "base64"})

    return await drive([corpus[i : i + n] for i in range(0, len(corpus), n)], c, send)


async def measure(stack, corpus: list[str], model: str, shapes=SHAPES, rounds: int = ROUNDS, profile: bool = True, say=print) -> dict:
    """The shapes, alternated over `rounds`, through Envoy REST: per text, each party's CPU (ms) and the batches run."""
    from .clients import HttpClient
    from .load import server_pids

    pids = server_pids(stack)
    accounting = Accounting(pids[0], pids[1:], stack.envoy.pid)
    metrics = (stack.server_metrics_urls or [None])[0]
    client = HttpClient("127.0.0.1", stack.config.envoy.listen_port, "/v1/embeddings")
    runs: dict[tuple[int, int], list[dict]] = {s: [] for s in shapes}
    try:
        for c, n in shapes:  # warm-up: every shape's code paths and batch widths once
            await _send_all(client, model, corpus[:256], c, n)
        for r in range(rounds):
            for c, n in shapes:
                await asyncio.sleep(1.0)  # the previous run's stragglers settle
                m0, a0 = scrape(metrics), accounting.snapshot()
                run = await _send_all(client, model, corpus, c, n)
                a1, m1 = accounting.snapshot(), scrape(metrics)
                cpu = {k: v / len(corpus) * 1e3 for k, v in Accounting.delta(a0, a1).items()}
                batches = {k: m1.get(k, 0.0) - m0.get(k, 0.0) for k in m1}
                server = sum(v for k, v in cpu.items() if k not in ("Envoy", "client (the bench)"))
                runs[(c, n)].append({"cpu": cpu, "server": server, "batches": batches, "seconds": run.seconds, "errors": run.errors})
                say(f"   round {r + 1}/{rounds}, {c} × {n}: server {server:.2f} ms CPU/text, Envoy {cpu.get('Envoy', 0):.2f}, "
                    f"{batches['batches']:.0f} forward passes, {run.seconds:.1f} s, errors {run.errors}")
        lone = shapes[1] if len(shapes) > 1 else shapes[0]
        rate = float(np.median([len(corpus) / r["seconds"] for r in runs[lone]]))  # calls per second (one text each)
        floor = await floors(rate) if lone[1] == 1 else {}
        for name, f in floor.items():
            say(f"   a bare grpc.aio server {name}: {f['ms_per_call']:.2f} ms CPU a call at {f['calls_per_s']:,.0f} calls/s")
        profiles = {}
        spy = py_spy()
        if profile and spy:
            for c, n in shapes:
                await asyncio.sleep(1.0)
                with tempfile.NamedTemporaryFile("r", suffix=".txt") as out:
                    proc = subprocess.Popen([spy, "record", "-p", str(pids[0]), "-r", "250", "--nonblocking", "--threads", "--format", "raw",
                                             "-o", out.name], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    await asyncio.sleep(1.0)  # attached
                    await _send_all(client, model, corpus, c, n)
                    proc.send_signal(signal.SIGINT)
                    proc.wait(timeout=60)
                    profiles[(c, n)] = categorize(Path(out.name).read_text())
        elif profile:
            say("   (py-spy not found: the event loop is not split by function)")
    finally:
        await client.close()
    out = summarize(runs, profiles, len(corpus))
    out["floor"] = floor
    out["floor_shape"] = lone
    return out


def summarize(runs: dict, profiles: dict, texts: int) -> dict:
    shapes = list(runs)
    ref = shapes[0]
    out = {"texts": texts, "rounds": len(runs[ref]), "reference": ref, "shapes": {}}
    for shape, rs in runs.items():
        median = lambda key: float(np.median([key(r) for r in rs]))  # noqa: E731
        groups = sorted({k for r in rs for k in r["cpu"]})
        b = lambda k: median(lambda r: r["batches"].get(k, 0.0))  # noqa: E731
        out["shapes"][shape] = {
            "server": median(lambda r: r["server"]),
            "servers": [r["server"] for r in rs],
            "cpu": {g: median(lambda r: r["cpu"].get(g, 0.0)) for g in groups},
            "batches": b("batches"),
            "inputs_per_batch": b("inputs") / max(b("batches"), 1),
            "padding": 1 - b("tokens") / b("padded_tokens") if b("padded_tokens") else 0.0,
            "errors": sum(r["errors"] for r in rs),
            "profile": dict(profiles.get(shape, {})),
        }
    base = out["shapes"][ref]["server"]
    for shape in shapes:
        out["shapes"][shape]["ratio"] = out["shapes"][shape]["server"] / base
    return out


def section(result: dict) -> list[str]:
    """The report's "Per server CPU" section."""
    shapes = list(result["shapes"])
    ref = result["reference"]
    label = lambda s: f"{s[0]} × {s[1]}"  # noqa: E731
    names = [g for g in (*GROUPS, "Envoy", "client (the bench)") if any(result["shapes"][s]["cpu"].get(g, 0) > 0.0005 for s in shapes)]
    lines = [
        "## Per server CPU: a lone request against its share of a batch",
        "",
        f"The corpus's first {result['texts']:,} texts through Envoy REST (OpenAI route, base64) as C clients × N texts a request,",
        f"{result['rounds']} rounds alternating the shapes (medians). CPU is user + system time from `/proc`, in ms per text;",
        "the server's is its whole process tree (offload workers included), split by thread. Envoy and the client are beside",
        f"it, not in it. *Ratio*: the server's CPU per text against {label(ref)}'s (target ≤ 1.10).",
        "",
        "| | " + " | ".join(label(s) for s in shapes) + " |",
        "| --- |" + " ---: |" * len(shapes),
        "| **server, ms CPU per text** | " + " | ".join(f"**{result['shapes'][s]['server']:.2f}**" for s in shapes) + " |",
        "| **ratio** | " + " | ".join(f"**{result['shapes'][s]['ratio']:.3f}**" for s in shapes) + " |",
        "| rounds | " + " | ".join(", ".join(f"{v:.2f}" for v in result["shapes"][s]["servers"]) for s in shapes) + " |",
    ]
    for g in names:
        prefix = "" if g in ("Envoy", "client (the bench)") else "  "
        lines.append(f"| {prefix}{g} | " + " | ".join(f"{result['shapes'][s]['cpu'].get(g, 0.0):.3f}" for s in shapes) + " |")
    lines += [
        "| forward passes | " + " | ".join(f"{result['shapes'][s]['batches']:,.0f}" for s in shapes) + " |",
        "| inputs per forward pass | " + " | ".join(f"{result['shapes'][s]['inputs_per_batch']:.1f}" for s in shapes) + " |",
        "| padding (share of tokens run) | " + " | ".join(f"{result['shapes'][s]['padding']:.1%}" for s in shapes) + " |",
        "",
    ]
    floor = result.get("floor")
    if floor:
        f_lone, f_flat = floor["at the lone shape's rate"], floor["flat out"]
        shape = result["floor_shape"]
        lines += [
            "What gRPC aio itself costs a call, beside it: a bare `grpc.aio` server (two pass-through interceptors, its answer",
            "resolved from another thread, initial metadata sent, no other work) called by 32 clients directly, its worker",
            f"holding each call long enough to match {label(shape)}'s rate ({f_lone['calls_per_s']:,.0f} calls/s), then flat out: "
            f"**{f_lone['ms_per_call']:.2f} ms** of CPU a call at that rate,",
            f"{f_flat['ms_per_call']:.2f} ms at {f_flat['calls_per_s']:,.0f} calls/s. Calls that come one at a time each pay for their own wake-ups",
            "(gRPC's poller thread, the event loop's, the GIL passing between them); calls that come together share them.",
            "",
        ]
    profiled = [s for s in shapes if result["shapes"][s]["profile"]]
    if profiled:
        cats = [name for name, _ in CATEGORIES] + ["gRPC aio and the event loop"]
        lines += [
            "The event loop's CPU per text split by what its Python code was doing (py-spy samples, one more pass per shape,",
            "in proportion to the event loop's CPU above; *gRPC aio and the event loop*: no frame of ours, i.e. gRPC's Cython",
            "coroutines, its sends and receives, and asyncio's own scheduling).",
            "",
            "| event loop, ms CPU per text | " + " | ".join(label(s) for s in profiled) + " |",
            "| --- |" + " ---: |" * len(profiled),
        ]
        for cat in cats:
            vals = []
            for s in profiled:
                prof = result["shapes"][s]["profile"]
                total = sum(prof.values()) or 1
                vals.append(prof.get(cat, 0) / total * result["shapes"][s]["cpu"].get("event loop", 0.0))
            if any(v >= 0.0005 for v in vals):
                lines.append(f"| {cat} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
        lines.append("")
    return lines


# -- the floor: a bare grpc.aio server ---------------------------------------------------------------------------------

FLOOR_SERVER = """
import asyncio, queue, sys, threading, time
import grpc

class Pass(grpc.aio.ServerInterceptor):  # two, as the server has (its gate and auth)
    async def intercept_service(self, continuation, details):
        return await continuation(details)

def work(jobs):  # one thread, one call at a time: a forward pass of WORK seconds, resolved as the batcher does
    while True:
        loop, future, seconds = jobs.get()
        time.sleep(seconds)
        loop.call_soon_threadsafe(future.set_result, None)

async def main():
    jobs, loop = queue.SimpleQueue(), asyncio.get_running_loop()
    threading.Thread(target=work, args=(jobs,), daemon=True).start()

    async def handler(request, context):
        future = loop.create_future()
        jobs.put((loop, future, float(request.decode() or 0)))
        await future
        await context.send_initial_metadata((("x-compute-time", "1.000"),))  # the REST caller's headers
        return bytes(1600)  # a vector's worth of answer

    server = grpc.aio.server(interceptors=[Pass(), Pass()], options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("floor.Floor", {"Call": grpc.unary_unary_rpc_method_handler(handler)}),))
    print(server.add_insecure_port("127.0.0.1:0"), flush=True)
    await server.start()
    await server.wait_for_termination()

asyncio.run(main())
"""


async def grpc_floor(work_seconds: float, calls: int = 320, clients: int = 32) -> dict:
    """CPU per call of a bare grpc.aio server (two pass-through interceptors, its answer resolved from another thread
    after `work_seconds`, initial metadata sent) with `clients` concurrent callers: what gRPC aio itself costs a call
    at the rate the work allows (0: as fast as it goes; one call at a time in the worker, as a lone text's pass)."""
    import grpc

    proc = subprocess.Popen([sys.executable, "-c", FLOOR_SERVER], stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/floor.Floor/Call")
            body = f"{work_seconds}".encode()

            async def caller(n: int) -> None:
                for _ in range(n):
                    await call(body)

            await asyncio.gather(*[caller(2) for _ in range(clients)])  # warm-up
            cpu0, t0 = process_seconds(proc.pid), time.perf_counter()
            await asyncio.gather(*[caller(calls // clients) for _ in range(clients)])
            seconds = time.perf_counter() - t0
            return {"calls_per_s": calls / seconds, "ms_per_call": (process_seconds(proc.pid) - cpu0) / calls * 1e3}
    finally:
        proc.kill()
        proc.wait()


async def floors(lone_rate: float) -> dict:
    """The bare server at the lone shape's call rate and flat out."""
    out = {}
    for name, work in (("at the lone shape's rate", 1 / lone_rate if lone_rate else 0.0), ("flat out", 0.0)):
        out[name] = await grpc_floor(work, calls=320 if work else 3200)
    return out


# -- the other two per-CPU targets: a short text against plain encode, a bulk stream against the engine ------------------


def plain_latency(texts: list[str], warm: int = 20) -> list[float]:
    """`SentenceTransformer.encode([text])` of each text, one at a time, in this process (torch fp32): the baseline a short
    text's served latency is held to (seconds each; the first `warm` texts are a warm-up, not counted)."""
    from sentence_transformers import SentenceTransformer

    from service.config import default_model_path

    model = SentenceTransformer(default_model_path(), device="cpu")
    out = []
    for i, text in enumerate([*texts[:warm], *texts]):
        t0 = time.perf_counter()
        model.encode([text])
        if i >= warm:
            out.append(time.perf_counter() - t0)
    return out


def short_lines(plain: list[float], rest: list[float], server: dict[str, list[float]] | None = None) -> list[str]:
    """Target 2: a new short text through Envoy REST against plain encode of the same texts in the same run."""
    from .stages import pct

    p50, p99 = pct(rest)
    b50, b99 = pct(plain)
    lines = [
        "A new short text (10–16 words, uncached) through Envoy REST, one at a time on an idle server, against plain",
        f"`SentenceTransformer.encode([text])` (torch fp32, in process) of the same {len(rest)} texts in the same run:",
        "",
        "| | p50 ms | p99 ms | p99 / p50 |",
        "| --- | ---: | ---: | ---: |",
        f"| plain `SentenceTransformer.encode([text])` | {b50:.2f} | {b99:.2f} | {b99 / b50:.2f} |",
        f"| **REST through Envoy** | **{p50:.2f}** | {p99:.2f} | **{p99 / p50:.2f}** |",
    ]
    for key, label in (("x-inference-time", "  the server's forward pass + pooling (`x-inference-time`)"), ("x-compute-time", "  the server's whole pipeline (`x-compute-time`)")):
        if server and server.get(key):
            a, b = pct(server[key])
            lines.append(f"| {label} | {a:.2f} | {b:.2f} | |")
    lines += ["", f"**{p50 / b50:.2f}×** plain encode at p50 (target ≤ 0.35×), p99 {p99 / p50:.2f}× p50 (target ≤ 2).", ""]
    return lines


def bulk_lines(bulk: dict) -> list[str]:
    """Target 3: the server's CPU per streamed text against the engine in process's, measured right beside it."""
    ref, cpu = bulk.get("reference"), bulk.get("cpu_us_per_text")
    if not ref or not cpu:
        return []
    engine = (ref["before"]["cpu_us_per_text"] + ref["after"]["cpu_us_per_text"]) / 2
    server = next(v for k, v in cpu.items() if k.startswith("server"))
    return ["The server's CPU per streamed text (its offload workers included) against the engine in process's, right before and",
            f"after: {server:,.0f} µs against {engine:,.0f} µs, **{server / engine:.3f}×** (target ≤ 1.03×).", ""]


async def main_async(args) -> int:
    from service.config import Config
    from service.engine.models import resolve_mode
    from service.launch import Stack

    from .__main__ import bulk_run, environment
    from .corpus import isolated, load
    from .report import bulk_section
    from .stages import rest_latency, short_texts

    print("== machine", flush=True)
    env = environment()
    for k, v in env.items():
        print(f"  {k:22} {v}")
    corpus, lengths = load()
    cfg = Config().validate()
    cfg.cache.max_bytes = 0
    mode = resolve_mode(cfg.default_model())
    model = cfg.default_model().id
    shapes = tuple(tuple(int(x) for x in shape.split("x")) for shape in args.shapes.split(","))
    texts = short_texts(corpus, args.short_texts)
    started = time.perf_counter()
    plain = rest = server = None
    if texts:
        print(f"== plain SentenceTransformer.encode([text]) of {len(texts)} new short texts", flush=True)
        plain = plain_latency(texts)
    bulk = None
    with Stack(isolated(cfg)) as stack:
        print(f"== per server CPU: the corpus's first {args.texts} texts, shapes {args.shapes}, {args.rounds} rounds", flush=True)
        result = await measure(stack, corpus[: args.texts], model, shapes=shapes, rounds=args.rounds, profile=not args.no_profile)
        if texts:
            print("== the same short texts through Envoy REST", flush=True)
            await asyncio.sleep(2.0)  # idle
            rest, server = await rest_latency(stack.config.envoy.listen_port, model, texts)
        if args.bulk_texts:
            bulk = await bulk_run(stack, corpus, lengths, args.bulk_texts, args.bulk_reference, cfg.default_model(), cfg.limits)
    lines = [
        "# Per server CPU (issue 29's targets)",
        "",
        f"Written by `make bench-cpu` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, in {time.perf_counter() - started:.0f} s; "
        f"the default mode here is {mode[0]}/{mode[1]}. Cache off: every text is computed.",
        "",
        "| | |",
        "| --- | --- |",
        *[f"| {k} | {v} |" for k, v in env.items()],
        "",
        *section(result),
    ]
    if texts:
        lines += ["## A short text against plain encode", "", *short_lines(plain, rest, server)]
    if bulk:
        lines += bulk_section(bulk, [])  # with bulk_lines: target 3
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"== wrote {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = argparse.ArgumentParser(prog="python -m bench.cpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--texts", type=int, default=1024, help="texts each run of a shape sends (the corpus's first N)")
    p.add_argument("--rounds", type=int, default=ROUNDS)
    p.add_argument("--shapes", default=",".join(f"{c}x{n}" for c, n in SHAPES), help="C×N shapes, the first the reference (e.g. 32x32,32x1)")
    p.add_argument("--no-profile", action="store_true", help="skip the py-spy pass that splits the event loop by function")
    p.add_argument("--short-texts", type=int, default=200, help="new short texts timed through Envoy REST and by plain encode (0: skip)")
    p.add_argument("--bulk-texts", type=int, default=100_000, help="texts streamed over one TEI EmbedStream (0: skip)")
    p.add_argument("--bulk-reference", type=int, default=10_240, help="texts the engine in process embeds right before and after the stream")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "CPU.md"))
    args = p.parse_args(argv)
    from service import logs

    logs.setup("warning")
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
