"""The services any caller may use without a key (health and reflection), each with a bound on its long-lived streams.

Neither is counted by the dialects' call gate (a flood of embedding calls must not starve the probes), so each needs
its own bound: without one, a caller could open streams until the server's memory or its HTTP/2 stream budget ran out.
"""

from __future__ import annotations

import contextlib

import grpc
from grpc_health.v1 import health
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer


class Slots:
    """At most `limit` streams of one kind at once: `async with slots.held(context):` refuses one past it
    (RESOURCE_EXHAUSTED) and frees its place however the stream ends."""

    def __init__(self, limit: int, what: str) -> None:
        self.limit = limit
        self.what = what
        self.used = 0

    @contextlib.asynccontextmanager
    async def held(self, context: grpc.aio.ServicerContext):
        if self.used >= self.limit:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"At most {self.limit} {self.what} at once.")
        self.used += 1
        try:
            yield
        finally:
            self.used -= 1


class BoundedHealth(health.aio.HealthServicer):
    """gRPC health, with a bound on Watch streams (each is a long-lived stream any caller can open)."""

    def __init__(self, max_watchers: int) -> None:
        super().__init__()
        self.watches = Slots(max_watchers, "health watches")

    async def Watch(self, request, context):  # noqa: N802 (gRPC's name)
        async with self.watches.held(context):
            await super().Watch(request, context)


class BoundedReflection(ReflectionServicer):
    """gRPC server reflection, with a bound on its streams (a reflection call is a bidirectional stream a client such
    as grpcurl keeps open for as long as it likes)."""

    def __init__(self, service_names: list[str], max_streams: int) -> None:
        super().__init__(service_names)
        self.streams = Slots(max_streams, "reflection streams")

    async def ServerReflectionInfo(self, request_iterator, context):  # noqa: N802 (gRPC's name)
        async with self.streams.held(context):
            async for response in super().ServerReflectionInfo(request_iterator, context):
                yield response


def add_reflection(server: grpc.aio.Server, service_names: list[str], max_streams: int) -> None:
    """Reflection on `service_names` (and on health and reflection themselves), bounded."""
    names = [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME]
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(BoundedReflection(names, max_streams), server)
