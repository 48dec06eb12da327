"""The pod simulation's helper processes (tests/podsim.py starts them; nothing heavy is imported up front).

- `python -m tests.podsim_proc exec SPEC`: becomes one container. As root: enters the pod's network namespace,
  unshares a mount namespace, builds the container's root (a tmpfs with the image's files and the volumes
  bound at their mountPaths, /proc, a minimal /dev with the pod's /dev/shm), makes it read-only when asked,
  chroots into it, drops every capability, takes the container's uid, gid and groups, sets no_new_privs, and
  execs the container's argv. Its pid is the container process's.
- `python -m tests.podsim_proc netexec NETNS ARGV...`: execs ARGV in the node's network namespace (the front Envoy).
- `python -m tests.podsim_proc agent NETNS`: the node's side, inside its network namespace: the kubelet's
  probes (HTTP, gRPC health, TCP), single requests, and the Service's clients (a bounded load), driven by
  JSON lines on stdin.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys

# The helpers below run before anything heavy is imported: `exec` must not start threads before it switches
# namespaces, and it replaces itself with the container's process.

CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 24, 38

_libc = ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def setns(path: str, nstype: int) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        _check(_libc.setns(fd, nstype), f"setns {path}")
    finally:
        os.close(fd)


def mount(src: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = lambda s: s.encode() if s is not None else None  # noqa: E731
    _check(_libc.mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {src} on {target}")


def _mount_points_under(target: str) -> list[str]:
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4].encode().decode("unicode_escape")
            if mp == target or mp.startswith(target.rstrip("/") + "/"):
                points.append(mp)
    return points


def _bind(src: str, dst: str, readonly: bool, recursive: bool = False, devices: bool = False) -> None:
    mount(src, dst, None, MS_BIND | (MS_REC if recursive else 0))
    base = MS_REMOUNT | MS_BIND | MS_NOSUID | (0 if devices else MS_NODEV)
    for mp in _mount_points_under(dst) if recursive else [dst]:
        try:
            mount(None, mp, None, base | (MS_RDONLY if readonly else 0))
        except OSError:
            if mp == dst:
                raise
            # A submount that keeps flags of its own (a locked mount): it stays as it was, read-only or not,
            # and holds nothing this process may write (root-owned).


def _mkdirs(root: str, path: str) -> str:
    full = os.path.join(root, path.lstrip("/"))
    os.makedirs(full, mode=0o755, exist_ok=True)
    return full


def become_container(spec: dict) -> None:
    """In a fresh process, as root: enter the pod's network, build the container's filesystem, drop to its user,
    exec its argv. Never returns."""
    setns(spec["netns"], CLONE_NEWNET)
    _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing done here reaches the host
    root = spec["rootfs"]
    if spec.get("image_root"):
        # The image's files under a fresh writable layer (a tmpfs), where mount points are made; read-only below
        # when the manifest says so.
        layer = root + ".layer"
        os.makedirs(layer, exist_ok=True)
        mount("tmpfs", layer, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
        os.makedirs(f"{layer}/upper")
        os.makedirs(f"{layer}/work")
        mount("overlay", root, "overlay", MS_NOSUID | MS_NODEV,
              f"lowerdir={spec['image_root']},upperdir={layer}/upper,workdir={layer}/work")
    else:
        mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
    for link in spec["symlinks"]:
        os.symlink(link["target"], os.path.join(root, link["path"].lstrip("/")))
    for d in spec["dirs"]:
        _mkdirs(root, d)
    for b in spec["binds"]:
        dst = os.path.join(root, b["dst"].lstrip("/"))
        if os.path.isdir(b["src"]):
            os.makedirs(dst, mode=0o755, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(dst), mode=0o755, exist_ok=True)
            if not os.path.exists(dst):
                open(dst, "a").close()
        _bind(b["src"], dst, b["readonly"], b.get("recursive", False), b.get("devices", False))
    mount("proc", _mkdirs(root, "/proc"), "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    dev = _mkdirs(root, "/dev")
    mount("tmpfs", dev, "tmpfs", MS_NOSUID, "mode=0755")
    for name in ("null", "zero", "full", "random", "urandom", "tty"):
        open(os.path.join(dev, name), "a").close()
        _bind(f"/dev/{name}", os.path.join(dev, name), readonly=False, devices=True)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(target, os.path.join(dev, name))
    shm = os.path.join(dev, "shm")
    os.makedirs(shm)
    _bind(spec["shm"], shm, readonly=False)
    if spec["readonly_root"]:
        mount(None, root, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.chroot(root)
    os.chdir(spec["workdir"] or "/")
    uid, gid = spec["uid"], spec["gid"]
    if spec["run_as_non_root"] and uid == 0:
        raise SystemExit("container has runAsNonRoot and would run as root")
    if spec["drop_capabilities"]:
        last = int(open("/proc/sys/kernel/cap_last_cap").read())
        for cap in range(last + 1):
            _check(_libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), f"drop capability {cap}")
    os.setgroups(spec["groups"])
    os.setgid(gid)
    os.setuid(uid)  # from root to another uid: permitted, effective and ambient capabilities are cleared
    if spec["no_new_privs"]:
        _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    env = spec["env"]
    argv = spec["argv"]
    try:
        os.execvpe(argv[0], argv, env)
    except OSError as e:
        raise SystemExit(f"exec {argv[0]}: {e.strerror} (PATH={env.get('PATH')})") from None


def net_exec(netns: str, argv: list[str]) -> None:
    """Runs `argv` in network namespace `netns` (the node's side: the front Envoy)."""
    setns(netns, CLONE_NEWNET)
    os.execvp(argv[0], argv)


# -- the node's agent ------------------------------------------------------------------------------------------


def agent_main(netns: str) -> None:
    setns(netns, CLONE_NEWNET)  # before any thread exists: every socket below is the node's
    import http.client
    import socket
    import threading
    import time

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    out_lock = threading.Lock()

    def reply(obj: dict) -> None:
        with out_lock:
            sys.stdout.write(json.dumps(obj) + "\n")
            sys.stdout.flush()

    def http_request(c: dict) -> dict:
        conn = http.client.HTTPConnection(c["host"], c["port"], timeout=c.get("timeout", 1.0))
        try:
            body = c.get("body")
            conn.request(c.get("method", "GET"), c["path"], body=body.encode() if body is not None else None, headers=c.get("headers", {}))
            r = conn.getresponse()
            data = r.read()
            return {"status": r.status, "body": data[: c.get("max_body", 4000)].decode(errors="replace"), "headers": dict(r.getheaders())}
        finally:
            conn.close()

    def grpc_health(c: dict) -> dict:
        with grpc.insecure_channel(f"{c['host']}:{c['port']}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            r = stub.Check(health_pb2.HealthCheckRequest(service=c.get("service", "")), timeout=c.get("timeout", 1.0))
            return {"serving": r.status == health_pb2.HealthCheckResponse.SERVING, "status": health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)}

    def tcp(c: dict) -> dict:
        with socket.create_connection((c["host"], c["port"]), timeout=c.get("timeout", 1.0)):
            return {"connected": True}

    class Load:
        """Clients of the Service: each sends one request after the other on a keep-alive connection."""

        def __init__(self, c: dict) -> None:
            self.c = c
            self.stop = threading.Event()
            self.lock = threading.Lock()
            self.sent = self.ok = 0
            self.failures: list[dict] = []
            self.by_upstream: dict[str, int] = {}
            self.last_ok: dict[str, float] = {}
            self.started = time.time()
            self.threads = [threading.Thread(target=self.worker, args=(i,), daemon=True) for i in range(c["workers"])]
            for t in self.threads:
                t.start()

        def worker(self, i: int) -> None:
            c = self.c
            deadline = time.monotonic() + c["max_seconds"]
            conn = None
            n = 0
            while not self.stop.is_set() and time.monotonic() < deadline and n < c["max_requests_per_worker"]:
                n += 1
                body = json.dumps({"input": [f"rollout load {i} {n}"], "model": c["model"]})
                t0 = time.time()
                try:
                    if conn is None:
                        conn = http.client.HTTPConnection(c["host"], c["port"], timeout=c["timeout"])
                    conn.request("POST", c["path"], body=body, headers={"Content-Type": "application/json", **c["headers"]})
                    r = conn.getresponse()
                    data = r.read()
                    upstream = r.getheader(c["upstream_header"], "?")
                    if r.status == 200 and json.loads(data)["data"][0]["embedding"]:
                        with self.lock:
                            self.sent += 1
                            self.ok += 1
                            self.by_upstream[upstream] = self.by_upstream.get(upstream, 0) + 1
                            self.last_ok[upstream] = time.time()
                    else:
                        self.fail(t0, f"HTTP {r.status} from {upstream}: {data[:300]!r}")
                    if r.getheader("connection", "").lower() == "close":
                        conn.close()
                        conn = None
                except Exception as e:  # noqa: BLE001 - every failure is counted, whatever it is
                    self.fail(t0, f"{type(e).__name__}: {e}")
                    if conn is not None:
                        conn.close()
                    conn = None
                if c["pause"]:
                    self.stop.wait(c["pause"])
            if conn is not None:
                conn.close()

        def fail(self, t0: float, what: str) -> None:
            with self.lock:
                self.sent += 1
                self.failures.append({"at": t0, "error": what})

        def peek(self) -> dict:
            with self.lock:
                return {"sent": self.sent, "ok": self.ok, "failed": len(self.failures), "by_upstream": dict(self.by_upstream)}

        def finish(self) -> dict:
            self.stop.set()
            for t in self.threads:
                t.join(30)
            return {"sent": self.sent, "ok": self.ok, "failed": len(self.failures), "failures": self.failures[:20],
                    "by_upstream": self.by_upstream, "last_ok": self.last_ok, "started": self.started, "finished": time.time()}

    loads: dict[str, Load] = {}

    def dns(c: dict) -> dict:
        """The cluster's DNS: every A query answers `c["blackhole"]` (an address nobody holds: a connection to the
        outside hangs, as with blocked egress), AAAA has no data, anything else (PTR...) does not exist."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((c["host"], 53))
        answer_ip = socket.inet_aton(c["blackhole"])

        def serve() -> None:
            while True:
                query, peer = sock.recvfrom(512)
                if len(query) < 12:
                    continue
                end = 12
                while end < len(query) and query[end] != 0:
                    end += query[end] + 1
                question = query[12 : end + 5]
                qtype = int.from_bytes(query[end + 1 : end + 3], "big")
                rcode, answers = (0, b"") if qtype in (1, 28) else (3, b"")
                if qtype == 1:
                    answers = b"\xc0\x0c" + (1).to_bytes(2, "big") + (1).to_bytes(2, "big") + (5).to_bytes(4, "big") + (4).to_bytes(2, "big") + answer_ip
                header = query[:2] + (0x8180 | rcode).to_bytes(2, "big") + b"\x00\x01" + (1 if answers else 0).to_bytes(2, "big") + b"\x00\x00\x00\x00"
                sock.sendto(header + question + answers, peer)

        threading.Thread(target=serve, daemon=True).start()
        return {}

    def handle(c: dict) -> None:
        try:
            op = c["op"]
            if op == "http":
                result = http_request(c)
            elif op == "grpc_health":
                result = grpc_health(c)
            elif op == "tcp":
                result = tcp(c)
            elif op == "dns_start":
                result = dns(c)
            elif op == "load_start":
                loads[c["name"]] = Load(c)
                result = {}
            elif op == "load_peek":
                result = loads[c["name"]].peek()
            elif op == "load_stop":
                result = loads.pop(c["name"]).finish()
            else:
                raise ValueError(f"unknown op {op}")
            reply({"id": c["id"], "ok": True, **result})
        except Exception as e:  # noqa: BLE001 - the caller decides what a failed probe means
            reply({"id": c["id"], "ok": False, "error": f"{type(e).__name__}: {e}"})

    reply({"id": 0, "ok": True, "ready": True})
    for line in sys.stdin:
        if line.strip():
            threading.Thread(target=handle, args=(json.loads(line),), daemon=True).start()


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "exec":
        with open(sys.argv[2]) as f:
            become_container(json.load(f))
    elif mode == "netexec":
        net_exec(sys.argv[2], sys.argv[3:])
    elif mode == "agent":
        agent_main(sys.argv[2])
    else:
        raise SystemExit(f"unknown mode {mode}")
    sys.exit(0)

