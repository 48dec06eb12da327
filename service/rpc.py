"""What every servicer method does around its dialect's work: deadlines, errors, response headers.

Servicers stay thin: each one maps its message to an `EmbedRequest`, calls the pipeline and maps the
result back, inside `handle`, which turns any `ServiceError` into the gRPC status (plus the dialect's
own error body for Envoy) and any unexpected exception into INTERNAL without leaking a stack trace.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable, TypeVar

import grpc

from . import errors
from .engine.pipeline import EmbedResult

log = logging.getLogger(__name__)
T = TypeVar("T")


def deadline(context: grpc.aio.ServicerContext) -> float | None:
    """The caller's gRPC deadline (from `grpc-timeout`) as a time.monotonic() value."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def metadata(context: grpc.aio.ServicerContext) -> dict[str, str]:
    """Request metadata (REST headers arrive here lowercased through Envoy), text values only."""
    return {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}


def result_headers(result: EmbedResult) -> list[tuple[str, str]]:
    """Per-request timing, in the names Text Embeddings Inference uses (milliseconds)."""
    t = result.timings
    return [
        ("x-compute-time", f"{t.total * 1000:.3f}"),
        ("x-tokenization-time", f"{t.tokenize * 1000:.3f}"),
        ("x-queue-time", f"{t.queue * 1000:.3f}"),
        ("x-inference-time", f"{t.inference * 1000:.3f}"),
        ("x-compute-tokens", str(result.total_tokens)),
        ("x-cache", "hit" if result.cache_hits == len(result.vectors) else "miss"),
        ("x-model-id", result.model),
    ]


async def handle(context: grpc.aio.ServicerContext, dialect: str, work: Callable[[], Awaitable[T]]) -> T:
    try:
        return await work()
    except errors.ServiceError as err:
        await abort(context, err, dialect)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("request failed", extra={"dialect": dialect})
        await abort(context, errors.internal(), dialect)
    raise AssertionError("unreachable")


async def abort(context: grpc.aio.ServicerContext, err: errors.ServiceError, dialect: str) -> None:
    log.debug("request refused", extra={"dialect": dialect, "code": err.code.name, "reason": err.reason, "error": err.message})

    await context.abort(err.code, err.message, trailing_metadata=errors.trailing_metadata(err, dialect))
