"""Inference threads follow the pod's CPU quota (cgroup v2 `cpu.max`, v1 CFS files), not the node's cores."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.runtimes import threads


@pytest.fixture(autouse=True)
def many_cores(monkeypatch):
    """A 64-core node: what the affinity mask says in a pod that has no cpuset of its own."""
    monkeypatch.setattr(threads, "affinity_cpus", lambda: 64)


def cgroup(tmp_path: Path, files: dict[str, str], self_cgroup: str = "0::/\n") -> tuple[str, str]:
    root = tmp_path / "cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    root.mkdir(exist_ok=True)
    proc = tmp_path / "self-cgroup"
    proc.write_text(self_cgroup)
    return str(root), str(proc)


@pytest.mark.parametrize(
    "cpu_max, expected",
    [("200000 100000\n", 2), ("150000 100000\n", 2), ("50000 100000\n", 1), ("400000 100000\n", 4), ("max 100000\n", 64), ("1000 1000", 1)],
)
def test_cgroup_v2_quota(tmp_path, cpu_max, expected):
    root, proc = cgroup(tmp_path, {"cgroup.controllers": "cpu memory\n", "cpu.max": cpu_max})
    assert threads.inference_threads(0, root, proc) == expected


def test_cgroup_v2_without_a_namespace_reads_the_own_cgroup_and_its_parents(tmp_path):
    """No cgroup namespace: /proc/self/cgroup names the pod's folder under the host's hierarchy; a parent's
    (the pod's) quota binds the container's unlimited one."""
    own = "kubepods.slice/kubepods-pod1.slice/cri-containerd-abc.scope"
    root, proc = cgroup(
        tmp_path,
        {"cgroup.controllers": "cpu\n", f"{own}/cpu.max": "max 100000\n", "kubepods.slice/kubepods-pod1.slice/cpu.max": "300000 100000\n",
         "kubepods.slice/cpu.max": "max 100000\n"},
        self_cgroup=f"0::/{own}\n",
    )
    assert threads.available_cpus(root, proc) == 3


def test_cgroup_v1_quota(tmp_path):
    root, proc = cgroup(tmp_path, {"cpu,cpuacct/cpu.cfs_quota_us": "250000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"},
                        self_cgroup="4:cpu,cpuacct:/\n1:name=systemd:/\n")
    assert threads.inference_threads(0, root, proc) == 3


def test_cgroup_v1_no_quota_and_hybrid_layout(tmp_path):
    """The hybrid layout (v2 at /unified without the cpu controller, v1 cpu beside it); -1 means no quota."""
    root, proc = cgroup(
        tmp_path,
        {"unified/cgroup.controllers": "", "cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"},
        self_cgroup="3:cpu:/\n0::/\n",
    )
    assert threads.inference_threads(0, root, proc) == 64
    (Path(root) / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    assert threads.inference_threads(0, root, proc) == 1


def test_missing_or_unreadable_cgroup_files_mean_no_limit(tmp_path):
    root, proc = cgroup(tmp_path, {})
    assert threads.inference_threads(0, root, proc) == 64
    assert threads.inference_threads(0, str(tmp_path / "nowhere"), str(tmp_path / "nothing")) == 64
    root, proc = cgroup(tmp_path / "garbage", {"cgroup.controllers": "", "cpu.max": "lots\n"})
    assert threads.inference_threads(0, root, proc) == 64


def test_the_quota_never_raises_the_count_above_the_affinity(tmp_path, monkeypatch):
    monkeypatch.setattr(threads, "affinity_cpus", lambda: 2)
    root, proc = cgroup(tmp_path, {"cgroup.controllers": "", "cpu.max": "800000 100000\n"})
    assert threads.inference_threads(0, root, proc) == 2


def test_an_explicit_count_wins(tmp_path):
    root, proc = cgroup(tmp_path, {"cgroup.controllers": "", "cpu.max": "100000 100000\n"})
    assert threads.inference_threads(6, root, proc) == 6


def test_this_machine_has_a_sane_answer():
    assert 1 <= threads.available_cpus() <= threads.affinity_cpus()


def test_the_runtime_gets_the_quota_not_the_nodes_cores(monkeypatch):
    """The count reaches the forward pass: a pod limited to 1 CPU on a 64-core node compiles one stream of one
    thread, not 64 (each stream holds its own buffers: 64 of them in a 2 GiB limit)."""
    import os

    from service.config import LimitsConfig, ModelConfig
    from service.engine.models import load_model

    monkeypatch.setattr(threads, "cgroup_cpu_quota", lambda *_args: 1.0)
    monkeypatch.setattr(threads, "_configured", None)
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", str(os.cpu_count())))  # restored after
    model = load_model(ModelConfig(runtime="openvino", precision="fp32"), LimitsConfig(), inference_threads=0)
    assert model.runtime.streams == 1
    assert int(model.runtime._throughput.get_property("INFERENCE_NUM_THREADS")) == 1
    assert int(model.runtime._latency.get_property("INFERENCE_NUM_THREADS")) == 1
