"""`make load`: a bounded load test through Envoy — many clients, every dialect, loopback only.

64 concurrent clients (by default) for 60 s, each sending requests of 1–16 texts through a dialect picked
at random (Inworld, OpenAI base64 and float, AIGNE, Hugging Face, HrFlow). Prints requests/s, p50/p99
latency, errors by kind, and the server's memory before and after each of two runs (growth between the
runs would be a leak), and writes bench/LOAD.md. The only acceptable errors are the intended 429s of
backpressure.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import copy
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from ..config import Config, default_model_path  # noqa: E402
from .clients import HttpClient  # noqa: E402
from .corpus import make_corpus  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def request_for(dialect: str, texts: list[str]) -> tuple[str, dict]:
    if dialect == "inworld":
        return "/ml/v1alpha/embedding:embed", {"inputs": [{"text": t} for t in texts]}
    if dialect == "openai-base64":
        return "/v1/embeddings", {"input": texts, "model": MODEL}
    if dialect == "openai-float":
        return "/v1/embeddings", {"input": texts, "model": MODEL, "encoding_format": "float"}
    if dialect == "aigne":
        return "/api/embeddings", {"input": texts, "model": MODEL}
    if dialect == "huggingface":
        return f"/models/{MODEL}", {"inputs": texts}
    return "/v1/document/embedding", {"item_type": "job", "item": {"text": " ".join(texts)}}


DIALECTS = ["inworld", "openai-base64", "openai-float", "aigne", "huggingface", "hrflow"]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def run(port: int, corpus: list[str], clients: int, seconds: float, seed: int) -> dict:
    rng = random.Random(seed)
    latencies: list[float] = []
    outcomes: collections.Counter = collections.Counter()
    by_dialect: collections.Counter = collections.Counter()
    end = time.monotonic() + seconds

    async def client(i: int) -> None:
        http = HttpClient("127.0.0.1", port)
        local = random.Random(rng.random())
        try:
            while time.monotonic() < end:
                dialect = local.choice(DIALECTS)
                n = local.choice([1, 1, 2, 4, 8, 16])
                texts = [local.choice(corpus) for _ in range(n)]
                path, body = request_for(dialect, texts)
                t0 = time.perf_counter()
                try:
                    status, _ = await http.request(path, body)
                except Exception as e:
                    status = f"{type(e).__name__}"
                latencies.append(time.perf_counter() - t0)
                outcomes[status] += 1
                by_dialect[(dialect, status)] += 1
                if status == 429:
                    await asyncio.sleep(0.05)
        finally:
            await http.close()

    started = time.monotonic()
    await asyncio.gather(*[client(i) for i in range(clients)])
    wall = time.monotonic() - started
    lat = np.array(latencies) * 1000
    return {
        "requests": len(latencies),
        "rps": len(latencies) / wall,
        "p50": float(np.percentile(lat, 50)),
        "p99": float(np.percentile(lat, 99)),
        "outcomes": dict(outcomes),
        "by_dialect": dict(by_dialect),
    }


async def main_async(args) -> int:
    from tokenizers import Tokenizer

    from ..launch import Stack

    tok = Tokenizer.from_file(str(Path(default_model_path()) / "tokenizer.json"))
    corpus = make_corpus(list(tok.get_vocab()))
    cfg = copy.deepcopy(Config().validate())
    cfg.server.grpc_port = cfg.server.metrics_port = cfg.envoy.listen_port = cfg.envoy.admin_port = 0
    print(f"== load: {args.clients} clients, {args.seconds:.0f} s per run, two runs, every dialect, through Envoy", flush=True)
    results = []
    with Stack(cfg) as stack:
        pid = stack.servers[0].pid
        memory = [rss_mib(pid)]
        for i in range(2):
            r = await run(stack.config.envoy.listen_port, corpus, args.clients, args.seconds, seed=i)
            memory.append(rss_mib(pid))
            results.append(r)
            errors = {k: v for k, v in r["outcomes"].items() if k != 200}
            print(f"   run {i + 1}: {r['requests']} requests, {r['rps']:.1f} req/s, p50 {r['p50']:.0f} ms, p99 {r['p99']:.0f} ms; "
                  f"not 200: {errors or 'none'}; server RSS {memory[-2]:.0f} → {memory[-1]:.0f} MiB", flush=True)
    unexpected = {k: v for r in results for k, v in r["outcomes"].items() if k not in (200, 429)}
    lines = [
        "# Load test results",
        "",
        f"Written by `make load` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {args.clients} concurrent clients, "
        f"{args.seconds:.0f} s per run, two runs back to back against one server behind Envoy, on loopback. Each request: a",
        "random dialect (Inworld, OpenAI base64 / float, AIGNE, Hugging Face, HrFlow) and 1–16 texts from the benchmark corpus.",
        "The embedding cache is on (the default) and texts repeat, as they do in real traffic.",
        "",
        "| run | requests | requests/s | p50 ms | p99 ms | outcomes (HTTP status: count) | server RSS before → after |",
        "| --- | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for i, r in enumerate(results):
        outcomes = ", ".join(f"{k}: {v}" for k, v in sorted(r["outcomes"].items(), key=str))
        lines.append(f"| {i + 1} | {r['requests']} | {r['rps']:.1f} | {r['p50']:.0f} | {r['p99']:.0f} | {outcomes} | {memory[i]:.0f} → {memory[i + 1]:.0f} MiB |")
    lines += ["", "By dialect (run 2):", "", "| dialect | status | count |", "| --- | --- | ---: |"]
    lines += [f"| {d} | {s} | {c} |" for (d, s), c in sorted(results[-1]["by_dialect"].items(), key=str)]
    lines += ["", f"Errors other than the intended 429s: **{sum(unexpected.values()) if unexpected else 0}**. "
              f"Memory growth from the end of run 1 to the end of run 2: **{memory[2] - memory[1]:+.0f} MiB**.", ""]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print(f"== wrote {args.out}; unexpected errors: {unexpected or 'none'}; memory run1→run2 {memory[2] - memory[1]:+.0f} MiB")
    return 1 if unexpected else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m service.bench.load", description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--out", default=str(ROOT / "bench" / "LOAD.md"))
    args = p.parse_args(argv)
    from .. import logs

    logs.setup("warning")
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
