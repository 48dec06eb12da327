"""gRPC interceptors: what every dialect's call goes through before its servicer sees it.

- `GateInterceptor`: refuses new calls while the server drains (marked for Envoy to retry them on another
  replica), refuses callers from beyond this machine while the service is open (no keys), and counts calls
  in flight so a drain knows when they are done.
- `AuthInterceptor`: the one place authentication happens, in each dialect's own schemes; it records which
  credential a call came with (the cache is partitioned by it).

A refused call is answered by a handler with no deserializer: its request is never parsed. Health and
reflection pass through untouched.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from typing import Awaitable, Callable

import grpc

from . import auth, errors, metrics
from .dialects import Dialect, dialect_of
from .engine.pipeline import caller
from .envoy import DOWNSTREAM_HEADER, REST_MARK

log = logging.getLogger(__name__)
Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]]


@dataclass
class CallState:
    """Shared by the server and the gate: calls in flight and whether new ones are still taken."""

    inflight: int = 0
    refusing: bool = False


def _metadata(details: grpc.HandlerCallDetails) -> dict[str, str]:
    return {k: v for k, v in (details.invocation_metadata or ()) if isinstance(v, str)}


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.strip().strip("[]")).is_loopback
    except ValueError:
        return False


class GateInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, state: CallState, store: auth.CredentialStore, allow_open_non_loopback: bool, max_calls: int = 1 << 30) -> None:
        self.state = state
        self.store = store
        self.allow_open_non_loopback = allow_open_non_loopback
        self.max_calls = max_calls

    async def intercept_service(self, continuation: Continuation, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        dialect = dialect_of(details.method)
        if dialect is None:
            return await continuation(details)
        if self.state.refusing:
            err = errors.ServiceError(
                grpc.StatusCode.UNAVAILABLE, "This replica is shutting down; retry the request.", reason="DRAINING",
                retry_after=1.0, retry_elsewhere=True,
            )
            metrics.observe_request(dialect.name, "", err.code.name, 0.0)
            return _refuse(err, dialect)
        if not self.store.enabled and not self.allow_open_non_loopback:
            # Envoy writes the address its caller connected from (overwriting anything the caller sent).
            downstream = _metadata(details).get(DOWNSTREAM_HEADER)
            if downstream is not None and not is_loopback(downstream):
                err = errors.ServiceError(
                    grpc.StatusCode.PERMISSION_DENIED,
                    "This service has no API keys configured, so it answers only callers on its own machine.",
                    reason="OPEN_SERVICE_LOOPBACK_ONLY",
                )
                metrics.observe_request(dialect.name, "", err.code.name, 0.0)
                return _refuse(err, dialect)
        handler = await continuation(details)
        return _around(handler, self._enter, self._leave, dialect)

    def _enter(self) -> None:
        # Runs once the call's request has arrived (an idle call, headers but no message, holds nothing here).
        if self.state.inflight >= self.max_calls:
            raise errors.ServiceError(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"The server is serving {self.max_calls} calls; retry shortly.",
                reason="OVERLOADED", retry_after=1.0,
            )
        self.state.inflight += 1

    def _leave(self) -> None:
        self.state.inflight -= 1


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Checks each call's credentials in its dialect's schemes; health and reflection stay open."""

    def __init__(self, store: auth.CredentialStore) -> None:
        self.store = store

    async def intercept_service(self, continuation: Continuation, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        dialect = dialect_of(details.method)
        if dialect is None or not self.store.enabled or details.method in dialect.public_methods:
            return await continuation(details)
        metadata = _metadata(details)
        try:
            cred = auth.check(self.store, dialect.schemes(rest=REST_MARK in metadata), metadata)
        except errors.ServiceError as err:
            log.debug("unauthenticated", extra={"dialect": dialect.name, "reason": err.reason, "method": details.method})
            metrics.observe_request(dialect.name, "", err.code.name, 0.0)
            return _refuse(err, dialect)
        handler = await continuation(details)
        identity = cred.identity if cred is not None else ""
        return _around(handler, lambda: caller.set(identity), None, dialect)


def _refuse(err: errors.ServiceError, dialect: Dialect) -> grpc.RpcMethodHandler:
    async def refuse(request: bytes, context: grpc.aio.ServicerContext) -> None:
        await context.abort(err.code, err.message, trailing_metadata=errors.trailing_metadata(err, dialect))

    # No deserializer: the request is never parsed for a caller we don't let in.
    return grpc.unary_unary_rpc_method_handler(refuse)


def _around(handler: grpc.RpcMethodHandler | None, enter: Callable[[], object], leave: Callable[[], None] | None,
            dialect: Dialect | None = None):
    """The same handler, with `enter` run in the call's own task before it and `leave` after it. A ServiceError from
    `enter` refuses the call, in the dialect's words."""
    if handler is None:
        return None

    async def begin(context) -> bool:
        try:
            enter()
        except errors.ServiceError as err:
            await context.abort(err.code, err.message, trailing_metadata=errors.trailing_metadata(err, dialect))
            return False
        return True

    def end() -> None:
        if leave is not None:
            leave()

    if handler.unary_unary is not None or handler.stream_unary is not None:
        inner = handler.unary_unary or handler.stream_unary

        async def unary_response(request, context):
            if not await begin(context):
                return None
            try:
                return await inner(request, context)
            finally:
                end()

        make = grpc.unary_unary_rpc_method_handler if handler.unary_unary is not None else grpc.stream_unary_rpc_method_handler
        return make(unary_response, handler.request_deserializer, handler.response_serializer)
    inner_stream = handler.unary_stream or handler.stream_stream

    async def stream_response(request, context):
        if not await begin(context):
            return
        try:
            async for item in _responses(inner_stream(request, context)):
                yield item
        finally:
            end()

    make = grpc.unary_stream_rpc_method_handler if handler.unary_stream is not None else grpc.stream_stream_rpc_method_handler
    return make(stream_response, handler.request_deserializer, handler.response_serializer)


async def _responses(result):
    """A streaming behavior is an async generator, or a coroutine that writes with context.write and returns None."""
    if hasattr(result, "__aiter__"):
        async for item in result:
            yield item
    else:
        await result
