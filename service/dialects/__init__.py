"""Dialects: thin adapters between one API's wire format and the core `EmbedRequest`/`EmbedResult`.

A dialect never touches a runtime, a batcher or a cache: it maps fields, calls `Embedder.embed`, and
maps the result back. Errors are raised as `ServiceError`s and rendered by `service.errors`.
"""

from __future__ import annotations

# gRPC service → dialect, for what is decided per dialect outside the adapters (auth schemes, error bodies).
SERVICES = {
    "ai.inworld.embedding.v1alpha.EmbeddingService": "inworld",
    "embedding.dialects.v1.OpenAI": "openai",
    "embedding.dialects.v1.HuggingFace": "huggingface",
    "embedding.dialects.v1.HrFlow": "hrflow",
}


def dialect_of(method: str) -> str | None:
    """`/pkg.Service/Method` → the dialect, or None for health, reflection and the like."""
    return SERVICES.get(method.lstrip("/").split("/", 1)[0])
