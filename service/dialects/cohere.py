"""Cohere's Embed API: `POST /v2/embed` and `POST /v1/embed`.

- `texts` (or v2's `inputs` with text components) → one embedding per text, unit length, as Cohere's are.
- `embedding_types`: `float` (default), `int8`, `uint8`, `binary`, `ubinary` — sentence-transformers'
  `quantize_embeddings` of the float vector, int8/uint8 with the fixed ranges of `service.engine.quantize` —
  and `base64`: the float vector as little-endian float32 bytes, base64 (what Cohere-compatible servers such as
  vLLM send and `np.frombuffer(base64.b64decode(s), "<f4")` reads; Cohere's SDK leaves the string as it is).
- `input_type` picks the model's prompt for it where the model has one: `search_query` → `search_query` or
  `query`, `search_document` → `search_document`, `document` or `passage`, `classification` and `clustering` →
  the prompt of that name; none of them: the model's default.
- `truncate`: END cuts an over-long input at its end, START at its start, NONE refuses it (400); left out, END, as
  Cohere documents (`dialects.long_inputs.cohere`: truncate; `chunk` there reads a left-out one whole, in windows).
- `output_dimension`: the first N components, normalized again. `max_tokens`: at most that many tokens of each
  input are read (special tokens included), the rest cut as `truncate` says (NONE: refused); at or above the model's
  own limit, that limit.
- v1 without `embedding_types` answers `embeddings_floats` (a bare list of float vectors), else by type.

Errors are Cohere's `{"id", "message"}` with its statuses; `id` is the request's id (x-request-id), as in
successful answers.
"""

from __future__ import annotations

import uuid
from typing import Any

import grpc
import numpy as np
from google.api import httpbody_pb2
from google.protobuf import struct_pb2

from embedding.dialects.v1 import cohere_pb2 as pb

from .. import auth, errors, rpc
from ..engine.encoding import base64_float32
from ..engine.pipeline import EmbedRequest, Embedder
from ..engine.quantize import quantize
from ..logs import request_id as current_request_id
from . import Dialect
from ._shared import request_id, served_model, task_prompt
from .common import add_servicer, count_inputs, json_body, strings

# input_type → the model prompts that serve it, the first the model defines wins.
INPUT_TYPES: dict[str, tuple[str, ...]] = {
    "search_query": ("search_query", "query"),
    "search_document": ("search_document", "document", "passage"),
    "classification": ("classification",),
    "clustering": ("clustering",),
}
EMBEDDING_TYPES = ("float", "int8", "uint8", "binary", "ubinary", "base64")
# truncate → the side an over-long input is cut from (None: refused).
TRUNCATE = {"END": "right", "START": "left", "NONE": None}


def error_body(err: errors.ServiceError) -> dict[str, Any]:
    """Cohere's `{"id", "message"}`, in its words for the failures its clients meet most."""
    message = err.message
    if err.code == grpc.StatusCode.UNAUTHENTICATED:
        message = "no api key supplied" if err.reason == "missing_api_key" else "invalid api token"
    elif err.reason == "model_not_found" and err.resource:
        message = f"model '{err.resource[1]}' not found, make sure the correct model ID was used and that you have access to the model."
    elif err.code == grpc.StatusCode.INVALID_ARGUMENT and not message.startswith("invalid request"):
        message = f"invalid request: {message}"
    return {"id": current_request_id.get() or str(uuid.uuid4()), "message": message}


def _texts(request: pb.CohereEmbedRequest, max_inputs: int) -> list[str]:
    if request.HasField("images") and request.images.WhichOneof("kind") not in (None, "null_value"):
        raise errors.invalid_argument("images are not supported: the models served here embed text.", "images")
    has_texts = request.HasField("texts") and request.texts.WhichOneof("kind") not in (None, "null_value")
    has_inputs = request.HasField("inputs") and request.inputs.WhichOneof("kind") not in (None, "null_value")
    if has_texts and has_inputs:
        raise errors.invalid_argument("give either texts or inputs, not both.", "texts")
    if has_inputs:
        return _inputs(request.inputs, max_inputs)
    texts = strings(request.texts if has_texts else None, "texts", max_inputs)
    for i, text in enumerate(texts):
        if not text:
            raise errors.invalid_argument(f"texts[{i}] is empty; every text must have content.", "texts", "EMPTY_INPUT")
    return texts


def _inputs(v: struct_pb2.Value, max_inputs: int) -> list[str]:
    """v2's `inputs`: [{"content": [{"type": "text", "text": "..."}, ...]}]; an input's text components joined by a space."""
    if v.WhichOneof("kind") != "list_value" or not v.list_value.values:
        raise errors.invalid_argument("inputs must be a non-empty array of {content: [...]} objects.", "inputs")
    count_inputs(v, max_inputs, "inputs")
    texts = []
    for i, item in enumerate(v.list_value.values):
        content = item.struct_value.fields.get("content") if item.WhichOneof("kind") == "struct_value" else None
        if content is None or content.WhichOneof("kind") != "list_value":
            raise errors.invalid_argument(f"inputs[{i}].content must be an array of content components.", "inputs")
        parts = []
        for j, part in enumerate(content.list_value.values):
            fields = part.struct_value.fields if part.WhichOneof("kind") == "struct_value" else {}
            kind = fields["type"].string_value if "type" in fields else ""
            if kind == "image_url" or "image_url" in fields:
                raise errors.invalid_argument("images are not supported: the models served here embed text.", "inputs")
            text = fields.get("text")
            if kind not in ("", "text") or text is None or text.WhichOneof("kind") != "string_value":
                raise errors.invalid_argument(f"inputs[{i}].content[{j}] must be {{\"type\": \"text\", \"text\": \"...\"}}.", "inputs")
            if text.string_value:
                parts.append(text.string_value)
        if not parts:
            raise errors.invalid_argument(f"inputs[{i}] has no text.", "inputs", "EMPTY_INPUT")
        texts.append(" ".join(parts))
    return texts


def to_core(request: pb.CohereEmbedRequest, call: rpc.Call) -> EmbedRequest:
    texts = _texts(request, call.max_inputs)
    input_type = request.input_type.lower()
    if input_type == "image":
        raise errors.invalid_argument("input_type image needs images; the models served here embed text.", "input_type")
    if input_type and input_type not in INPUT_TYPES:
        raise errors.invalid_argument(f"input_type must be one of {', '.join(INPUT_TYPES)}; got {request.input_type!r}.", "input_type")
    types: list[str] = []
    for t in request.embedding_types:
        if t.lower() not in EMBEDDING_TYPES:
            raise errors.invalid_argument(f"embedding_types must be among {', '.join(EMBEDDING_TYPES)}; got {t!r}.", "embedding_types")
        if t.lower() not in types:
            types.append(t.lower())
    truncate = request.truncate.upper()
    if truncate and truncate not in TRUNCATE:
        raise errors.invalid_argument(f"truncate must be NONE, START or END; got {request.truncate!r}.", "truncate")
    dimensions = request.output_dimension if request.HasField("output_dimension") else None
    if dimensions is not None and dimensions < 1:
        raise errors.invalid_argument(f"output_dimension must be at least 1; got {dimensions}.", "output_dimension")
    if request.HasField("max_tokens") and request.max_tokens < 1:
        raise errors.invalid_argument(f"max_tokens must be at least 1; got {request.max_tokens}.", "max_tokens")
    # Left out, the route's policy decides (`dialects.long_inputs.cohere`: truncate, Cohere's END; chunk reads it whole);
    # END/START cut from that side, NONE refuses.
    direction = TRUNCATE[truncate] if truncate else "right"
    return EmbedRequest(
        inputs=texts,
        model=request.model,
        # Cohere's embeddings are unit length (and the int8/uint8 ranges are those of unit vectors).
        normalize=True,
        dimensions=dimensions,
        long_inputs=("truncate" if direction is not None else "refuse") if truncate else call.long_inputs,
        truncation_direction=direction or "right",
        max_tokens=request.max_tokens if request.HasField("max_tokens") else None,
        deadline=call.deadline,
        param="texts",
        echo={"types": types or ["float"], "by_type": bool(types), "prompts": INPUT_TYPES.get(input_type, ())},
    )


def to_body(vectors: np.ndarray, types: list[str], by_type: bool, texts: list[str], tokens: int, rid: str, version: int) -> httpbody_pb2.HttpBody:
    """v2 always answers by type; v1 answers a bare list of float vectors when no `embedding_types` was asked for."""
    embeddings: Any
    if version == 1 and not by_type:
        embeddings, response_type = vectors, "embeddings_floats"
    else:
        embeddings, response_type = {}, "embeddings_by_type"
        for t in types:
            if t == "float":
                embeddings[t] = vectors
            elif t == "base64":
                embeddings[t] = [base64_float32(v) for v in vectors]
            else:
                embeddings[t] = quantize(vectors, t)
    return json_body({"id": rid, "embeddings": embeddings, "texts": texts,
                      "meta": {"api_version": {"version": str(version)}, "billed_units": {"input_tokens": tokens}},
                      "response_type": response_type})


class CohereServicer:
    def __init__(self, embedder: Embedder) -> None:
        self.embedder = embedder

    async def Embed(self, raw: bytes, context: grpc.aio.ServicerContext) -> httpbody_pb2.HttpBody:  # noqa: N802
        return await self._embed(raw, context, 2)

    async def EmbedV1(self, raw: bytes, context: grpc.aio.ServicerContext) -> httpbody_pb2.HttpBody:  # noqa: N802
        return await self._embed(raw, context, 1)

    async def _embed(self, raw: bytes, context: grpc.aio.ServicerContext, version: int) -> httpbody_pb2.HttpBody:
        async def work() -> httpbody_pb2.HttpBody:
            call = rpc.call(context, self.embedder.limits.max_client_batch_size)
            core = await rpc.parse(raw, pb.CohereEmbedRequest, to_core, call)
            if core.echo["prompts"]:
                core.prompt_name = task_prompt(await served_model(self.embedder, core), core.echo["prompts"])
            result = await self.embedder.embed(core)
            await rpc.respond(context, result)
            types = core.echo["types"]
            return await rpc.encode(to_body, result.vectors.size * len(types), result.vectors, types, core.echo["by_type"], core.inputs,
                                    result.total_tokens, request_id(call.headers), version)

        return await rpc.handle(context, DIALECT, work)


DIALECT = Dialect(
    name="cohere",
    services=(pb.DESCRIPTOR.services_by_name["Cohere"].full_name,),
    add_to_server=lambda server, embedder, config: add_servicer(server, pb.DESCRIPTOR.services_by_name["Cohere"], CohereServicer(embedder)),
    auth=(auth.BEARER,),
    error_body=error_body,
    # `/v1/embed` as a prefix would also claim OpenAI's `/v1/embeddings`: matched exactly (a `^` regex). Its body-parse
    # errors are Cohere's in any case, matched by the service name once the transcoder has rewritten the path.
    rest_prefixes=("/v2/embed", r"^/v1/embed(\?.*)?$"),
    fallback_prefixes=("/v2/",),
    envoy_error_body={"id": "%REQ(X-REQUEST-ID)%", "message": "%LOCAL_REPLY_BODY%"},
    doc={"api": "Cohere Embed v2 and v1", "routes": "`POST /v2/embed`, `POST /v1/embed`",
         "client": "`cohere` (`ClientV2`, `Client`)", "auth": "`Authorization: Bearer`", "error": '`{"id": "...", "message": "..."}`'},
)
