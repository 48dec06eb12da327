"""Prometheus metrics, served on their own port (`server.metrics_port`) by a small bounded server (`MetricsServer`).

Counters and histograms are updated where things happen (the servicer wrapper, the batcher's callback);
queue depths, cache state and model load times are read at scrape time by a collector, so nothing on the
hot path keeps them up to date.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .streams import server_streams

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

REQUESTS = Counter("embedding_requests_total", "Requests answered, by dialect, model and gRPC status code", ["dialect", "model", "code"])
REQUEST_SECONDS = Histogram("embedding_request_duration_seconds", "Time to answer a request, by dialect", ["dialect"], buckets=LATENCY_BUCKETS)
STAGE_SECONDS = Histogram(
    "embedding_stage_duration_seconds", "Time a request spent per stage (tokenize, queue, inference)", ["model", "stage"], buckets=LATENCY_BUCKETS
)
INPUTS = Counter("embedding_inputs_total", "Inputs embedded", ["model"])
TOKENS = Counter("embedding_tokens_total", "Tokens embedded (special tokens included)", ["model"])
BATCH_SIZE = Histogram("embedding_batch_size", "Inputs per forward pass", ["model"], buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
BATCH_TOKENS = Histogram(
    "embedding_batch_tokens", "Tokens per forward pass, padding included", ["model"], buckets=(16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384)
)
CREDENTIAL_RELOADS = Counter(
    "embedding_credential_reloads", "Reloads of the API keys by result: ok, invalid (kept the previous keys), empty (kept them too)", ["result"]
)
LONG_INPUTS = Counter("embedding_long_inputs", "Inputs longer than the model reads, by what was done: truncated or chunked", ["model", "action"])
BATCH_SECONDS = Histogram("embedding_batch_duration_seconds", "Time of one forward pass with pooling", ["model"], buckets=LATENCY_BUCKETS)


def observe_batch(model: str, stats) -> None:
    BATCH_SIZE.labels(model).observe(stats.size)
    BATCH_TOKENS.labels(model).observe(stats.padded_tokens)
    BATCH_SECONDS.labels(model).observe(stats.seconds)


def observe_request(dialect: str, model: str, code: str, seconds: float, result=None) -> None:
    REQUESTS.labels(dialect, model, code).inc()
    REQUEST_SECONDS.labels(dialect).observe(seconds)
    if result is not None:
        t = result.timings
        STAGE_SECONDS.labels(result.model, "tokenize").observe(t.tokenize)
        STAGE_SECONDS.labels(result.model, "queue").observe(t.queue)
        STAGE_SECONDS.labels(result.model, "inference").observe(t.inference)
        INPUTS.labels(result.model).inc(len(result.token_counts))
        if result.truncated:
            LONG_INPUTS.labels(result.model, "truncated").inc(result.truncated)
        if result.chunked:
            LONG_INPUTS.labels(result.model, "chunked").inc(result.chunked)
        TOKENS.labels(result.model).inc(result.total_tokens)


# What StateCollector reports at scrape time: (name as exposed, type, labels, help).
STATE_METRICS = [
    ("embedding_queue_inputs", "gauge", "model", "Inputs waiting in a model's queue"),
    ("embedding_queue_tokens", "gauge", "model", "Tokens waiting in a model's queue"),
    ("embedding_model_load_seconds", "gauge", "model", "Seconds the model took to load"),
    ("embedding_model_ready", "gauge", "model, runtime", "1 once the model serves"),
    ("embedding_inflight_requests", "gauge", "", "Requests being served"),
    ("embedding_cache_hits_total", "counter", "", "Inputs answered from the embedding cache"),
    ("embedding_cache_misses_total", "counter", "", "Inputs the cache did not hold"),
    ("embedding_cache_hit_ratio", "gauge", "", "Cache hits over lookups"),
    ("embedding_cache_bytes", "gauge", "", "Memory held by the embedding cache"),
    ("embedding_streams_open", "gauge", "", "Streams being served"),
    ("embedding_stream_bytes", "gauge", "", "Bytes the streams hold: requests read and not answered, answers not yet sent"),
]
_HELP = {name.removesuffix("_total"): doc for name, _, _, doc in STATE_METRICS}


class StateCollector(Collector):
    """Queue depth, in-flight requests, cache and model state, read when Prometheus scrapes."""

    def __init__(self, registry, cache, embedder) -> None:
        self.registry, self.cache, self.embedder = registry, cache, embedder

    def collect(self):
        depth = GaugeMetricFamily("embedding_queue_inputs", _HELP["embedding_queue_inputs"], labels=["model"])
        queued = GaugeMetricFamily("embedding_queue_tokens", _HELP["embedding_queue_tokens"], labels=["model"])
        load = GaugeMetricFamily("embedding_model_load_seconds", _HELP["embedding_model_load_seconds"], labels=["model"])
        ready = GaugeMetricFamily("embedding_model_ready", _HELP["embedding_model_ready"], labels=["model", "runtime"])
        for model in self.registry.loaded():
            depth.add_metric([model.id], model.batcher.queued_inputs)
            queued.add_metric([model.id], model.batcher.queued_tokens)
            load.add_metric([model.id], model.load_seconds)
            ready.add_metric([model.id, model.runtime.describe()], 1)
        yield from (depth, queued, load, ready)
        yield GaugeMetricFamily("embedding_inflight_requests", _HELP["embedding_inflight_requests"], value=self.embedder.inflight)
        yield CounterMetricFamily("embedding_cache_hits", _HELP["embedding_cache_hits"], value=self.cache.hits)
        yield CounterMetricFamily("embedding_cache_misses", _HELP["embedding_cache_misses"], value=self.cache.misses)
        yield GaugeMetricFamily("embedding_cache_hit_ratio", _HELP["embedding_cache_hit_ratio"], value=self.cache.hit_rate)
        yield GaugeMetricFamily("embedding_cache_bytes", _HELP["embedding_cache_bytes"], value=self.cache.bytes)
        streams = server_streams()
        yield GaugeMetricFamily("embedding_streams_open", _HELP["embedding_streams_open"], value=streams.open)
        yield GaugeMetricFamily("embedding_stream_bytes", _HELP["embedding_stream_bytes"], value=streams.budget.held)


class MetricsServer:
    """`/metrics` over HTTP/1.1, in one thread of its own, bounded so that no caller can make it cost the serving path.

    prometheus_client's own server runs a thread per connection with no timeout: 2,000 connections that sent half a
    request held 2,000 threads, and once they closed the process sat at ~150 % CPU for minutes, a one-text request
    taking 0.3-2 s instead of ~10 ms. Here one event loop (in this server's thread, never the gRPC server's) holds at
    most `max_connections` connections, closing any beyond that at once; a request must arrive whole within
    `timeout` seconds and fit in 8 KiB; one request per connection; and the exposition is built at most once per
    `min_interval` seconds, however many scrapes ask for it. In a pod or the image, Envoy's metrics listener is in
    front of it (its own connection limits and timeouts) and this one listens on loopback only.
    """

    MAX_REQUEST_BYTES = 8192

    def __init__(self, host: str, port: int, registry=REGISTRY, max_connections: int = 8, timeout: float = 5.0,
                 min_interval: float = 1.0) -> None:
        self.host, self.port, self.registry = host, port, registry
        self.max_connections, self.timeout, self.min_interval = max_connections, timeout, min_interval
        self.active = 0
        self._cached: tuple[float, bytes] = (float("-inf"), b"")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="metrics", daemon=True)

    def start(self) -> int:
        """Listens (raises OSError if it cannot); returns the port."""
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self.port

    def stop(self) -> None:
        if self._loop is not None and self._server is not None:
            self._loop.call_soon_threadsafe(self._server.close)
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(2)

    def _run(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        try:
            self._server = loop.run_until_complete(asyncio.start_server(self._handle, self.host, self.port, backlog=64,
                                                                        limit=self.MAX_REQUEST_BYTES))
            self.port = self._server.sockets[0].getsockname()[1]
        except BaseException as e:  # noqa: BLE001 - reported to start()
            self._error = e
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    def exposition(self) -> bytes:
        now = time.monotonic()
        at, body = self._cached
        if now - at >= self.min_interval:
            body = generate_latest(self.registry)
            self._cached = (now, body)
        return body

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.active >= self.max_connections:
            writer.transport.abort()
            return
        self.active += 1
        closed = False
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.timeout)
            except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                return
            parts = head.split(b"\r\n", 1)[0].split(b" ")
            method, path = (parts[0], parts[1].split(b"?", 1)[0]) if len(parts) == 3 else (b"", b"")
            if method not in (b"GET", b"HEAD"):
                status, body, kind = b"405 Method Not Allowed", b"only GET /metrics\n", b"text/plain"
            elif path in (b"/metrics", b"/"):
                status, body, kind = b"200 OK", self.exposition(), CONTENT_TYPE_LATEST.encode()
            else:
                status, body, kind = b"404 Not Found", b"only GET /metrics\n", b"text/plain"
            writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: " + kind + b"\r\nContent-Length: " + str(len(body)).encode()
                         + b"\r\nConnection: close\r\n\r\n" + (body if method == b"GET" else b""))
            writer.close()  # once what is buffered has been sent
            try:
                await asyncio.wait_for(writer.wait_closed(), self.timeout)
                closed = True
            except (asyncio.TimeoutError, ConnectionError):
                return
        finally:
            self.active -= 1
            if not closed:  # a caller that sent half a request, or stopped reading: dropped, never waited on
                writer.transport.abort()


def serve(host: str, port: int, collector: Collector) -> Callable[[], None] | None:
    """Starts the metrics endpoint (port 0: none); returns a function that stops it."""
    REGISTRY.register(collector)
    if not port:
        return None
    server = MetricsServer(host, port)
    server.start()
    return server.stop
