"""Thread counts, set once for the process, so tokenizer, runtime and gRPC threads don't oversubscribe.

The runtime gets `n` intra-op threads (every CPU the process may use by default: the forward pass is the
work); its inter-op pool is 1; tokenization runs on a small pool with the tokenizers library's own
parallelism off; the gRPC server is one asyncio thread.

"Every CPU the process may use" is the smallest of: the CPUs of its affinity mask, and its cgroup's CPU
quota (rounded up). In a Kubernetes pod with `limits.cpu: 2` on a 64-core node, the affinity mask still
lists 64 cores; the quota (cgroup v2 `cpu.max`, v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`) says 2, and
64 streams in a 2-CPU quota would spend their time throttled.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = "/sys/fs/cgroup"
PROC_SELF_CGROUP = "/proc/self/cgroup"

_configured: int | None = None


def affinity_cpus() -> int:
    """CPUs this process may be scheduled on (its affinity mask; all online CPUs where that is unknown)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, ValueError):
        return None


def _own_paths(proc_self_cgroup: str) -> tuple[str | None, str | None]:
    """This process's cgroup path in the v2 hierarchy and in v1's cpu controller, from /proc/self/cgroup."""
    text = _read(Path(proc_self_cgroup)) or ""
    v2 = v1 = None
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hid, controllers, path = parts
        if hid == "0" and controllers == "":
            v2 = path
        elif "cpu" in controllers.split(","):
            v1 = path
    return v2, v1


def _candidates(mount: Path, own: str | None) -> list[Path]:
    """The process's own cgroup folder and its ancestors up to the mount (a parent's limit binds its children).

    Inside a container with a cgroup namespace the mount *is* the container's cgroup and `own` is "/"; without
    one, `own` may name a path that does not exist under this mount: then only the mount itself is read.
    """
    folders: list[Path] = []
    if own and own != "/":
        folder = mount / own.lstrip("/")
        if folder.is_dir():
            while True:
                folders.append(folder)
                if folder == mount or mount not in folder.parents:
                    break
                folder = folder.parent
            return folders
    return [mount]


def _v2_quota(folder: Path) -> float | None:
    text = _read(folder / "cpu.max")
    if not text:
        return None
    fields = text.split()
    if not fields or fields[0] == "max":
        return None
    try:
        quota = int(fields[0])
        period = int(fields[1]) if len(fields) > 1 else 100_000
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _v1_quota(folder: Path) -> float | None:
    quota, period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
    try:
        q, p = int(quota or ""), int(period or "")
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None  # -1: no quota


def cgroup_cpu_quota(root: str | os.PathLike = CGROUP_ROOT, proc_self_cgroup: str = PROC_SELF_CGROUP) -> float | None:
    """The CPU quota of this process's cgroup in CPUs (e.g. 1.5), the tightest along its ancestors; None if unlimited.

    cgroup v2 first (`<root>/cpu.max`, or the hybrid layout's `<root>/unified`), then v1's cpu controller
    (`<root>/cpu` or `<root>/cpu,cpuacct`). Missing or unreadable files mean no known limit.
    """
    root = Path(root)
    v2_path, v1_path = _own_paths(proc_self_cgroup)
    quotas: list[float] = []
    for mount in (root, root / "unified"):
        if (mount / "cgroup.controllers").exists() or (mount / "cpu.max").exists():
            quotas += [q for f in _candidates(mount, v2_path) if (q := _v2_quota(f)) is not None]
            if quotas:
                return min(quotas)
    for name in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        mount = root / name
        if mount.is_dir():
            quotas += [q for f in _candidates(mount, v1_path) if (q := _v1_quota(f)) is not None]
            if quotas:
                return min(quotas)
    if (root / "cpu.cfs_quota_us").exists():  # a v1 cpu controller mounted at the root itself
        q = _v1_quota(root)
        return q
    return None


def available_cpus(cgroup_root: str | os.PathLike = CGROUP_ROOT, proc_self_cgroup: str = PROC_SELF_CGROUP) -> int:
    """CPUs this process can keep busy: ceil(cgroup quota), at least 1, at most its affinity count."""
    cpus = affinity_cpus()
    quota = cgroup_cpu_quota(cgroup_root, proc_self_cgroup)
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota - 1e-9)))
    return max(1, cpus)


def inference_threads(requested: int = 0, cgroup_root: str | os.PathLike = CGROUP_ROOT, proc_self_cgroup: str = PROC_SELF_CGROUP) -> int:
    """`requested` if set, else one thread per CPU the process may use (see `available_cpus`)."""
    return requested if requested > 0 else available_cpus(cgroup_root, proc_self_cgroup)


def configure(requested: int = 0) -> int:
    """Applies the thread settings (idempotent); returns the runtime's thread count."""
    global _configured
    n = inference_threads(requested)
    if _configured == n:
        return n
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ.setdefault("OMP_NUM_THREADS", str(n))
    _configured = n
    return n


def configure_torch(n: int) -> None:
    """torch's pools, set when (and only if) the torch runtime is used: a server on OpenVINO never imports torch."""
    import torch

    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # only settable before the first parallel op; already set is fine
        pass


# oneDNN's primitive cache for a server that runs a model on torch/bf16 (set at process start; see below).
ONEDNN_PRIMITIVE_CACHE = 16
ONEDNN_CACHE_VARS = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "DNNL_PRIMITIVE_CACHE_CAPACITY")


def bound_onednn_cache(modes: list[tuple[str, str]], environ=os.environ) -> bool:
    """Bounds oneDNN's primitive cache when the process will run a model on torch/bf16; True if it set it.

    torch's bf16 matmuls run through oneDNN, which keeps every primitive it built (one per operation and input shape)
    in a cache of 1,024 by default: with the batcher's varied shapes, a served torch/bf16 process grew from 484 MiB
    after loading to 851-915 MiB after the benchmark corpus at 32 x 32, over the 819 MiB line (1 GiB less 20%
    headroom). Bounded to 16: 758-782 MiB, at 4-5% of that mode's tokens/s (166 against 174 texts/s, three
    alternating served runs each). Other modes are left alone (OpenVINO carries its own oneDNN).

    oneDNN reads the variable once, when it builds its first primitive, so this runs at process start, before any
    model loads; an operator's own value (either of oneDNN's names for it) wins. Children of the server inherit it.
    """
    if ("torch", "bf16") not in modes or any(name in environ for name in ONEDNN_CACHE_VARS):
        return False
    environ[ONEDNN_CACHE_VARS[0]] = str(ONEDNN_PRIMITIVE_CACHE)
    return True
