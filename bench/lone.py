"""A lone short text's forward pass under the runtime options a latency-tuned server could pick instead.

A 10–16-word text pads to 16 or 32 tokens; alone it runs on the latency-compiled model (one stream over every core).
Each option here runs in a process of its own (so its memory is its own), twice, in alternating order (this VM's speed
drifts): the default's bf16 model compiled for one static shape per lone width, the dynamic-shape model every other
batch runs on, fp32, one thread instead of all, and onnxruntime fp32. Reported: p50/p99 per shape back to back, p50
after an idle gap of `IDLE` seconds before each pass (a served request comes after one: the client, Envoy and gRPC run
in between, and on a shared host the caches go cold in it), the resident memory the option's models add, and the
cosine of their output to the default's (the same ids through both).

Run by `make bench` (`stages`), or alone: `python -m bench.lone`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

SHAPES = (16, 24, 32)  # the widths a short text runs at alone (OpenVinoRuntime.lone_widths)
RUNS = 300
IDLE = 0.003  # about what a served short text spends outside the forward pass (client, Envoy, gRPC, tokenizing)
OPTIONS = {
    "openvino bf16, one static shape per width (the default)": ("openvino", "bf16", "static", 0),
    "openvino bf16, dynamic shape": ("openvino", "bf16", "dynamic", 0),
    "openvino fp32, dynamic shape": ("openvino", "f32", "dynamic", 0),
    "openvino bf16, dynamic shape, one thread": ("openvino", "bf16", "dynamic", 1),
    "onnxruntime fp32": ("onnxruntime", "f32", "dynamic", 0),
}


def _rss_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _feeds(names: list[str], width: int) -> dict[str, np.ndarray]:
    ids = np.random.default_rng(width).integers(1000, 20000, size=(1, width)).astype(np.int64)
    ids[0, 0], ids[0, -1] = 101, 102
    given = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    return {n: given[n] for n in names}


def _child(option: str) -> dict:
    """One option, in this process: {shape: [p50, p99]}, the MiB its models add, its pooled first token per shape."""
    sys.modules.setdefault("openvino_telemetry", None)
    from service.config import default_model_path
    from service.runtimes import threads
    from service.runtimes.export import onnx_model

    runtime, precision, shape, n_threads = OPTIONS[option]
    n_threads = n_threads or threads.available_cpus()
    path = str(onnx_model(default_model_path()))
    if runtime == "openvino":
        import openvino as ov

        core = ov.Core()
        names = [i.get_any_name() for i in core.read_model(path).inputs]
        before = _rss_mib()
        cfg = {"INFERENCE_NUM_THREADS": n_threads, "INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
        runners = {}
        source = core.read_model(path)
        for width in SHAPES:
            if shape == "static" or not runners:
                model = source.clone()  # sharing the source's weights, as the runtime's own static models do
                if shape == "static":
                    model.reshape({n: [1, width] for n in names})
                request = core.compile_model(model, "CPU", cfg).create_infer_request()
            runners[width] = (lambda r: (lambda f: np.asarray(r.infer(f)[0])))(request)
    else:
        import onnxruntime as ort

        before = _rss_mib()
        options = ort.SessionOptions()
        options.intra_op_num_threads = n_threads
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        runners = {w: (lambda f: session.run(None, f)[0]) for w in SHAPES}
    out: dict = {"latency": {}, "vectors": {}}
    for width in SHAPES:
        feeds, run = _feeds(names, width), runners[width]
        for _ in range(30):
            run(feeds)
        times, idle_times = [], []
        for _ in range(RUNS):
            t0 = time.perf_counter()
            run(feeds)
            times.append(time.perf_counter() - t0)
        for _ in range(RUNS):
            time.sleep(IDLE)
            t0 = time.perf_counter()
            run(feeds)
            idle_times.append(time.perf_counter() - t0)
        out["latency"][width] = [float(np.percentile(times, 50)) * 1000, float(np.percentile(times, 99)) * 1000,
                                 float(np.percentile(idle_times, 50)) * 1000]
        out["vectors"][width] = run(feeds)[0].mean(axis=0).astype(float).tolist()
    out["added_mib"] = _rss_mib() - before
    return out


def measure(say=print) -> list[dict]:
    """Every option, each in a child process, twice in alternating order: rows of {option, shape, p50, p99, idle_p50, mib,
    cosine}."""
    order = list(OPTIONS)
    results: dict[str, list[dict]] = {o: [] for o in order}
    for round_ in (order, order[::-1]):
        for option in round_:
            env = {**os.environ, "GRPC_VERBOSITY": "ERROR"}
            proc = subprocess.run([sys.executable, "-m", "bench.lone", "--child", option], capture_output=True, text=True, env=env,
                                  cwd=ROOT, timeout=600)
            if proc.returncode != 0:
                say(f"   {option}: failed ({proc.stderr.strip().splitlines()[-1:]})")
                continue
            results[option].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    rows = []
    default = results[order[0]]
    for option in order:
        runs = results[option]
        if not runs:
            continue
        for width in SHAPES:
            key = str(width)
            p50 = float(np.median([r["latency"][key][0] for r in runs]))
            p99 = float(np.median([r["latency"][key][1] for r in runs]))
            idle_p50 = float(np.median([r["latency"][key][2] for r in runs]))
            cos = float("nan")
            if default:
                a, b = np.array(default[0]["vectors"][key]), np.array(runs[0]["vectors"][key])
                cos = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
            rows.append({"option": option, "shape": width, "p50": p50, "p99": p99, "idle_p50": idle_p50,
                         "mib": float(np.median([r["added_mib"] for r in runs])), "cosine": cos})
            say(f"   {option:46} 1×{width}: p50 {p50:5.2f} ms  p99 {p99:5.2f} ms  after {IDLE * 1000:.0f} ms idle p50 {idle_p50:5.2f} ms  +{rows[-1]['mib']:.0f} MiB  cosine {cos:.6f}")
    return rows


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(_child(sys.argv[2])))
    else:
        measure()
