"""Where a short text's time goes, stage by stage, and what many one-text clients and one bulk stream reach.

- Stages: one new (uncached) 10–16-word text at a time, measured on every layer from the inside out — the forward
  pass alone (the runtime, on the padded batch the batcher would build), the engine in process (tokenize, queue,
  forward, pool, normalize), native gRPC to the server, gRPC through Envoy, REST through Envoy (OpenAI route) — so
  each layer's cost is the difference to the one inside it; the server's own timing headers split the engine part
  (tokenization, queue, inference) on the REST path.
- Many clients: C concurrent clients each sending one text at a time through Envoy REST (the query path of every
  search product), against the batched 32 × 32 throughput.
- Bulk ingestion: one client streaming N texts over one connection through TEI's `tei.v1.Embed/EmbedStream` (through
  Envoy), against the engine in process on the same texts.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np


def short_texts(corpus: list[str], n: int, seed: int = 13) -> list[str]:
    """n distinct 10-16-word texts (new to the server: each is sent once)."""
    rng = np.random.default_rng(seed)
    words = " ".join(corpus).split()
    out = []
    for i in range(n):
        k = int(rng.integers(10, 17))
        start = int(rng.integers(0, len(words) - k))
        out.append(" ".join(words[start : start + k]).rstrip(".,") + f" ({i}).")
    return out


def pct(values: list[float]) -> tuple[float, float]:
    ms = np.array(values) * 1000
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


async def forward_only(model, texts: list[str], idle: float = 0.0) -> list[float]:
    """The runtime alone, on the batch the batcher builds for one text (padded as it pads); the first ten are a
    warm-up, not counted. `idle`: seconds slept before each pass, as a served request comes after the client, Envoy
    and gRPC ran (on a shared host the caches go cold in that gap)."""
    tok = model.tokenizer
    multiple = model.runtime.seq_multiple
    out = []
    for i, text in enumerate([*texts[:10], *texts]):
        ids = tok.encode([text], truncate=True)[0].ids
        width = -(-len(ids) // multiple) * multiple if multiple > 1 else len(ids)
        batch = np.zeros((1, width), dtype=np.int64)
        batch[0, : len(ids)] = ids
        mask = (batch != 0).astype(np.int64)
        if idle:
            time.sleep(idle)
        t0 = time.perf_counter()
        model.runtime.forward(batch, mask, np.zeros_like(batch), alone=True)
        if i >= 10:
            out.append(time.perf_counter() - t0)
    return out


async def engine_latency(embedder, texts: list[str]) -> list[float]:
    from service.engine.pipeline import EmbedRequest

    out = []
    for text in texts:
        t0 = time.perf_counter()
        await embedder.embed(EmbedRequest(inputs=[text], use_cache=False))
        out.append(time.perf_counter() - t0)
    return out


async def grpc_latency(target: str, texts: list[str]) -> list[float]:
    import grpc

    from ai.inworld.embedding.v1alpha import embedding_service_pb2 as pb
    from ai.inworld.embedding.v1alpha import embedding_service_pb2_grpc as pb_grpc

    out = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        await stub.Embed(pb.EmbedRequest(inputs=[pb.EmbedRequest.Input(text="warm up")]))
        for text in texts:
            t0 = time.perf_counter()
            await stub.Embed(pb.EmbedRequest(inputs=[pb.EmbedRequest.Input(text=text)]))
            out.append(time.perf_counter() - t0)
    return out


async def rest_latency(port: int, model: str, texts: list[str]) -> tuple[list[float], dict[str, list[float]]]:
    """Latency through Envoy REST, and the server's own timing headers for each request (seconds)."""
    from .clients import HttpClient

    client = HttpClient("127.0.0.1", port)
    out: list[float] = []
    server: dict[str, list[float]] = {"x-compute-time": [], "x-tokenization-time": [], "x-queue-time": [], "x-inference-time": []}
    try:
        await client.request("/v1/embeddings", {"input": "warm up", "model": model, "encoding_format": "base64"})
        for text in texts:
            t0 = time.perf_counter()
            status, _, headers = await client.request_with_headers("/v1/embeddings", {"input": text, "model": model, "encoding_format": "base64"})
            out.append(time.perf_counter() - t0)
            assert status == 200
            for k in server:
                server[k].append(float(headers.get(k, "0")) / 1000)
    finally:
        await client.close()
    return out, server


def stage_table(rows: dict[str, list[float]], server: dict[str, list[float]]) -> list[tuple[str, float, float, float]]:
    """(stage, p50 ms, p99 ms, p50 ms added by this layer) from the inside out."""
    order = ["forward pass (runtime alone)", "engine in process", "native gRPC (direct)", "gRPC through Envoy", "REST through Envoy"]
    out = []
    inner = 0.0
    for name in order:
        if name not in rows:
            continue
        p50, p99 = pct(rows[name])
        out.append((name, p50, p99, p50 - inner))
        inner = p50
    for name in rows:
        if name not in order:  # measured beside the layers, not one of them
            p50, p99 = pct(rows[name])
            out.append((f"  {name}", p50, p99, float("nan")))
    for key, label in (("x-tokenization-time", "  server: tokenization"), ("x-queue-time", "  server: queue (until its batch starts)"),
                       ("x-inference-time", "  server: forward pass + pooling"), ("x-compute-time", "  server: all of the pipeline")):
        if server.get(key):
            p50, p99 = pct(server[key])
            out.append((label, p50, p99, float("nan")))
    return out


async def one_text_clients(port: int, model: str, texts: list[str], clients: int) -> tuple[float, int, list[float]]:
    """C clients, one text per request, until `texts` are all sent: (seconds, tokens unknown → texts, latencies)."""
    from .clients import HttpClient, drive

    client = HttpClient("127.0.0.1", port, "/v1/embeddings")

    async def send(batch):
        await client.post({"input": batch, "model": model, "encoding_format": "base64"})

    try:
        run = await drive([[t] for t in texts], clients, send)
    finally:
        await client.close()
    return run.seconds, run.errors, run.latencies


def cpu_seconds(pid: int | str = "self") -> float:
    """CPU time (user + system, every thread) a process has used so far: what each party of a run costs the machine."""
    import os

    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def bulk_stream(target: str, texts: list[str], window: int = 2048, bar=None) -> tuple[float, int]:
    """Streams `texts` over one TEI EmbedStream call (one message each), `window` in flight: (seconds, answers).

    2048 in flight, more than the server takes (its window of ~1,150, streams.WINDOW × streams.GROUP and an inbox): as a
    client writing as fast as flow control lets it would, so the server holds as many texts as it batches from. With
    512 in flight the server has only those 512 to batch: measured, 26.1k tokens/s against 28.3k at 2048."""
    import grpc

    from tei.v1 import tei_pb2, tei_pb2_grpc

    answers = 0
    async with grpc.aio.insecure_channel(target, options=[("grpc.max_receive_message_length", 64 << 20)]) as channel:
        stub = tei_pb2_grpc.EmbedStub(channel)
        call = stub.EmbedStream(timeout=3600)
        sent = asyncio.Semaphore(window)

        async def writer():
            for text in texts:
                await sent.acquire()
                await call.write(tei_pb2.EmbedRequest(inputs=text, normalize=True, truncate=True))
            await call.done_writing()

        t0 = time.perf_counter()
        task = asyncio.create_task(writer())
        try:
            async for _ in call:
                answers += 1
                sent.release()
                if bar is not None:
                    bar.update(1)
        finally:
            task.cancel()  # done if every text went; else its texts have no one to answer them
            (writer,) = await asyncio.gather(task, return_exceptions=True)
        seconds = time.perf_counter() - t0
        if answers != len(texts):
            why = f" (writing failed: {writer!r})" if isinstance(writer, Exception) else ""
            raise RuntimeError(f"the stream ended after {answers:,} of {len(texts):,} answers{why}")
    return seconds, answers
