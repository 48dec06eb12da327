"""Wiring only: builds the engine, registers every servicer, health and reflection, serves, drains."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ai.inworld.embedding.v1alpha import embedding_service_pb2 as inworld_pb
from ai.inworld.embedding.v1alpha import embedding_service_pb2_grpc as inworld_grpc
from embedding.dialects.v1 import hrflow_pb2, hrflow_pb2_grpc, huggingface_pb2, huggingface_pb2_grpc, openai_pb2, openai_pb2_grpc

from . import metrics, tracing
from .auth import CredentialStore
from .config import Config
from .interceptors import AuthInterceptor
from .dialects import hrflow, huggingface, inworld, openai
from .engine.cache import EmbeddingCache
from .engine.models import ModelRegistry, ServedModel
from .engine.pipeline import Embedder
from .launch import free_port

log = logging.getLogger(__name__)

SERVICE_NAMES = [
    inworld_pb.DESCRIPTOR.services_by_name["EmbeddingService"].full_name,
    openai_pb2.DESCRIPTOR.services_by_name["OpenAI"].full_name,
    huggingface_pb2.DESCRIPTOR.services_by_name["HuggingFace"].full_name,
    hrflow_pb2.DESCRIPTOR.services_by_name["HrFlow"].full_name,
]
# Big enough for the largest batch accepted (2048 inputs) in and out.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class EmbeddingServer:
    """The gRPC server and everything it owns; `start` returns once it listens, models load behind it."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.health = health.aio.HealthServicer()
        self.registry = ModelRegistry(
            config.models,
            config.limits,
            on_ready=self._model_ready,
            on_batch=metrics.observe_batch,
            inference_threads=config.server.inference_threads,
            providers=config.providers,
        )
        self.cache = EmbeddingCache(config.cache.max_bytes)
        # Tokenization runs here, beside (not on) the event loop and the batcher threads.
        self.executor = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 2), thread_name_prefix="tokenize")
        self.embedder = Embedder(self.registry, config.limits, self.cache, self.executor)
        self.credentials = CredentialStore(config.auth.keys_file)
        tracer = tracing.setup(config.tracing)
        self.server = grpc.aio.server(
            # Tracing first, so a refused call is traced too.
            interceptors=[i for i in (tracer, AuthInterceptor(self.credentials)) if i is not None],
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),
            ]
        )
        self.port = 0
        self.metrics_port = 0
        self._stop_metrics = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> int:
        self._loop = asyncio.get_running_loop()
        # One servicer per dialect, all over the same embedder.
        inworld_grpc.add_EmbeddingServiceServicer_to_server(inworld.InworldServicer(self.embedder), self.server)
        openai_pb2_grpc.add_OpenAIServicer_to_server(
            openai.OpenAIServicer(self.embedder, auto_truncate=self.config.limits.auto_truncate), self.server
        )
        huggingface_pb2_grpc.add_HuggingFaceServicer_to_server(huggingface.HuggingFaceServicer(self.embedder), self.server)
        hrflow_pb2_grpc.add_HrFlowServicer_to_server(hrflow.HrFlowServicer(self.embedder), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection([*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server)
        for name in ["", *SERVICE_NAMES]:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        host = self.config.server.host
        if not self.credentials.enabled:
            if host not in ("127.0.0.1", "localhost", "::1") and not self.config.auth.allow_open_non_loopback:
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
        if self.config.server.metrics:
            self.metrics_port = self.config.server.metrics_port or free_port(host)
            self._stop_metrics = metrics.serve(host, self.metrics_port, metrics.StateCollector(self.registry, self.cache, self.embedder))
        log.info("listening", extra={"grpc": f"{host}:{self.port}", "metrics": f"{host}:{self.metrics_port}" if self.metrics_port else None})
        self.registry.start()
        return self.port

    def _model_ready(self, model: ServedModel) -> None:
        """Called from the loader thread: the server is SERVING once its default model is."""
        assert self._loop is not None
        names = [f"model:{model.id}"]
        if model.id == self.registry.default_id:
            names += ["", *SERVICE_NAMES]
        for name in names:
            asyncio.run_coroutine_threadsafe(self.health.set(name, health_pb2.HealthCheckResponse.SERVING), self._loop)

    def reload_credentials(self) -> None:
        """SIGHUP: re-read the keys; in-flight and new requests carry on (the store swaps atomically)."""
        try:
            self.credentials.reload()
        except Exception as e:  # a broken file keeps the keys we have
            log.error("credentials not reloaded; keeping the previous ones", extra={"error": str(e)})

    async def stop(self, grace: float | None = None) -> None:
        """Drains: health goes NOT_SERVING, new calls are refused, in-flight ones get `grace` seconds."""
        grace = self.config.server.grace_seconds if grace is None else grace
        await self.health.enter_graceful_shutdown()
        log.info("draining", extra={"grace_seconds": grace})
        await self.server.stop(grace)
        if self._stop_metrics:
            self._stop_metrics()
        await self.registry.close_providers()
        self.registry.stop()
        self.executor.shutdown(wait=False, cancel_futures=True)
        log.info("stopped")

    async def wait(self) -> None:
        await self.server.wait_for_termination()


async def serve(config: Config) -> None:
    server = EmbeddingServer(config)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, server.reload_credentials)
    await stop.wait()
    await server.stop()
