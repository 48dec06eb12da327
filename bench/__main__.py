"""`make bench` / `python -m bench`: throughput and latency against the baselines, in one run.

Side by side, on one deterministic corpus: the baseline `SentenceTransformer.encode(batch_size=32)`, every
runtime mode of the engine (with its fidelity to the fp32 reference), then the default mode served four
ways — the engine in process, native gRPC, gRPC through Envoy, REST through Envoy (OpenAI route, base64
as the SDKs ask) — at concurrency 1, 8 and 32 with requests of 1 and 32 texts; and a single short text's
latency. Then where a new short text's time goes, layer by layer, and 128 one-text clients (bench/stages.py);
the runtime options a lone short text could run on instead (bench/lone.py);
one client streaming thousands of texts over TEI's EmbedStream; chunk against truncate on long documents
(bench/long_docs.py); each mode's server RSS in its own process; with --peers, fastembed and Infinity
(bench/peers.py). Prints as it goes (with progress bars) and writes bench/RESULTS.md and bench/throughput.png.
The embedding cache is off throughout: every text is computed.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

from service.config import Config, ModelConfig, default_model_path  # noqa: E402
from .clients import HttpClient, Run, drive  # noqa: E402
from .corpus import isolated, load as load_corpus  # noqa: E402
from .stages import bulk_stream, cpu_seconds, engine_latency, forward_only, grpc_latency, rest_latency, short_texts, stage_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHORT_TEXT = "What is the capital of France? Paris is."  # 14 tokens with [CLS] and [SEP]


@dataclass
class Row:
    group: str
    name: str
    concurrency: int = 0
    per_request: int = 0
    tokens_per_s: float = 0.0
    texts_per_s: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    ratio: float = 0.0
    errors: int = 0
    extra: dict = field(default_factory=dict)


# -- machine ------------------------------------------------------------------------------------


def environment() -> dict[str, str]:
    import grpc
    import onnxruntime
    import sentence_transformers
    import tokenizers
    import torch
    import transformers

    cpu, flags = "unknown", ""
    try:
        info = Path("/proc/cpuinfo").read_text()
        cpu = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
        all_flags = next(line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags"))
        flags = " ".join(f for f in all_flags if f.startswith(("avx512", "amx", "avx_vnni", "avx2", "fma")))
    except (OSError, StopIteration):
        pass
    from service.launch import envoy_binary
    import subprocess

    import re

    found = re.search(r"version: \S+?/(\d+\.\d+\.\d+)", subprocess.run([envoy_binary(), "--version"], capture_output=True, text=True).stdout)
    env = {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "cpu flags": flags,
        "memory": f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "sentence-transformers": sentence_transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "onnxruntime": onnxruntime.__version__,
        "grpcio": grpc.__version__,
        "envoy": found.group(1) if found else "?",
    }
    try:
        sys.modules.setdefault("openvino_telemetry", None)  # no telemetry (see service/runtimes/openvino.py)
        import openvino

        env["openvino"] = openvino.__version__
    except ImportError:
        pass
    return env


def peak_rss_mib(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


# -- workloads ----------------------------------------------------------------------------------


def chunks(texts: list[str], n: int) -> list[list[str]]:
    return [texts[i : i + n] for i in range(0, len(texts), n)]


def summarize(group: str, name: str, run: Run, c: int, n: int, texts: int, tokens: int, base_tps: float) -> Row:
    lat = np.array(run.latencies) * 1000 if run.latencies else np.zeros(1)
    tps = tokens / run.seconds
    return Row(group, name, c, n, tps, texts / run.seconds, float(np.percentile(lat, 50)), float(np.percentile(lat, 99)), tps / base_tps if base_tps else 0.0, run.errors)


def progress_bar(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="text", leave=False, dynamic_ncols=True, file=sys.stderr)


def run_baseline(corpus: list[str]) -> tuple[float, np.ndarray]:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(default_model_path(), device="cpu")
    model.encode(corpus[:64], batch_size=32)  # warm-up
    t0 = time.perf_counter()
    vectors = model.encode(corpus, batch_size=32, show_progress_bar=True)
    return time.perf_counter() - t0, vectors


async def engine_session(model_cfg: ModelConfig, limits):
    """An in-process engine on one model; returns (embedder, registry)."""
    from service.engine.cache import EmbeddingCache
    from service.engine.models import ModelRegistry
    from service.engine.pipeline import Embedder

    registry = ModelRegistry([model_cfg], limits)
    await asyncio.get_running_loop().run_in_executor(None, registry.load_now)
    pool = ThreadPoolExecutor(2, thread_name_prefix="tokenize")
    return Embedder(registry, limits, EmbeddingCache(0), pool), registry, pool


async def engine_run(embedder, corpus, c, n, desc):
    from service.engine.pipeline import EmbedRequest

    vectors: dict[int, np.ndarray] = {}
    requests = chunks(corpus, n)
    index = {id(r): i for i, r in enumerate(requests)}

    async def send(texts):
        result = await embedder.embed(EmbedRequest(inputs=texts, use_cache=False))
        vectors[index[id(texts)]] = result.vectors

    with progress_bar(len(corpus), desc) as bar:
        run = await drive(requests, c, send, bar)
    return run, np.concatenate([vectors[i] for i in range(len(requests))]) if len(vectors) == len(requests) else None


async def bulk_run(stack, corpus, lengths, n_texts: int, n_reference: int, mcfg, limits) -> dict:
    """One client streaming `n_texts` over one TEI EmbedStream through Envoy, between two runs of the engine in process
    (32 x 32, on the first `n_reference` of the same texts; 0: none) as its reference.

    The reference is measured right beside the stream because this shared host drifts between runs minutes apart (the
    report shows by how much: the serving grid's 32 x 32 row against this reference). The CPU each party used (the
    server with its offload workers, Envoy, this process as the client) says where a streamed text's cost goes."""
    from .load import server_pids

    texts = [corpus[i % len(corpus)] for i in range(n_texts)]  # the corpus again and again (cache off)
    tokens = int(np.resize(lengths, n_texts).sum())
    ref_texts = texts[: max(0, min(n_reference, n_texts))]
    ref_tokens = int(np.resize(lengths, len(ref_texts)).sum())
    print(f"== bulk: {n_texts:,} texts over one TEI EmbedStream through Envoy"
          + (f", between two runs of the engine in process on {len(ref_texts):,} of them" if ref_texts else ""), flush=True)
    session = await engine_session(mcfg, limits) if ref_texts else None

    async def reference(when: str) -> dict:
        embedder = session[0]
        cpu0 = cpu_seconds()
        run, _ = await engine_run(embedder, ref_texts, 32, 32, f"engine in process ({when})")
        if run.errors:
            raise RuntimeError(f"the bulk stream's reference ({when}) failed {run.errors} requests")
        return {"seconds": run.seconds, "tokens_per_s": ref_tokens / run.seconds, "cpu_us_per_text": (cpu_seconds() - cpu0) / len(ref_texts) * 1e6}

    try:
        if session:
            await engine_run(session[0], corpus[:256], 32, 32, "warm-up")
            before = await reference("before")
        parties = {"server (and its offload workers)": server_pids(stack), "Envoy": [stack.envoy.pid], "client (the bench)": ["self"]}
        cpu0 = {name: sum(cpu_seconds(p) for p in pids) for name, pids in parties.items()}
        with progress_bar(n_texts, "EmbedStream") as bar:
            secs, answers = await bulk_stream(stack.envoy_target, texts, bar=bar)
        cpu = {name: (sum(cpu_seconds(p) for p in pids) - cpu0[name]) / max(answers, 1) * 1e6 for name, pids in parties.items()}
        if session:
            after = await reference("after")
    finally:
        if session:
            session[1].stop()
            session[2].shutdown()
    tps = tokens / secs
    out = {"texts": n_texts, "answers": answers, "tokens": tokens, "seconds": secs, "tokens_per_s": tps, "cpu_us_per_text": cpu}
    print(f"   {tps:,.0f} tokens/s, {answers:,} answers in {secs:.1f} s", flush=True)
    print("   CPU per text: " + ", ".join(f"{k} {v:.0f} us" for k, v in cpu.items()), flush=True)
    if session:
        # Both runs embed the same tokens: their combined rate is the tokens over their total time.
        engine_tps = 2 * ref_tokens / (before["seconds"] + after["seconds"])
        out["reference"] = {"texts": len(ref_texts), "before": before, "after": after, "tokens_per_s": engine_tps}
        print(f"   engine in process beside it: {before['tokens_per_s']:,.0f} before, {after['tokens_per_s']:,.0f} after tokens/s; "
              f"the stream {tps / engine_tps:.0%} of them; the engine's CPU per text "
              f"{(before['cpu_us_per_text'] + after['cpu_us_per_text']) / 2:.0f} us", flush=True)
    return out


async def grpc_run(target, corpus, c, n, desc):
    import grpc

    from ai.inworld.embedding.v1alpha import embedding_service_pb2 as pb
    from ai.inworld.embedding.v1alpha import embedding_service_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(target, options=[("grpc.max_receive_message_length", 64 << 20)]) as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)

        async def send(texts):
            await stub.Embed(pb.EmbedRequest(inputs=[pb.EmbedRequest.Input(text=t) for t in texts]), timeout=120)

        await send(corpus[:2])
        with progress_bar(len(corpus), desc) as bar:
            return await drive(chunks(corpus, n), c, send, bar)


async def rest_run(port, corpus, c, n, desc, model):
    client = HttpClient("127.0.0.1", port, "/v1/embeddings")

    async def send(texts):
        await client.post({"input": texts, "model": model, "encoding_format": "base64"})

    await send(corpus[:2])
    try:
        with progress_bar(len(corpus), desc) as bar:
            return await drive(chunks(corpus, n), c, send, bar)
    finally:
        await client.close()


async def latency(send, count: int = 300) -> tuple[float, float]:
    for _ in range(20):
        await send([SHORT_TEXT])
    run = await drive([[SHORT_TEXT]] * count, 1, send)
    lat = np.array(run.latencies) * 1000
    return float(np.percentile(lat, 50)), float(np.percentile(lat, 99))


async def rss_per_mode(cfg: Config, modes, corpus: list[str]) -> list[tuple[str, float, float]]:
    """(mode, peak RSS of the server process, of it with its offload worker) for a server in each runtime mode,
    after serving the corpus over native gRPC at 32 × 32: each mode in its own process, as it would run."""
    from service.launch import Stack
    from .load import server_pids

    out = []
    for runtime, precision in modes:
        scfg = isolated(cfg)
        scfg.default_model().runtime, scfg.default_model().precision = runtime, precision
        try:
            with Stack(scfg) as stack:
                await grpc_run(stack.server_targets[0], corpus, 32, 32, f"{runtime}/{precision}")
                pids = server_pids(stack)
                server = peak_rss_mib(pids[0])
                total = sum(peak_rss_mib(p) for p in pids)
        except Exception as e:  # a runtime this machine lacks is reported, not fatal
            print(f"   {runtime}/{precision}: unavailable ({type(e).__name__}: {e})", flush=True)
            continue
        out.append((f"{runtime}/{precision}", server, total))
        print(f"   {runtime}/{precision}: server peak RSS {server:.0f} MiB, with its offload workers {total:.0f} MiB", flush=True)
    return out


# -- the run ------------------------------------------------------------------------------------


def cosine_stats(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    cos = (a * b).sum(axis=1)
    return float(cos.min()), float(cos.mean())


async def bench(args) -> int:
    from tokenizers import Tokenizer

    from service.engine.models import resolve_mode
    from service.launch import Stack

    print("== machine", flush=True)
    env = environment()
    for k, v in env.items():
        print(f"  {k:22} {v}")

    corpus, lengths = load_corpus(args.texts)
    tokens = int(lengths.sum())
    print(f"== corpus: {len(corpus)} texts, {tokens} tokens, p50 {np.percentile(lengths, 50):.0f}, p90 {np.percentile(lengths, 90):.0f} tokens/text", flush=True)
    rows: list[Row] = []

    print("== baseline: SentenceTransformer.encode(batch_size=32), fp32", flush=True)
    secs, reference = run_baseline(corpus)
    base_tps = tokens / secs
    rows.append(Row("baseline", "SentenceTransformer.encode, batch 32, fp32", 1, 32, base_tps, len(corpus) / secs, ratio=1.0))
    print(f"   {base_tps:,.0f} tokens/s, {len(corpus) / secs:.0f} texts/s", flush=True)

    cfg = Config().validate()
    cfg.cache.max_bytes = 0
    default_mode = resolve_mode(cfg.default_model())
    from service.runtimes import MODES

    modes = [m for m in MODES if not args.modes or f"{m[0]}/{m[1]}" in args.modes]
    print(f"== runtimes in process (concurrency 32, 32 texts per request); default: {default_mode[0]}/{default_mode[1]}", flush=True)
    for runtime, precision in modes:
        mcfg = copy.deepcopy(cfg.default_model())
        mcfg.runtime, mcfg.precision = runtime, precision
        try:
            embedder, registry, pool = await engine_session(mcfg, cfg.limits)
        except Exception as e:  # a runtime this machine lacks is reported, not fatal
            print(f"   {runtime}/{precision}: unavailable ({e})", flush=True)
            continue
        await engine_run(embedder, corpus[:256], 32, 32, "warm-up")
        run, vectors = await engine_run(embedder, corpus, 32, 32, f"{runtime}/{precision}")
        cmin, cmean = cosine_stats(vectors, reference)
        row = summarize("runtime", f"engine, {runtime}/{precision}", run, 32, 32, len(corpus), tokens, base_tps)
        row.extra = {"cos_min": cmin, "cos_mean": cmean, "default": (runtime, precision) == default_mode}
        rows.append(row)
        print(f"   {runtime}/{precision}: {row.tokens_per_s:,.0f} tokens/s ({row.ratio:.2f}x), cosine to fp32 min {cmin:.6f} mean {cmean:.6f}", flush=True)
        registry.stop()
        pool.shutdown()

    print(f"== serving {default_mode[0]}/{default_mode[1]}: in process, gRPC, gRPC via Envoy, REST via Envoy", flush=True)
    mcfg = copy.deepcopy(cfg.default_model())
    embedder, registry, pool = await engine_session(mcfg, cfg.limits)
    grid = [(c, n) for n in (1, 32) for c in (1, 8, 32)]
    for c, n in grid:
        run, _ = await engine_run(embedder, corpus, c, n, f"engine c={c} n={n}")
        rows.append(summarize("serving", "engine in process", run, c, n, len(corpus), tokens, base_tps))
    from service.engine.pipeline import EmbedRequest

    async def engine_send(texts):
        await embedder.embed(EmbedRequest(inputs=texts, use_cache=False))

    short = {"engine in process": await latency(engine_send)}
    # Where a short text's time goes: the same new texts on every layer, from the inside out (bench/stages.py).
    stage_texts = short_texts(corpus, args.stage_texts)
    served = await registry.get(mcfg.id)
    from . import cpu as cpu_bench

    plain = cpu_bench.plain_latency(stage_texts)  # target 2's baseline: plain encode of the same new texts
    stage = {"forward pass (runtime alone)": await forward_only(served, stage_texts),
             "forward pass alone, 3 ms idle before each (as served)": await forward_only(served, stage_texts, idle=0.003),
             "engine in process": await engine_latency(embedder, stage_texts)}
    long_docs = None
    if args.long_docs:
        print("== long documents: chunk against truncate (in process)", flush=True)
        from . import long_docs as long_docs_bench

        long_docs = await long_docs_bench.run_all(embedder, Tokenizer.from_file(str(Path(default_model_path()) / "tokenizer.json")))
        for name, result in long_docs.items():
            for policy in ("truncate", "chunk"):
                r = result[policy]
                print(f"   {name} ({result['documents']} documents), {policy}: right document first {r['top1']:.1%}, MRR {r['mrr']:.3f}, {r['tokens_per_s']:,.0f} tokens/s", flush=True)
    registry.stop()
    pool.shutdown()
    print("== a lone short text's forward pass: the runtime options, each in its own process", flush=True)
    from . import lone as lone_bench

    lone = lone_bench.measure()

    with Stack(isolated(cfg)) as stack:
        server_pid = stack.servers[0].pid
        for c, n in grid:
            for name, fn in (
                ("gRPC direct", lambda: grpc_run(stack.server_targets[0], corpus, c, n, f"gRPC c={c} n={n}")),
                ("gRPC via Envoy", lambda: grpc_run(stack.envoy_target, corpus, c, n, f"gRPC/Envoy c={c} n={n}")),
                ("REST via Envoy (OpenAI, base64)", lambda: rest_run(stack.config.envoy.listen_port, corpus, c, n, f"REST c={c} n={n}", mcfg.id)),
            ):
                rows.append(summarize("serving", name, await fn(), c, n, len(corpus), tokens, base_tps))
        import grpc

        from ai.inworld.embedding.v1alpha import embedding_service_pb2 as pb
        from ai.inworld.embedding.v1alpha import embedding_service_pb2_grpc as pb_grpc

        async with grpc.aio.insecure_channel(stack.server_targets[0]) as ch:
            stub = pb_grpc.EmbeddingServiceStub(ch)
            short["gRPC direct"] = await latency(lambda t: stub.Embed(pb.EmbedRequest(inputs=[pb.EmbedRequest.Input(text=x) for x in t])))
        client = HttpClient("127.0.0.1", stack.config.envoy.listen_port, "/v1/embeddings")
        short["REST via Envoy (OpenAI, base64)"] = await latency(lambda t: client.post({"input": t, "model": mcfg.id, "encoding_format": "base64"}))
        await client.close()

        print("== stages: one new short text at a time, each layer", flush=True)
        stage["native gRPC (direct)"] = await grpc_latency(stack.server_targets[0], stage_texts)
        stage["gRPC through Envoy"] = await grpc_latency(stack.envoy_target, stage_texts)
        stage["REST through Envoy"], server_times = await rest_latency(stack.config.envoy.listen_port, mcfg.id, stage_texts)
        stages = stage_table(stage, server_times)
        for name, p50, p99, added in stages:
            print(f"   {name:42} p50 {p50:6.2f} ms  p99 {p99:6.2f} ms" + (f"  ({added:+.2f} ms)" if added == added else ""), flush=True)

        print("== per server CPU: a lone request against its share of a batch (bench/cpu.py)", flush=True)
        cpu = await cpu_bench.measure(stack, corpus[:1024], mcfg.id)

        print("== many clients, one text each, through Envoy REST", flush=True)
        for c in (128,):
            run = await rest_run(stack.config.envoy.listen_port, corpus, c, 1, f"REST c={c} n=1", mcfg.id)
            rows.append(summarize("serving", "REST via Envoy (OpenAI, base64)", run, c, 1, len(corpus), tokens, base_tps))

        bulk = None
        if args.bulk_texts:
            try:
                bulk = await bulk_run(stack, corpus, lengths, args.bulk_texts, args.bulk_reference, mcfg, cfg.limits)
            except Exception as e:  # noqa: BLE001 - reported, and the rest of the run still written
                print(f"   bulk: failed ({type(e).__name__}: {e})", flush=True)
        server_rss = peak_rss_mib(server_pid)

    for row in rows:
        if row.group == "serving":
            print(f"   {row.name:34} c={row.concurrency:<2} n={row.per_request:<2} {row.tokens_per_s:9,.0f} tok/s {row.texts_per_s:7.0f} texts/s  p50 {row.p50_ms:8.1f} ms  p99 {row.p99_ms:8.1f} ms  {row.ratio:5.2f}x  errors {row.errors}")
    for name, (p50, p99) in short.items():
        print(f"   short text (14 tokens), c=1, {name}: p50 {p50:.2f} ms, p99 {p99:.2f} ms")
    print(f"   server peak RSS under load: {server_rss:.0f} MiB; bench process peak RSS: {peak_rss_mib():.0f} MiB")

    peers = None
    if args.peers:  # fastembed and Infinity, each in its own venv, on the same corpus (bench/peers.py)
        from .peers import run_peers

        peers = await run_peers(corpus, tokens, reference, base_tps, SHORT_TEXT)

    memory = None
    if args.memory:
        print("== memory: a server in each mode, peak RSS after serving the corpus", flush=True)
        memory = await rss_per_mode(cfg, modes, corpus)

    from .report import write_report

    write_report(args.out, args.plot, env, corpus_stats=(len(corpus), tokens, lengths), rows=rows, short=short,
                 server_rss=server_rss, default_mode=default_mode, base_tps=base_tps, peers=peers,
                 stages=stages, bulk=bulk, long_docs=long_docs, memory=memory, lone=lone, cpu=cpu,
                 short_vs_plain=(plain, stage["REST through Envoy"], server_times))
    print(f"== wrote {args.out} and {args.plot}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--texts", type=int, default=2048, help="corpus size (2048: the issue's corpus)")
    p.add_argument("--modes", nargs="*", help="runtime modes to compare, e.g. torch/fp32 onnx/fp32 (default: all)")
    p.add_argument("--out", default=str(ROOT / "bench" / "RESULTS.md"))
    p.add_argument("--plot", default=str(ROOT / "bench" / "throughput.png"))
    p.add_argument("--stage-texts", type=int, default=200, help="new short texts timed on each layer (the stage table)")
    p.add_argument("--bulk-texts", type=int, default=100_000, help="texts streamed over one TEI EmbedStream (0: skip)")
    p.add_argument("--bulk-reference", type=int, default=20_480, help="texts the engine in process embeds right before and after the stream, as its reference")
    p.add_argument("--no-long-docs", dest="long_docs", action="store_false", help="skip chunk-against-truncate on long documents")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak RSS of a server in each mode")
    p.add_argument("--peers", action="store_true", help="also run fastembed and Infinity on the same corpus (make bench PEERS=1)")
    args = p.parse_args(argv)
    from service import logs

    logs.setup("warning")
    return asyncio.run(bench(args))


if __name__ == "__main__":
    sys.exit(main())
