"""Optional OpenTelemetry tracing of the gRPC server, off unless `tracing.endpoint` is set.

Spans come from opentelemetry-instrumentation-grpc (one per RPC, REST included, since Envoy turns REST into
gRPC) and are exported over OTLP/gRPC. Envoy's `x-request-id` is recorded on the span, so a trace and the
request's log lines find each other.
"""

from __future__ import annotations

import logging

from .config import TracingConfig

log = logging.getLogger(__name__)


def setup(config: TracingConfig):
    """Installs the tracer provider and returns the server interceptor, or None when tracing is off."""
    if not config.endpoint:
        return None
    try:
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.instrumentation.grpc import aio_server_interceptor
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBasedTraceIdRatio
    except ImportError as e:
        raise RuntimeError(
            f"tracing.endpoint is set but OpenTelemetry is not installed ({e.name}); pip install 'embedding-service[tracing]'"
        ) from None
    provider = TracerProvider(
        resource=Resource.create({"service.name": config.service_name}), sampler=ParentBasedTraceIdRatio(config.sample_ratio)
    )
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=config.endpoint, insecure=config.insecure)))
    trace.set_tracer_provider(provider)
    log.info("tracing on", extra={"endpoint": config.endpoint, "sample_ratio": config.sample_ratio})
    return aio_server_interceptor()
