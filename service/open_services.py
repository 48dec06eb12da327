"""The services any caller may use without a key (health and reflection), each with a bound on its long-lived streams.

Neither is counted by the dialects' call gate (a flood of embedding calls must not starve the probes), so each needs
its own bound: without one, a caller could open streams until the server's memory or its HTTP/2 stream budget ran out.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer


class BoundedHealth(health.aio.HealthServicer):
    """gRPC health, with a bound on Watch streams (each is a long-lived stream any caller can open)."""

    def __init__(self, max_watchers: int) -> None:
        super().__init__()
        self.max_watchers = max_watchers
        self.watchers = 0

    async def Watch(self, request, context):  # noqa: N802 (gRPC's name)
        if self.watchers >= self.max_watchers:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"At most {self.max_watchers} health watches at once.")
        self.watchers += 1
        try:
            await super().Watch(request, context)
        finally:
            self.watchers -= 1


class BoundedReflection(ReflectionServicer):
    """gRPC server reflection, with a bound on its streams (a reflection call is a bidirectional stream a client such
    as grpcurl keeps open for as long as it likes)."""

    def __init__(self, service_names: list[str], max_streams: int) -> None:
        super().__init__(service_names)
        self.max_streams = max_streams
        self.streams = 0

    async def ServerReflectionInfo(self, request_iterator, context):  # noqa: N802 (gRPC's name)
        if self.streams >= self.max_streams:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"At most {self.max_streams} reflection streams at once.")
        self.streams += 1
        try:
            async for response in super().ServerReflectionInfo(request_iterator, context):
                yield response
        finally:
            self.streams -= 1


def add_reflection(server: grpc.aio.Server, service_names: list[str], max_streams: int) -> None:
    """Reflection on `service_names` (and on health and reflection themselves), bounded."""
    names = [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME]
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(BoundedReflection(names, max_streams), server)
