"""Wiring only: builds the engine, registers every enabled dialect, health and reflection, serves, drains.

Shutdown, in order (what a Kubernetes rollout needs to lose nothing):
1. health turns NOT_SERVING at once, so Envoy's health checks and the kubelet's probes take the replica out;
2. for `server.drain_delay_seconds` new calls are still served (they were already on their way);
3. then new calls are refused with UNAVAILABLE, marked for Envoy to retry on another replica;
4. calls in flight get until `server.grace_seconds` after the signal to finish; then the server stops.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from . import dialects, metrics, offload, rpc, streams, tracing
from .auth import CredentialStore
from .config import Config
from .engine.cache import EmbeddingCache
from .engine.models import ModelRegistry, ServedModel
from .engine.pipeline import Embedder
from .interceptors import AuthInterceptor, CallState, GateInterceptor
from .launch import free_port
from .open_services import BoundedHealth, add_reflection
from .runtimes import threads

log = logging.getLogger(__name__)
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class EmbeddingServer:
    """The gRPC server and everything it owns; `start` returns once it listens, models load behind it."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.dialects = dialects.enabled(config)
        self.health = BoundedHealth(config.server.max_health_watchers)
        self.registry = ModelRegistry(
            config.models,
            config.limits,
            on_ready=self._model_ready,
            on_batch=metrics.observe_batch,
            inference_threads=config.server.inference_threads,
            providers=config.providers,
            on_failure=self._model_failed,
        )
        self.cache = EmbeddingCache(config.cache.max_bytes)
        # Tokenization runs here, beside (not on) the event loop and the batcher threads.
        self.executor = ThreadPoolExecutor(max_workers=min(4, threads.available_cpus()), thread_name_prefix="tokenize")
        self.embedder = Embedder(self.registry, config.limits, self.cache, self.executor, per_credential_cache=config.cache.per_credential)
        # Keys first: a keys file that is configured but unusable stops the start (KeysFileError).
        self.credentials = CredentialStore(config.auth.keys_file)
        self.calls = CallState()
        tracer = tracing.setup(config.tracing)
        server_cfg = config.server
        self.server = grpc.aio.server(
            # Tracing first, so a refused call is traced too; the gate before auth, so a draining server answers fast.
            interceptors=[
                i for i in (
                    tracer,
                    GateInterceptor(self.calls, self.credentials, config.auth.allow_open_non_loopback, server_cfg.max_concurrent_rpcs),
                    AuthInterceptor(self.credentials),
                ) if i is not None
            ],
            options=[
                ("grpc.max_receive_message_length", server_cfg.max_message_bytes),
                ("grpc.max_send_message_length", max(server_cfg.max_message_bytes, 64 * 1024 * 1024)),
                ("grpc.so_reuseport", 0),
                # Streams one connection may open at once, and how long a connection with no call lives.
                ("grpc.max_concurrent_streams", 256),
                ("grpc.max_connection_idle_ms", 300_000),
            ],
            # No `maximum_concurrent_rpcs`: gRPC counts a call from its headers, so callers that open calls and never
            # send a message would hold every slot, health checks included. The gate counts calls being served instead
            # (from their message on), for the dialects' services only.
        )
        self.port = 0
        self.metrics_port = 0
        self._stop_metrics = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Set when a model is down for good: the server-wide health then stays NOT_SERVING (see `_model_failed`).
        self._condemned = False
        self._health_lock = threading.Lock()
        self._watch_task: asyncio.Task | None = None

    @property
    def service_names(self) -> list[str]:
        return [name for d in self.dialects for name in d.services]

    async def start(self) -> int:
        self._loop = asyncio.get_running_loop()
        rpc.LONG_INPUTS.update(self.config.dialects.long_inputs)
        rpc.MAX_PARSING_BYTES = self.config.server.max_parsing_bytes
        streams.configure(self.config.limits)
        for dialect in self.dialects:  # one servicer per dialect, all over the same embedder
            dialect.add_to_server(self.server, self.embedder, self.config)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if self.config.server.reflection:
            add_reflection(self.server, self.service_names, self.config.server.max_reflection_streams)
        for name in ["", *self.service_names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        host = self.config.server.host
        if not self.credentials.enabled:
            if host not in LOOPBACK and not self.config.auth.allow_open_non_loopback:
                log.warning(
                    "no API keys configured: the service is open, so it listens on loopback only "
                    "(configure auth.keys_file or EMBED_API_KEYS, or set auth.allow_open_non_loopback)",
                    extra={"asked_for": host},
                )
                host = "127.0.0.1"
            else:
                log.warning("no API keys configured: the service is open to every caller that can reach it", extra={"host": host})
        else:
            log.info("API keys required", extra={"credentials": len(self.credentials)})
        address = f"{host}:{self.config.server.grpc_port}"
        self.port = self.server.add_insecure_port(address)
        if not self.port:
            raise OSError(f"cannot listen on {address}")
        await self.server.start()
        offload.start(self.config.server.offload_workers)
        if self.config.server.metrics:
            self.metrics_port = self.config.server.metrics_port or free_port(host)
            self._stop_metrics = metrics.serve(host, self.metrics_port, metrics.StateCollector(self.registry, self.cache, self.embedder))
        log.info(
            "listening",
            extra={"grpc": f"{host}:{self.port}", "metrics": f"{host}:{self.metrics_port}" if self.metrics_port else None,
                   "dialects": [d.name for d in self.dialects]},
        )
        if self.config.auth.keys_file and self.config.auth.reload_interval_seconds > 0:
            self._watch_task = asyncio.create_task(self._watch_keys(self.config.auth.reload_interval_seconds))
        self.registry.start()
        return self.port

    # -- health -----------------------------------------------------------------------------------

    def _set_health(self, model_id: str, status: int) -> None:
        """Called from loader and batcher threads: the server follows its default model, unless it is condemned.
        Updates are posted under a lock, so the loop applies them in the order they were decided."""
        assert self._loop is not None
        names = [f"model:{model_id}"] if self.config.server.health_per_model else []
        with self._health_lock:
            if model_id == self.registry.default_id and not (self._condemned and status == health_pb2.HealthCheckResponse.SERVING):
                names += ["", *self.service_names]
            for name in names:
                asyncio.run_coroutine_threadsafe(self.health.set(name, status), self._loop)

    def _model_ready(self, model: ServedModel) -> None:
        self._set_health(model.id, health_pb2.HealthCheckResponse.SERVING)

    def _model_failed(self, model_id: str, permanent: bool = False) -> None:
        """A model's batcher died: NOT_SERVING until it is running again (the batcher starts over). One that died too
        often stays down for good, whichever model it serves: then the whole server goes NOT_SERVING, so Envoy stops
        routing here and the pod's liveness probe (the server's health) has the kubelet replace the container; a
        replica serving its other models with one model dead would otherwise run on unnoticed, never recovering."""
        self._set_health(model_id, health_pb2.HealthCheckResponse.NOT_SERVING)
        if permanent:
            log.error("a model is out of service for good on this replica: the server reports NOT_SERVING so that it is "
                      "replaced", extra={"model": model_id})
            assert self._loop is not None
            with self._health_lock:  # for good: a later recovery or load of the default model must not undo it
                self._condemned = True
                for name in ["", *self.service_names]:
                    asyncio.run_coroutine_threadsafe(self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING), self._loop)

    # -- keys -------------------------------------------------------------------------------------

    def reload_credentials(self) -> None:
        """SIGHUP or a changed keys file: re-read the keys; a bad or empty set keeps the previous one."""
        self.credentials.reload()

    async def _watch_keys(self, interval: float) -> None:
        """A Kubernetes Secret volume changes its file in place and sends no signal: poll it (it is tiny)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval)
            try:
                fingerprint = await loop.run_in_executor(None, self.credentials.file_fingerprint)
                if fingerprint is not None and fingerprint != self.credentials.fingerprint:
                    await loop.run_in_executor(None, self.reload_credentials)
                    # A rejected file is not retried until it changes again.
                    self.credentials.fingerprint = fingerprint
            except Exception as e:  # noqa: BLE001 - a watcher that dies stops rotation and revocation for good
                log.error("keys watcher: a check failed; watching on", extra={"error": type(e).__name__})

    # -- shutdown ---------------------------------------------------------------------------------

    async def stop(self, grace: float | None = None) -> None:
        """Drains (see the module docstring), then stops everything."""
        started = time.monotonic()
        grace = self.config.server.grace_seconds if grace is None else grace
        delay = min(self.config.server.drain_delay_seconds, grace)
        await self.health.enter_graceful_shutdown()
        if self.config.server.sidecar_admin_url:
            await asyncio.get_running_loop().run_in_executor(None, self._fail_sidecar_health)
        log.info("draining", extra={"grace_seconds": grace, "drain_delay_seconds": delay, "inflight": self.calls.inflight})
        if self._watch_task is not None:
            self._watch_task.cancel()
        if delay > 0:
            await asyncio.sleep(delay)
        self.calls.refusing = True
        while self.calls.inflight > 0 and time.monotonic() - started < grace:
            await asyncio.sleep(0.05)
        await self.server.stop(max(0.0, grace - (time.monotonic() - started)))
        if self._stop_metrics:
            self._stop_metrics()
        await self.registry.close_providers()
        self.registry.stop()
        self.executor.shutdown(wait=False, cancel_futures=True)
        offload.stop()
        log.info("stopped", extra={"seconds": round(time.monotonic() - started, 2)})

    def _fail_sidecar_health(self) -> None:
        """Tells the Envoy beside us (a pod's sidecar) that we are going: it fails its readiness at once and closes its
        callers' keep-alive connections (HTTP/1 `Connection: close`, HTTP/2 GOAWAY), so they reconnect, through the
        Service, to another replica. kube-proxy never moves an open connection: without this, a keep-alive client
        would stay on this pod until the drain delay ends and it is refused."""
        url = self.config.server.sidecar_admin_url.rstrip("/") + "/healthcheck/fail"
        try:
            direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through an HTTP_PROXY
            with direct.open(urllib.request.Request(url, data=b"", method="POST"), timeout=1.0) as r:
                log.info("told the Envoy sidecar to drain its connections", extra={"status": r.status})
        except OSError as e:
            log.warning("could not tell the Envoy sidecar to drain", extra={"error": type(e).__name__})

    async def wait(self) -> None:
        await self.server.wait_for_termination()


async def serve(config: Config) -> None:
    server = EmbeddingServer(config)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: loop.run_in_executor(None, server.reload_credentials))
    # A library that forks (without exec) must not hand its child our signal wakeup fd: a signal to that child would be
    # read here as our own (it was: OpenVINO's telemetry child, SIGTERMed after 3 s, stopped the server).
    os.register_at_fork(after_in_child=lambda: signal.set_wakeup_fd(-1))
    await stop.wait()
    await server.stop()
