"""What every servicer method does around its dialect's work: deadlines, errors, headers, metrics, logs.

Servicers stay thin: each one parses its request into an `EmbedRequest` (`parse`, off the event loop when
the body is large), calls the pipeline, hands the result to `respond` and maps it back (`encode`), all inside `handle`, which turns any `ServiceError` into the gRPC status (plus
the dialect's own error body for Envoy) and any unexpected exception into INTERNAL without leaking a stack
trace, and counts and times every request.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, TypeVar

import grpc
from google.protobuf.message import DecodeError

from . import errors, metrics, offload
from .dialects import Dialect
from .engine.pipeline import EmbedResult
from .envoy import REST_MARK
from .logs import request_id

log = logging.getLogger(__name__)
T = TypeVar("T")
_result: contextvars.ContextVar[EmbedResult | None] = contextvars.ContextVar("result", default=None)


@dataclass(frozen=True)
class Call:
    """What a dialect's parser may use besides the request body: plain data, so it can cross to an offload worker."""

    headers: dict[str, str] = field(default_factory=dict)
    deadline: float | None = None
    # Inputs one request may hold (limits.max_client_batch_size): counted before anything is converted.
    max_inputs: int = 2048
    # Dialect settings from the configuration (e.g. OpenAI's auto_truncate).
    settings: dict[str, Any] = field(default_factory=dict)
    # What this route does with an input longer than the model reads when its API has no switch for it, or the caller
    # left the switch out (`dialects.long_inputs`): refuse | truncate | chunk.
    long_inputs: str = "truncate"


# `dialects.long_inputs`, set by the server at start; the dialect being served, set by `handle` for `call` to read.
LONG_INPUTS: dict[str, str] = {}
_dialect: contextvars.ContextVar[str] = contextvars.ContextVar("dialect", default="")
# The call came through Envoy's transcoder (a REST caller), set by `handle` for `respond` to read.
_rest: contextvars.ContextVar[bool] = contextvars.ContextVar("rest", default=False)
# The call's metadata, read by `handle` for `call` (each call runs in a task of its own, with a context of its own).
_metadata: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("metadata", default=None)


def call(context: grpc.aio.ServicerContext, max_inputs: int, **settings: Any) -> Call:
    md = _metadata.get()  # read once per call, by `handle`
    return Call(metadata(context) if md is None else md, deadline(context), max_inputs, settings, LONG_INPUTS.get(_dialect.get(), "truncate"))


def _parse(message_type: Any, to_core: Callable[[Any, Call], T], raw: bytes, info: Call) -> T:
    try:
        message = message_type.FromString(raw)
    except DecodeError:
        raise errors.invalid_argument("The request body could not be parsed (malformed or nested too deeply).", None, "MALFORMED_REQUEST") from None
    return to_core(message, info)


# Large bodies waiting for (or in) the offload workers, at most: each is held in memory until it is parsed, so a flood of
# them is refused at once (429) rather than queued without bound (`server.max_parsing_bytes`, set by the server).
MAX_PARSING_BYTES = 64 * 1024 * 1024
_parsing_bytes = 0


async def parse(raw: bytes, message_type: Any, to_core: Callable[[Any, Call], T], info: Call) -> T:
    """`to_core(message_type.FromString(raw), info)`: inline for a small body, in an offload worker for a large one.

    Servicers receive their request as raw bytes (see `dialects.common.add_servicer`) so that no large body is
    ever parsed on the event loop; `to_core` is a module-level function of the dialect, and checks counts before
    it converts anything.
    """
    if len(raw) <= offload.INLINE_BYTES:
        return _parse(message_type, to_core, raw, info)
    global _parsing_bytes
    if _parsing_bytes + len(raw) > MAX_PARSING_BYTES:
        raise errors.overloaded(f"The server is parsing {_parsing_bytes} bytes of large requests; retry shortly.", 1.0)
    _parsing_bytes += len(raw)
    try:
        return await offload.run(_parse, message_type, to_core, raw, info)
    finally:
        _parsing_bytes -= len(raw)


async def encode(fn: Callable[..., T], floats: int, *args: Any) -> T:
    """`fn(*args)` (a dialect's response writer), in an offload worker when it prints more than a few thousand numbers."""
    if floats <= offload.INLINE_FLOATS:
        return fn(*args)
    return await offload.run(fn, *args)


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
        # Nothing is silent: how many inputs lost text, and how many were read as several windows.
        ("x-truncated-inputs", str(result.truncated)),
        ("x-chunked-inputs", str(result.chunked)),
        ("x-cache", "hit" if result.cache_hits == len(result.vectors) else "miss"),
        ("x-model-id", result.model),
    ]


async def respond(context: grpc.aio.ServicerContext, result: EmbedResult, extra: tuple[tuple[str, str], ...] = (),
                  *, initial: bool | None = None) -> None:
    """Timing as trailing metadata (every gRPC caller) and as response headers (REST callers through Envoy, or with
    `initial`: a gRPC API whose own server sends them as headers); `extra`: a dialect's own.

    Only a REST caller needs the headers: Envoy's transcoder makes HTTP headers of the initial metadata alone, never
    of trailers. For a gRPC caller they would cost a second send of their own, apart from the one that carries the
    response and its trailers: measured ~0.7 ms of a one-text call's latency and ~0.2 ms of the server's CPU."""
    # A dialect's own header of the same name replaces the common one (TEI's whole milliseconds).
    own = {k for k, _ in extra}
    headers = [*((k, v) for k, v in result_headers(result) if k not in own), *extra]
    _result.set(result)
    as_headers = _rest.get() if initial is None else initial
    if as_headers:
        await context.send_initial_metadata(headers)
    context.set_trailing_metadata(headers)


async def handle(context: grpc.aio.ServicerContext, dialect: Dialect, work: Callable[[], Awaitable[T]]) -> T:
    started = time.perf_counter()
    _dialect.set(dialect.name)
    md = metadata(context)
    _metadata.set(md)
    request_id.set(md.get("x-request-id"))
    _rest.set(REST_MARK in md)
    _result.set(None)
    try:
        response = await work()
    except errors.ServiceError as err:
        metrics.observe_request(dialect.name, "", err.code.name, time.perf_counter() - started)
        await abort(context, err, dialect)
    except asyncio.CancelledError:
        metrics.observe_request(dialect.name, "", "CANCELLED", time.perf_counter() - started)
        raise
    except Exception:
        log.exception("request failed", extra={"dialect": dialect.name})
        metrics.observe_request(dialect.name, "", "INTERNAL", time.perf_counter() - started)
        await abort(context, errors.internal(), dialect)
    else:
        result = _result.get()
        seconds = time.perf_counter() - started
        metrics.observe_request(dialect.name, result.model if result else "", "OK", seconds, result)
        if result is not None:
            log.debug(
                "embedded",
                extra={"dialect": dialect.name, "model": result.model, "inputs": len(result.token_counts), "tokens": result.total_tokens,
                       "cache_hits": result.cache_hits, "ms": round(seconds * 1000, 2)},
            )
        return response
    raise AssertionError("unreachable")


async def abort(context: grpc.aio.ServicerContext, err: errors.ServiceError, dialect: Dialect) -> None:
    # The message of an authentication failure may quote the key the caller sent: never logged.
    message = None if err.code == grpc.StatusCode.UNAUTHENTICATED else err.message
    log.debug("request refused", extra={"dialect": dialect.name, "code": err.code.name, "reason": err.reason, "error": message})
    await context.abort(err.code, err.message, trailing_metadata=errors.trailing_metadata(err, dialect))
