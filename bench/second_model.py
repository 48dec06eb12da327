"""`make bench-mpnet` / `python -m bench.second_model FOLDER`: the second real model, side by side in one run.

all-mpnet-base-v2 (768-d, MPNet, 110M parameters) beside all-MiniLM-L6-v2 (384-d, 22M), both served by one server,
each against its own baseline `SentenceTransformer.encode(batch_size=32)` in fp32 on the same corpus, in this run:
the server through Envoy's OpenAI route (32 clients × 32 texts, the model named in each request), with the server's
process-tree CPU per text; Infinity in process (torch fp32, its CPU default) on the same folder where its venv exists
(`make bench PEERS=1` makes it); and the server's memory with both models loaded. Writes bench/MPNET.md.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import copy
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

from service.config import Config, ModelConfig, default_model_path  # noqa: E402
from .clients import HttpClient, drive  # noqa: E402
from .corpus import make_corpus  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
MPNET = "sentence-transformers/all-mpnet-base-v2"


def baseline(folder: str, corpus: list[str]) -> tuple[float, np.ndarray]:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(folder, device="cpu")
    model.encode(corpus[:64], batch_size=32)  # warm-up
    t0 = time.perf_counter()
    vectors = model.encode(corpus, batch_size=32, show_progress_bar=True)
    return time.perf_counter() - t0, vectors


def cosine_min(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((a * b).sum(axis=1).min())


async def served(port: int, model: str, corpus: list[str], pids: list[int]) -> tuple[float, float, np.ndarray, float]:
    """(seconds, server CPU seconds, vectors, the first pass's seconds) for the corpus through Envoy's OpenAI route at
    32 × 32, measured on its second pass."""
    from .__main__ import progress_bar
    from .stages import cpu_seconds

    client = HttpClient("127.0.0.1", port, "/v1/embeddings")
    requests = [corpus[i : i + 32] for i in range(0, len(corpus), 32)]
    answers: dict[int, np.ndarray] = {}
    index = {id(r): i for i, r in enumerate(requests)}

    async def send(texts: list[str]) -> None:
        payload = await client.post({"input": texts, "model": model, "encoding_format": "base64"})
        data = sorted(json.loads(payload)["data"], key=lambda d: d["index"])
        answers[index.get(id(texts), -1)] = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in data])

    try:
        # A first pass, timed apart: the runtime compiles kernels for each new batch shape as it meets it (a cost the
        # first callers after a start pay), which would otherwise count in the steady-state rate.
        with progress_bar(len(corpus), f"first pass {model.rsplit('/', 1)[-1]}") as bar:
            first = await drive(requests, 32, send, bar)
        answers.clear()
        cpu0 = sum(cpu_seconds(p) for p in pids)
        with progress_bar(len(corpus), f"served {model.rsplit('/', 1)[-1]}") as bar:
            run = await drive(requests, 32, send, bar)
        cpu = sum(cpu_seconds(p) for p in pids) - cpu0
    finally:
        await client.close()
    if run.errors or first.errors:
        raise RuntimeError(f"{run.errors + first.errors} requests failed")
    return run.seconds, cpu, np.concatenate([answers[i] for i in range(len(requests))]), first.seconds


def infinity(folder: str, corpus: list[str]) -> tuple[float, np.ndarray, dict] | None:
    """Infinity's AsyncEmbeddingEngine, torch fp32 (its CPU default), 32 × 32: (seconds, vectors, versions)."""
    from .peers import _python, run_runner

    if _python("infinity") is None:
        print("   Infinity: no .venv-peers-infinity (make bench PEERS=1 makes it): skipped", flush=True)
        return None
    job = {"texts": corpus, "modes": [{"label": "torch fp32", "engine": "torch", "args": {}, "model": folder}], "grid": [(32, 32)],
           "batch_size": 32, "short_text": "What is the capital of France?", "short_count": 20}
    result = run_runner("infinity", "infinity_runner.py", job)
    run = next((r for r in result["runs"] if isinstance(r.get("vectors"), np.ndarray)), None)
    if run is None:
        raise RuntimeError("; ".join(result.get("notes", [])) or "no run")
    return run["seconds"], run["vectors"], result["versions"]


async def bench(args) -> int:
    from tokenizers import Tokenizer

    from service.launch import Stack
    from .__main__ import environment, peak_rss_mib
    from .load import server_pids

    folders = {MINILM: default_model_path(), MPNET: args.folder}
    vocab = Tokenizer.from_file(str(Path(default_model_path()) / "tokenizer.json")).get_vocab()
    corpus = make_corpus(list(vocab), n=args.texts)
    tokens = {}
    for name, folder in folders.items():
        tok = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
        tok.no_padding()
        tok.enable_truncation(384 if name == MPNET else 256)
        tokens[name] = sum(len(e.ids) for e in tok.encode_batch(corpus))
    env = environment()
    print(f"== mpnet beside MiniLM: {len(corpus)} texts; {env['cpu']}, {env['cores']} cores", flush=True)
    rows: dict[str, dict] = {}
    for name, folder in folders.items():
        print(f"== baseline: SentenceTransformer.encode, batch 32, fp32: {name}", flush=True)
        secs, vectors = baseline(folder, corpus)
        rows[name] = {"baseline_s": secs, "baseline": vectors}
    cfg = Config()
    cfg.models = [ModelConfig(id=MINILM, default=True), ModelConfig(id=MPNET, path=folders[MPNET], aliases=["mpnet"])]
    cfg.server.grpc_port = cfg.server.metrics_port = cfg.envoy.listen_port = cfg.envoy.admin_port = 0
    cfg.envoy.readiness_port = cfg.envoy.metrics_port = 0
    cfg.cache.max_bytes = 0
    with Stack(copy.deepcopy(cfg.validate())) as stack:
        port = int(stack.http_url.rsplit(":", 1)[1])
        import requests

        deadline = time.monotonic() + 900
        while requests.post(stack.http_url + "/v1/embeddings", json={"model": "mpnet", "input": "x"}, timeout=60).status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError("mpnet did not load")
            time.sleep(1)
        info = {MINILM: requests.get(stack.http_url + "/info", timeout=30).json()}
        pids = server_pids(stack)
        for name in folders:
            print(f"== served through Envoy (OpenAI route), 32 clients x 32 texts: {name}", flush=True)
            secs, cpu, vectors, first = await served(port, name, corpus, pids)
            rows[name].update(served_s=secs, first_s=first, cpu_ms_per_text=cpu / len(corpus) * 1000, cos=cosine_min(vectors, rows[name]["baseline"]))
        rss = sum(peak_rss_mib(p) for p in pids)
        precision = info[MINILM]["model_dtype"]
    for name, folder in folders.items():
        print(f"== Infinity in process, torch fp32, 32 x 32: {name}", flush=True)
        try:
            got = infinity(folder, corpus)
        except Exception as e:
            print(f"   Infinity failed: {e}", flush=True)
            got = None
        if got:
            secs, vectors, versions = got
            rows[name].update(infinity_s=secs, infinity_cos=cosine_min(vectors, rows[name]["baseline"]), infinity_versions=versions)
    lines = render(rows, tokens, len(corpus), env, rss, precision)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    return 0


# Why a bigger model's ratio does not rise on a CPU without bf16 units (the issue expected it to).
WHY_FP32 = (
    "Why the bigger model's ratio does not rise here: this CPU has no bf16 units, so both sides run fp32 matrix products "
    "(OpenVINO's and torch's oneDNN kernels, both AVX2) at about the same speed per FLOP. What the server adds over a plain "
    "encode is work it avoids and overlaps (batches of similar lengths, so less padding; two inference streams; tokenizing "
    "beside the forward pass), and on the same corpus that is the same share of the work for both models. A larger model "
    "is more compute-bound, so the ratio can only rise where the server's kernels are faster than the baseline's: with bf16 "
    "on AMX or AVX512-BF16 (about 2x per matrix product, measured on such a machine in bench/RESULTS.md), not here."
)


def render(rows: dict, tokens: dict, n: int, env: dict, rss: float, precision: str) -> list[str]:
    out = [
        "# The second model: all-mpnet-base-v2 beside all-MiniLM-L6-v2",
        "",
        f"Written by `make bench-mpnet` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {n} texts of the benchmark "
        "corpus, each model against its own baseline `SentenceTransformer.encode(batch_size=32)` in fp32, in the same run. "
        "Served: both models in one server, through Envoy's OpenAI route, 32 clients × 32 texts, cache off, measured on the "
        "corpus's second pass (the first, where the runtime compiles kernels for each new batch shape, is shown apart); server "
        "CPU is the server process tree's (user + system, from /proc, offload workers included) over the measured pass.",
        "",
        f"Machine: {env['cpu']}, {env['cores']} cores; bf16 units: {'yes' if 'amx_bf16' in env.get('cpu flags', '') or 'avx512_bf16' in env.get('cpu flags', '') else 'no'} "
        f"(served precision: {precision}); torch {env.get('torch', '?')}, openvino {env.get('openvino', '?').split('-')[0]}, "
        f"sentence-transformers {env.get('sentence-transformers', '?')}.",
        "",
        "| model | tokens | baseline tokens/s | served tokens/s | × baseline | first pass tokens/s | server CPU ms/text | cosine min | Infinity tokens/s | × baseline | cosine min |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in rows.items():
        base = tokens[name] / r["baseline_s"]
        srv = tokens[name] / r["served_s"]
        inf = tokens[name] / r["infinity_s"] if "infinity_s" in r else None
        out.append(f"| {name} | {tokens[name]:,} | {base:,.0f} | {srv:,.0f} | {srv / base:.2f} | {tokens[name] / r['first_s']:,.0f} | {r['cpu_ms_per_text']:.1f} | {r['cos']:.5f} | "
                   + (f"{inf:,.0f} | {inf / base:.2f} | {r['infinity_cos']:.5f} |" if inf else "– | – | – |"))
    out += ["", f"Server peak RSS with both models loaded (process tree): {rss:,.0f} MiB."]
    if "fp32" in precision or "float32" in precision:
        out += ["", WHY_FP32]
    versions = next((r["infinity_versions"] for r in rows.values() if "infinity_versions" in r), None)
    if versions:
        out += ["", "Infinity: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + "."]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.second_model", description=__doc__.split("\n\n")[0])
    p.add_argument("folder", help="the all-mpnet-base-v2 sentence-transformers folder (tests/second_model.py assembles it)")
    p.add_argument("--texts", type=int, default=1024)
    p.add_argument("--out", default=str(ROOT / "bench" / "MPNET.md"))
    return asyncio.run(bench(p.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
