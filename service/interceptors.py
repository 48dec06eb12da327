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
    def __init__(self, state: CallState, store: auth.CredentialStore, allow_open_non_loopback: bool) -> None:
        self.state = state
        self.store = store
        self.allow_open_non_loopback = allow_open_non_loopback

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
        return _around(handler, self._enter, self._leave)

    def _enter(self) -> None:
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
        name = cred.name if cred is not None else ""
        return _around(handler, lambda: caller.set(name), None)


def _refuse(err: errors.ServiceError, dialect: Dialect) -> grpc.RpcMethodHandler:
    async def refuse(request: bytes, context: grpc.aio.ServicerContext) -> None:
        await context.abort(err.code, err.message, trailing_metadata=errors.trailing_metadata(err, dialect))

    # No deserializer: the request is never parsed for a caller we don't let in.
    return grpc.unary_unary_rpc_method_handler(refuse)


def _around(handler: grpc.RpcMethodHandler | None, enter: Callable[[], object], leave: Callable[[], None] | None):
    """The same handler, with `enter` run in the call's own task before it and `leave` after it."""
    if handler is None:
        return None
    if handler.unary_unary is not None:
        inner = handler.unary_unary

        async def unary_unary(request, context):
            enter()
            try:
                return await inner(request, context)
            finally:
                if leave is not None:
                    leave()

        return grpc.unary_unary_rpc_method_handler(unary_unary, handler.request_deserializer, handler.response_serializer)
    if handler.unary_stream is not None:
        inner_us = handler.unary_stream

        async def unary_stream(request, context):
            enter()
            try:
                async for item in _responses(inner_us(request, context)):
                    yield item
            finally:
                if leave is not None:
                    leave()

        return grpc.unary_stream_rpc_method_handler(unary_stream, handler.request_deserializer, handler.response_serializer)
    if handler.stream_stream is not None:
        inner_ss = handler.stream_stream

        async def stream_stream(requests, context):
            enter()
            try:
                async for item in _responses(inner_ss(requests, context)):
                    yield item
            finally:
                if leave is not None:
                    leave()

        return grpc.stream_stream_rpc_method_handler(stream_stream, handler.request_deserializer, handler.response_serializer)
    inner_su = handler.stream_unary

    async def stream_unary(requests, context):
        enter()
        try:
            return await inner_su(requests, context)
        finally:
            if leave is not None:
                leave()

    return grpc.stream_unary_rpc_method_handler(stream_unary, handler.request_deserializer, handler.response_serializer)


async def _responses(result):
    """A streaming behavior is an async generator, or a coroutine that writes with context.write and returns None."""
    if hasattr(result, "__aiter__"):
        async for item in result:
            yield item
    else:
        await result
