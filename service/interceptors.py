"""gRPC interceptors: the one place authentication happens, for every dialect and native gRPC alike."""

from __future__ import annotations

import logging
from typing import Awaitable, Callable

import grpc

from . import auth, errors, metrics
from .dialects import dialect_of
from .envoy import REST_MARK

log = logging.getLogger(__name__)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Checks each call's credentials in its dialect's scheme; health and reflection stay open."""

    def __init__(self, store: auth.CredentialStore) -> None:
        self.store = store

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        dialect = dialect_of(details.method)
        if dialect is None or not self.store.enabled:
            return await continuation(details)
        metadata = {k: v for k, v in (details.invocation_metadata or ()) if isinstance(v, str)}
        try:
            auth.check(self.store, dialect, metadata, rest=REST_MARK in metadata)
        except errors.ServiceError as err:
            log.debug("unauthenticated", extra={"dialect": dialect, "reason": err.reason, "method": details.method})
            metrics.observe_request(dialect, "", err.code.name, 0.0)
            return _refuse(err, dialect)
        return await continuation(details)


def _refuse(err: errors.ServiceError, dialect: str) -> grpc.RpcMethodHandler:
    async def refuse(request: bytes, context: grpc.aio.ServicerContext) -> None:
        await context.abort(err.code, err.message, trailing_metadata=errors.trailing_metadata(err, dialect))

    # No deserializer: the request is never parsed for a caller we don't let in.
    return grpc.unary_unary_rpc_method_handler(refuse)
