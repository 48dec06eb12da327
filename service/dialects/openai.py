"""OpenAI's `POST /v1/embeddings` (and AIGNE Hub's `POST /api/embeddings`), and the model list.

The official SDKs ask for `encoding_format: base64` by default and decode it with
`np.frombuffer(..., "float32")`: little-endian float32 bytes.

`POST /api/embeddings` is also Ollama's older embeddings API: a body with `prompt` and no `input` is Ollama's,
answered by `ollama.legacy_embeddings` when the Ollama dialect is enabled (see service/dialects/ollama.py).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import grpc
import numpy as np
from google.api import httpbody_pb2

from embedding.dialects.v1 import openai_pb2 as pb

from .. import auth, errors, rpc
from ..engine.encoding import base64_float32
from ..engine.pipeline import EmbedRequest, Embedder
from . import Dialect, enabled, ollama
from .common import add_servicer, as_message, json_body, json_object, token_array, typed

OWNER = "embedding-service"
log = logging.getLogger(__name__)

# OpenAI's `error.type` by HTTP status (the values its API and SDKs use).
ERROR_TYPE = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    429: "rate_limit_exceeded",
    503: "server_error",
    504: "server_error",
}


def error_body(err: errors.ServiceError) -> dict[str, Any]:
    status = err.http_status
    return {
        "error": {
            "message": err.message,
            "type": ERROR_TYPE.get(status, "invalid_request_error" if status < 500 else "server_error"),
            "param": err.param,
            "code": err.reason.lower() if err.reason else None,
        }
    }


# The header that says a request's token arrays are this model's own token ids (from its /tokenize, say).
OWN_IDS_HEADER = "x-token-ids"
TOKEN_IDS_REFUSED = (
    "'input' holds token ids, which this server does not read from OpenAI-style clients: they are ids of OpenAI's "
    "tokenizer (tiktoken), not of this model's, so they would embed other text. Send the text instead (LangChain: "
    "OpenAIEmbeddings(check_embedding_ctx_length=False)); ids of this model's own tokenizer are read with the header "
    "'X-Token-Ids: model'."
)


def parse_input(raw: Any, max_inputs: int, own_ids: bool = False) -> list[str] | list[np.ndarray]:
    """string | string[] | int[] | int[][] → texts or token-id arrays; the count is checked before anything is converted."""
    if isinstance(raw, str):
        if not raw:
            raise errors.invalid_argument("'input' cannot be an empty string.", "input", "EMPTY_INPUT")
        return [raw]
    if raw is None:
        raise errors.invalid_argument("'input' is a required property.", "input", "EMPTY_INPUT")
    if not isinstance(raw, list):
        raise errors.invalid_argument("'input' must be a string, an array of strings, or an array of token arrays.", "input")
    if len(raw) > max_inputs:
        raise errors.invalid_argument(f"Too many inputs: {len(raw)}; at most {max_inputs} per request.", "input", "TOO_MANY_INPUTS")
    if not raw:
        raise errors.invalid_argument("'input' cannot be an empty array.", "input", "EMPTY_INPUT")
    first = raw[0]
    if isinstance(first, str):
        for i, x in enumerate(raw):
            if not isinstance(x, str):
                raise errors.invalid_argument("'input' mixes types; use strings only or token arrays only.", "input")
            if not x:
                raise errors.invalid_argument(f"'input[{i}]' cannot be an empty string.", "input", "EMPTY_INPUT")
        return raw
    if isinstance(first, list):
        if not all(isinstance(x, list) for x in raw):
            raise errors.invalid_argument("'input' mixes types; use strings only or token arrays only.", "input")
        if not own_ids:
            raise errors.invalid_argument(TOKEN_IDS_REFUSED, "input", "TOKEN_IDS_NOT_READ")
        return [token_array(x, f"input[{i}]", "input") for i, x in enumerate(raw)]
    if not own_ids:
        raise errors.invalid_argument(TOKEN_IDS_REFUSED, "input", "TOKEN_IDS_NOT_READ")
    return [token_array(raw, "input", "input")]


def to_core(body: httpbody_pb2.HttpBody, call: rpc.Call) -> EmbedRequest:
    """OpenAI's JSON body (passed through by Envoy as raw bytes: no transcoding of a million token ids there)."""
    data = json_object(body.data)
    path = call.headers.get(rpc.REST_MARK)
    if call.settings.get("ollama_legacy") and "input" not in data and path in (None, ollama.LEGACY_PATH) and (
        "prompt" in data or (path == ollama.LEGACY_PATH and isinstance(data.get("model"), str) and set(data) <= ollama.LEGACY_PRELOAD)
    ):
        # Ollama's older API on the path it shares with AIGNE Hub (/api/embeddings): its body chose. A prompt, or only the
        # model (and options): how Ollama's clients preload a model, answered {"embedding": []}.
        return ollama.legacy_to_core(data, call)
    model = typed(data, "model", str, "a string") or ""
    fmt = typed(data, "encoding_format", str, "'float' or 'base64'") or "float"
    if fmt not in ("float", "base64"):
        raise errors.invalid_argument(f"'encoding_format' must be 'float' or 'base64'; got {fmt!r}.", "encoding_format")
    dimensions = typed(data, "dimensions", (int, float), "an integer")
    if dimensions is not None and (dimensions != int(dimensions) or dimensions < 1):
        raise errors.invalid_argument(f"'dimensions' must be an integer of at least 1; got {dimensions}.", "dimensions")
    typed(data, "user", str, "a string")
    return EmbedRequest(
        inputs=parse_input(data.get("input"), call.max_inputs, call.headers.get(OWN_IDS_HEADER, "").strip().lower() == "model"),
        model=model,
        dimensions=int(dimensions) if dimensions is not None else None,
        # OpenAI reads 8,191 tokens: a longer input than the model's is chunked by default (`dialects.long_inputs`).
        long_inputs="truncate" if call.settings.get("auto_truncate") else call.long_inputs,
        deadline=call.deadline,
        param="input",
        echo={"model": model, "encoding_format": fmt},
    )


def to_body(vectors: np.ndarray, model: str, tokens: int, fmt: str) -> httpbody_pb2.HttpBody:
    if fmt == "base64":
        data = [{"object": "embedding", "embedding": base64_float32(v), "index": i} for i, v in enumerate(vectors)]
    else:
        data = [{"object": "embedding", "embedding": v, "index": i} for i, v in enumerate(vectors)]
    return json_body({"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


def model_object(name: str, created: int, embedder: Embedder | None = None) -> dict[str, Any]:
    """OpenAI's model object; a model served from the Hugging Face hub also says which repository and commit (fields
    OpenAI's clients ignore)."""
    out = {"id": name, "object": "model", "created": created, "owned_by": OWNER}
    if embedder is not None:
        state, model = embedder.registry.peek(name)
        if state == "loaded" and getattr(model, "commit", ""):
            out.update(repo=model.config.repo, revision=model.commit)
    return out


class OpenAIServicer:
    def __init__(self, embedder: Embedder, auto_truncate: bool = False, ollama_legacy: bool = False) -> None:
        self.embedder = embedder
        self.auto_truncate = auto_truncate
        self.ollama_legacy = ollama_legacy
        self.created = int(time.time())

    async def CreateEmbedding(self, raw: bytes, context: grpc.aio.ServicerContext) -> httpbody_pb2.HttpBody:  # noqa: N802
        async def work() -> httpbody_pb2.HttpBody:
            info = rpc.call(context, self.embedder.limits.max_client_batch_size, auto_truncate=self.auto_truncate,
                            ollama_legacy=self.ollama_legacy)
            core = await rpc.parse(raw, httpbody_pb2.HttpBody, to_core, info)
            if core.echo.get("api") == ollama.LEGACY:
                return await ollama.legacy_embeddings(self.embedder, core, context)
            result = await self.embedder.embed(core)
            await rpc.respond(context, result)
            fmt = core.echo["encoding_format"]
            return await rpc.encode(to_body, result.vectors.size if fmt == "float" else 0,
                                    result.vectors, core.echo["model"] or result.model, result.total_tokens, fmt)

        return await rpc.handle(context, DIALECT, work)

    async def ListModels(self, raw: bytes, context: grpc.aio.ServicerContext) -> httpbody_pb2.HttpBody:  # noqa: N802
        async def work() -> httpbody_pb2.HttpBody:
            names = self.embedder.registry.names()
            return json_body({"object": "list", "data": [model_object(n, self.created, self.embedder) for n in names]})

        return await rpc.handle(context, DIALECT, work)

    async def RetrieveModel(self, raw: bytes, context: grpc.aio.ServicerContext) -> httpbody_pb2.HttpBody:  # noqa: N802
        async def work() -> httpbody_pb2.HttpBody:
            request = await rpc.parse(raw, pb.RetrieveModelRequest, as_message, rpc.Call())
            if request.model not in self.embedder.registry.names():
                raise errors.model_not_found(request.model, self.embedder.registry.names())
            return json_body(model_object(request.model, self.created, self.embedder))

        return await rpc.handle(context, DIALECT, work)


DIALECT = Dialect(
    name="openai",
    services=(pb.DESCRIPTOR.services_by_name["OpenAI"].full_name,),
    add_to_server=lambda server, embedder, config: add_servicer(
        server, pb.DESCRIPTOR.services_by_name["OpenAI"],
        OpenAIServicer(embedder, auto_truncate=config.limits.auto_truncate, ollama_legacy=ollama.DIALECT in enabled(config)),
    ),
    auth=(auth.BEARER,),
    error_body=error_body,
    rest_prefixes=("/v1/embeddings", "/v1/models", "/api/embeddings", "/api/v1/embeddings", "/api/v2/embeddings",
                   r"^/embeddings(\?.*)?$"),
    # OpenAI's API lives under /v1/ (Cohere's /v1/embed, HrFlow's /v1/document/ and Gemini's :verbs have their own
    # entries above), AIGNE Hub's under /api/v1/ and /api/v2/.
    fallback_prefixes=("/v1/", "/api/v1/", "/api/v2/"),
    envoy_error_body={"error": {"message": "%LOCAL_REPLY_BODY%", "type": "invalid_request_error", "param": None, "code": None}},
    doc={"api": "OpenAI (003), AIGNE Hub (001)", "routes": "`POST /v1/embeddings`, `POST /api/embeddings` (and `/api/v1/…`, `/api/v2/…`), `GET /v1/models`, `GET /v1/models/{model}`",
         "client": "`openai`", "auth": "`Authorization: Bearer`"},
)
