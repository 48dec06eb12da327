"""Text Embeddings Inference (huggingface/text-embeddings-inference) for an embedding model: its HTTP routes and
its own gRPC API, `tei.v1` (proto/tei/v1/tei.proto, TEI's file as published: code generated from it calls us).

HTTP (`proto/embedding/dialects/v1/tei.proto`): `POST /embed` and `POST /` (TEI's route for an embedding model),
`POST /embed_all`, `POST /tokenize`, `POST /decode`, `GET /info`, `GET /health`; answers and errors as TEI writes
them (`{"error": ..., "error_type": ...}` with TEI's statuses: Empty 400, Validation 413, a body of the wrong
shape 422, Backend 424, Overloaded 429, Unhealthy 503). TEI's HTTP defaults: `normalize` true, `truncate` the
server's `limits.auto_truncate`, `add_special_tokens` and `skip_special_tokens` true.

gRPC: `tei.v1.Info`, `tei.v1.Embed` (Embed, EmbedAll and their streams; EmbedSparse answers that the model is
dense) and `tei.v1.Tokenize` (Tokenize, Decode and their streams), with TEI's gRPC semantics: one input per
message, proto3 defaults (normalize, truncate, add_special_tokens false), TEI's status codes, and streams that
answer one response per request, in order. A stream keeps up to `WINDOW` groups of up to `GROUP` requests in
flight at once, so the batcher sees many inputs together; a reader that falls behind stops it reading more.

TEI requests name no model: the default model answers, or the one `dialects.model.tei` names (once the
configuration has it).
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.metadata
import logging
import math
import os
import time
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

import grpc
from google.protobuf.message import DecodeError
import numpy as np
from google.api import httpbody_pb2
from google.protobuf import struct_pb2

from embedding.dialects.v1 import tei_pb2 as pb
from tei.v1 import tei_pb2 as tei

from .. import auth, errors, metrics, rpc
from ..engine import tokenization
from ..engine.folder import read_folder
from ..engine.models import RemoteModel, ServedModel
from ..engine.pipeline import EmbedRequest, EmbedResult, Embedder
from . import Dialect
from .common import add_servicer, as_message, count_inputs, json_body, token_ids

log = logging.getLogger(__name__)
T = TypeVar("T")

# -- errors -----------------------------------------------------------------------------------------------------

# A body of the wrong shape (a field of the wrong type, an unknown enum value): TEI's JSON extractor answers 422.
UNPROCESSABLE = "UNPROCESSABLE_ENTITY"
_C = grpc.StatusCode
Ctx = grpc.aio.ServicerContext


def classify(err: errors.ServiceError) -> tuple[int, str]:
    """(HTTP status, TEI `error_type`) of a failure, as TEI reports it."""
    code = err.code
    if code == _C.INVALID_ARGUMENT:
        if err.reason == "EMPTY_INPUT":
            return 400, "Empty"
        if err.reason in (UNPROCESSABLE, "MALFORMED_REQUEST"):
            return 422, "Validation"
        return 413, "Validation"  # too many inputs, too long, an unknown prompt_name: TEI's Validation
    if code == _C.RESOURCE_EXHAUSTED:
        return 429, "Overloaded"
    if code == _C.UNAVAILABLE:
        return 503, "Unhealthy"
    if code in (_C.FAILED_PRECONDITION, _C.INTERNAL):
        return 424, "Backend"
    if code in (_C.UNAUTHENTICATED, _C.PERMISSION_DENIED):
        return err.http_status, "Unauthorized"
    if code == _C.NOT_FOUND:
        return 404, "NotFound"
    return err.http_status, "Backend"


def error_body(err: errors.ServiceError) -> dict[str, Any]:
    return {"error": err.message, "error_type": classify(err)[1]}


def http_status(err: errors.ServiceError) -> int:
    return classify(err)[0]


def unprocessable(field: str, message: str) -> errors.ServiceError:
    return errors.invalid_argument(f"Failed to deserialize the JSON body into the target type: {field}: {message}", field, UNPROCESSABLE)


def backend_codes(err: errors.ServiceError) -> errors.ServiceError:
    """TEI's gRPC code for a failure: its Backend errors (ours: INTERNAL, a failed forward pass) are FAILED_PRECONDITION."""
    if err.code == _C.INTERNAL:
        return dataclasses.replace(err, code=_C.FAILED_PRECONDITION, message=f"Backend error: {err.message}")
    return err


# -- reading TEI's loosely typed JSON fields ---------------------------------------------------------------------


def _describe(v: struct_pb2.Value) -> str:
    """A JSON value as serde names it in its errors (`invalid type: string "x", expected a boolean`)."""
    kind = v.WhichOneof("kind")
    if kind == "string_value":
        return f'string "{v.string_value[:40]}"'
    if kind == "bool_value":
        return f"boolean `{str(v.bool_value).lower()}`"
    if kind == "number_value":
        n = v.number_value
        return f"integer `{int(n)}`" if math.isfinite(n) and n == int(n) and abs(n) < 2**63 else f"floating point `{n}`"
    if kind == "list_value":
        return "sequence"
    if kind == "struct_value":
        return "map"
    return "null"


def _given(message: Any, field: str) -> struct_pb2.Value | None:
    """The field's Value, or None when absent or null (TEI's `Option` fields and serde defaults)."""
    if not message.HasField(field):
        return None
    v = getattr(message, field)
    return None if v.WhichOneof("kind") in (None, "null_value") else v


def opt_bool(message: Any, field: str, default: bool) -> bool:
    v = _given(message, field)
    if v is None:
        return default
    if v.WhichOneof("kind") != "bool_value":
        raise unprocessable(field, f"invalid type: {_describe(v)}, expected a boolean")
    return v.bool_value


def opt_str(message: Any, field: str) -> str | None:
    v = _given(message, field)
    if v is None:
        return None
    if v.WhichOneof("kind") != "string_value":
        raise unprocessable(field, f"invalid type: {_describe(v)}, expected a string")
    return v.string_value


def opt_uint(message: Any, field: str) -> int | None:
    v = _given(message, field)
    if v is None:
        return None
    n = v.number_value if v.WhichOneof("kind") == "number_value" else None
    if n is None or not math.isfinite(n) or n != int(n) or not 0 <= n < 2**32:
        raise unprocessable(field, f"invalid type: {_describe(v)}, expected an unsigned integer")
    return int(n)


def direction(message: Any, field: str = "truncation_direction") -> str:
    """"Left" or "Right" (TEI's enum); the lowercase forms huggingface_hub sends are accepted too."""
    v = _given(message, field)
    if v is None:
        return "right"
    if v.WhichOneof("kind") == "string_value" and v.string_value.lower() in ("left", "right"):
        return v.string_value.lower()
    raise unprocessable(field, f"unknown variant {_describe(v)}, expected `Left` or `Right`")


def _ids(values: Any, where: str, field: str) -> np.ndarray:
    try:
        return token_ids(values, where, field)
    except errors.ServiceError as err:
        if err.reason == "EMPTY_INPUT":
            raise
        raise unprocessable(field, err.message) from None


def inputs(v: struct_pb2.Value | None, max_inputs: int, field: str = "inputs", ids_allowed: bool = True) -> list[str] | list[np.ndarray]:
    """TEI's `Input`: a string, strings, token ids, or lists of token ids (`Single` or `Batch`), counted before any of
    it is converted. Every item of a batch is of one kind here (TEI also takes a batch that mixes texts and ids)."""
    kind = v.WhichOneof("kind") if v is not None else None
    if kind == "string_value":
        return [v.string_value]
    if kind is None:
        raise unprocessable(field, f"missing field `{field}`")
    if kind == "null_value":
        raise unprocessable(field, "invalid type: null, expected a string or a sequence")
    if kind != "list_value":
        raise unprocessable(field, f"invalid type: {_describe(v)}, expected a string or a sequence")
    items = v.list_value.values
    if not items:
        raise errors.invalid_argument(f"`{field}` cannot be empty", field, "EMPTY_INPUT")
    first = items[0].WhichOneof("kind")
    if first == "number_value" and ids_allowed:
        return [_ids(items, field, field)]  # one sequence of token ids (TEI's Single(Ids))
    count_inputs(v, max_inputs, field)
    kinds = {x.WhichOneof("kind") for x in items}
    if kinds == {"string_value"}:
        return [x.string_value for x in items]
    if kinds == {"list_value"} and ids_allowed:
        return [_ids(x.list_value.values, f"{field}[{i}]", field) for i, x in enumerate(items)]
    if ids_allowed and kinds == {"string_value", "list_value"}:
        raise unprocessable(field, "a batch that mixes texts and token ids is not supported here; send one kind per request")
    bad = next(x for x in items if x.WhichOneof("kind") not in ("string_value", "list_value" if ids_allowed else "string_value"))
    raise unprocessable(field, f"invalid type: {_describe(bad)}, expected {'a string or a sequence of token ids' if ids_allowed else 'a string'}")


# -- HTTP: request → core, result → body (module level: they may run in an offload worker) ------------------------


def long_inputs(request: Any, call: rpc.Call) -> str:
    """TEI's `truncate`: true cuts, false refuses; left out, TEI's --auto-truncate (`limits.auto_truncate`) or else the
    route's policy (`dialects.long_inputs.tei`, refuse by default, as TEI)."""
    given = opt_bool(request, "truncate", None)  # type: ignore[arg-type]
    if given is None:
        return "truncate" if call.settings["auto_truncate"] else call.long_inputs
    return "truncate" if given else "refuse"


def embed_core(request: pb.TeiEmbedRequest, call: rpc.Call) -> EmbedRequest:
    items = inputs(request.inputs if request.HasField("inputs") else None, call.max_inputs)
    return EmbedRequest(
        inputs=items,
        model=call.settings["model"],
        normalize=opt_bool(request, "normalize", True),
        long_inputs=long_inputs(request, call),
        truncation_direction=direction(request),
        prompt_name=opt_str(request, "prompt_name"),
        dimensions=opt_uint(request, "dimensions"),
        deadline=call.deadline,
        param="inputs",
        echo={"chars": sum(len(x) for x in items)},
    )


def embed_all_core(request: pb.TeiEmbedAllRequest, call: rpc.Call) -> EmbedRequest:
    items = inputs(request.inputs if request.HasField("inputs") else None, call.max_inputs)
    return EmbedRequest(
        inputs=items,
        model=call.settings["model"],
        long_inputs=long_inputs(request, call),
        truncation_direction=direction(request),
        prompt_name=opt_str(request, "prompt_name"),
        token_embeddings=True,
        use_cache=False,
        deadline=call.deadline,
        param="inputs",
        echo={"chars": sum(len(x) for x in items)},
    )


def tokenize_args(request: pb.TeiTokenizeRequest, call: rpc.Call) -> dict[str, Any]:
    return {
        "texts": inputs(request.inputs if request.HasField("inputs") else None, call.max_inputs, ids_allowed=False),
        "add_special_tokens": opt_bool(request, "add_special_tokens", True),
        "prompt_name": opt_str(request, "prompt_name"),
        "deadline": call.deadline,
    }


def decode_args(request: pb.TeiDecodeRequest, call: rpc.Call) -> dict[str, Any]:
    v = request.ids if request.HasField("ids") else None
    kind = v.WhichOneof("kind") if v is not None else None
    if kind != "list_value":
        raise unprocessable("ids", "missing field `ids`" if kind is None else f"invalid type: {_describe(v)}, expected a sequence")
    items = v.list_value.values
    if not items:
        raise errors.invalid_argument("`ids` cannot be empty", "ids", "EMPTY_INPUT")
    if items[0].WhichOneof("kind") == "number_value":
        sequences = [_ids(items, "ids", "ids").tolist()]
    else:
        count_inputs(v, call.max_inputs, "ids")
        if any(x.WhichOneof("kind") != "list_value" for x in items):
            raise unprocessable("ids", "expected a sequence of token ids or a sequence of sequences of token ids")
        sequences = [_ids(x.list_value.values, f"ids[{i}]", "ids").tolist() for i, x in enumerate(items)]
    return {"sequences": sequences, "skip_special_tokens": opt_bool(request, "skip_special_tokens", True), "deadline": call.deadline}


def vectors_body(vectors: np.ndarray) -> httpbody_pb2.HttpBody:
    # Always an array of arrays, one string too: [[...]].
    return json_body(vectors)


def token_embeddings_body(matrices: list[np.ndarray]) -> httpbody_pb2.HttpBody:
    return json_body([np.ascontiguousarray(m, dtype=np.float32) for m in matrices])


def simple_tokens(e: tokenization.Encoded) -> list[dict[str, Any]]:
    """TEI's SimpleTokens: a special token has its token string and null offsets; the others their characters."""
    out = []
    for id_, token, (start, stop), special in zip(e.ids, e.tokens, e.offsets, e.special):
        if special:
            out.append({"id": id_, "text": token, "special": True, "start": None, "stop": None})
        else:
            out.append({"id": id_, "text": e.text[start:stop], "special": False, "start": start, "stop": stop})
    return out


def tokens_body(encodings: list[tokenization.Encoded]) -> httpbody_pb2.HttpBody:
    return json_body([simple_tokens(e) for e in encodings])


POOLING_NAMES = {"lasttoken": "last_token"}


def info_fields(model: ServedModel | RemoteModel, pooling: tuple[str, ...], embedder: Embedder) -> dict[str, Any]:
    """TEI's `Info`, in its order, filled from this server."""
    limits = embedder.limits
    if isinstance(model, ServedModel):
        dtype = {"fp32": "float32", "bf16": "bfloat16"}.get(model.runtime.precision, model.runtime.precision)
        max_input = model.tokenizer.max_seq_length
    else:
        dtype, max_input = "float32", 0
    return {
        "model_id": model.id,
        "model_sha": None,
        "model_dtype": dtype,
        "model_type": {"embedding": {"pooling": "+".join(POOLING_NAMES.get(p, p) for p in pooling) or "mean"}},
        "max_concurrent_requests": limits.max_concurrent_requests,
        "max_input_length": max_input,
        "max_batch_tokens": limits.max_batch_tokens,
        "max_batch_requests": limits.max_batch_size,
        "max_client_batch_size": limits.max_client_batch_size,
        "auto_truncate": limits.auto_truncate,
        "tokenization_workers": getattr(embedder.executor, "_max_workers", None) or min(4, os.cpu_count() or 2),
        "version": VERSION,
        "sha": None,
        "docker_label": None,
    }


def _version() -> str:
    try:
        return importlib.metadata.version("embedding-service")
    except importlib.metadata.PackageNotFoundError:
        return "0"


VERSION = _version()


async def respond(context: grpc.aio.ServicerContext, result: EmbedResult, chars: int) -> None:
    """`rpc.respond`, plus the timing headers TEI sends that the other dialects don't."""
    extra = [("x-compute-type", "cpu"), ("x-compute-characters", str(chars)), ("x-total-time", f"{result.timings.total * 1000:.3f}")]
    await rpc.respond(context, result, tuple(extra))


class _Base:
    def __init__(self, embedder: Embedder, model: str = "", auto_truncate: bool = False) -> None:
        self.embedder = embedder
        self.model = model
        self.auto_truncate = auto_truncate
        self._pooling: dict[str, tuple[str, ...]] = {}

    def call(self, context: grpc.aio.ServicerContext) -> rpc.Call:
        return rpc.call(context, self.embedder.limits.max_client_batch_size, model=self.model, auto_truncate=self.auto_truncate)

    async def pooling(self, model: ServedModel | RemoteModel) -> tuple[str, ...]:
        """The model's pooling, read once from its folder (the served model keeps only the function)."""
        if isinstance(model, RemoteModel):
            return ()
        if model.id not in self._pooling:
            loop = asyncio.get_running_loop()
            folder = await loop.run_in_executor(self.embedder.executor, read_folder, model.config.resolved_path())
            self._pooling[model.id] = folder.pooling_modes
        return self._pooling[model.id]

    async def info(self) -> tuple[ServedModel | RemoteModel, dict[str, Any]]:
        model = await self.embedder.registry.get(self.model, wait=False)
        return model, info_fields(model, await self.pooling(model), self.embedder)


# -- HTTP -------------------------------------------------------------------------------------------------------


class TeiHttpServicer(_Base):
    async def Embed(self, raw: bytes, context: grpc.aio.ServicerContext) -> httpbody_pb2.HttpBody:  # noqa: N802
        async def work() -> httpbody_pb2.HttpBody:
            core = await rpc.parse(raw, pb.TeiEmbedRequest, embed_core, self.call(context))
            result = await self.embedder.embed(core)
            await respond(context, result, core.echo["chars"])
            return await rpc.encode(vectors_body, result.vectors.size, result.vectors)

        return await rpc.handle(context, DIALECT, work)

    async def EmbedAll(self, raw: bytes, context: grpc.aio.ServicerContext) -> httpbody_pb2.HttpBody:  # noqa: N802
        async def work() -> httpbody_pb2.HttpBody:
            core = await rpc.parse(raw, pb.TeiEmbedAllRequest, embed_all_core, self.call(context))
            result = await self.embedder.embed(core)
            await respond(context, result, core.echo["chars"])
            matrices = result.token_embeddings or []
            return await rpc.encode(token_embeddings_body, sum(m.size for m in matrices), matrices)

        return await rpc.handle(context, DIALECT, work)

    async def EmbedSparse(self, raw: bytes, context: grpc.aio.ServicerContext) -> httpbody_pb2.HttpBody:  # noqa: N802
        async def work() -> httpbody_pb2.HttpBody:
            await rpc.parse(raw, pb.TeiEmbedAllRequest, embed_all_core, self.call(context))  # a malformed body is still a 4xx of its own
            raise sparse()

        return await rpc.handle(context, DIALECT, work)

    async def Tokenize(self, raw: bytes, context: grpc.aio.ServicerContext) -> httpbody_pb2.HttpBody:  # noqa: N802
        async def work() -> httpbody_pb2.HttpBody:
            args = await rpc.parse(raw, pb.TeiTokenizeRequest, tokenize_args, self.call(context))
            done = await tokenization.tokenize(self.embedder, self.model, args["texts"], args["add_special_tokens"], args["prompt_name"],
                                               deadline=args["deadline"])
            return await rpc.encode(tokens_body, 4 * sum(len(e.ids) for e in done.encodings), done.encodings)

        return await rpc.handle(context, DIALECT, work)

    async def Decode(self, raw: bytes, context: grpc.aio.ServicerContext) -> httpbody_pb2.HttpBody:  # noqa: N802
        async def work() -> httpbody_pb2.HttpBody:
            args = await rpc.parse(raw, pb.TeiDecodeRequest, decode_args, self.call(context))
            _, texts = await tokenization.decode(self.embedder, self.model, args["sequences"], args["skip_special_tokens"], deadline=args["deadline"])
            return json_body(texts)

        return await rpc.handle(context, DIALECT, work)

    async def Info(self, raw: bytes, context: grpc.aio.ServicerContext) -> httpbody_pb2.HttpBody:  # noqa: N802
        async def work() -> httpbody_pb2.HttpBody:
            _, fields = await self.info()
            return json_body(fields)

        return await rpc.handle(context, DIALECT, work)

    async def Health(self, raw: bytes, context: grpc.aio.ServicerContext) -> httpbody_pb2.HttpBody:  # noqa: N802
        async def work() -> httpbody_pb2.HttpBody:
            if not await healthy(self.embedder, self.model):
                raise errors.ServiceError(_C.UNAVAILABLE, "unhealthy", reason="UNHEALTHY")
            return httpbody_pb2.HttpBody()

        return await rpc.handle(context, DIALECT, work)


async def healthy(embedder: Embedder, name: str) -> bool:
    """Whether the model TEI's routes use can serve (loaded, its batcher not out of service; or a lazy model not loaded
    yet, which its first request loads). Asking causes no work: a probe never starts a lazy model's load."""
    try:
        state, model = embedder.registry.peek(name)
    except errors.ServiceError:
        return False
    if state == "pending":
        return embedder.registry.config(name).load == "lazy"
    if model is None:
        return False
    return isinstance(model, RemoteModel) or getattr(model.batcher, "_down", None) is None


# -- gRPC: tei.v1 -----------------------------------------------------------------------------------------------

# A stream keeps up to WINDOW groups of up to GROUP requests in flight: ~1000 inputs before the batcher at once, as
# TEI's GRPC_MAX_PARALLEL_STREAM_REQUESTS (1024) does, and never more, whatever the client sends.
GROUP = 128
WINDOW = 8
# A stream waits (as TEI's do) rather than fail when the server is at its limits; it polls this often.
OVERLOAD_POLL = 0.05

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
        normalize=False if all_tokens else first.normalize,
        truncate=first.truncate,
        truncation_direction=grpc_direction(first.truncation_direction),
        prompt_name=first.prompt_name if first.HasField("prompt_name") else None,
        token_embeddings=all_tokens,
        use_cache=not all_tokens,
        deadline=call.deadline,
        param="inputs",
    )


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


def embed_response(result: EmbedResult, i: int, chars: int) -> tei.EmbedResponse:
    # Parsed from its wire form (`embeddings` is a packed float field: the vector's little-endian bytes as they are):
    # a fifteenth of the time of building it from a Python list, for the many responses of a stream.
    floats = result.vectors[i].astype("<f4", copy=False).tobytes()
    md = metadata(result, i, chars).SerializeToString()
    return tei.EmbedResponse.FromString(b"\x0a" + _varint(len(floats)) + floats + b"\x12" + _varint(len(md)) + md)


def embed_all_response(result: EmbedResult, i: int, chars: int) -> tei.EmbedAllResponse:
    matrix = (result.token_embeddings or [])[i]
    return tei.EmbedAllResponse(token_embeddings=[tei.TokenEmbedding(embeddings=row) for row in matrix.tolist()], metadata=metadata(result, i, chars))


def encode_response(e: tokenization.Encoded) -> tei.EncodeResponse:
    tokens = []
    for t in simple_tokens(e):
        if t["special"]:
            tokens.append(tei.SimpleToken(id=t["id"], text=t["text"], special=True))
        else:
            tokens.append(tei.SimpleToken(id=t["id"], text=t["text"], special=False, start=t["start"], stop=t["stop"]))
    return tei.EncodeResponse(tokens=tokens)


def _runs(group: list[Any], key: Callable[[Any], Any]) -> list[list[Any]]:
    """Consecutive requests with the same options, which one core request can serve together."""
    runs: list[list[Any]] = []
    last = object()
    for m in group:
        k = key(m)
        if not runs or k != last:
            runs.append([])
            last = k
        runs[-1].append(m)
    return runs


def _observe(result: EmbedResult) -> None:
    """A streamed group's inputs and tokens in the metrics (the stream itself counts as one request)."""
    t = result.timings
    metrics.STAGE_SECONDS.labels(result.model, "tokenize").observe(t.tokenize)
    metrics.STAGE_SECONDS.labels(result.model, "queue").observe(t.queue)
    metrics.STAGE_SECONDS.labels(result.model, "inference").observe(t.inference)
    metrics.INPUTS.labels(result.model).inc(len(result.token_counts))
    metrics.TOKENS.labels(result.model).inc(result.total_tokens)


_END = object()
# What a group's work returns: its responses in order, and the failure that ends the stream after them (or None).
Group = tuple[list[Any], "errors.ServiceError | None"]


async def in_order(requests: AsyncIterator[Any], run: Callable[[list[Any]], Awaitable[Group]], group_size: int = GROUP) -> AsyncIterator[Any]:
    """One response per request, in request order, with up to WINDOW groups of requests worked on at once.

    A reader task takes requests off the stream into a small inbox; a dispatcher starts a group's work (as many
    requests as are waiting, up to `group_size`) whenever fewer than WINDOW groups are unanswered; this generator yields
    each group's responses in turn. Everything is bounded: when the caller reads slowly the window stays full, the
    dispatcher stops taking requests, the inbox fills and the reader stops reading, so gRPC's flow control pushes
    back on the caller. The first failure ends the stream (with the responses before it sent), as in TEI.
    """
    inbox: asyncio.Queue = asyncio.Queue(maxsize=group_size)
    started: asyncio.Queue = asyncio.Queue()  # groups' tasks, in order (at most WINDOW, by the semaphore)
    window = asyncio.Semaphore(WINDOW)

    async def read() -> None:
        try:
            async for message in requests:
                await inbox.put(message)
        except DecodeError:  # a message that is not the method's request: the caller's fault, not the backend's
            await inbox.put(errors.invalid_argument("A message of the stream could not be parsed.", None, "MALFORMED_REQUEST"))
            return
        except Exception as exc:  # noqa: BLE001 - a broken request stream ends the responses with its error
            await inbox.put(exc)
            return
        await inbox.put(_END)

    async def dispatch() -> None:
        while True:
            await window.acquire()
            first = await inbox.get()
            if first is _END or isinstance(first, BaseException):
                await started.put(first)
                return
            group, end = [first], None
            while len(group) < group_size and not inbox.empty():
                m = inbox.get_nowait()
                if m is _END or isinstance(m, BaseException):
                    end = m
                    break
                group.append(m)
            await started.put(asyncio.ensure_future(run(group)))
            if end is not None:
                await started.put(end)
                return

    tasks = [asyncio.ensure_future(read()), asyncio.ensure_future(dispatch())]
    try:
        while True:
            item = await started.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            try:
                responses, failure = await item
            finally:
                window.release()
            for response in responses:
                yield response
            if failure is not None:
                raise failure
    finally:
        for t in tasks:
            t.cancel()
        while not started.empty():
            item = started.get_nowait()
            if isinstance(item, asyncio.Future):
                item.cancel()


class _GrpcBase(_Base):
    async def stream(self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext,
                     run: Callable[[list[Any]], Awaitable[Group]]) -> AsyncIterator[Any]:
        """A bidirectional stream: `in_order`, with failures as TEI's gRPC statuses and one request in the metrics."""
        began = time.perf_counter()
        code = "OK"
        try:
            async for response in in_order(requests, run, min(GROUP, self.embedder.limits.max_client_batch_size)):
                yield response
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception as exc:  # noqa: BLE001 - a ServiceError in TEI's code; anything else INTERNAL, without its details
            if isinstance(exc, errors.ServiceError):
                err = backend_codes(exc)
            else:
                log.exception("stream failed", extra={"dialect": DIALECT.name})
                err = backend_codes(errors.internal())
            code = err.code.name
            await context.abort(err.code, err.message, trailing_metadata=errors.trailing_metadata(err, DIALECT))
        finally:
            metrics.observe_request(DIALECT.name, "", code, time.perf_counter() - began)

    async def embed_waiting(self, core: EmbedRequest) -> EmbedResult:
        """`Embedder.embed`, waiting while the server is at its limits (a stream's requests wait, as in TEI)."""
        return await waiting(lambda: self.embedder.embed(core), core.deadline)

    async def embed_group(self, group: list[Any], call: rpc.Call, respond_one: Callable[[EmbedResult, int, int], Any], all_tokens: bool) -> Group:
        out: list[Any] = []
        options = (lambda m: (m.truncate, m.truncation_direction, m.HasField("prompt_name"), m.prompt_name)) if all_tokens else \
            (lambda m: (m.truncate, m.normalize, m.truncation_direction, m.HasField("prompt_name"), m.prompt_name))
        for run in _runs(group, options):
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
                version=f["version"], model_id=f["model_id"], model_dtype=f["model_dtype"], model_type=tei.MODEL_TYPE_EMBEDDING,
                max_concurrent_requests=f["max_concurrent_requests"], max_input_length=f["max_input_length"],
                max_batch_tokens=f["max_batch_tokens"], max_batch_requests=f["max_batch_requests"],
                max_client_batch_size=f["max_client_batch_size"], tokenization_workers=f["tokenization_workers"],
            )

        return await rpc.handle(context, DIALECT, work)


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

        return await rpc.handle(context, DIALECT, work)

    async def EmbedAll(self, raw: bytes, context: grpc.aio.ServicerContext) -> tei.EmbedAllResponse:  # noqa: N802
        async def work() -> tei.EmbedAllResponse:
            try:
                core = await rpc.parse(raw, tei.EmbedAllRequest, grpc_embed_all_one, self.call(context))
                result = await self.embedder.embed(core)
            except errors.ServiceError as err:
                raise backend_codes(err) from None
            await rpc.respond(context, result, initial=True)  # TEI's gRPC server sends them as headers
            return embed_all_response(result, 0, len(core.inputs[0]))

        return await rpc.handle(context, DIALECT, work)

    async def EmbedStream(self, requests: AsyncIterator[tei.EmbedRequest], context: Ctx) -> AsyncIterator[tei.EmbedResponse]:  # noqa: N802
        call = self.call(context)
        async for response in self.stream(requests, context, lambda group: self.embed_group(group, call, embed_response, all_tokens=False)):
            yield response

    async def EmbedAllStream(self, requests: AsyncIterator[tei.EmbedAllRequest], context: Ctx) -> AsyncIterator[tei.EmbedAllResponse]:  # noqa: N802
        call = self.call(context)
        async for response in self.stream(requests, context, lambda group: self.embed_group(group, call, embed_all_response, all_tokens=True)):
            yield response

    async def EmbedSparse(self, raw: bytes, context: grpc.aio.ServicerContext) -> tei.EmbedSparseResponse:  # noqa: N802
        async def work() -> tei.EmbedSparseResponse:
            raise sparse()

        return await rpc.handle(context, DIALECT, work)

    async def EmbedSparseStream(self, requests: AsyncIterator[Any], context: Ctx) -> AsyncIterator[tei.EmbedSparseResponse]:  # noqa: N802
        async def refuse(group: list[Any]) -> Group:
            return [], sparse()

        async for response in self.stream(requests, context, refuse):
            yield response


async def waiting(call: Callable[[], Awaitable[T]], deadline: float | None) -> T:
    """`call()`, again every OVERLOAD_POLL seconds while the server is at its limits: a stream's requests wait, as in
    TEI, rather than end the stream (its groups run several at once, each holding a place, so a fast stream would
    otherwise refuse itself). Until the deadline, which ends the wait with the overload error."""
    while True:
        try:
            return await call()
        except errors.ServiceError as err:
            if err.code != _C.RESOURCE_EXHAUSTED or (deadline is not None and time.monotonic() + OVERLOAD_POLL > deadline):
                raise
        await asyncio.sleep(OVERLOAD_POLL)


def sparse() -> errors.ServiceError:
    """TEI's answer to EmbedSparse on a model without SPLADE pooling (every model here is dense)."""
    return errors.ServiceError(_C.FAILED_PRECONDITION, "Backend error: Model is not an embedding model with SPLADE pooling", reason="NOT_SPLADE")


class TeiTokenizeServicer(_GrpcBase):
    async def tokenize_group(self, group: list[tei.EncodeRequest], deadline: float | None) -> Group:
        out: list[Any] = []
        for run in _runs(group, lambda m: (m.add_special_tokens, m.HasField("prompt_name"), m.prompt_name)):
            first = run[0]
            prompt = first.prompt_name if first.HasField("prompt_name") else None
            try:
                done = await waiting(lambda: tokenization.tokenize(self.embedder, self.model, [m.inputs for m in run], first.add_special_tokens,
                                                                   prompt, deadline=deadline), deadline)
            except errors.ServiceError as err:
                if err.code != _C.INVALID_ARGUMENT or len(run) == 1:
                    return out, err
                for m in run:
                    try:
                        one = await waiting(lambda: tokenization.tokenize(self.embedder, self.model, [m.inputs], first.add_special_tokens, prompt,
                                                                          deadline=deadline), deadline)
                    except errors.ServiceError as err_one:
                        return out, err_one
                    out.append(encode_response(one.encodings[0]))
                continue
            out.extend(encode_response(e) for e in done.encodings)
        return out, None

    async def decode_group(self, group: list[tei.DecodeRequest], deadline: float | None) -> Group:
        out: list[Any] = []
        for run in _runs(group, lambda m: m.skip_special_tokens):
            try:
                _, texts = await waiting(lambda: tokenization.decode(self.embedder, self.model, [list(m.ids) for m in run],
                                                                     run[0].skip_special_tokens, deadline=deadline), deadline)
            except errors.ServiceError as err:
                if err.code != _C.INVALID_ARGUMENT or len(run) == 1:
                    return out, err
                for m in run:
                    try:
                        _, one = await waiting(lambda: tokenization.decode(self.embedder, self.model, [list(m.ids)], m.skip_special_tokens,
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

        return await rpc.handle(context, DIALECT, work)

    async def Decode(self, raw: bytes, context: grpc.aio.ServicerContext) -> tei.DecodeResponse:  # noqa: N802
        async def work() -> tei.DecodeResponse:
            request = await rpc.parse(raw, tei.DecodeRequest, as_message, rpc.Call())
            responses, failure = await self.decode_group([request], rpc.deadline(context))
            if failure is not None:
                raise backend_codes(failure)
            return responses[0]

        return await rpc.handle(context, DIALECT, work)

    async def TokenizeStream(self, requests: AsyncIterator[tei.EncodeRequest], context: Ctx) -> AsyncIterator[tei.EncodeResponse]:  # noqa: N802
        deadline = rpc.deadline(context)
        async for response in self.stream(requests, context, lambda group: self.tokenize_group(group, deadline)):
            yield response

    async def DecodeStream(self, requests: AsyncIterator[tei.DecodeRequest], context: Ctx) -> AsyncIterator[tei.DecodeResponse]:  # noqa: N802
        deadline = rpc.deadline(context)
        async for response in self.stream(requests, context, lambda group: self.decode_group(group, deadline)):
            yield response


# -- registration -----------------------------------------------------------------------------------------------

HTTP_SERVICE = pb.DESCRIPTOR.services_by_name["TextEmbeddingsInference"]
GRPC_SERVICES = {name: tei.DESCRIPTOR.services_by_name[name] for name in ("Info", "Embed", "Tokenize")}


def configured_model(config: Any) -> str:
    """The model TEI's routes use: `dialects.model.tei` where the configuration has it, else the default model ('')."""
    models = getattr(config.dialects, "model", None) or {}
    return str(models.get("tei", "")) if isinstance(models, dict) else ""


def add_to_server(server: grpc.aio.Server, embedder: Embedder, config: Any) -> None:
    settings = {"model": configured_model(config), "auto_truncate": config.limits.auto_truncate}
    add_servicer(server, HTTP_SERVICE, TeiHttpServicer(embedder, **settings))
    add_servicer(server, GRPC_SERVICES["Info"], TeiInfoServicer(embedder, **settings))
    add_servicer(server, GRPC_SERVICES["Embed"], TeiEmbedServicer(embedder, **settings))
    add_servicer(server, GRPC_SERVICES["Tokenize"], TeiTokenizeServicer(embedder, **settings))


DIALECT = Dialect(
    name="tei",
    services=(HTTP_SERVICE.full_name, *(s.full_name for s in GRPC_SERVICES.values())),
    add_to_server=add_to_server,
    # TEI's --api-key: `Authorization: Bearer <key>`, over HTTP and gRPC alike.
    auth=(auth.BEARER,),
    error_body=error_body,
    http_status=http_status,
    # TEI's /health needs no key (TEI keeps it out of --api-key's reach, for load balancers' probes).
    public_methods=(f"/{HTTP_SERVICE.full_name}/Health",),
    # `/embed` and `/` as exact paths (regexes, `^`): as prefixes they would also catch other APIs' routes
    # (`/embeddings/v1alpha/...`, every path).
    rest_prefixes=("/embed_all", "/embed_sparse", "/tokenize", "/decode", "/info", "/health", r"^/embed(\?.*)?$", r"^/(\?.*)?$"),
    envoy_error_body={"error": "%LOCAL_REPLY_BODY%", "error_type": "Validation"},
    doc={"api": "Text Embeddings Inference (HTTP and gRPC `tei.v1`)",
         "routes": "`POST /embed`, `POST /`, `POST /embed_all`, `POST /embed_sparse` (424: dense models), `POST /tokenize`, "
                   "`POST /decode`, `GET /info`, `GET /health`; "
                   "gRPC `tei.v1.Info`, `tei.v1.Embed`, `tei.v1.Tokenize`",
         "client": "`huggingface_hub.InferenceClient`, stubs from TEI's `tei.proto`, LangChain `HuggingFaceEndpointEmbeddings`, "
                   "LlamaIndex `TextEmbeddingsInference`",
         "auth": "`Authorization: Bearer`"},
)
