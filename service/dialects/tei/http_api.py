"""TEI's HTTP API (proto/embedding/dialects/v1/tei.proto): `POST /embed` and `POST /`, `POST /embed_all`, `POST /tokenize`,
`POST /decode`, `GET /info`, `GET /health`, with TEI's loosely typed JSON fields read as serde reads them."""

from __future__ import annotations

import math
from typing import Any

import grpc
import numpy as np
from google.api import httpbody_pb2
from google.protobuf import struct_pb2

from embedding.dialects.v1 import tei_pb2 as pb

from ... import errors, rpc
from ...engine import tokenization
from ...engine.models import RemoteModel
from ...engine.pipeline import EmbedRequest, EmbedResult, Embedder
from ..common import count_inputs, json_body, token_ids
from ._shared import _C, Base, dialect, simple_tokens, sparse, unprocessable

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
    """TEI's `truncate`: true cuts, false refuses; left out, TEI's --auto-truncate (on unless `dialects.long_inputs.tei` says
    otherwise: TEI 1.9's default) or else the route's policy (chunk, where an operator sets it)."""
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


def tokens_body(done: tokenization.Tokenized) -> httpbody_pb2.HttpBody:
    return json_body([simple_tokens(e) for e in done.encodings])


async def respond(context: grpc.aio.ServicerContext, result: EmbedResult, chars: int) -> None:
    """`rpc.respond`, plus the timing headers TEI sends that the other dialects don't."""
    t = result.timings
    # Whole milliseconds, as TEI writes them (`as_millis().to_string()`), over the other dialects' fractional ones.
    ms = [("x-compute-time", t.total), ("x-total-time", t.total), ("x-tokenization-time", t.tokenize), ("x-queue-time", t.queue),
          ("x-inference-time", t.inference)]
    extra = [("x-compute-type", "cpu"), ("x-compute-characters", str(chars)), *((k, str(int(v * 1000))) for k, v in ms)]
    await rpc.respond(context, result, tuple(extra))


# -- HTTP -------------------------------------------------------------------------------------------------------


class TeiHttpServicer(Base):
    async def Embed(self, raw: bytes, context: grpc.aio.ServicerContext) -> httpbody_pb2.HttpBody:  # noqa: N802
        async def work() -> httpbody_pb2.HttpBody:
            core = await rpc.parse(raw, pb.TeiEmbedRequest, embed_core, self.call(context))
            result = await self.embedder.embed(core)
            await respond(context, result, core.echo["chars"])
            return await rpc.encode(vectors_body, result.vectors.size, result.vectors)

        return await rpc.handle(context, dialect(), work)

    async def EmbedAll(self, raw: bytes, context: grpc.aio.ServicerContext) -> httpbody_pb2.HttpBody:  # noqa: N802
        async def work() -> httpbody_pb2.HttpBody:
            core = await rpc.parse(raw, pb.TeiEmbedAllRequest, embed_all_core, self.call(context))
            result = await self.embedder.embed(core)
            await respond(context, result, core.echo["chars"])
            matrices = result.token_embeddings or []
            return await rpc.encode(token_embeddings_body, sum(m.size for m in matrices), matrices)

        return await rpc.handle(context, dialect(), work)

    async def EmbedSparse(self, raw: bytes, context: grpc.aio.ServicerContext) -> httpbody_pb2.HttpBody:  # noqa: N802
        async def work() -> httpbody_pb2.HttpBody:
            await rpc.parse(raw, pb.TeiEmbedAllRequest, embed_all_core, self.call(context))  # a malformed body is still a 4xx of its own
            raise sparse()

        return await rpc.handle(context, dialect(), work)

    async def Tokenize(self, raw: bytes, context: grpc.aio.ServicerContext) -> httpbody_pb2.HttpBody:  # noqa: N802
        async def work() -> httpbody_pb2.HttpBody:
            args = await rpc.parse(raw, pb.TeiTokenizeRequest, tokenize_args, self.call(context))
            done = await tokenization.tokenize(self.embedder, self.model, args["texts"], args["add_special_tokens"], args["prompt_name"],
                                               deadline=args["deadline"])
            return await rpc.encode(tokens_body, 4 * len(done.ids), done)

        return await rpc.handle(context, dialect(), work)

    async def Decode(self, raw: bytes, context: grpc.aio.ServicerContext) -> httpbody_pb2.HttpBody:  # noqa: N802
        async def work() -> httpbody_pb2.HttpBody:
            args = await rpc.parse(raw, pb.TeiDecodeRequest, decode_args, self.call(context))
            _, texts = await tokenization.decode(self.embedder, self.model, args["sequences"], args["skip_special_tokens"], deadline=args["deadline"])
            return json_body(texts)

        return await rpc.handle(context, dialect(), work)

    async def Info(self, raw: bytes, context: grpc.aio.ServicerContext) -> httpbody_pb2.HttpBody:  # noqa: N802
        async def work() -> httpbody_pb2.HttpBody:
            _, fields = await self.info()
            return json_body(fields)

        return await rpc.handle(context, dialect(), work)

    async def Health(self, raw: bytes, context: grpc.aio.ServicerContext) -> httpbody_pb2.HttpBody:  # noqa: N802
        async def work() -> httpbody_pb2.HttpBody:
            if not await healthy(self.embedder, self.model):
                raise errors.ServiceError(_C.UNAVAILABLE, "unhealthy", reason="UNHEALTHY")
            return httpbody_pb2.HttpBody()

        return await rpc.handle(context, dialect(), work)


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
