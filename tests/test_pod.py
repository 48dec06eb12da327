"""The rendered pod, run the way the kubelet runs it (tests/podsim.py) from the built image's filesystem (what ships,
not this checkout): it becomes Ready within its startup budget with probes sent to its address from outside its
network namespace, runs unprivileged on a read-only root, rolls out behind a Service without losing a request, and
takes a rotated Secret without a signal.

It needs root (network and mount namespaces) and the image (`make test-image` builds it); CI has both, so without
them this fails rather than skips.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from service import deploy
from service.config import DEFAULT_MODEL_ID

from . import image as img
from . import podsim
from .podsim import Kubelet, PodSimError, check_hook, load_manifests

pytestmark = pytest.mark.image

ROOT = Path(__file__).resolve().parents[1]
OLD_KEY, NEW_KEY = "podsim-key-before-rotation", "podsim-key-after-rotation"
# Endpoint changes reach the Service's data plane this long after the controller publishes them (kube-proxy and
# mesh sidecars are not instant); the server's drain delay must cover it.
PROPAGATION_DELAY = 1.0
# The Service's clients: each sends one small request after the other, with a short pause (2 cores run two pods,
# three Envoys and this load).
LOAD = {"workers": 4, "pause": 0.02, "max_seconds": 150, "max_requests_per_worker": 20_000, "timeout": 30}


def keys_secret(key: str) -> dict:
    return {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": deploy.KEYS_SECRET}, "type": "Opaque",
        "stringData": {"keys.yaml": f"keys:\n  - name: podsim\n    key: {key}\n"},
    }


def keys_files(key: str) -> dict[str, bytes]:
    return {k: v.encode() for k, v in keys_secret(key)["stringData"].items()}


@pytest.fixture(scope="module")
def manifests():
    """deploy/ as committed (test_deploy keeps it current) and the keys Secret an operator creates: what
    `kubectl apply -k deploy/` needs."""
    return load_manifests(ROOT / "deploy", [keys_secret(OLD_KEY)])


@pytest.fixture(scope="module")
def images(image):
    """The image both containers run: the built one's filesystem and config."""
    with img.mounted(image) as rootfs:
        yield {deploy.IMAGE: podsim.built_image(img.inspect(image)["Config"], rootfs, main_binary="python")}


def request(kubelet: Kubelet, host: str, port: int, key: str) -> dict:
    body = json.dumps({"input": ["rotation check"], "model": DEFAULT_MODEL_ID})
    return kubelet.agent.call("http", host=host, port=port, path="/v1/embeddings", method="POST", body=body, timeout=10,
                              headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})


def assert_unprivileged(pod: podsim.Pod) -> None:
    """What the kernel says about each container's process: its ids, capabilities, no_new_privs, read-only root."""
    for c in pod.containers:
        sc = c.spec["securityContext"]
        status = podsim.process_status(c.proc.pid)
        assert status["Uid"].split() == [str(sc["runAsUser"])] * 4, (c.name, status["Uid"])
        assert status["Gid"].split() == [str(sc["runAsGroup"])] * 4, (c.name, status["Gid"])
        assert str(pod.spec["securityContext"]["fsGroup"]) in status["Groups"].split()
        for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(status[caps], 16) == 0, (c.name, caps, status[caps])
        assert status["NoNewPrivs"] == "1", c.name
        assert "ro" in podsim.root_mount_options(c.proc.pid), c.name


def test_a_hook_that_needs_a_tool_the_image_lacks_fails_the_pod(images):
    image = images[deploy.IMAGE]
    # The manifest's own hooks pass.
    for c in deploy.render(deploy.Config().validate())["deployment.yaml"]["spec"]["template"]["spec"]["containers"]:
        check_hook(c, images[c["image"].rsplit(":", 1)[0]])
    # What deploy/ once shipped (wget inside Envoy's image), or curl: not in this image either.
    with pytest.raises(PodSimError, match="does not certainly have"):
        check_hook({"name": "envoy", "lifecycle": {"preStop": {"exec": {"command": ["wget", "-qO-", "http://127.0.0.1:9901/ready"]}}}}, image)
    with pytest.raises(PodSimError, match="does not certainly have"):
        check_hook({"name": "envoy", "lifecycle": {"preStop": {"exec": {"command": ["curl", "-X", "POST", "localhost:9901/drain_listeners"]}}}}, image)
    # Programs the image holds, or Kubernetes' own actions, are fine.
    check_hook({"name": "envoy", "lifecycle": {"preStop": {"exec": {"command": ["envoy", "--version"]}}}}, image)
    check_hook({"name": "server", "lifecycle": {"preStop": {"exec": {"command": ["python", "-m", "service.healthcheck"]}}}}, image)
    check_hook({"name": "envoy", "lifecycle": {"preStop": {"httpGet": {"path": "/x", "port": 9902}}}}, image)
    assert podsim.expand("$(A)-$$(A)-$(B)", {"A": "x"}) == "x-$(A)-$(B)"


def test_the_pod_becomes_ready_rolls_out_without_loss_and_runs_unprivileged(manifests, images, tmp_path):
    podsim.preflight()
    started = time.monotonic()
    deployment = manifests[("Deployment", deploy.APP)]
    template = deployment["spec"]["template"]
    containers = {c["name"]: c for c in template["spec"]["containers"]}
    startup_budget = max(c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] for c in containers.values())
    report: dict = {}
    with Kubelet(tmp_path, template, manifests, images, propagation_delay=PROPAGATION_DELAY) as kubelet:
        host, port = kubelet.start_service(manifests[("Service", deploy.APP)])

        def ready(pod: podsim.Pod) -> bool:
            if pod.failures():
                raise AssertionError(f"{pod.name}: {pod.failures()}\n{logs(pod)}")
            return pod.ready

        def logs(pod: podsim.Pod) -> str:
            return "\n".join(f"--- {c.name}\n{(pod.dir / f'{c.name}.log').read_text(errors='replace')[-3000:]}" for c in pod.containers)

        # 1. The first pod: Ready within its startup budget, from probes at its address.
        a = kubelet.run_pod("a")
        try:
            report["a_ready_seconds"] = round(kubelet.wait(lambda: ready(a), startup_budget, "pod a to be Ready"), 1)
        except PodSimError:
            raise AssertionError(f"pod a not Ready in {startup_budget}s:\n{logs(a)}\n{kubelet.events}") from None
        assert_unprivileged(a)
        server_log = (a.dir / "server.log").read_text()
        assert "exporting to ONNX" not in server_log, "the image's baked export was not found: the server exported at start"
        kubelet.wait(lambda: kubelet.front_endpoints() == {a.ip}, 10, "the Service to send to pod a")

        # 2. A rollout under load: the new pod comes up, then the old one is deleted.
        kubelet.agent.call("load_start", name="rollout", host=host, port=port, path="/v1/embeddings", model=DEFAULT_MODEL_ID,
                           headers={"Authorization": f"Bearer {OLD_KEY}"}, upstream_header="x-podsim-upstream", **LOAD)
        b = kubelet.run_pod("b")
        report["b_ready_seconds"] = round(kubelet.wait(lambda: ready(b), startup_budget, "pod b to be Ready"), 1)
        # The Deployment controller deletes the old pod as soon as the new one is Ready (maxUnavailable: 0).
        deleted_wall = time.time()  # the load agent stamps its answers with the wall clock
        a.delete()
        a.wait_terminated(a.grace + 10)
        # Load goes on past the old pod's end, through the new one alone, for a few more requests.
        kubelet.wait(lambda: kubelet.front_endpoints() == {b.ip}, 10, "the Service to send to pod b alone")
        done = kubelet.agent.call("load_peek", name="rollout")["ok"]
        kubelet.wait(lambda: kubelet.agent.call("load_peek", name="rollout")["ok"] >= done + 50, 30, "more requests after the old pod's end")
        load = kubelet.agent.call("load_stop", name="rollout", wait=60)

        # 3. The keys Secret changes: the kubelet swaps the files in place; no signal is sent.
        b.rotate_secret("keys", keys_files(NEW_KEY))
        rotated = time.monotonic()
        kubelet.wait(lambda: request(kubelet, host, port, NEW_KEY).get("status") == 200, 20, "the new key to be accepted")
        report["key_rotation_seconds"] = round(time.monotonic() - rotated, 1)
        old_key = request(kubelet, host, port, OLD_KEY)
        assert old_key["status"] == 401, old_key

        assert not b.failures(), b.failures()
        events = [f"{e.at:7.2f} {e.pod}/{e.container}: {e.what}" for e in kubelet.events]

    # -- what happened --------------------------------------------------------------------------------------------
    print("\n".join(events))
    by_container = {c.name: c for c in a.containers}
    server, sidecar = by_container["server"], by_container["envoy"]
    report.update({
        "requests": load["sent"], "failed": load["failed"], "by_pod": load["by_upstream"],
        "server_exit_after_sigterm": round(server.exited_at - server.sigterm_at, 1) if server.sigterm_at else None,
        "envoy_exit_after_sigterm": round(sidecar.exited_at - sidecar.sigterm_at, 2) if sidecar.sigterm_at else None,
        "pod_gone_after_deletion": round(max(c.exited_at for c in a.containers) - a.deleted_at, 1),
        "grace": a.grace, "endpoints": kubelet.endpoints.history, "total_seconds": round(time.monotonic() - started, 1),
    })
    print(json.dumps(report, indent=1))
    assert not a.failures(), "\n".join(a.failures() + events)
    assert load["failed"] == 0, json.dumps(load["failures"], indent=1)
    for c in a.containers:
        assert not c.killed and c.exited_at - a.deleted_at <= a.grace, (c.name, c.exited_at - a.deleted_at, a.grace)
        assert c.proc.returncode == 0, (c.name, c.proc.returncode)
    # The order: the server got SIGTERM at deletion (no hook), drained and exited; only then was Envoy stopped.
    assert server.sigterm_at - a.deleted_at < 0.5
    assert server.exited_at < sidecar.sigterm_at, "Envoy was stopped while the server still drained"
    assert sidecar.hook_seconds >= containers["envoy"]["lifecycle"]["preStop"]["sleep"]["seconds"] - 0.5
    pod_a, pod_b = f"{a.ip}:", f"{b.ip}:"
    served = {ip: sum(n for up, n in load["by_upstream"].items() if up.startswith(ip)) for ip in (pod_a, pod_b)}
    assert served[pod_a] > 0 and served[pod_b] > 0, served
    # The drain carried traffic: the old pod still answered after its deletion, while its endpoint's removal travelled.
    last_a = max(t for up, t in load["last_ok"].items() if up.startswith(pod_a))
    assert last_a > deleted_wall, ("pod a answered nothing after its deletion", last_a - deleted_wall)
    assert report["a_ready_seconds"] <= startup_budget and report["b_ready_seconds"] <= startup_budget
