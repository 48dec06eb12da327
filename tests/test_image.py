"""The image (`make image`), built here and run as an operator runs it: every API answers through the container's port
from outside it, it runs unprivileged on a read-only root with nothing writable (not even /tmp), ships without torch,
refuses callers from elsewhere when it has no keys, drains on SIGTERM without losing a request, and runs the server
alone for a pod's sidecar layout. tests/test_pod.py runs the pod from the same image's filesystem.

`make test-image` (and `.ci/run`) runs these; they need root, and build the image first (tests/image.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from . import image as img
from .image import Container, Netns

pytestmark = pytest.mark.image

KEY = "image-test-key-0123456789"
INWORLD_KEY, INWORLD_SECRET = "image-inworld-key-0123", "image-inworld-secret-4567"
KEYS = f"{KEY},{INWORLD_KEY}:{INWORLD_SECRET}"
# What the image's defaults are (config.py, and the Dockerfile's ENV).
HTTP, READY, METRICS, GRPC, SERVER_METRICS = 8080, 9902, 9000, 50051, 9101
GRACE = 7  # server.grace_seconds in the image (the Dockerfile's ENV): the stop fits docker stop's 10 s
MAX_IMAGE_BYTES = 1_000_000_000
# A read-only root and no tmpfs at all: the service must write nothing to start and serve.
READ_ONLY = ["--read-only", "--read-only-tmpfs=false", "--cap-drop=ALL", "--security-opt=no-new-privileges"]


@pytest.fixture
def netns():
    """A namespace per container: two containers in one would share its ports."""
    with Netns(f"emb-img-{os.getpid()}") as ns:
        yield ns


@pytest.fixture(scope="module")
def served(image):
    """The image as `docker run -e EMBED_API_KEYS=... IMAGE` runs it, on a read-only root; `served.netns` is where its
    callers run."""
    with Netns(f"emb-served-{os.getpid()}") as ns, \
            Container(image, ns, name="embedding-image-test", env={"EMBED_API_KEYS": KEYS}, options=READ_ONLY) as c:
        c.ready_seconds = c.wait_ready()
        yield c


def cosine(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_the_image_is_small_unprivileged_and_torch_free(image):
    info = img.inspect(image)
    size = info["Size"]
    config = info["Config"]
    print(f"\n{image}: {size / 1e6:.0f} MB, {len(info['RootFS']['Layers'])} layers")
    assert size <= MAX_IMAGE_BYTES, f"{size / 1e6:.0f} MB"
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["python", "-m", "service.run"]
    assert {"8080/tcp", "9000/tcp", "9902/tcp"} <= set(config["ExposedPorts"])
    assert info["Healthcheck"]["Test"] == ["CMD", "python", "-m", "service.healthcheck"]  # podman keeps it beside Config
    assert config["Labels"]["org.opencontainers.image.title"] == "embedding-service"
    run = lambda *argv: img.podman("run", "--rm", "--network", "none", "--entrypoint", argv[0], image, *argv[1:], check=False)  # noqa: E731
    assert run("id", "-u").stdout.strip() == "10001"
    no_torch = run("python", "-c", "import torch")
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr, no_torch.stderr
    for gone in ("transformers", "sentence_transformers", "grpc_tools", "bench"):
        assert run("python", "-c", f"import {gone}").returncode != 0, gone
    # Envoy is on the PATH (the pod's sidecar runs it from this image) and its descriptor set is inside.
    assert "1.40" in run("envoy", "--version").stdout
    assert run("test", "-s", "/app/gen/descriptor.pb").returncode == 0
    # The licence travels with the image, and with it the notice for the file of TEI's it carries (issue 28.4).
    assert "Apache License" in run("cat", "/app/LICENSE").stdout and "Hugging Face" in run("cat", "/app/NOTICE").stdout
    assert "--model-id ID" in run("python", "-m", "service.run", "--help").stdout
    # A model by id: the image is offline by default, so one not in its Hugging Face cache stops the start in one line
    # that says how to fetch it; the cache folder is the service user's, for a volume or a download.
    missing = run("python", "-m", "service.run", "--model-id", "acme/not-here")
    ours = [line for line in missing.stderr.splitlines() if line and not line.startswith("time=")]  # podman's own lines
    assert missing.returncode == 2 and len(ours) == 1, missing.stderr
    assert "python -m service.models download acme/not-here" in missing.stderr
    assert run("test", "-w", "/var/cache/huggingface").returncode == 0
    # The image's defaults (Envoy on every interface, a drain within docker stop's 10 s) are a file that a --config
    # replaces, as the pod's does: nothing of the image's beats the pod's configuration.
    own = run("python", "-m", "service", "--print-config").stdout
    assert "listen_host: 0.0.0.0" in own and "grace_seconds: 7.0" in own, own
    pods = run("python", "-m", "service", "--config", "/dev/null", "--print-config").stdout
    assert "listen_host: 127.0.0.1" in pods and "grace_seconds: 10.0" in pods, pods


def test_every_api_answers_through_the_containers_port(served, reference):
    netns = served.netns
    print(f"\nready in {served.ready_seconds:.0f}s")
    want = reference.encode(["The image serves every API."])[0]
    answers = netns.check("dialects", host=netns.address, port=HTTP, key=KEY, inworld_key=INWORLD_KEY, inworld_secret=INWORLD_SECRET)
    assert set(answers) == {"openai", "aigne", "tei", "ollama", "cohere", "gemini", "huggingface", "hrflow", "inworld", "grpc"}
    for dialect, answer in answers.items():
        assert "vector" in answer, (dialect, answer)
        assert len(answer["vector"]) == 384, dialect
        # The image's own precision (`auto`: bf16 where the CPU has bf16 units, fp32 elsewhere).
        assert cosine(answer["vector"], want) >= 0.999, (dialect, cosine(answer["vector"], want))
    # A key is required from a caller elsewhere.
    refused = netns.check("post", host=netns.address, port=HTTP, path="/v1/embeddings", body={"model": "x", "input": "hi"})
    assert refused["status"] == 401, refused
    # The API reference is in the image and open, Swagger UI's script included (issue 28.2)
    for path in ("/openapi.json", "/docs", "/docs/swagger-ui-bundle.js"):
        assert netns.check("get", host=netns.address, port=HTTP, path=path)["status"] == 200, path
    logs = served.logs()
    assert "exporting to ONNX" not in logs, "the image's baked export was not found"
    assert KEY not in logs and INWORLD_SECRET not in logs


def test_only_envoys_ports_are_reachable(served):
    """Readiness and metrics (the server's and Envoy's, through Envoy's bounded listener) from elsewhere; the server
    itself (gRPC and its own metrics) is on the container's loopback only."""
    netns = served.netns
    ready = netns.check("get", host=netns.address, port=READY, path="/ready")
    assert ready["status"] == 200, ready
    metrics = netns.check("get", host=netns.address, port=METRICS, path="/metrics")
    assert metrics["status"] == 200 and "embedding_requests_total" in metrics["body"], metrics
    stats = netns.check("get", host=netns.address, port=METRICS, path="/stats/prometheus")
    assert stats["status"] == 200 and "envoy_" in stats["body"]
    assert netns.check("get", host=netns.address, port=METRICS, path="/stats")["status"] == 404  # not the admin interface
    for port in (GRPC, SERVER_METRICS, 9901):
        assert netns.check("refused_connection", host=netns.address, port=port)["refused"], port


def test_an_open_image_serves_only_its_own_loopback(image, netns):
    """Without keys the service is open, so Envoy listens on loopback: a caller from elsewhere is refused a
    connection, and the log says why and what to set."""
    with Container(image, netns, name="embedding-image-open", options=READ_ONLY) as c:
        c.wait_ready()
        assert netns.check("refused_connection", host=netns.address, port=HTTP)["refused"]
        # The namespace's own loopback is the container's (they share it): a local caller is served.
        local = netns.check("post", host="127.0.0.1", port=HTTP, path="/v1/embeddings",
                            body={"model": "sentence-transformers/all-MiniLM-L6-v2", "input": "hi"})
        assert local["status"] == 200, local
        assert "Set EMBED_API_KEYS" in c.logs()


def test_sigterm_drains_without_losing_a_request(image, netns):
    """Callers keep sending while the container gets SIGTERM (`docker stop`): every request sent before the signal
    is answered; after it Envoy closes its listening socket at once, so a caller is answered, refused cleanly (503,
    or a refused connection), or, if its connection was still in the kernel's accept queue as the socket closed,
    reset before any answer (as with any server that stops listening); Envoy is stopped only once it holds no caller's
    connection (before this was so, callers it had accepted were cut at its exit); the container exits 0 within the
    grace period."""
    with Container(image, netns, name="embedding-image-drain", env={"EMBED_API_KEYS": KEYS}, options=READ_ONLY) as c:
        c.wait_ready()
        args = json.dumps({"host": netns.address, "port": HTTP, "key": KEY, "workers": 4, "seconds": 90})
        load = subprocess.Popen(["ip", "netns", "exec", netns.name, sys.executable, "-m", "tests.image_checks", "load", args],
                                cwd=img.ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert load.stdout is not None
        assert load.stdout.readline().strip() == "started", load.stderr.read() if load.poll() is not None else "no start"
        time.sleep(1.0)
        signalled = time.time()
        img.podman("kill", "--signal", "TERM", c.name)
        img.podman("wait", c.name, timeout=GRACE + 30)
        exited = time.time()
        out, err = load.communicate(timeout=120)
        state = c.state()
        results = json.loads(out.strip().splitlines()[-1])["results"]
        logs = c.logs()
    kinds: dict[str, int] = {}
    for r in results:
        kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
    before = [r for r in results if r["sent"] < signalled]
    in_flight = [r for r in before if r["done"] >= signalled]
    print(f"\n{len(results)} requests: {kinds}; {len(in_flight)} in flight at SIGTERM; exited {exited - signalled:.1f}s after it")
    assert all(r["kind"] == "ok" for r in before), [r for r in before if r["kind"] != "ok"][:5]
    # A reset with no answer: the connection was in an accept queue as the listening sockets closed (one per Envoy
    # worker), all within a moment; anything else is a request lost.
    unaccepted = [r for r in results if r["kind"].startswith("lost: ConnectionReset") and r["sent"] >= signalled]
    if unaccepted:
        assert max(r["done"] for r in unaccepted) - min(r["sent"] for r in unaccepted) < 0.1, unaccepted
    lost = [{**r, "sent": round(r["sent"] - signalled, 3), "done": round(r["done"] - signalled, 3)}
            for r in results if r["kind"].startswith("lost") and r not in unaccepted]
    assert not lost, (lost[:8], logs[-3000:])
    assert "Envoy was stopped holding" not in logs, logs[-3000:]
    assert state["ExitCode"] == 0, (state, logs[-3000:])
    assert exited - signalled <= 10  # docker stop's default before SIGKILL
    assert "stopped." in logs


def test_the_server_runs_alone_for_a_pods_sidecar_layout(image, netns):
    """`--server-only`: the gRPC server without Envoy (the pod runs Envoy from this image in its own container)."""
    env = {"EMBED_API_KEYS": KEYS, "EMBED__SERVER__HOST": "0.0.0.0"}
    with Container(image, netns, "--server-only", name="embedding-image-server", env=env, options=READ_ONLY) as c:
        deadline = time.monotonic() + 240
        while True:
            health = netns.python("-c", GRPC_HEALTH, f"{netns.address}:{GRPC}")
            if health.stdout.strip() == "SERVING":
                break
            assert time.monotonic() < deadline and c.state()["Running"], (health.stdout, health.stderr[-500:], c.logs()[-3000:])
            time.sleep(1)
        assert netns.check("refused_connection", host=netns.address, port=HTTP)["refused"]  # no Envoy
        assert c.exec("python", "-m", "service.healthcheck").returncode == 0  # the HEALTHCHECK asks the server itself


GRPC_HEALTH = """
import sys, grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
try:
    with grpc.insecure_channel(sys.argv[1]) as ch:
        print(health_pb2.HealthCheckResponse.ServingStatus.Name(health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2).status))
except grpc.RpcError as e:
    print(e.code().name)
"""
