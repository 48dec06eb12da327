"""Inworld's Embedding v1alpha `Embed`: the primary contract, native gRPC and transcoded REST."""

from __future__ import annotations

import grpc

from ai.inworld.embedding.v1alpha import embedding_service_pb2 as pb
from ai.inworld.embedding.v1alpha import embedding_service_pb2_grpc as pb_grpc

from .. import errors, rpc
from ..engine.pipeline import EmbedRequest, EmbedResult, Embedder

DIALECT = "inworld"
LOCAL_PROVIDERS = (pb.SERVICE_PROVIDER_UNSPECIFIED, pb.SERVICE_PROVIDER_INWORLD)


def to_core(request: pb.EmbedRequest, deadline: float | None) -> EmbedRequest:
    provider = request.model.service_provider
    if provider not in LOCAL_PROVIDERS and provider != pb.SERVICE_PROVIDER_OPENAI:
        raise errors.invalid_argument(f"Unknown service provider value {provider}.", "model.service_provider")
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
        deadline=deadline,
        param="inputs",
        # SERVICE_PROVIDER_OPENAI: forwarded to the provider named `openai` (FAILED_PRECONDITION if there is none).
        provider="openai" if provider == pb.SERVICE_PROVIDER_OPENAI else None,
    )


def to_response(result: EmbedResult, provider: int) -> pb.EmbedResponse:
    served_by = pb.SERVICE_PROVIDER_OPENAI if provider == pb.SERVICE_PROVIDER_OPENAI else pb.SERVICE_PROVIDER_INWORLD
    response = pb.EmbedResponse(
        usage=pb.EmbedResponse.Usage(token_count=result.total_tokens, model=pb.ModelId(model=result.model, service_provider=served_by))
    )
    for vector in result.vectors:
        response.embeddings.add().values.extend(vector.tolist())
    return response


class InworldServicer(pb_grpc.EmbeddingServiceServicer):
    def __init__(self, embedder: Embedder) -> None:
        self.embedder = embedder

    async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        async def work() -> pb.EmbedResponse:
            result = await self.embedder.embed(to_core(request, rpc.deadline(context)))
            await rpc.respond(context, result)
            return to_response(result, request.model.service_provider)

        return await rpc.handle(context, DIALECT, work)
