"""TEI's HTTP routes beyond embedding, as TEI 1.9.3 answers them for an embedding model (router/src/http/server.rs):

- `POST /similarity` `{"inputs": {"source_sentence", "sentences"}, "parameters"?}` → the cosine similarity of each
  sentence to the source, `[f32]` (TEI embeds them, unnormalized, and returns 1 - cosine distance).
- `POST /rerank` and `POST /predict`: TEI's 424 Backend errors (`model is not a re-ranker model`, `Model is not a
  classifier model`) once the request is valid (an empty `texts` or `inputs` is its 400 Empty first).
- `POST /vertex` `{"instances": [EmbedRequest, ...]}` → `{"predictions": [[[f32]], ...]}`: each instance an `/embed`
  body (one with `query` and `texts` is a rerank request: 424); Vertex AI's prediction wrapper.
- `POST /invocations` (SageMaker) is `/embed` and `GET /ping` is `/health` (bound in the proto to those methods).
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import grpc
import numpy as np
from google.api import httpbody_pb2
from google.protobuf import json_format, struct_pb2

from embedding.dialects.v1 import tei_pb2 as pb

from ... import errors, rpc
from ...engine.pipeline import EmbedRequest
from ..common import json_body, value
from ._shared import _C, dialect, unprocessable
from .http_api import TeiHttpServicer, _describe, _given, direction, embed_core, inputs, long_inputs, opt_str, respond


def _backend(message: str) -> errors.ServiceError:
    return errors.ServiceError(_C.FAILED_PRECONDITION, f"Backend error: {message}", reason="NOT_THIS_MODEL_TYPE")


def _empty(field: str) -> errors.ServiceError:
    return errors.invalid_argument(f"`{field}` cannot be empty", field, "EMPTY_INPUT")


def _struct(v: struct_pb2.Value | None, field: str) -> struct_pb2.Struct:
    if v is None:
        raise unprocessable(field, f"missing field `{field}`")
    if v.WhichOneof("kind") != "struct_value":
        raise unprocessable(field, f"invalid type: {_describe(v)}, expected struct {field}")
    return v.struct_value


def similarity_core(request: pb.TeiSimilarityRequest, call: rpc.Call) -> EmbedRequest:
    """TEI's SimilarityRequest: the source sentence first, then the sentences, as one request of N + 1 inputs."""
    body = _struct(_given(request, "inputs"), "inputs")
    source, sentences = body.fields.get("source_sentence"), body.fields.get("sentences")
    if source is None or source.WhichOneof("kind") != "string_value":
        raise unprocessable("inputs", "missing field `source_sentence`" if source is None else f"invalid type: {_describe(source)}, expected a string")
    if sentences is None or sentences.WhichOneof("kind") != "list_value":
        raise unprocessable("inputs", "missing field `sentences`" if sentences is None else f"invalid type: {_describe(sentences)}, expected a sequence")
    if not sentences.list_value.values:
        raise _empty("sentences")
    texts = [source.string_value, *inputs(sentences, call.max_inputs - 1, "sentences", ids_allowed=False)]
    params = pb.TeiEmbedAllRequest()  # the same optional fields: truncate, truncation_direction, prompt_name
    given = _given(request, "parameters")
    if given is not None:
        fields = _struct(given, "parameters").fields
        for name in ("truncate", "truncation_direction", "prompt_name"):
            if name in fields:
                getattr(params, name).CopyFrom(fields[name])
    return EmbedRequest(inputs=texts, model=call.settings["model"], normalize=True, long_inputs=long_inputs(params, call),
                        truncation_direction=direction(params), prompt_name=opt_str(params, "prompt_name"), deadline=call.deadline,
                        param="inputs", echo={"chars": sum(len(t) for t in texts)})


def rerank_check(request: pb.TeiRerankRequest, call: rpc.Call) -> None:
    """A RerankRequest TEI would read (query, texts), refused as TEI refuses it on an embedding model."""
    query, texts = _given(request, "query"), _given(request, "texts")
    if query is None or query.WhichOneof("kind") != "string_value":
        raise unprocessable("query", "missing field `query`" if query is None else f"invalid type: {_describe(query)}, expected a string")
    if texts is None or texts.WhichOneof("kind") != "list_value":
        raise unprocessable("texts", "missing field `texts`" if texts is None else f"invalid type: {_describe(texts)}, expected a sequence")
    if not texts.list_value.values:
        raise _empty("texts")
    raise _backend("model is not a re-ranker model")


def predict_check(request: pb.TeiPredictRequest, call: rpc.Call) -> None:
    v = _given(request, "inputs")
    if v is None:
        raise unprocessable("inputs", "missing field `inputs`")
    if v.WhichOneof("kind") == "list_value" and not v.list_value.values:
        raise _empty("inputs")
    if v.WhichOneof("kind") not in ("string_value", "list_value"):
        raise unprocessable("inputs", f"invalid type: {_describe(v)}, expected a string or a sequence")
    raise _backend("Model is not a classifier model")


def vertex_cores(request: pb.TeiVertexRequest, call: rpc.Call) -> list[EmbedRequest]:
    """Each instance an /embed request (TEI tries a rerank request first: on an embedding model that is its 424)."""
    v = _given(request, "instances")
    if v is None or v.WhichOneof("kind") != "list_value":
        raise unprocessable("instances", "missing field `instances`" if v is None else f"invalid type: {_describe(v)}, expected a sequence")
    instances = v.list_value.values
    if not instances:
        raise _empty("instances")
    if len(instances) > call.max_inputs:
        raise errors.invalid_argument(f"batch size {len(instances)} > maximum allowed batch size {call.max_inputs}", "instances", "TOO_MANY_INPUTS")
    cores, total = [], 0
    for i, instance in enumerate(instances):
        fields = _struct(instance, f"instances[{i}]").fields
        if "query" in fields and "texts" in fields:
            raise _backend("model is not a re-ranker model")
        embed = pb.TeiEmbedRequest()
        data = value(instance, f"instances[{i}]")  # NaN or Infinity (native gRPC can send them): a 400 naming the field
        try:
            json_format.ParseDict(data, embed, ignore_unknown_fields=True)  # unknown fields ignored, serde's default
        except (json_format.ParseError, ValueError) as err:
            raise unprocessable(f"instances[{i}]", str(err).split("\n")[0][:200]) from None
        core = embed_core(embed, call)
        total += len(core.inputs)
        if total > call.max_inputs:
            raise errors.invalid_argument(f"batch size {total} > maximum allowed batch size {call.max_inputs}", "instances", "TOO_MANY_INPUTS")
        cores.append(core)
    return cores


def predictions_body(predictions: list[np.ndarray]) -> httpbody_pb2.HttpBody:
    return json_body({"predictions": predictions})


class TeiTasksServicer(TeiHttpServicer):
    """TEI's HTTP service: its embedding routes (http_api.py) and these."""

    async def Similarity(self, raw: bytes, context: grpc.aio.ServicerContext) -> httpbody_pb2.HttpBody:  # noqa: N802
        async def work() -> httpbody_pb2.HttpBody:
            core = await rpc.parse(raw, pb.TeiSimilarityRequest, similarity_core, self.call(context))
            result = await self.embedder.embed(core)
            await respond(context, result, core.echo["chars"])
            vectors = result.vectors
            return json_body((vectors[1:] @ vectors[0]).astype(np.float32))

        return await rpc.handle(context, dialect(), work)

    async def Rerank(self, raw: bytes, context: grpc.aio.ServicerContext) -> httpbody_pb2.HttpBody:  # noqa: N802
        return await self._refused(raw, context, pb.TeiRerankRequest, rerank_check)

    async def Predict(self, raw: bytes, context: grpc.aio.ServicerContext) -> httpbody_pb2.HttpBody:  # noqa: N802
        return await self._refused(raw, context, pb.TeiPredictRequest, predict_check)

    async def _refused(self, raw: bytes, context: grpc.aio.ServicerContext, message: Any, check: Any) -> httpbody_pb2.HttpBody:
        async def work() -> httpbody_pb2.HttpBody:
            await rpc.parse(raw, message, check, self.call(context))
            raise AssertionError("unreachable: the check raises")

        return await rpc.handle(context, dialect(), work)

    async def Vertex(self, raw: bytes, context: grpc.aio.ServicerContext) -> httpbody_pb2.HttpBody:  # noqa: N802
        async def work() -> httpbody_pb2.HttpBody:
            cores = await rpc.parse(raw, pb.TeiVertexRequest, vertex_cores, self.call(context))
            # All at once: the engine batches the instances' inputs together, as one /embed of them all would be.
            results = await asyncio.gather(*(self.embedder.embed(core) for core in cores))
            slowest = max(results, key=lambda r: r.timings.total)
            # One result for the headers (instances may differ in `dimensions`: only their count is taken).
            merged = dataclasses.replace(slowest, vectors=np.empty((sum(len(r.vectors) for r in results), 0), dtype=np.float32),
                                         token_counts=[c for r in results for c in r.token_counts],
                                         cache_hits=sum(r.cache_hits for r in results), usage_tokens=None,
                                         truncated=sum(r.truncated for r in results), chunked=sum(r.chunked for r in results))
            await respond(context, merged, sum(c.echo["chars"] for c in cores))
            predictions = [r.vectors for r in results]
            return await rpc.encode(predictions_body, sum(r.vectors.size for r in results), predictions)

        return await rpc.handle(context, dialect(), work)
