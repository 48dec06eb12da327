"""What the Ollama, Cohere and Gemini adapters share: a task's prompt, a Matryoshka cut, a request id.

(Not a dialect: modules whose name starts with `_` are skipped by the registry.)
"""

from __future__ import annotations

import time
import uuid

import numpy as np

from ..engine.models import RemoteModel, ServedModel
from ..engine.pipeline import EmbedRequest, Embedder
from ..engine.pooling import l2_normalize


async def served_model(embedder: Embedder, core: EmbedRequest) -> ServedModel | RemoteModel:
    """The request's model, waited for as `Embedder.embed` would (an unknown one raises the same NOT_FOUND)."""
    deadline = core.deadline if core.deadline is not None else time.monotonic() + embedder.limits.request_timeout_seconds
    return await embedder.registry.get(core.model, wait=core.wait_for_model, timeout=max(0.0, deadline - time.monotonic()))


def task_prompt(model: ServedModel | RemoteModel, candidates: tuple[str, ...]) -> str | None:
    """The first of `candidates` that `model` defines as a prompt, or None (the model's default prompt, if any).

    An API's task (Cohere's `input_type`, Gemini's `taskType`) selects a prompt only where the model has one, so
    the model must be known first (`served_model`). A model served by a provider has no prompts.
    """
    prompts = getattr(model, "prompts", None) or {}
    return next((name for name in candidates if name in prompts), None)


def cut(vectors: np.ndarray, dimensions: int | None) -> np.ndarray:
    """The first `dimensions` components, L2-normalized again (as the engine does); all of them for None or ≥ D."""
    if dimensions is None or dimensions >= vectors.shape[1]:
        return vectors
    return np.ascontiguousarray(l2_normalize(vectors[:, :dimensions]), dtype=np.float32)


def request_id(headers: dict[str, str]) -> str:
    """The request's id (Envoy's x-request-id, which the logs carry too), or a fresh one."""
    return headers.get("x-request-id") or str(uuid.uuid4())
