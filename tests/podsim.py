"""A tiny kubelet: runs the rendered pod's containers the way Kubernetes would, on this machine, as root.

What it does with the manifests in deploy/ (the Deployment, its ConfigMaps, the Secrets):
- Network: a "node" network namespace with a bridge (10.213.0.1/24), and per pod a network namespace with
  its own address on a veth pair into that bridge. Every address lives inside namespaces made here; they
  are removed at the end, with every process in them, whatever happened.
- Containers: each container is a process in its pod's network namespace and a mount namespace of its own,
  whose root is a fresh tmpfs holding only its image (see `Image`) and the manifest's volumes at their
  mountPaths (ConfigMaps and Secrets laid out as the kubelet's atomic writer does, `..data` symlink and all;
  emptyDirs writable; /dev/shm per pod), then made read-only when the manifest says readOnlyRootFilesystem.
  The process runs as the manifest's runAsUser/runAsGroup (fsGroup as a supplementary group), with no
  capabilities left in any set and no_new_privs when allowPrivilegeEscalation is false; runAsNonRoot is
  enforced as the kubelet does. argv comes from command/args and the image's ENTRYPOINT/CMD by Kubernetes'
  rules (with `$(VAR)` expansion), the environment from the image's ENV and the manifest's env (secretKeyRef
  resolved from the Secrets given).
- Probes (startup, readiness, liveness: grpc, httpGet, tcpSocket) go from the node namespace to the pod's
  address, at the manifest's ports, paths and timings, by the kubelet's rules (readiness and liveness wait for
  startup; liveness and startup stop once the pod is deleted; readiness goes on).
- Deletion: the endpoint leaves at once; every container's preStop runs (`sleep` and `httpGet` natively;
  `exec` only with the container's own main binary: any other tool is not certainly in the image, and fails
  the pod), each container gets SIGTERM when its hook is done, SIGKILL at terminationGracePeriodSeconds.
- Endpoints: what the EndpointSlice controller publishes (Ready and not terminating), written for a front Envoy
  standing for the Service as file-based EDS, after a propagation delay, in order.

Not emulated: seccomp (RuntimeDefault), cgroups (CPU and memory limits), PID and UTS namespaces, image pulls.
"The image" is the built one's filesystem (`podman image mount`, under a fresh writable layer that is made
read-only as the manifest says) with its config's ENV, WORKDIR, USER, ENTRYPOINT and CMD: what runs is what ships.

The processes it starts to do so (become a container; the node's agent for probes and load) are in
tests/podsim_proc.py.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

ROOT = Path(__file__).resolve().parents[1]
SUBNET = "10.213.0"
NODE_IP = f"{SUBNET}.1"
# The cluster's DNS (served by the node's agent): it answers every name with BLACKHOLE, an address of the pod
# subnet nobody holds, so a connection to the outside hangs as it does in a cluster whose egress is blocked, and
# nothing ever leaves these namespaces.
CLUSTER_DNS = f"{SUBNET}.2"
BLACKHOLE = f"{SUBNET}.3"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class PodSimError(RuntimeError):
    """Something the kubelet would refuse or report (a hook needing a tool the image lacks, a bad probe...)."""


def run(*argv: str) -> str:
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        raise PodSimError(f"{' '.join(argv)}: {r.stderr.strip() or r.returncode}")
    return r.stdout


def preflight() -> None:
    """The pod test needs root and iproute2; CI has both, so their absence is a failure, not a skip."""
    problems = []
    if os.geteuid() != 0:
        problems.append("not root (network and mount namespaces need it)")
    if not shutil.which("ip"):
        problems.append("no `ip` (iproute2)")
    if problems:
        raise PodSimError("the pod simulation cannot run: " + "; ".join(problems))


# -- images --------------------------------------------------------------------------------------------------


@dataclass
class Bind:
    src: str
    dst: str
    readonly: bool = True
    recursive: bool = False


@dataclass
class Image:
    """What a container image gives a container: its files, ENTRYPOINT/CMD, ENV, WORKDIR and USER."""

    name: str
    entrypoint: list[str]
    cmd: list[str]
    env: dict[str, str]
    workdir: str
    user: str
    binds: list[Bind]
    # The one program the image certainly has (what an exec hook may use); the rest of its tools are unknown.
    main_binary: str
    # Emulates the image's entrypoint script (which is not copied here): argv, uid -> argv, uid.
    entrypoint_rules: Callable[[list[str], int, dict[str, str]], tuple[list[str], int]] | None = None
    # The image's own root filesystem (a built image, mounted): then it is the container's root, not `binds`.
    rootfs: str | None = None

    def has(self, program: str) -> bool:
        """Whether the image certainly holds `program` (on its PATH, or at that path): known only with its rootfs."""
        if self.rootfs is None:
            return os.path.basename(program) == self.main_binary
        dirs = [program] if program.startswith("/") else [f"{d}/{program}" for d in self.env.get("PATH", DEFAULT_PATH).split(":")]
        return any(os.path.lexists(self.rootfs + path) for path in dirs)


# What an image's /etc holds here: the few files programs read (the machine's own, read-only). Not the whole
# folder: mountPaths under /etc (ConfigMaps) get mount points made in the container's root, never in the host's.
ETC_FILES = ("passwd", "group", "nsswitch.conf", "ld.so.cache", "ld.so.conf", "ld.so.conf.d",
             "localtime", "ssl", "ca-certificates", "alternatives", "mime.types")


def system_binds() -> tuple[list[Bind], list[dict[str, str]]]:
    """The base system of every image here: this machine's /usr (without /usr/local) and a few /etc files,
    read-only (merged-/usr symlinks kept as symlinks)."""
    # /usr but its `local`, which an image fills with its own programs (Envoy's image: /usr/local/bin/envoy).
    binds = [Bind(str(p), str(p)) for p in sorted(Path("/usr").iterdir()) if p.name != "local" and p.is_dir() and not p.is_symlink()]
    links: list[dict[str, str]] = []
    for name in ETC_FILES:
        p = Path("/etc") / name
        if p.exists():
            binds.append(Bind(str(p.resolve()), str(p)))
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        p = Path("/") / name
        if p.is_symlink():
            links.append({"path": f"/{name}", "target": os.readlink(p)})
        elif p.is_dir():
            binds.append(Bind(str(p), str(p)))
    return binds, links


def parse_dockerfile(path: Path) -> dict[str, Any]:
    """The final stage's ENV, WORKDIR, USER, ENTRYPOINT, CMD and EXPOSE (what the image's config holds)."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out: dict[str, Any] = {"env": {}, "workdir": "/", "user": "0", "entrypoint": [], "cmd": [], "expose": []}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instr, _, rest = line.partition(" ")
        instr = instr.upper()
        if instr == "FROM":
            out = {**out, "env": {}, "workdir": "/", "user": "0", "entrypoint": [], "cmd": [], "expose": []}
        elif instr == "ENV":
            for token in shlex.split(rest):
                key, _, value = token.partition("=")
                out["env"][key] = value
        elif instr == "WORKDIR":
            out["workdir"] = rest.strip()
        elif instr == "USER":
            out["user"] = rest.strip()
        elif instr in ("ENTRYPOINT", "CMD"):
            out[instr.lower()] = json.loads(rest)
        elif instr == "EXPOSE":
            out["expose"] += [int(p.split("/")[0]) for p in rest.split()]
    return out


def built_image(config: dict[str, Any], rootfs: Path, main_binary: str) -> Image:
    """A built image: its mounted root filesystem and its config (`podman image inspect`'s `Config`)."""
    env = dict(e.split("=", 1) for e in config.get("Env") or [])
    return Image(
        name=str(rootfs), entrypoint=list(config.get("Entrypoint") or []), cmd=list(config.get("Cmd") or []), env=env,
        workdir=config.get("WorkingDir") or "/", user=config.get("User") or "0", binds=[], main_binary=main_binary,
        rootfs=str(rootfs),
    )


# -- the node: namespaces, bridge, veths -----------------------------------------------------------------------


class Network:
    """The node's namespace with a bridge, and one namespace per pod on a veth into it."""

    _instances = itertools.count()

    def __init__(self) -> None:
        self.tag = f"podsim{os.getpid()}-{next(self._instances)}"
        self.node = f"{self.tag}-node"
        self.namespaces: list[str] = []
        self._next = itertools.count(11)

    @staticmethod
    def path(ns: str) -> str:
        return f"/run/netns/{ns}"

    def create(self) -> None:
        self.remove_stale()
        self._add_ns(self.node)
        run("ip", "-n", self.node, "link", "set", "lo", "up")
        run("ip", "-n", self.node, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", self.node, "addr", "add", f"{NODE_IP}/24", "dev", "br0")
        run("ip", "-n", self.node, "addr", "add", f"{CLUSTER_DNS}/24", "dev", "br0")
        run("ip", "-n", self.node, "link", "set", "br0", "up")
        # A new namespace forwards nothing and has no route out; said explicitly: whatever a pod sends beyond the
        # pod subnet is dropped here, like egress a cluster blocks.
        run(sys.executable, "-m", "tests.podsim_proc", "netexec", self.path(self.node), sys.executable, "-c",
            "open('/proc/sys/net/ipv4/ip_forward', 'w').write('0')")

    def _add_ns(self, ns: str) -> None:
        run("ip", "netns", "add", ns)
        self.namespaces.append(ns)

    def add_pod(self, name: str) -> tuple[str, str]:
        """A pod's namespace and address: eth0 inside it, its peer on the node's bridge."""
        n = next(self._next)
        ns, ip, host_end = f"{self.tag}-{name}", f"{SUBNET}.{n}", f"veth{n}"
        self._add_ns(ns)
        # Both ends are made inside namespaces of ours: nothing ever appears in the machine's own namespace.
        run("ip", "-n", self.node, "link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", ns)
        run("ip", "-n", self.node, "link", "set", host_end, "master", "br0", "up")
        run("ip", "-n", ns, "link", "set", "lo", "up")
        run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
        run("ip", "-n", ns, "link", "set", "eth0", "up")
        run("ip", "-n", ns, "route", "add", "default", "via", NODE_IP)
        return ns, ip

    def destroy(self) -> None:
        for ns in reversed(self.namespaces):
            self._kill_and_delete(ns)
        self.namespaces.clear()

    @staticmethod
    def _kill_and_delete(ns: str) -> None:
        r = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
        for pid in r.stdout.split():  # only processes this simulation started live in its namespaces
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    @staticmethod
    def remove_stale() -> None:
        """Namespaces a crashed earlier run left (named after its pid, which is gone)."""
        r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
        for line in r.stdout.splitlines():
            m = re.match(r"(podsim(\d+)-\S+)", line)
            if m and not Path(f"/proc/{m.group(2)}").exists():
                Network._kill_and_delete(m.group(1))


# -- the node's agent (from the test's side) -------------------------------------------------------------------


class Agent:
    """The helper process inside the node namespace: the kubelet's prober and the Service's clients."""

    def __init__(self, netns_path: str, log: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.podsim_proc", "agent", netns_path], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=open(log, "ab"), cwd=ROOT, text=True, env={**os.environ, "GRPC_VERBOSITY": "NONE"},
        )
        self._ids = itertools.count(1)
        self._pending: dict[int, Future] = {0: Future()}
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()
        self._pending[0].result(timeout=60)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            msg = json.loads(line)
            with self._lock:
                fut = self._pending.pop(msg["id"], None)
            if fut is not None:
                fut.set_result(msg)
        with self._lock:
            for fut in self._pending.values():
                fut.set_exception(PodSimError("the node agent exited"))
            self._pending.clear()

    def call(self, op: str, wait: float = 60.0, **kw: Any) -> dict:
        i = next(self._ids)
        fut: Future = Future()
        with self._lock:
            self._pending[i] = fut
        assert self.proc.stdin is not None
        with self._write_lock:
            self.proc.stdin.write(json.dumps({"op": op, "id": i, **kw}) + "\n")
            self.proc.stdin.flush()
        return fut.result(timeout=wait)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


# -- API objects -----------------------------------------------------------------------------------------------


def config_map_files(cm: dict) -> dict[str, bytes]:
    files = {k: v.encode() for k, v in (cm.get("data") or {}).items()}
    files.update({k: base64.b64decode(v) for k, v in (cm.get("binaryData") or {}).items()})
    return files


def secret_files(secret: dict) -> dict[str, bytes]:
    files = {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}
    files.update({k: v.encode() for k, v in (secret.get("stringData") or {}).items()})
    return files


class AtomicVolume:
    """A ConfigMap or Secret volume as the kubelet writes it: files in a timestamped folder, `..data` pointing
    at it, and one symlink per key through `..data`; an update swaps `..data` in one rename."""

    def __init__(self, path: Path, mode: int, gid: int | None) -> None:
        self.path, self.mode, self.gid = path, mode, gid
        path.mkdir(parents=True)
        os.chmod(path, 0o755)
        self._n = 0

    def write(self, files: dict[str, bytes], items: list[dict] | None = None) -> None:
        if items is not None:
            files = {it["path"]: files[it["key"]] for it in items}
        self._n += 1
        stamp = f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{os.getpid()}{self._n}"
        payload = self.path / stamp
        payload.mkdir(mode=0o755)
        for name, data in files.items():
            f = payload / name
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_bytes(data)
            mode = self.mode | (0o440 if self.gid is not None else 0)  # fsGroup: group-readable, as the kubelet sets
            os.chmod(f, mode)
            if self.gid is not None:
                os.chown(f, 0, self.gid)
        old = os.readlink(self.path / "..data") if (self.path / "..data").is_symlink() else None
        tmp = self.path / "..data_tmp"
        os.symlink(stamp, tmp)
        os.rename(tmp, self.path / "..data")
        for name in files:
            top = name.split("/")[0]
            link = self.path / top
            if not link.is_symlink():
                os.symlink(f"..data/{top}", link)
        if old:
            shutil.rmtree(self.path / old)


# -- pods ------------------------------------------------------------------------------------------------------


@dataclass
class Event:
    at: float
    pod: str
    container: str
    what: str


@dataclass
class Container:
    pod: Pod
    spec: dict
    image: Image
    uid: int = 0
    gid: int = 0
    argv: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    started: bool = False  # the startup probe passed (or there is none)
    ready: bool = False
    sigterm_at: float | None = None
    exited_at: float | None = None
    killed: bool = False
    hook_seconds: float | None = None
    failures: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.spec["name"]

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def port(self, ref: int | str) -> int:
        if isinstance(ref, int):
            return ref
        for p in self.spec.get("ports", []):
            if p["name"] == ref:
                return p["containerPort"]
        raise PodSimError(f"{self.name}: no container port named {ref!r}")


class Kubelet:
    """Runs pods of one pod template on the node, probes them and deletes them, recording what happened."""

    def __init__(self, workdir: Path, template: dict, objects: dict[tuple[str, str], dict], images: dict[str, Image],
                 propagation_delay: float = 1.0) -> None:
        preflight()
        self.workdir = workdir
        self.template = template
        self.objects = objects  # (kind, name) -> manifest
        self.images = images
        self.t0 = time.monotonic()
        self.events: list[Event] = []
        self.pods: list[Pod] = []
        self.network = Network()
        self.agent: Agent | None = None
        self.front: subprocess.Popen | None = None
        self.endpoints: Endpoints | None = None
        self.propagation_delay = propagation_delay
        self._lock = threading.Lock()

    # -- lifecycle of the node ----------------------------------------------------------------------------------

    def __enter__(self) -> Kubelet:
        try:
            self.network.create()
            self.agent = Agent(Network.path(self.network.node), self.workdir / "agent.log")
            self.agent.call("dns_start", host=CLUSTER_DNS, blackhole=BLACKHOLE)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for pod in self.pods:
            for c in pod.containers:
                if c.running:
                    c.proc.kill()
                    c.proc.wait()
            pod.stop_probes()
        if self.front is not None and self.front.poll() is None:
            self.front.kill()
            self.front.wait()
        if self.endpoints is not None:
            self.endpoints.close()
        if self.agent is not None:
            self.agent.close()
        self.network.destroy()

    def now(self) -> float:
        return time.monotonic() - self.t0

    def record(self, pod: str, container: str, what: str) -> None:
        with self._lock:
            self.events.append(Event(round(self.now(), 2), pod, container, what))

    # -- the Service: a front Envoy over the pods' endpoints -------------------------------------------------------

    def start_service(self, service: dict, port_name: str = "http") -> tuple[str, int]:
        """A front Envoy standing for the Service (kube-proxy or a mesh's client side): it balances over the
        endpoints the EndpointSlice controller publishes (file-based EDS), and retries nothing."""
        from service.launch import envoy_binary

        svc_port = next(p for p in service["spec"]["ports"] if p["name"] == port_name)
        target = svc_port["targetPort"]
        if isinstance(target, str):  # a named port: the pod template's container port of that name
            target = next(p["containerPort"] for c in self.template["spec"]["containers"] for p in c.get("ports", []) if p["name"] == target)
        self.endpoints = Endpoints(self, self.workdir / "eds", target)
        admin_port = 15000
        cfg = {
            "node": {"id": "podsim-node", "cluster": "service"},  # file-based EDS needs them
            "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
            "static_resources": {
                "listeners": [{
                    "name": "service",
                    "address": {"socket_address": {"address": NODE_IP, "port_value": svc_port["port"]}},
                    "filter_chains": [{"filters": [{
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                            "stat_prefix": "service",
                            "route_config": {"virtual_hosts": [{
                                "name": "service", "domains": ["*"],
                                "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "service", "timeout": "30s"}}],
                                "response_headers_to_add": [{"header": {"key": "x-podsim-upstream", "value": "%UPSTREAM_REMOTE_ADDRESS%"}}],
                            }]},
                            "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
                        },
                    }]}],
                }],
                "clusters": [{
                    "name": "service",
                    "type": "EDS",
                    "connect_timeout": "1s",
                    "lb_policy": "ROUND_ROBIN",
                    "eds_cluster_config": {"eds_config": {
                        "resource_api_version": "V3",
                        "path_config_source": {"path": str(self.endpoints.file), "watched_directory": {"path": str(self.endpoints.dir)}},
                    }},
                }],
            },
        }
        path = self.workdir / "front-envoy.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        self.front = subprocess.Popen(
            [sys.executable, "-m", "tests.podsim_proc", "netexec", Network.path(self.network.node), envoy_binary(),
             "-c", str(path), "--disable-hot-restart", "--log-level", "warn"],
            stdout=open(self.workdir / "front-envoy.log", "ab"), stderr=subprocess.STDOUT, cwd=ROOT,
        )
        self.front_admin = admin_port
        self.wait(lambda: self._front_up(), 30, "the front Envoy to start")
        return NODE_IP, svc_port["port"]

    def _front_up(self) -> bool:
        if self.front is not None and self.front.poll() is not None:
            raise PodSimError(f"the front Envoy exited ({self.front.returncode}); see {self.workdir}/front-envoy.log")
        r = self.agent.call("http", host="127.0.0.1", port=self.front_admin, path="/ready")
        return r["ok"] and r["status"] == 200

    def front_endpoints(self) -> set[str]:
        """The pod addresses the front Envoy balances over now (its admin's view)."""
        r = self.agent.call("http", host="127.0.0.1", port=self.front_admin, path="/clusters", timeout=2, max_body=1_000_000)
        if not r["ok"]:
            return set()
        return set(re.findall(r"^service::(\d+\.\d+\.\d+\.\d+):\d+::health_flags::healthy$", r["body"], re.M))

    # -- pods ------------------------------------------------------------------------------------------------------

    def run_pod(self, name: str) -> Pod:
        pod = Pod(self, name, self.template)
        self.pods.append(pod)
        pod.start()
        return pod

    def wait(self, cond: Callable[[], bool], timeout: float, what: str, poll: float = 0.1) -> float:
        """Polls `cond` until true; returns the seconds it took."""
        start = time.monotonic()
        while not cond():
            if time.monotonic() - start > timeout:
                raise PodSimError(f"timed out after {timeout:.0f}s waiting for {what}")
            time.sleep(poll)
        return time.monotonic() - start


class Endpoints:
    """The EndpointSlice controller and the Service's data plane: Ready, non-terminating pods' addresses, published
    to the front Envoy as an EDS file after `propagation_delay`, updates applied in order."""

    def __init__(self, kubelet: Kubelet, directory: Path, target_port: int) -> None:
        self.kubelet = kubelet
        self.dir = directory
        self.dir.mkdir()
        self.file = directory / "endpoints.yaml"
        self.target_port = target_port
        self.published: list[str] = []
        self.history: list[tuple[float, list[str]]] = []
        self._queue: list[tuple[float, list[str]]] = []
        self._cv = threading.Condition()
        self._closed = False
        self._write([])
        threading.Thread(target=self._apply, daemon=True).start()

    def update(self) -> None:
        """Called on every readiness change and deletion: what the controller would publish now."""
        addresses = [p.ip for p in self.kubelet.pods if p.ready and not p.terminating]
        with self._cv:
            self._queue.append((time.monotonic() + self.kubelet.propagation_delay, addresses))
            self._cv.notify()

    def _apply(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                due, addresses = self._queue[0]
                delay = due - time.monotonic()
                if delay > 0:
                    self._cv.wait(delay)
                    continue
                self._queue.pop(0)
            if addresses != self.published:
                self._write(addresses)

    def _write(self, addresses: list[str]) -> None:
        port = self.target_port
        doc = {"resources": [{
            "@type": "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
            "cluster_name": "service",
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": a, "port_value": port}}}} for a in addresses]}],
        }]}
        tmp = self.dir / ".endpoints.tmp"
        tmp.write_text(yaml.safe_dump(doc))
        os.rename(tmp, self.file)  # Envoy reloads on the move into the watched folder
        self.published = addresses
        self.history.append((round(self.kubelet.now(), 2), list(addresses)))

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()


class Pod:
    def __init__(self, kubelet: Kubelet, name: str, template: dict) -> None:
        self.kubelet = kubelet
        self.name = name
        self.spec = template["spec"]
        self.dir = kubelet.workdir / name
        self.dir.mkdir()
        self.ns, self.ip = "", ""
        self.volumes: dict[str, Path] = {}
        self.atomic: dict[str, AtomicVolume] = {}
        self.containers: list[Container] = []
        self.terminating = False
        self.deleted_at: float | None = None
        self._stop = threading.Event()
        self._probe_threads: list[threading.Thread] = []
        self._ready = False

    # -- volumes ---------------------------------------------------------------------------------------------------

    def _volumes(self) -> None:
        fs_group = (self.spec.get("securityContext") or {}).get("fsGroup")
        for v in self.spec.get("volumes", []):
            path = self.dir / "volumes" / v["name"]
            if "configMap" in v or "secret" in v:
                src = v.get("configMap") or v["secret"]
                kind, obj_name = ("ConfigMap", src["name"]) if "configMap" in v else ("Secret", src["secretName"])
                obj = self.kubelet.objects.get((kind, obj_name))
                if obj is None:
                    if src.get("optional"):
                        continue
                    raise PodSimError(f"volume {v['name']}: {kind} {obj_name} does not exist (the pod would not start)")
                files = config_map_files(obj) if kind == "ConfigMap" else secret_files(obj)
                vol = AtomicVolume(path, src.get("defaultMode", 0o644), fs_group)
                vol.write(files, src.get("items"))
                self.atomic[v["name"]] = vol
            elif "emptyDir" in v:
                path.mkdir(parents=True)
                # An emptyDir is world-writable (with fsGroup: group-owned, setgid), on the node's disk.
                os.chmod(path, 0o777)
                if fs_group is not None:
                    os.chown(path, 0, fs_group)
                    os.chmod(path, 0o2777)
            else:
                raise PodSimError(f"volume {v['name']}: only configMap, secret and emptyDir volumes are simulated")
            self.volumes[v["name"]] = path
        shm = self.dir / "shm"
        shm.mkdir()
        os.chmod(shm, 0o1777)
        self.shm = shm
        # The files the kubelet writes for every container of the pod.
        self.etc = {"/etc/hosts": self.dir / "hosts", "/etc/resolv.conf": self.dir / "resolv.conf", "/etc/hostname": self.dir / "hostname"}
        self.etc["/etc/hosts"].write_text(f"127.0.0.1\tlocalhost\n::1\tlocalhost\n{self.ip}\t{self.name}\n")
        self.etc["/etc/resolv.conf"].write_text(
            f"search default.svc.cluster.local svc.cluster.local cluster.local\nnameserver {CLUSTER_DNS}\noptions ndots:5\n")
        self.etc["/etc/hostname"].write_text(self.name + "\n")
        for f in self.etc.values():
            os.chmod(f, 0o644)

    def rotate_secret(self, volume: str, files: dict[str, bytes]) -> None:
        """What the kubelet does when the Secret changes: the new files appear at once, by one rename of `..data`."""
        vol = self.atomic[volume]
        src = next(v for v in self.spec["volumes"] if v["name"] == volume)
        vol.write(files, (src.get("secret") or src.get("configMap")).get("items"))

    # -- containers --------------------------------------------------------------------------------------------

    def _env(self, c: dict, image: Image) -> dict[str, str]:
        env = dict(image.env)
        env.setdefault("HOME", "/")
        env["HOSTNAME"] = self.name
        for e in c.get("env", []):
            if "value" in e:
                env[e["name"]] = expand(e["value"], env)
            elif "secretKeyRef" in e.get("valueFrom", {}):
                ref = e["valueFrom"]["secretKeyRef"]
                secret = self.kubelet.objects.get(("Secret", ref["name"]))
                if secret is None or ref["key"] not in secret_files(secret):
                    if ref.get("optional"):
                        continue
                    raise PodSimError(f"{c['name']}: env {e['name']}: Secret {ref['name']} key {ref['key']} is missing")
                env[e["name"]] = secret_files(secret)[ref["key"]].decode()
            else:
                raise PodSimError(f"{c['name']}: env {e['name']}: only value and secretKeyRef are simulated")
        return env

    def _security(self, c: dict, image: Image) -> dict[str, Any]:
        pod_sc = self.spec.get("securityContext") or {}
        sc = c.get("securityContext") or {}
        user, _, group = image.user.partition(":")
        uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
        if uid is None:
            if not user.isdigit():
                raise PodSimError(f"{c['name']}: the image's USER {user!r} is not numeric: runAsNonRoot cannot be verified")
            uid = int(user)
        gid = sc.get("runAsGroup", pod_sc.get("runAsGroup"))
        if gid is None:
            gid = int(group) if group.isdigit() else 0
        non_root = sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot", False))
        if non_root and uid == 0:
            raise PodSimError(f"{c['name']}: runAsNonRoot, but the container would run as root (CreateContainerConfigError)")
        groups = [gid, *pod_sc.get("supplementalGroups", [])]
        if pod_sc.get("fsGroup") is not None:
            groups.append(pod_sc["fsGroup"])
        drops = (sc.get("capabilities") or {}).get("drop", [])
        return {
            "uid": uid, "gid": gid, "groups": sorted(set(groups)), "run_as_non_root": non_root,
            "readonly_root": bool(sc.get("readOnlyRootFilesystem", False)),
            "no_new_privs": sc.get("allowPrivilegeEscalation") is False,
            "drop_capabilities": "ALL" in drops,
        }

    def _spec_for(self, c: dict, image: Image) -> tuple[dict, list[str], int]:
        env = self._env(c, image)
        sec = self._security(c, image)
        # Kubernetes: command replaces ENTRYPOINT (and then CMD is unused), args replaces CMD.
        if c.get("command"):
            argv = [expand(a, env) for a in c["command"]] + [expand(a, env) for a in c.get("args", [])]
        else:
            argv = list(image.entrypoint) + ([expand(a, env) for a in c["args"]] if "args" in c else list(image.cmd))
        uid = sec["uid"]
        if image.entrypoint and argv[: len(image.entrypoint)] == image.entrypoint and image.entrypoint_rules:
            argv, uid = image.entrypoint_rules(argv, uid, env)
        if not argv:
            raise PodSimError(f"{c['name']}: nothing to run")
        binds = [{"src": b.src, "dst": b.dst, "readonly": b.readonly, "recursive": b.recursive} for b in image.binds]
        links = [] if image.rootfs else system_binds()[1]
        binds.append({"src": "/sys", "dst": "/sys", "readonly": True, "recursive": True})
        binds += [{"src": str(src), "dst": dst, "readonly": True} for dst, src in self.etc.items()]
        for m in c.get("volumeMounts", []):
            vol = self.volumes.get(m["name"])
            if vol is None:
                raise PodSimError(f"{c['name']}: volumeMount {m['name']} names no volume")
            kind = next(v for v in self.spec["volumes"] if v["name"] == m["name"])
            api_data = "configMap" in kind or "secret" in kind
            src = vol / m["subPath"] if m.get("subPath") else vol
            if m.get("subPath"):
                src = Path(os.path.realpath(src))  # the kubelet binds what the key's symlink points at, once
            if not src.exists():
                raise PodSimError(f"{c['name']}: {m['name']} has no {m.get('subPath')!r}")
            # ConfigMap and Secret volumes are always read-only; others as the mount says.
            binds.append({"src": str(src), "dst": m["mountPath"], "readonly": api_data or bool(m.get("readOnly"))})
        binds.sort(key=lambda b: len(Path(b["dst"]).parts))  # parents before what is mounted inside them
        rootfs = self.dir / "rootfs" / c["name"]
        rootfs.mkdir(parents=True)
        spec = {
            "netns": Network.path(self.ns), "rootfs": str(rootfs), "symlinks": links,
            "dirs": [image.workdir or "/", "/tmp", "/var/tmp", "/run"], "binds": binds, "shm": str(self.shm),
            "workdir": c.get("workingDir") or image.workdir, "env": env, "argv": argv, "image_root": image.rootfs,
            **sec, "uid": uid,
        }
        if image.entrypoint_rules and uid != sec["uid"]:
            spec["gid"] = uid
        return spec, argv, uid

    def start(self) -> None:
        k = self.kubelet
        self.ns, self.ip = k.network.add_pod(self.name)
        self._volumes()
        for c in self.spec["containers"]:
            image = k.images[c["image"].rsplit(":", 1)[0]]
            container = Container(self, c, image)
            spec, container.argv, container.uid = self._spec_for(c, image)
            container.gid = spec["gid"]
            spec_path = self.dir / f"{c['name']}.json"
            spec_path.write_text(json.dumps(spec, indent=1))
            log = open(self.dir / f"{c['name']}.log", "ab")
            container.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.podsim_proc", "exec", str(spec_path)], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
            )
            container.started_at = time.monotonic()
            self.containers.append(container)
            k.record(self.name, c["name"], f"started: {' '.join(container.argv)} as {container.uid}:{container.gid}")
        for container in self.containers:
            self._start_probes(container)

    # -- probes ----------------------------------------------------------------------------------------------------

    def probe(self, c: Container, probe: dict) -> tuple[bool, str]:
        agent = self.kubelet.agent
        timeout = probe.get("timeoutSeconds", 1)
        if "httpGet" in probe:
            h = probe["httpGet"]
            if h.get("host"):
                raise PodSimError(f"{c.name}: a probe with a host of its own does not test this pod")
            r = agent.call("http", host=self.ip, port=c.port(h["port"]), path=h.get("path", "/"), timeout=timeout,
                           headers={"User-Agent": "kube-probe/1.33", "Accept": "*/*"}, wait=timeout + 10)
            return (r["ok"] and 200 <= r["status"] < 400), (f"HTTP {r['status']}" if r["ok"] else r["error"])
        if "grpc" in probe:
            g = probe["grpc"]
            r = agent.call("grpc_health", host=self.ip, port=c.port(g["port"]), service=g.get("service", ""), timeout=timeout, wait=timeout + 10)
            return (r["ok"] and r["serving"]), (r["status"] if r["ok"] else r["error"])
        if "tcpSocket" in probe:
            r = agent.call("tcp", host=self.ip, port=c.port(probe["tcpSocket"]["port"]), timeout=timeout, wait=timeout + 10)
            return r["ok"], ("connected" if r["ok"] else r["error"])
        raise PodSimError(f"{c.name}: probe {probe} is not simulated (exec probes would run a tool inside the image)")

    def _start_probes(self, c: Container) -> None:
        spec = c.spec
        if "startupProbe" not in spec:
            c.started = True
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            if kind in spec:
                t = threading.Thread(target=self._probe_loop, args=(c, kind, spec[kind]), daemon=True, name=f"{self.name}/{c.name}/{kind}")
                self._probe_threads.append(t)
                t.start()
        if "readinessProbe" not in spec:
            threading.Thread(target=self._follow_started, args=(c,), daemon=True).start()

    def _follow_started(self, c: Container) -> None:
        while not self._stop.is_set() and not c.started:
            self._stop.wait(0.05)
        if c.started and c.running:
            c.ready = True
            self._readiness_changed()

    def _probe_loop(self, c: Container, kind: str, probe: dict) -> None:
        k = self.kubelet
        period = probe.get("periodSeconds", 10)
        failure_threshold = probe.get("failureThreshold", 3)
        success_threshold = probe.get("successThreshold", 1)
        next_at = c.started_at + probe.get("initialDelaySeconds", 0)
        failures = successes = 0
        while not self._stop.is_set():
            delay = next_at - time.monotonic()
            if delay > 0 and self._stop.wait(delay):
                return
            next_at += period
            if not c.running:
                if c.exited_at is None and not self.terminating:
                    c.failures.append(f"exited unexpectedly with {c.proc.returncode}")
                    k.record(self.name, c.name, f"exited unexpectedly ({c.proc.returncode})")
                    c.exited_at = time.monotonic()
                if c.ready:
                    c.ready = False
                    self._readiness_changed()
                return
            if kind != "startupProbe" and not c.started:
                continue
            if kind in ("startupProbe", "livenessProbe") and self.terminating:
                return  # the kubelet stops these once the pod is being deleted
            ok, detail = self.probe(c, probe)
            if kind == "startupProbe":
                if ok:
                    c.started = True
                    k.record(self.name, c.name, f"startup probe passed ({detail}) after {time.monotonic() - c.started_at:.1f}s")
                    return
                failures += 1
                if failures >= failure_threshold:
                    c.failures.append(f"startup probe failed {failures} times ({detail}): the kubelet would restart it")
                    k.record(self.name, c.name, f"startup probe failed ({detail})")
                    return
            elif kind == "livenessProbe":
                failures = 0 if ok else failures + 1
                if failures >= failure_threshold:
                    c.failures.append(f"liveness probe failed {failures} times ({detail}): the kubelet would restart it")
                    k.record(self.name, c.name, f"liveness probe failed ({detail})")
                    failures = 0
            else:
                if ok:
                    successes, failures = successes + 1, 0
                    if not c.ready and successes >= success_threshold:
                        c.ready = True
                        k.record(self.name, c.name, "ready")
                        self._readiness_changed()
                else:
                    successes, failures = 0, failures + 1
                    if c.ready and failures >= failure_threshold:
                        c.ready = False
                        k.record(self.name, c.name, f"not ready ({detail})")
                        self._readiness_changed()

    @property
    def ready(self) -> bool:
        return self._ready

    def _readiness_changed(self) -> None:
        ready = bool(self.containers) and all(c.ready for c in self.containers)
        if ready != self._ready:
            self._ready = ready
            self.kubelet.record(self.name, "-", "Ready" if ready else "not Ready")
            if self.kubelet.endpoints is not None:
                self.kubelet.endpoints.update()

    def failures(self) -> list[str]:
        return [f"{c.name}: {f}" for c in self.containers for f in c.failures]

    def stop_probes(self) -> None:
        self._stop.set()

    # -- deletion --------------------------------------------------------------------------------------------------

    @property
    def grace(self) -> int:
        return self.spec.get("terminationGracePeriodSeconds", 30)

    def delete(self) -> None:
        """`kubectl delete pod` as the kubelet carries it out: endpoint removed, preStop hooks, SIGTERM, SIGKILL."""
        k = self.kubelet
        self.terminating = True
        self.deleted_at = time.monotonic()
        k.record(self.name, "-", "deleted")
        if k.endpoints is not None:
            k.endpoints.update()
        threads = [threading.Thread(target=self._kill_container, args=(c,), daemon=True) for c in self.containers]
        for t in threads:
            t.start()
        self._killers = threads

    def wait_terminated(self, timeout: float) -> None:
        for t in self._killers:
            t.join(timeout)
        self.stop_probes()

    def _kill_container(self, c: Container) -> None:
        k = self.kubelet
        deadline = self.deleted_at + self.grace
        hook = (c.spec.get("lifecycle") or {}).get("preStop")
        if hook and c.running:
            started = time.monotonic()
            try:
                self.run_hook(c, hook, deadline)
            except PodSimError as e:
                c.failures.append(f"preStop hook failed: {e}")
                k.record(self.name, c.name, f"preStop failed: {e}")
            c.hook_seconds = time.monotonic() - started
            k.record(self.name, c.name, f"preStop done ({c.hook_seconds:.1f}s)")
            # A hook that outlived the grace period gets the kubelet's one-time 2 s extension.
            deadline = max(deadline, time.monotonic() + 2) if time.monotonic() > deadline else deadline
        if c.running:
            c.sigterm_at = time.monotonic()
            c.proc.send_signal(signal.SIGTERM)
            k.record(self.name, c.name, "SIGTERM")
        try:
            c.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            c.killed = True
            c.failures.append(f"still running after terminationGracePeriodSeconds ({self.grace}s): SIGKILL")
            c.proc.kill()
            c.proc.wait()
        c.exited_at = time.monotonic()
        if c.ready:
            c.ready = False
            self._readiness_changed()
        k.record(self.name, c.name, f"exited ({c.proc.returncode}) {c.exited_at - self.deleted_at:.1f}s after deletion")

    def run_hook(self, c: Container, hook: dict, deadline: float) -> None:
        check_hook(c.spec, c.image, c.argv)
        if "sleep" in hook:
            time.sleep(max(0.0, min(hook["sleep"]["seconds"], deadline - time.monotonic())))
        elif "httpGet" in hook:
            h = hook["httpGet"]
            r = self.kubelet.agent.call("http", host=h.get("host") or self.ip, port=c.port(h["port"]), path=h.get("path", "/"),
                                        timeout=max(0.1, deadline - time.monotonic()), wait=max(1.0, deadline - time.monotonic() + 5))
            if not r["ok"] or not 200 <= r["status"] < 400:
                raise PodSimError(f"httpGet hook: {r.get('status') or r.get('error')}")
        elif "exec" in hook:
            argv = ["nsenter", "-t", str(c.proc.pid), "-m", "-n", "-r", "-w", "-S", str(c.uid), "-G", str(c.gid), "--", *hook["exec"]["command"]]
            r = subprocess.run(argv, capture_output=True, text=True, timeout=max(0.1, deadline - time.monotonic()))
            if r.returncode != 0:
                raise PodSimError(f"exec hook exited {r.returncode}: {r.stderr.strip()[-300:]}")


def check_hook(container: dict, image: Image, argv: list[str] | None = None) -> None:
    """A lifecycle hook may use Kubernetes' own actions (sleep, httpGet), or exec a program the image holds (known
    from its filesystem; else only its main binary): Envoy's official image has no wget, a distroless one no sh."""
    for name, hook in (container.get("lifecycle") or {}).items():
        if "exec" in hook:
            cmd = hook["exec"].get("command") or []
            binary = os.path.basename(cmd[0]) if cmd else ""
            main = os.path.basename((argv or [image.main_binary])[0])
            if not cmd or not (image.has(cmd[0]) or binary == main):
                raise PodSimError(
                    f"{container['name']}: {name} runs {cmd[0] if cmd else '(nothing)'!r}, which the image {image.name!r} "
                    f"does not certainly have; use a sleep or httpGet action"
                )
        elif "tcpSocket" in hook:
            raise PodSimError(f"{container['name']}: {name}: tcpSocket is not a lifecycle action Kubernetes runs")
        elif not ({"sleep", "httpGet"} & hook.keys()):
            raise PodSimError(f"{container['name']}: {name}: unknown action {list(hook)}")


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in command, args and env values ($$ escapes; unknown references stay)."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), value)


def load_manifests(folder: Path, extra: list[dict] | None = None) -> dict[tuple[str, str], dict]:
    objects = {}
    for path in sorted(folder.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and "kind" in doc and "metadata" in doc:
                objects[(doc["kind"], doc["metadata"]["name"])] = doc
    for doc in extra or []:
        objects[(doc["kind"], doc["metadata"]["name"])] = doc
    return objects


def process_status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def root_mount_options(pid: int) -> list[str]:
    """The mount options of the process's / (as it sees it)."""
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == "/":
            last = fields  # the topmost mount on / wins
    return last[5].split(",")

