"""Hugging Face Inference feature extraction: `POST /models/{model_id}`, a bare array of arrays back.

Also at the paths huggingface_hub builds for its `hf-inference` provider, `/hf-inference/models/{id}` and
`.../models/{id}/pipeline/feature-extraction` (with or without the `/hf-inference` prefix).

Defaults, statuses and error types follow Text Embeddings Inference, which serves this API: `normalize` true,
`truncate` false (an over-long input is an error, 422 Validation as TEI 1.9 answers it), truncation from the right.
`x-use-cache: false` bypasses the cache; without `x-wait-for-model: true` a model that is still loading answers 503
with `estimated_time`.
"""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np
from google.api import httpbody_pb2

from embedding.dialects.v1 import huggingface_pb2 as pb

from .. import auth, errors, rpc
from ..engine.pipeline import EmbedRequest, Embedder
from . import Dialect
from .tei import _shared as tei
from .common import add_servicer, flag, json_body, strings, value

# huggingface_hub's hf-inference provider puts the task after the model id.
PIPELINE = "/pipeline/feature-extraction"


def error_body(err: errors.ServiceError) -> dict[str, Any]:
    """TEI's body (`error_type` beside `error`), with `estimated_time` while a model loads."""
    body: dict[str, Any] = {"error": err.message, "error_type": tei.classify(err)[1]}
    if err.estimated_time is not None:
        body["estimated_time"] = err.estimated_time
    return body


def model_of(path_model: str) -> str:
    """The model id of the path: `{id}/pipeline/feature-extraction` names `{id}`."""
    if path_model.endswith(PIPELINE) and len(path_model) > len(PIPELINE):
        return path_model[: -len(PIPELINE)]
    return path_model

OPTIONS = ("normalize", "prompt_name", "truncate", "truncation_direction")


def _options(request: pb.FeatureExtractionRequest) -> dict[str, Any]:
    """Top-level options win over the older nested `parameters` form."""
    opts: dict[str, Any] = {}
    if request.HasField("parameters"):
        nested = value(request.parameters, "parameters")
        opts.update({k: nested[k] for k in OPTIONS if k in nested})
    if request.HasField("normalize"):
        opts["normalize"] = request.normalize
    if request.HasField("truncate"):
        opts["truncate"] = request.truncate
    if request.prompt_name:
        opts["prompt_name"] = request.prompt_name
    if request.truncation_direction:
        opts["truncation_direction"] = request.truncation_direction
    return opts


def _bool(opts: dict[str, Any], key: str, default: bool) -> bool:
    v = opts.get(key, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise errors.invalid_argument(f"'{key}' must be a boolean.", key)
    return v


def to_core(request: pb.FeatureExtractionRequest, call: rpc.Call) -> EmbedRequest:
    opts = _options(request)
    direction = opts.get("truncation_direction") or "Right"
    if not isinstance(direction, str) or direction.lower() not in ("left", "right"):
        raise errors.invalid_argument(f"'truncation_direction' must be Left or Right; got {direction!r}.", "truncation_direction")
    prompt_name = opts.get("prompt_name")
    if prompt_name is not None and not isinstance(prompt_name, str):
        raise errors.invalid_argument("'prompt_name' must be a string.", "prompt_name")
    headers = call.headers
    return EmbedRequest(
        inputs=strings(request.inputs if request.HasField("inputs") else None, "inputs", call.max_inputs),
        model=model_of(request.model),
        normalize=_bool(opts, "normalize", True),
        # TEI's switch: true cuts, false refuses; left out, the route's policy (`dialects.long_inputs`, refuse).
        long_inputs=("truncate" if _bool(opts, "truncate", False) else "refuse") if opts.get("truncate") is not None else call.long_inputs,
        truncation_direction=direction.lower(),
        prompt_name=prompt_name,
        use_cache=flag(headers.get("x-use-cache")) is not False,
        wait_for_model=bool(flag(headers.get("x-wait-for-model"))),
        deadline=call.deadline,
        param="inputs",
    )


def to_body(vectors: np.ndarray) -> httpbody_pb2.HttpBody:
    # Always an array of arrays, a single string too: [[...]].
    return json_body(vectors)


class HuggingFaceServicer:
    def __init__(self, embedder: Embedder) -> None:
        self.embedder = embedder

    async def FeatureExtraction(self, raw: bytes, context: grpc.aio.ServicerContext) -> httpbody_pb2.HttpBody:  # noqa: N802
        async def work() -> httpbody_pb2.HttpBody:
            core = await rpc.parse(raw, pb.FeatureExtractionRequest, to_core, rpc.call(context, self.embedder.limits.max_client_batch_size))
            result = await self.embedder.embed(core)
            await rpc.respond(context, result)
            return await rpc.encode(to_body, result.vectors.size, result.vectors)

        return await rpc.handle(context, DIALECT, work)


DIALECT = Dialect(
    name="huggingface",
    services=(pb.DESCRIPTOR.services_by_name["HuggingFace"].full_name,),
    add_to_server=lambda server, embedder, config: add_servicer(server, pb.DESCRIPTOR.services_by_name["HuggingFace"], HuggingFaceServicer(embedder)),
    auth=(auth.BEARER,),
    error_body=error_body,
    http_status=tei.http_status,
    rest_prefixes=("/models/", "/hf-inference/"),
    envoy_error_body={"error": "%LOCAL_REPLY_BODY%", "error_type": "Validation"},
    doc={"api": "Hugging Face feature extraction (004)", "routes": "`POST /models/{model_id}` (and `/hf-inference/models/{model_id}[/pipeline/feature-extraction]`)",
         "client": "`huggingface_hub.InferenceClient`", "auth": "`Authorization: Bearer`"},
)
