"""TEI's own gRPC API, `tei.v1` (proto/tei/v1/tei.proto, TEI's file as published: code generated from it calls us):
Info, Embed (Embed, EmbedAll and their streams; EmbedSparse answers that the model is dense) and Tokenize (Tokenize,
Decode and their streams), with TEI's gRPC semantics: one input per message, proto3 defaults, TEI's status codes, and
streams that answer one response per request, in order (the stream machinery is service/streams.py)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, AsyncIterator, Awaitable, Callable

import grpc
import numpy as np

from tei.v1 import tei_pb2 as tei

from ... import errors, metrics, rpc, streams
from ...engine import tokenization
from ...engine.pipeline import EmbedRequest, EmbedResult, caller
from ..common import as_message
from ._shared import _C, Base, Ctx, backend_codes, dialect, simple_tokens, sparse

log = logging.getLogger(__name__)
FIELDS_PER_TOKEN = tokenization.FIELDS_PER_TOKEN

# -- gRPC: tei.v1 -----------------------------------------------------------------------------------------------

DIRECTIONS = {tei.TRUNCATION_DIRECTION_RIGHT: "right", tei.TRUNCATION_DIRECTION_LEFT: "left"}


def grpc_direction(value: int) -> str:
    try:
        return DIRECTIONS[value]
    except KeyError:
        raise errors.invalid_argument(f"Unknown truncation_direction value {value}.", "truncation_direction") from None


def grpc_embed_core(requests: list[Any], call: rpc.Call, all_tokens: bool = False) -> EmbedRequest:
    """EmbedRequests (or EmbedAllRequests) with the same options as one core request, one input each."""
    first = requests[0]
    return EmbedRequest(
        inputs=[m.inputs for m in requests],
        model=call.settings["model"],
        # TEI 1.9's `optional bool normalize`: unset is true (as its HTTP API); clients of older protos that set it true
        # send it, and one that left it false (not on the wire) now gets what current TEI gives, a unit vector.
        normalize=False if all_tokens else (first.normalize if first.HasField("normalize") else True),
        # `optional uint32 dimensions` (TEI 1.9): the first N components, normalized again when normalizing.
        dimensions=None if all_tokens else grpc_dimensions(first),
        truncate=first.truncate,
        truncation_direction=grpc_direction(first.truncation_direction),
        prompt_name=first.prompt_name if first.HasField("prompt_name") else None,
        token_embeddings=all_tokens,
        use_cache=not all_tokens,
        deadline=call.deadline,
        param="inputs",
    )


def grpc_dimensions(request: Any) -> int | None:
    if not request.HasField("dimensions"):
        return None
    if request.dimensions == 0:
        raise errors.invalid_argument("`dimensions` should be positive", "dimensions")  # TEI's own words
    return request.dimensions


def grpc_embed_one(request: tei.EmbedRequest, call: rpc.Call) -> EmbedRequest:
    return grpc_embed_core([request], call)


def grpc_embed_all_one(request: tei.EmbedAllRequest, call: rpc.Call) -> EmbedRequest:
    return grpc_embed_core([request], call, all_tokens=True)


def metadata(result: EmbedResult, i: int | None, chars: int) -> tei.Metadata:
    """TEI's per-response Metadata: one input's tokens (i), or the whole request's (None); times in ns."""
    t = result.timings
    return tei.Metadata(
        compute_chars=chars,
        compute_tokens=result.total_tokens if i is None else result.token_counts[i],
        total_time_ns=int(t.total * 1e9),
        tokenization_time_ns=int(t.tokenize * 1e9),
        queue_time_ns=int(t.queue * 1e9),
        inference_time_ns=int(t.inference * 1e9),
    )


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def embed_response(result: EmbedResult, i: int, chars: int) -> bytes:
    """An EmbedResponse in wire form (`embeddings` is a packed float field: the vector's little-endian bytes as they
    are), passed through by the servicers' serializer: no Python object for the many answers of a stream."""
    floats = result.vectors[i].astype("<f4", copy=False).tobytes()
    md = metadata(result, i, chars).SerializeToString()
    return b"\x0a" + _varint(len(floats)) + floats + b"\x12" + _varint(len(md)) + md


def embed_all_response(result: EmbedResult, i: int, chars: int) -> bytes:
    """An EmbedAllResponse in wire form (the servicers' serializer passes bytes through), built with numpy: each
    token's `TokenEmbedding` is field 1 holding its packed floats, the same length for every token, so the whole answer
    is one array of fixed-size records. Built as Python objects (a message and a list of floats per token), a stream's
    512 answers held the event loop ~250 ms: every other caller waited that long."""
    matrix = np.ascontiguousarray((result.token_embeddings or [])[i], dtype="<f4")
    floats = matrix.shape[1] * 4
    inner = b"\x0a" + _varint(floats)  # TokenEmbedding.embeddings
    outer = b"\x0a" + _varint(len(inner) + floats)  # EmbedAllResponse.token_embeddings
    head = np.frombuffer(outer + inner, dtype=np.uint8)
    records = np.empty((matrix.shape[0], len(head) + floats), dtype=np.uint8)
    records[:, : len(head)] = head
    records[:, len(head):] = matrix.view(np.uint8).reshape(matrix.shape[0], floats)
    md = metadata(result, i, chars).SerializeToString()
    return records.tobytes() + b"\x12" + _varint(len(md)) + md


def encode_responses(done: tokenization.Tokenized) -> list[bytes]:
    """Each input's EncodeResponse in wire form (passed through by the servicers' serializer). A message per token:
    built on the event loop, a 66,000-token text held every caller ~400 ms; so a large answer is built in an offload
    worker (`rpc.encode`), which `done`'s flat arrays cross cheaply."""
    return [encode_response(e).SerializeToString() for e in done.encodings]


def encode_response(e: tokenization.Encoded) -> tei.EncodeResponse:
    tokens = []
    for t in simple_tokens(e):
        if t["special"]:
            tokens.append(tei.SimpleToken(id=t["id"], text=t["text"], special=True))
        else:
            tokens.append(tei.SimpleToken(id=t["id"], text=t["text"], special=False, start=t["start"], stop=t["stop"]))
    return tei.EncodeResponse(tokens=tokens)


def _observe(result: EmbedResult) -> None:
    """A streamed group's inputs and tokens in the metrics (the stream itself counts as one request)."""
    t = result.timings
    metrics.STAGE_SECONDS.labels(result.model, "tokenize").observe(t.tokenize)
    metrics.STAGE_SECONDS.labels(result.model, "queue").observe(t.queue)
    metrics.STAGE_SECONDS.labels(result.model, "inference").observe(t.inference)
    metrics.INPUTS.labels(result.model).inc(len(result.token_counts))
    metrics.TOKENS.labels(result.model).inc(result.total_tokens)


class _GrpcBase(Base):
    async def stream(self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext,
                     run: Callable[[list[Any]], Awaitable[streams.Group]]) -> None:
        """A bidirectional stream (service/streams.py: in order, bounded in work, bytes, time and number), answered
        with context.write so that a caller that reads none of its answers is ended after limits.stream_idle_seconds;
        failures as TEI's gRPC statuses; one request in the metrics."""
        began = time.perf_counter()
        code = "OK"
        server_streams = streams.server_streams()
        idle = server_streams.limits.stream_idle_seconds
        try:
            with server_streams.opened(caller.get()):
                async for response in streams.in_order(requests, run, min(streams.GROUP, self.embedder.limits.max_client_batch_size),
                                                       server_streams):
                    try:
                        await asyncio.wait_for(context.write(response), idle)
                    except asyncio.TimeoutError:
                        raise streams.idle_error(idle, "read none of its answers") from None
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception as exc:  # noqa: BLE001 - a ServiceError in TEI's code; anything else INTERNAL, without its details
            if isinstance(exc, errors.ServiceError):
                err = backend_codes(exc)
            else:
                log.exception("stream failed", extra={"dialect": "tei"})
                err = backend_codes(errors.internal())
            code = err.code.name
            await context.abort(err.code, err.message, trailing_metadata=errors.trailing_metadata(err, dialect()))
        finally:
            metrics.observe_request("tei", "", code, time.perf_counter() - began)

    async def embed_waiting(self, core: EmbedRequest) -> EmbedResult:
        """`Embedder.embed`, waiting while the server is at its limits (a stream's requests wait, as in TEI)."""
        return await streams.waiting(lambda: self.embedder.embed(core), core.deadline)

    async def embed_group(self, group: list[Any], call: rpc.Call, respond_one: Callable[[EmbedResult, int, int], Any], all_tokens: bool) -> streams.Group:
        out: list[Any] = []
        options = (lambda m: (m.truncate, m.truncation_direction, m.HasField("prompt_name"), m.prompt_name)) if all_tokens else \
            (lambda m: (m.truncate, m.HasField("normalize"), m.normalize, m.HasField("dimensions"), m.dimensions, m.truncation_direction,
                        m.HasField("prompt_name"), m.prompt_name))
        for run in streams.runs(group, options):
            try:
                result = await self.embed_waiting(grpc_embed_core(run, call, all_tokens))
            except errors.ServiceError as err:
                if err.code != _C.INVALID_ARGUMENT or len(run) == 1:
                    return out, err
                # One input spoiled the run: answer the ones before it, then fail with its error.
                for m in run:
                    try:
                        one = await self.embed_waiting(grpc_embed_core([m], call, all_tokens))
                    except errors.ServiceError as err_one:
                        return out, err_one
                    _observe(one)
                    out.append(respond_one(one, 0, len(m.inputs)))
                continue
            _observe(result)
            out.extend(respond_one(result, i, len(m.inputs)) for i, m in enumerate(run))
        return out, None


class TeiInfoServicer(_GrpcBase):
    async def Info(self, raw: bytes, context: grpc.aio.ServicerContext) -> tei.InfoResponse:  # noqa: N802
        async def work() -> tei.InfoResponse:
            _, f = await self.info()
            return tei.InfoResponse(
                version=f["version"], docker_label=f["docker_label"], model_id=f["model_id"], model_sha=f["model_sha"],
                model_dtype=f["model_dtype"], model_type=tei.MODEL_TYPE_EMBEDDING,
                max_concurrent_requests=f["max_concurrent_requests"], max_input_length=f["max_input_length"],
                max_batch_tokens=f["max_batch_tokens"], max_batch_requests=f["max_batch_requests"],
                max_client_batch_size=f["max_client_batch_size"], tokenization_workers=f["tokenization_workers"],
            )

        return await rpc.handle(context, dialect(), work)


class TeiEmbedServicer(_GrpcBase):
    async def Embed(self, raw: bytes, context: grpc.aio.ServicerContext) -> tei.EmbedResponse:  # noqa: N802
        async def work() -> tei.EmbedResponse:
            try:
                core = await rpc.parse(raw, tei.EmbedRequest, grpc_embed_one, self.call(context))
                result = await self.embedder.embed(core)
            except errors.ServiceError as err:
                raise backend_codes(err) from None
            await rpc.respond(context, result, initial=True)  # TEI's gRPC server sends them as headers
            return embed_response(result, 0, len(core.inputs[0]))

        return await rpc.handle(context, dialect(), work)

    async def EmbedAll(self, raw: bytes, context: grpc.aio.ServicerContext) -> tei.EmbedAllResponse:  # noqa: N802
        async def work() -> tei.EmbedAllResponse:
            try:
                core = await rpc.parse(raw, tei.EmbedAllRequest, grpc_embed_all_one, self.call(context))
                result = await self.embedder.embed(core)
            except errors.ServiceError as err:
                raise backend_codes(err) from None
            await rpc.respond(context, result, initial=True)  # TEI's gRPC server sends them as headers
            return embed_all_response(result, 0, len(core.inputs[0]))

        return await rpc.handle(context, dialect(), work)

    async def EmbedStream(self, requests: AsyncIterator[tei.EmbedRequest], context: Ctx) -> None:  # noqa: N802
        call = self.call(context)
        await self.stream(requests, context, lambda group: self.embed_group(group, call, embed_response, all_tokens=False))

    async def EmbedAllStream(self, requests: AsyncIterator[tei.EmbedAllRequest], context: Ctx) -> None:  # noqa: N802
        call = self.call(context)
        await self.stream(requests, context, lambda group: self.embed_group(group, call, embed_all_response, all_tokens=True))

    async def EmbedSparse(self, raw: bytes, context: grpc.aio.ServicerContext) -> tei.EmbedSparseResponse:  # noqa: N802
        async def work() -> tei.EmbedSparseResponse:
            raise sparse()

        return await rpc.handle(context, dialect(), work)

    async def EmbedSparseStream(self, requests: AsyncIterator[Any], context: Ctx) -> None:  # noqa: N802
        async def refuse(group: list[Any]) -> streams.Group:
            return [], sparse()

        await self.stream(requests, context, refuse)


class TeiTokenizeServicer(_GrpcBase):
    async def tokenize_group(self, group: list[tei.EncodeRequest], deadline: float | None) -> streams.Group:
        out: list[Any] = []
        for run in streams.runs(group, lambda m: (m.add_special_tokens, m.HasField("prompt_name"), m.prompt_name)):
            first = run[0]
            prompt = first.prompt_name if first.HasField("prompt_name") else None
            try:
                done = await streams.waiting(lambda: tokenization.tokenize(self.embedder, self.model, [m.inputs for m in run], first.add_special_tokens,
                                                                   prompt, deadline=deadline), deadline)
            except errors.ServiceError as err:
                if err.code != _C.INVALID_ARGUMENT or len(run) == 1:
                    return out, err
                for m in run:
                    try:
                        one = await streams.waiting(lambda: tokenization.tokenize(self.embedder, self.model, [m.inputs], first.add_special_tokens, prompt,
                                                                          deadline=deadline), deadline)
                    except errors.ServiceError as err_one:
                        return out, err_one
                    out.extend(await rpc.encode(encode_responses, FIELDS_PER_TOKEN * len(one.ids), one))
                continue
            out.extend(await rpc.encode(encode_responses, FIELDS_PER_TOKEN * len(done.ids), done))
        return out, None

    async def decode_group(self, group: list[tei.DecodeRequest], deadline: float | None) -> streams.Group:
        out: list[Any] = []
        for run in streams.runs(group, lambda m: m.skip_special_tokens):
            try:
                _, texts = await streams.waiting(lambda: tokenization.decode(self.embedder, self.model, [list(m.ids) for m in run],
                                                                     run[0].skip_special_tokens, deadline=deadline), deadline)
            except errors.ServiceError as err:
                if err.code != _C.INVALID_ARGUMENT or len(run) == 1:
                    return out, err
                for m in run:
                    try:
                        _, one = await streams.waiting(lambda: tokenization.decode(self.embedder, self.model, [list(m.ids)], m.skip_special_tokens,
                                                                           deadline=deadline), deadline)
                    except errors.ServiceError as err_one:
                        return out, err_one
                    out.append(tei.DecodeResponse(text=one[0]))
                continue
            out.extend(tei.DecodeResponse(text=t) for t in texts)
        return out, None

    async def Tokenize(self, raw: bytes, context: grpc.aio.ServicerContext) -> tei.EncodeResponse:  # noqa: N802
        async def work() -> tei.EncodeResponse:
            request = await rpc.parse(raw, tei.EncodeRequest, as_message, rpc.Call())
            responses, failure = await self.tokenize_group([request], rpc.deadline(context))
            if failure is not None:
                raise backend_codes(failure)
            return responses[0]

        return await rpc.handle(context, dialect(), work)

    async def Decode(self, raw: bytes, context: grpc.aio.ServicerContext) -> tei.DecodeResponse:  # noqa: N802
        async def work() -> tei.DecodeResponse:
            request = await rpc.parse(raw, tei.DecodeRequest, as_message, rpc.Call())
            responses, failure = await self.decode_group([request], rpc.deadline(context))
            if failure is not None:
                raise backend_codes(failure)
            return responses[0]

        return await rpc.handle(context, dialect(), work)

    async def TokenizeStream(self, requests: AsyncIterator[tei.EncodeRequest], context: Ctx) -> None:  # noqa: N802
        deadline = rpc.deadline(context)
        await self.stream(requests, context, lambda group: self.tokenize_group(group, deadline))

    async def DecodeStream(self, requests: AsyncIterator[tei.DecodeRequest], context: Ctx) -> None:  # noqa: N802
        deadline = rpc.deadline(context)
        await self.stream(requests, context, lambda group: self.decode_group(group, deadline))
