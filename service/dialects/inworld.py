"""Inworld's Embedding v1alpha `Embed`: the primary contract, native gRPC and transcoded REST."""

from __future__ import annotations

import grpc
import numpy as np

from ai.inworld.embedding.v1alpha import embedding_service_pb2 as pb

from .. import auth, errors, rpc
from ..engine import tokenization
from ..engine.pipeline import EmbedRequest, Embedder
from . import Dialect
from .common import add_servicer

LOCAL_PROVIDERS = (pb.SERVICE_PROVIDER_UNSPECIFIED, pb.SERVICE_PROVIDER_INWORLD)


def to_core(request: pb.EmbedRequest, call: rpc.Call) -> EmbedRequest:
    provider = request.model.service_provider
    if provider not in LOCAL_PROVIDERS and provider != pb.SERVICE_PROVIDER_OPENAI:
        raise errors.invalid_argument(f"Unknown service provider value {provider}.", "model.service_provider")
    if len(request.inputs) > call.max_inputs:
        raise errors.invalid_argument(f"Too many inputs: {len(request.inputs)}; at most {call.max_inputs} per request.", "inputs", "TOO_MANY_INPUTS")
    texts = []
    for i, item in enumerate(request.inputs):
        if item.WhichOneof("input_oneof") != "text":
            raise errors.invalid_argument(f"inputs[{i}] has no text.", f"inputs[{i}].text", "EMPTY_INPUT")
        if not item.text:
            raise errors.invalid_argument(f"inputs[{i}].text is empty; every input must have text.", f"inputs[{i}].text", "EMPTY_INPUT")
        texts.append(item.text)
    # Inworld's API truncates over-long text as sentence-transformers does, and returns normalized vectors.
    return EmbedRequest(
        inputs=texts,
        model=request.model.model,
        deadline=call.deadline,
        param="inputs",
        # sentence-transformers' behaviour by default (truncate); `dialects.long_inputs.inworld` may say chunk.
        long_inputs=call.long_inputs,
        # SERVICE_PROVIDER_OPENAI: forwarded to the provider named `openai` (FAILED_PRECONDITION if there is none).
        provider="openai" if provider == pb.SERVICE_PROVIDER_OPENAI else None,
        echo={"provider": provider},
    )


def to_response(vectors: np.ndarray, model: str, tokens: int, provider: int) -> pb.EmbedResponse:
    served_by = pb.SERVICE_PROVIDER_OPENAI if provider == pb.SERVICE_PROVIDER_OPENAI else pb.SERVICE_PROVIDER_INWORLD
    response = pb.EmbedResponse(usage=pb.EmbedResponse.Usage(token_count=tokens, model=pb.ModelId(model=model, service_provider=served_by)))
    for vector in vectors:
        response.embeddings.add().values.extend(vector.tolist())
    return response


def to_tokenize_response(done: tokenization.Tokenized) -> pb.TokenizeResponse:
    response = pb.TokenizeResponse(usage=pb.EmbedResponse.Usage(token_count=len(done.ids),
                                                                 model=pb.ModelId(model=done.model, service_provider=pb.SERVICE_PROVIDER_INWORLD)))
    for e in done.encodings:
        response.tokens.add(token_ids=e.ids.tolist(), token_count=len(e.ids), truncated=e.truncated)
    return response


class InworldServicer:
    def __init__(self, embedder: Embedder) -> None:
        self.embedder = embedder

    async def Embed(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:  # noqa: N802
        async def work() -> pb.EmbedResponse:
            core = await rpc.parse(raw, pb.EmbedRequest, to_core, rpc.call(context, self.embedder.limits.max_client_batch_size))
            result = await self.embedder.embed(core)
            await rpc.respond(context, result)
            return await rpc.encode(to_response, result.vectors.size, result.vectors, result.model, result.total_tokens, core.echo["provider"])

        return await rpc.handle(context, DIALECT, work)

    async def Tokenize(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:  # noqa: N802
        async def work() -> pb.TokenizeResponse:
            # The body of an Embed request: the same checks, the same model lookup.
            core = await rpc.parse(raw, pb.TokenizeRequest, to_core, rpc.call(context, self.embedder.limits.max_client_batch_size))
            if core.provider:
                raise errors.ServiceError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "Tokenize is not available for SERVICE_PROVIDER_OPENAI: that provider's tokenizer is not on this server.",
                    reason="TOKENIZER_UNAVAILABLE", param="model.service_provider",
                )
            # As Embed reads each text: its default prompt, special tokens, cut to max_seq_length.
            done = await tokenization.tokenize(self.embedder, core.model, core.inputs, truncate=True, param="inputs", deadline=core.deadline)
            return await rpc.encode(to_tokenize_response, len(done.ids), done)

        return await rpc.handle(context, DIALECT, work)


DIALECT = Dialect(
    name="inworld",
    services=(pb.DESCRIPTOR.services_by_name["EmbeddingService"].full_name,),
    add_to_server=lambda server, embedder, config: add_servicer(server, pb.DESCRIPTOR.services_by_name["EmbeddingService"], InworldServicer(embedder)),
    # Inworld's REST API takes Basic; native gRPC callers may use Bearer too.
    auth=(auth.BASIC, auth.BEARER),
    rest_auth=(auth.BASIC,),
    error_body=None,  # google.rpc.Status JSON, which the transcoder prints
    doc={"api": "Inworld v1alpha (002)",
         "routes": "`POST /ml/v1alpha/embedding:embed`, `POST /embeddings/v1alpha/content:embed`, `POST /ml/v1alpha/embedding:tokenize`",
         "client": "gRPC stubs from `proto/ai/inworld/`, REST", "auth": "`Authorization: Basic base64(key:secret)`"},
)
