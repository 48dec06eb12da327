"""Infinity (`infinity-emb`) in process, as its Python users run it: `AsyncEmbeddingEngine` from `EngineArgs`.

Runs in .venv-peers-infinity. Each mode is loaded from a local sentence-transformers folder (no hub access):
the `torch` engine reads the model's safetensors through sentence-transformers; the `optimum` engine reads an
ONNX file from the folder through optimum's ORTModelForFeatureExtraction (there it must be told the pooling:
its `auto` means CLS pooling, wrong for this model). The load is the workload of our "engine in process" rows:
C concurrent callers of `engine.embed(sentences=...)`, each sending the next N texts of the corpus.
"""

from __future__ import annotations

import asyncio
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")  # Infinity's anonymous usage statistics off
os.environ.setdefault("INFINITY_ANONYMOUS_USAGE_STATS", "0")

import numpy as np  # noqa: E402
from _common import chunks, load_job, percentiles, save_run, versions, write  # noqa: E402


async def drive(engine, texts: list[str], c: int, n: int) -> tuple[float, list[float], int, np.ndarray | None]:
    requests = chunks(texts, n)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(requests)):
        queue.put_nowait(i)
    out: dict[int, list] = {}
    lat: list[float] = []
    errors = 0

    async def worker() -> None:
        nonlocal errors
        while not queue.empty():
            i = queue.get_nowait()
            t0 = time.perf_counter()
            try:
                out[i], _ = await engine.embed(sentences=requests[i])
            except Exception:
                errors += 1
            lat.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(c)])
    seconds = time.perf_counter() - t0
    vectors = np.concatenate([np.asarray(out[i]) for i in range(len(requests))]) if len(out) == len(requests) else None
    return seconds, lat, errors, vectors


async def run_mode(mode: dict, job: dict, folder, result: dict) -> None:
    from infinity_emb import AsyncEmbeddingEngine, EngineArgs

    texts = job["texts"]
    kwargs = dict(
        model_name_or_path=mode["model"],
        engine=mode["engine"],
        device="cpu",
        batch_size=job.get("batch_size", 32),
        vector_disk_cache_path=False,  # no cache: every text is computed, as in ours
        model_warmup=False,  # our own warm-up below, as for ours
        **mode.get("args", {}),
    )
    cwd = os.getcwd()
    if mode.get("cwd"):
        os.chdir(mode["cwd"])  # see peers.py: the optimum engine wants the folder as "."
    t0 = time.perf_counter()
    engine = AsyncEmbeddingEngine.from_args(EngineArgs(**kwargs))
    os.chdir(cwd)
    load_s = time.perf_counter() - t0
    async with engine:
        await drive(engine, texts[:256], 32, 32)  # warm-up
        for c, n in job["grid"]:
            seconds, lat, errors, vectors = await drive(engine, texts, c, n)
            p50, p99 = percentiles(lat)
            save_run(folder, result, f"AsyncEmbeddingEngine, {mode['label']}", vectors, mode=mode["label"], seconds=seconds,
                     concurrency=c, per_request=n, errors=errors, p50_ms=p50, p99_ms=p99, load_s=load_s)
        short = job["short_text"]
        for _ in range(20):
            await engine.embed(sentences=[short])
        lat = []
        for _ in range(job["short_count"]):
            t0 = time.perf_counter()
            await engine.embed(sentences=[short])
            lat.append(time.perf_counter() - t0)
        result["short"][f"AsyncEmbeddingEngine, {mode['label']}"] = percentiles(lat)
        write(folder, result)


def main() -> None:
    job, folder = load_job()
    import torch

    result = {
        "versions": versions("infinity-emb", "torch", "transformers", "sentence-transformers", "optimum", "optimum-onnx", "onnxruntime", "numpy"),
        "runs": [],
        "short": {},
        "notes": [f"torch threads {torch.get_num_threads()}"],
    }
    for mode in job["modes"]:
        try:
            asyncio.run(run_mode(mode, job, folder, result))
        except Exception as e:  # one mode failing is reported, the others still run
            result["notes"].append(f"{mode['label']}: failed: {type(e).__name__}: {e}")
            write(folder, result)


if __name__ == "__main__":
    main()
