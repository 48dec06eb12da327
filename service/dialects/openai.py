"""OpenAI's `POST /v1/embeddings` (and AIGNE Hub's `POST /api/embeddings`), and the model list.

The official SDKs ask for `encoding_format: base64` by default and decode it with
`np.frombuffer(..., "float32")`: little-endian float32 bytes.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import grpc
from google.api import httpbody_pb2

from embedding.dialects.v1 import openai_pb2 as pb
from embedding.dialects.v1 import openai_pb2_grpc as pb_grpc

from .. import errors, rpc
from ..engine.encoding import base64_float32
from ..engine.pipeline import EmbedRequest, EmbedResult, Embedder
from .common import json_body, value

DIALECT = "openai"
OWNER = "embedding-service"
log = logging.getLogger(__name__)


def parse_input(raw: Any) -> list[str] | list[list[int]]:
    """string | string[] | int[] | int[][] → texts or token-id lists."""
    if isinstance(raw, str):
        if not raw:
            raise errors.invalid_argument("'input' cannot be an empty string.", "input", "EMPTY_INPUT")
        return [raw]
    if raw is None:
        raise errors.invalid_argument("'input' is a required property.", "input", "EMPTY_INPUT")
    if not isinstance(raw, list):
        raise errors.invalid_argument("'input' must be a string, an array of strings, or an array of token arrays.", "input")
    if not raw:
        raise errors.invalid_argument("'input' cannot be an empty array.", "input", "EMPTY_INPUT")
    if all(isinstance(x, str) for x in raw):
        for i, x in enumerate(raw):
            if not x:
                raise errors.invalid_argument(f"'input[{i}]' cannot be an empty string.", "input", "EMPTY_INPUT")
        return raw
    if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in raw):
        return [_token_ids(raw, "input")]
    if all(isinstance(x, list) for x in raw):
        return [_token_ids(x, f"input[{i}]") for i, x in enumerate(raw)]
    raise errors.invalid_argument("'input' mixes types; use strings only or token arrays only.", "input")


def _token_ids(items: list[Any], where: str) -> list[int]:
    if not items:
        raise errors.invalid_argument(f"'{where}' is an empty token array.", "input", "EMPTY_INPUT")
    out = []
    for x in items:
        if isinstance(x, bool) or not isinstance(x, (int, float)) or x != int(x) or x < 0 or x >= 2**31:
            raise errors.invalid_argument(f"'{where}' must hold non-negative integer token ids; got {x!r}.", "input")
        out.append(int(x))
    return out


def to_core(request: pb.CreateEmbeddingRequest, deadline: float | None, truncate: bool) -> EmbedRequest:
    fmt = request.encoding_format or "float"
    if fmt not in ("float", "base64"):
        raise errors.invalid_argument(f"'encoding_format' must be 'float' or 'base64'; got {fmt!r}.", "encoding_format")
    dimensions = request.dimensions if request.HasField("dimensions") else None
    if dimensions is not None and dimensions < 1:
        raise errors.invalid_argument(f"'dimensions' must be at least 1; got {dimensions}.", "dimensions")
    if request.user:
        log.debug("end user", extra={"user": request.user})
    return EmbedRequest(
        inputs=parse_input(value(request.input) if request.HasField("input") else None),
        model=request.model,
        dimensions=dimensions,
        truncate=truncate,
        deadline=deadline,
        param="input",
    )


def to_body(result: EmbedResult, requested_model: str, fmt: str) -> httpbody_pb2.HttpBody:
    if fmt == "base64":
        data = [{"object": "embedding", "embedding": base64_float32(v), "index": i} for i, v in enumerate(result.vectors)]
    else:
        data = [{"object": "embedding", "embedding": v, "index": i} for i, v in enumerate(result.vectors)]
    tokens = result.total_tokens
    return json_body(
        {
            "object": "list",
            "data": data,
            "model": requested_model or result.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )


def model_object(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": OWNER}


class OpenAIServicer(pb_grpc.OpenAIServicer):
    def __init__(self, embedder: Embedder, auto_truncate: bool = False) -> None:
        self.embedder = embedder
        # OpenAI refuses an input over the model's limit; operators may ask to truncate instead.
        self.auto_truncate = auto_truncate
        self.created = int(time.time())

    async def CreateEmbedding(self, request: pb.CreateEmbeddingRequest, context: grpc.aio.ServicerContext) -> httpbody_pb2.HttpBody:
        async def work() -> httpbody_pb2.HttpBody:
            result = await self.embedder.embed(to_core(request, rpc.deadline(context), self.auto_truncate))
            await rpc.respond(context, result)
            return to_body(result, request.model, request.encoding_format or "float")

        return await rpc.handle(context, DIALECT, work)

    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext) -> httpbody_pb2.HttpBody:
        async def work() -> httpbody_pb2.HttpBody:
            names = self.embedder.registry.names()
            return json_body({"object": "list", "data": [model_object(n, self.created) for n in names]})

        return await rpc.handle(context, DIALECT, work)

    async def RetrieveModel(self, request: pb.RetrieveModelRequest, context: grpc.aio.ServicerContext) -> httpbody_pb2.HttpBody:
        async def work() -> httpbody_pb2.HttpBody:
            if request.model not in self.embedder.registry.names():
                raise errors.model_not_found(request.model, self.embedder.registry.names())
            return json_body(model_object(request.model, self.created))

        return await rpc.handle(context, DIALECT, work)
