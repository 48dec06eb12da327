"""What TEI's HTTP API and its gRPC services share: its error statuses and body, the /info fields, the servicers' base."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.metadata
import os
from typing import Any

import grpc

from ... import errors, rpc
from ...engine import tokenization
from ...engine.folder import read_folder
from ...engine.models import RemoteModel, ServedModel
from ...engine.pipeline import Embedder

# -- errors -----------------------------------------------------------------------------------------------------

# A body of the wrong shape (a field of the wrong type, an unknown enum value): TEI's JSON extractor answers 422.
UNPROCESSABLE = "UNPROCESSABLE_ENTITY"
_C = grpc.StatusCode
Ctx = grpc.aio.ServicerContext


def classify(err: errors.ServiceError) -> tuple[int, str]:
    """(HTTP status, TEI `error_type`) of a failure, as TEI reports it."""
    code = err.code
    if code == _C.INVALID_ARGUMENT:
        if err.reason == "EMPTY_INPUT":
            return 400, "Empty"
        # TEI 1.9.3 answers every Validation error 422 (router/src/http/server.rs): too many inputs, too long, an unknown
        # prompt_name, as a body of the wrong shape (TEI before 1.9: 413).
        return 422, "Validation"
    if code == _C.RESOURCE_EXHAUSTED:
        return 429, "Overloaded"
    if code == _C.UNAVAILABLE:
        return 503, "Unhealthy"
    if code in (_C.FAILED_PRECONDITION, _C.INTERNAL):
        return 424, "Backend"
    if code in (_C.UNAUTHENTICATED, _C.PERMISSION_DENIED):
        return err.http_status, "Unauthorized"
    if code == _C.NOT_FOUND:
        return 404, "NotFound"
    return err.http_status, "Backend"


def error_body(err: errors.ServiceError) -> dict[str, Any]:
    return {"error": err.message, "error_type": classify(err)[1]}


def http_status(err: errors.ServiceError) -> int:
    return classify(err)[0]


def unprocessable(field: str, message: str) -> errors.ServiceError:
    return errors.invalid_argument(f"Failed to deserialize the JSON body into the target type: {field}: {message}", field, UNPROCESSABLE)


def backend_codes(err: errors.ServiceError) -> errors.ServiceError:
    """TEI's gRPC code for a failure: its Backend errors (ours: INTERNAL, a failed forward pass) are FAILED_PRECONDITION."""
    if err.code == _C.INTERNAL:
        return dataclasses.replace(err, code=_C.FAILED_PRECONDITION, message=f"Backend error: {err.message}")
    return err


def simple_tokens(e: tokenization.Encoded) -> list[dict[str, Any]]:
    """TEI's SimpleTokens: a special token has its token string and null offsets; the others their text and its byte
    offsets in the UTF-8 text (TEI slices `input.bytes()`: in "café au lait", `au` is 6-8, not characters 5-7)."""
    out = []
    special_texts = iter(e.special_texts)
    at = _byte_offsets(e.text)
    for id_, (start, stop), special in zip(e.ids.tolist(), e.offsets.tolist(), e.special.tolist()):
        if special:
            out.append({"id": id_, "text": next(special_texts), "special": True, "start": None, "stop": None})
        else:
            out.append({"id": id_, "text": e.text[start:stop], "special": False, "start": at(start), "stop": at(stop)})
    return out


def _byte_offsets(text: str) -> Any:
    """Character offset → byte offset in `text`'s UTF-8 (the identity for ASCII)."""
    if text.isascii():
        return lambda i: i
    ends = [0]
    for ch in text:
        ends.append(ends[-1] + len(ch.encode("utf-8", "surrogatepass")))
    return lambda i: ends[i]



POOLING_NAMES = {"lasttoken": "last_token"}


# The TEI release whose API this dialect matches (/info.version: clients read features off it).
TEI_VERSION = "1.9.3"


def info_fields(model: ServedModel | RemoteModel, pooling: tuple[str, ...], embedder: Embedder, auto_truncate: bool) -> dict[str, Any]:
    """TEI's `Info`, in its order, filled from this server."""
    limits = embedder.limits
    if isinstance(model, ServedModel):
        dtype = {"fp32": "float32", "bf16": "bfloat16"}.get(model.runtime.precision, model.runtime.precision)
        max_input = model.tokenizer.max_seq_length
    else:
        dtype, max_input = "float32", 0
    return {
        "model_id": model.id,
        "model_sha": (model.commit or None) if isinstance(model, ServedModel) else None,
        "model_dtype": dtype,
        "served_model_name": model.id,
        "model_type": {"embedding": {"pooling": "+".join(POOLING_NAMES.get(p, p) for p in pooling) or "mean"}},
        "max_concurrent_requests": limits.max_concurrent_requests,
        "max_input_length": max_input,
        "max_batch_tokens": limits.max_batch_tokens,
        "max_batch_requests": limits.max_batch_size,
        "max_client_batch_size": limits.max_client_batch_size,
        "auto_truncate": auto_truncate,
        "tokenization_workers": getattr(embedder.executor, "_max_workers", None) or min(4, os.cpu_count() or 2),
        "version": TEI_VERSION,
        "sha": None,
        "docker_label": f"embedding-service {VERSION}",
        # Not TEI's: how `precision: auto` chose this model's precision (tried, lowest cosine to fp32, chosen).
        **({"precision_check": model.fidelity} if isinstance(model, ServedModel) and model.fidelity else {}),
    }


def _version() -> str:
    try:
        return importlib.metadata.version("embedding-service")
    except importlib.metadata.PackageNotFoundError:  # the image runs the source, not an installed package
        from ... import __version__

        return __version__


VERSION = _version()



class Base:
    def __init__(self, embedder: Embedder, model: str = "", auto_truncate: bool = False) -> None:
        self.embedder = embedder
        self.model = model
        self.auto_truncate = auto_truncate
        self._pooling: dict[str, tuple[str, ...]] = {}

    def call(self, context: grpc.aio.ServicerContext) -> rpc.Call:
        return rpc.call(context, self.embedder.limits.max_client_batch_size, model=self.model, auto_truncate=self.auto_truncate)

    async def pooling(self, model: ServedModel | RemoteModel) -> tuple[str, ...]:
        """The model's pooling, read once from its folder (the served model keeps only the function)."""
        if isinstance(model, RemoteModel):
            return ()
        if model.id not in self._pooling:
            loop = asyncio.get_running_loop()
            folder = await loop.run_in_executor(self.embedder.executor, lambda: read_folder(model.path or model.config.resolved_path()))
            self._pooling[model.id] = folder.pooling_modes
        return self._pooling[model.id]

    async def info(self) -> tuple[ServedModel | RemoteModel, dict[str, Any]]:
        model = await self.embedder.registry.get(self.model, wait=False)
        return model, info_fields(model, await self.pooling(model), self.embedder, self.auto_truncate)


def dialect():
    """This dialect's registration (tei/__init__.py), found when a call needs it: it names these modules' servicers."""
    from . import DIALECT

    return DIALECT


def sparse() -> errors.ServiceError:
    """TEI's answer to EmbedSparse on a model without SPLADE pooling (every model here is dense)."""
    return errors.ServiceError(_C.FAILED_PRECONDITION, "Backend error: Model is not an embedding model with SPLADE pooling", reason="NOT_SPLADE")
