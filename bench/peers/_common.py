"""Shared by the peer runners, which run in the peers' own virtual environments (never in ours).

A runner is started as `<venv>/bin/python bench/peers/<peer>_runner.py JOB` by bench/peers.py;
JOB is a JSON file with the corpus and the settings; the runner writes `result.json` (and one `.npy` of vectors
per throughput run) into the job's folder. Only the standard library and numpy are used here.
"""

from __future__ import annotations

import json
import os
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np


def load_job() -> tuple[dict, Path]:
    path = Path(sys.argv[1])
    return json.loads(path.read_text()), path.parent


def versions(*names: str) -> dict[str, str]:
    found = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def percentiles(latencies_s: list[float]) -> tuple[float, float]:
    lat = np.array(latencies_s) * 1000 if latencies_s else np.zeros(1)
    return float(np.percentile(lat, 50)), float(np.percentile(lat, 99))


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def chunks(texts: list[str], n: int) -> list[list[str]]:
    return [texts[i : i + n] for i in range(0, len(texts), n)]


def time_calls(fn, count: int, warmup: int = 20) -> tuple[float, float]:
    """p50 and p99 in ms of `count` sequential calls of fn() after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    lat = []
    for _ in range(count):
        t0 = time.perf_counter()
        fn()
        lat.append(time.perf_counter() - t0)
    return percentiles(lat)


def save_run(folder: Path, result: dict, name: str, vectors: np.ndarray | None, **fields) -> None:
    """Records one throughput run (and its vectors, for the fidelity check)."""
    run = {"name": name, **fields}
    if vectors is not None:
        file = f"vectors-{len(result['runs'])}.npy"
        np.save(folder / file, np.asarray(vectors, dtype=np.float32))
        run["vectors"] = file
    result["runs"].append(run)
    write(folder, result)


def write(folder: Path, result: dict) -> None:
    result["rss_mib"] = peak_rss_mib()
    tmp = folder / f"result.json.tmp{os.getpid()}"
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, folder / "result.json")
