"""Ollama's embedding API: `POST /api/embed`, the older `POST /api/embeddings`, `GET /api/tags`, `GET /api/version`.

As Ollama's server does (server/routes.go `EmbedHandler`): `/api/embed` L2-normalizes every vector, and with
`dimensions` (0 < N < the model's dimension; anything else is ignored) keeps the first N components and
normalizes again; `truncate` (default true) cuts an over-long input at its end, false makes it a 400
`the input length exceeds the context length`; an empty `input` ("" or []) loads the model and answers
`{"model", "embeddings": []}`; an unknown model is a 404 `model "x" not found, try pulling it first`, and a missing
or empty one a 404 `model '' not found` (Ollama names no default model). `options.num_ctx` reads at most that many
tokens of each input (special tokens included), cut at the end or, with `truncate` false, refused. Errors are
`{"error": "..."}`. Durations are integer nanoseconds.

`POST /api/show` answers a model's `details`, `model_info` (general.architecture, {arch}.context_length,
{arch}.embedding_length, ...) and `capabilities` ["embedding"]; `GET /api/ps` lists the models loaded now.

`POST /api/embeddings` (`{model, prompt}` → `{embedding}`, not normalized, as Ollama) is also AIGNE Hub's path
(`{model, input}`, OpenAI's shape), and Envoy routes one path to one method: it is bound once, to
`OpenAI.CreateEmbedding`, whose JSON body Envoy passes through. The body chooses the API: `prompt` without
`input` is Ollama's (`legacy_to_core`), and that servicer hands such a request to `legacy_embeddings` here,
which answers (and fails) in Ollama's shape. With the Ollama dialect disabled such a body gets AIGNE's answer (`input` is
required); with the OpenAI dialect disabled the path is not served at all.

A model named `x:latest` is `x` when only `x` is configured, as Ollama's own names work.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from google.api import httpbody_pb2
from google.protobuf import struct_pb2

from embedding.dialects.v1 import ollama_pb2 as pb

from .. import auth, errors, rpc
from ..engine.pipeline import EmbedRequest, Embedder
from . import Dialect
from ._shared import cut, served_model
from .common import add_servicer, as_message, constant, count_inputs, json_body, value

# The Ollama release whose API this dialect follows (`/api/embed` with `dimensions` and `truncate`); clients that
# check the server's version before using a feature see one that has it.
OLLAMA_VERSION = "0.12.0"
LATEST = ":latest"
# /api/ps's expires_at of a model that never unloads (Ollama's keep_alive -1 reaches the same far future).
NEVER = "2318-08-04T00:00:00Z"


def error_body(err: errors.ServiceError) -> dict[str, Any]:
    """`{"error": "..."}`, in Ollama's words where a client may test for them (404 → `ollama pull`)."""
    if err.reason == "model_not_found" and err.resource:
        return {"error": f"model {json.dumps(err.resource[1], ensure_ascii=False)} not found, try pulling it first"}
    if err.reason == "context_length_exceeded":
        return {"error": "the input length exceeds the context length"}
    return {"error": err.message}


def http_status(err: errors.ServiceError) -> int:
    # Ollama answers a full queue with 503 ("server busy, please try again"), not 429.
    return 503 if err.code == grpc.StatusCode.RESOURCE_EXHAUSTED else err.http_status


def parse_input(v: struct_pb2.Value | None, max_inputs: int) -> list[str]:
    """A string or an array of strings; "" and [] (and no input) are no inputs at all, as in Ollama."""
    kind = v.WhichOneof("kind") if v is not None else None
    if kind in (None, "null_value"):
        return []
    if kind == "string_value":
        return [v.string_value] if v.string_value else []
    if kind == "list_value":
        count_inputs(v, max_inputs, "input")
        items = v.list_value.values
        if all(x.WhichOneof("kind") == "string_value" for x in items):
            return [x.string_value for x in items]
    raise errors.invalid_argument("invalid input type", "input")


def model_required(name: str) -> errors.ServiceError:
    """/api/embed and /api/show with no model: Ollama serves no default model (server/routes.go)."""
    return errors.ServiceError(grpc.StatusCode.NOT_FOUND, f"model '{name}' not found", reason="MODEL_REQUIRED", param="model")


def num_ctx(options: dict[str, Any] | None) -> int | None:
    """`options.num_ctx`: the tokens Ollama reads of an input (its context), or None."""
    n = (options or {}).get("num_ctx")
    if n is None:
        return None
    if isinstance(n, bool) or not isinstance(n, (int, float)) or n != int(n):
        raise errors.invalid_argument(f"option \"num_ctx\" must be of type integer; got {json.dumps(n)[:40]}", "options")
    return int(n) if n > 0 else None


def to_core(request: pb.OllamaEmbedRequest, call: rpc.Call) -> EmbedRequest:
    if not request.model.strip():
        raise model_required(request.model)
    dimensions = request.dimensions if request.HasField("dimensions") and request.dimensions > 0 else None
    return EmbedRequest(
        inputs=parse_input(request.input if request.HasField("input") else None, call.max_inputs),
        model=request.model,
        normalize=True,
        # Ollama cuts an over-long input at its end unless told not to.
        long_inputs=("truncate" if request.truncate else "refuse") if request.HasField("truncate") else call.long_inputs,
        truncation_direction="right",
        max_tokens=num_ctx(value(request.options, "options") if request.HasField("options") else None),
        deadline=call.deadline,
        param="input",
        echo={"model": request.model, "dimensions": dimensions},
    )


def to_body(vectors: np.ndarray, model: str, dimensions: int | None, tokens: int, total_ns: int, load_ns: int) -> httpbody_pb2.HttpBody:
    return json_body({"model": model, "embeddings": cut(vectors, dimensions), "total_duration": total_ns,
                      "load_duration": load_ns, "prompt_eval_count": tokens})


# -- POST /api/embeddings (bound in openai.proto) -------------------------------------------------

LEGACY = "ollama-legacy"  # EmbedRequest.echo["api"] of a request the OpenAI parser found to be Ollama's older API


def _legacy_error(err: errors.ServiceError) -> errors.ServiceError:
    """The error in Ollama's shape (the path is AIGNE Hub's, the request Ollama's): a copy, never the error itself,
    which may be shared (a batcher that is down raises one error to every caller)."""
    return dataclasses.replace(err, dialect="ollama", metadata=dict(err.metadata))


# Ollama's older route (shared with AIGNE Hub's), and the keys of a body that only preloads a model there
# (`ollama.embeddings(model=M)`): the model loads, the answer is {"embedding": []}.
LEGACY_PATH = "/api/embeddings"
LEGACY_PRELOAD = {"model", "options", "keep_alive"}


def legacy_to_core(data: dict[str, Any], call: rpc.Call) -> EmbedRequest:
    """Ollama's `{model, prompt}` (already parsed from the JSON body of `POST /api/embeddings`)."""
    prompt, model = data.get("prompt", ""), data.get("model")
    if not isinstance(prompt, str) or not isinstance(model, (str, type(None))):
        raise _legacy_error(errors.invalid_argument("prompt and model must be strings", "prompt"))
    if not (model or "").strip():
        raise _legacy_error(errors.invalid_argument("model is required", "model", "MODEL_REQUIRED"))
    options = data.get("options")
    try:
        max_tokens = num_ctx(options if isinstance(options, dict) else None)
    except errors.ServiceError as err:
        raise _legacy_error(err) from None
    return EmbedRequest(
        inputs=[prompt] if prompt else [],
        model=model or "",
        # The model's raw pooled vector, as Ollama's /api/embeddings answers (its /api/embed normalizes).
        normalize=False,
        truncate=True,
        max_tokens=max_tokens,
        deadline=call.deadline,
        param="prompt",
        echo={"api": LEGACY},
    )


def legacy_body(vector: np.ndarray | None) -> httpbody_pb2.HttpBody:
    return json_body({"embedding": vector if vector is not None else []})


async def legacy_embeddings(embedder: Embedder, core: EmbedRequest, context: grpc.aio.ServicerContext) -> httpbody_pb2.HttpBody:
    """Ollama's `POST /api/embeddings`, handed over by the OpenAI servicer: answers and errors in Ollama's shape."""
    try:
        core.model = model_name(embedder, core.model)
        await served_model(embedder, core)  # an empty prompt only loads the model, as in Ollama
        if not core.inputs:
            return legacy_body(None)
        result = await embedder.embed(core)
        await rpc.respond(context, result)
        return await rpc.encode(legacy_body, result.vectors.size, result.vectors[0])
    except errors.ServiceError as err:
        raise _legacy_error(err) from None


# -- the servicer ---------------------------------------------------------------------------------


def model_name(embedder: Embedder, name: str) -> str:
    """`x:latest` names `x` when only `x` is configured (Ollama's names default to the `latest` tag)."""
    if name.endswith(LATEST) and name not in embedder.registry.names() and name[: -len(LATEST)] in embedder.registry.names():
        return name[: -len(LATEST)]
    return name


def _folder_facts(path: str) -> tuple[int, str]:
    """A model folder's size in bytes and its architecture (config.json's model_type), best effort."""
    size = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                size += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    try:
        family = str(json.loads((Path(path) / "config.json").read_text()).get("model_type") or "")
    except (OSError, ValueError, AttributeError):
        family = ""
    return size, family


def _parameter_count(path: str) -> int:
    """The parameters in a folder's model.safetensors, from its header (no tensor is read); 0 when there is none."""
    try:
        with open(Path(path) / "model.safetensors", "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size <= 1 << 24:
                return 0
            header = json.loads(f.read(size))
    except (OSError, ValueError):
        return 0
    total = 0
    for name, t in header.items():
        if name != "__metadata__" and isinstance(t, dict):
            n = 1
            for d in t.get("shape", []):
                n *= int(d)
            total += n
    return total


def _parameter_size(n: int) -> str:
    """Ollama's `parameter_size`: 22.7M, 109.5M, 7.2B."""
    if not n:
        return ""
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


class OllamaServicer:
    def __init__(self, embedder: Embedder) -> None:
        self.embedder = embedder
        self.started = datetime.now(timezone.utc).isoformat()
        self._tags: dict[str, Any] | None = None
        self._facts_by_path: dict[str, tuple[int, str, int]] = {}

    async def Embed(self, raw: bytes, context: grpc.aio.ServicerContext) -> httpbody_pb2.HttpBody:  # noqa: N802
        async def work() -> httpbody_pb2.HttpBody:
            started = time.perf_counter_ns()
            core = await rpc.parse(raw, pb.OllamaEmbedRequest, to_core, rpc.call(context, self.embedder.limits.max_client_batch_size))
            core.model = model_name(self.embedder, core.model)
            # As Ollama: the model is loaded first (load_duration), and an empty input does only that.
            served = await served_model(self.embedder, core)
            load_ns = time.perf_counter_ns() - started
            model = core.echo["model"] or served.id
            if not core.inputs:
                return json_body({"model": model, "embeddings": []})
            result = await self.embedder.embed(core)
            await rpc.respond(context, result)
            return await rpc.encode(to_body, result.vectors.size, result.vectors, model, core.echo["dimensions"], result.total_tokens,
                                    time.perf_counter_ns() - started, load_ns)

        return await rpc.handle(context, DIALECT, work)

    async def ListTags(self, raw: bytes, context: grpc.aio.ServicerContext) -> httpbody_pb2.HttpBody:  # noqa: N802
        async def work() -> httpbody_pb2.HttpBody:
            if self._tags is None:
                self._tags = {"models": [self._tag(name) for name in self.embedder.registry.names()]}
            return json_body(self._tags)

        return await rpc.handle(context, DIALECT, work)

    def _facts(self, name: str) -> tuple[int, str, int]:
        """A model's size in bytes, family and parameters; a loaded model's own folder, another's looked up in its cache
        without checking it (no hashing here); nothing for a model the cache no longer holds, or a provider's. Read once
        per folder (a folder's files do not change under a running server)."""
        config = self.embedder.registry.config(name)
        if config.provider:
            return 0, "", 0
        _, served = self.embedder.registry.peek(name)
        try:
            path = getattr(served, "path", "") or config.resolved_path()
        except Exception:
            return 0, "", 0
        if path not in self._facts_by_path:
            try:
                self._facts_by_path[path] = (*_folder_facts(path), _parameter_count(path))
            except Exception:
                return 0, "", 0
        return self._facts_by_path[path]

    def _details(self, family: str, parameters: int) -> dict[str, Any]:
        return {"parent_model": "", "format": "safetensors", "family": family, "families": [family] if family else None,
                "parameter_size": _parameter_size(parameters), "quantization_level": "F32" if parameters else ""}

    def _tag(self, name: str) -> dict[str, Any]:
        size, family, parameters = self._facts(name)
        return {
            "name": name,
            "model": name,
            "modified_at": self.started,
            "size": size,
            "digest": hashlib.sha256(self.embedder.registry.config(name).id.encode()).hexdigest(),
            "details": self._details(family, parameters),
        }

    def _known(self, name: str) -> str:
        """`name` as the registry knows it (`x:latest` → `x`), or Ollama's 404 for /api/show."""
        if not name.strip():
            raise errors.invalid_argument("model is required", "model", "MODEL_REQUIRED")
        known = model_name(self.embedder, name)
        if known not in self.embedder.registry.names():
            raise errors.ServiceError(grpc.StatusCode.NOT_FOUND, f"model '{name}' not found", reason="NOT_FOUND", param="model")
        return known

    async def Show(self, raw: bytes, context: grpc.aio.ServicerContext) -> httpbody_pb2.HttpBody:  # noqa: N802
        async def work() -> httpbody_pb2.HttpBody:
            request = await rpc.parse(raw, pb.OllamaShowRequest, as_message, rpc.Call())
            name = self._known(request.model or request.name)
            size, family, parameters = self._facts(name)
            state, served = self.embedder.registry.peek(name)
            arch = family or "bert"
            info: dict[str, Any] = {"general.architecture": arch, "general.basename": self.embedder.registry.config(name).id}
            if parameters:
                info["general.parameter_count"] = parameters
            details = self._details(family, parameters)
            if state == "loaded" and served is not None:
                info[f"{arch}.context_length"] = served.tokenizer.max_seq_length
                info[f"{arch}.embedding_length"] = served.dimension
                details.update(context_length=served.tokenizer.max_seq_length, embedding_length=served.dimension)
            # model_info is always present (Ollama: integrations crash without it; the Python client requires it).
            return json_body({"details": details, "model_info": info, "capabilities": ["embedding"], "modified_at": self.started})

        return await rpc.handle(context, DIALECT, work)

    async def ListRunning(self, raw: bytes, context: grpc.aio.ServicerContext) -> httpbody_pb2.HttpBody:  # noqa: N802
        async def work() -> httpbody_pb2.HttpBody:
            models = []
            for name in self.embedder.registry.names():
                state, served = self.embedder.registry.peek(name)
                if state != "loaded" or served is None:
                    continue
                size, family, parameters = self._facts(name)
                models.append({"name": name, "model": name, "size": size,
                               "digest": hashlib.sha256(self.embedder.registry.config(name).id.encode()).hexdigest(),
                               "details": self._details(family, parameters),
                               # Models stay loaded here: Ollama's keep_alive -1 (its farthest time).
                               "expires_at": NEVER, "size_vram": 0, "context_length": served.tokenizer.max_seq_length})
            return json_body({"models": models})

        return await rpc.handle(context, DIALECT, work)

    async def Version(self, raw: bytes, context: grpc.aio.ServicerContext) -> httpbody_pb2.HttpBody:  # noqa: N802
        return await rpc.handle(context, DIALECT, constant(json_body({"version": OLLAMA_VERSION})))

    async def Root(self, raw: bytes, context: grpc.aio.ServicerContext) -> httpbody_pb2.HttpBody:  # noqa: N802
        return await rpc.handle(context, DIALECT, constant(httpbody_pb2.HttpBody(content_type="text/plain; charset=utf-8", data=b"Ollama is running")))



DIALECT = Dialect(
    name="ollama",
    services=(pb.DESCRIPTOR.services_by_name["Ollama"].full_name,),
    add_to_server=lambda server, embedder, config: add_servicer(server, pb.DESCRIPTOR.services_by_name["Ollama"], OllamaServicer(embedder)),
    # Ollama has no auth of its own; with keys configured its clients send `headers={"Authorization": "Bearer ..."}`.
    auth=(auth.BEARER,),
    error_body=error_body,
    http_status=http_status,
    # `/api/embed` as a prefix would also claim AIGNE Hub's `/api/embeddings`: matched exactly (a `^` regex). Its body-parse
    # errors are Ollama's in any case, matched by the service name once the transcoder has rewritten the path.
    rest_prefixes=("/api/tags", "/api/version", "/api/show", "/api/ps", r"^/api/embed(\?.*)?$"),
    fallback_prefixes=("/api/",),
    envoy_error_body={"error": "%LOCAL_REPLY_BODY%"},
    doc={"api": "Ollama", "routes": "`POST /api/embed`, `POST /api/embeddings` (`prompt`), `POST /api/show`, `GET /api/tags`, `GET /api/ps`, `GET /api/version`",
         "client": "`ollama`", "auth": "none of its own; `Authorization: Bearer` with keys configured",
         "error": '`{"error": "..."}`'},
)
