"""Tracing: with an OTLP endpoint configured, every RPC (REST through Envoy included) is exported as a span."""

from __future__ import annotations

import time
from concurrent import futures

import grpc
import requests
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from service.launch import Stack

from .conftest import stack_config


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """A real OTLP/gRPC receiver, in process: it records the span names it is sent."""

    def __init__(self) -> None:
        self.spans: list[str] = []

    def Export(self, request, context):
        for rs in request.resource_spans:
            for ss in rs.scope_spans:
                self.spans.extend(s.name for s in ss.spans)
        return trace_service_pb2.ExportTraceServiceResponse()


def test_rpcs_are_exported_as_spans(tmp_path):
    collector = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        cfg = stack_config()
        cfg.tracing.endpoint = f"http://127.0.0.1:{port}"
        with Stack(cfg.validate(), log_dir=tmp_path, extra_env={"OTEL_BSP_SCHEDULE_DELAY": "200"}) as s:
            r = requests.post(s.http_url + "/v1/embeddings", json={"input": "traced", "model": "sentence-transformers/all-MiniLM-L6-v2"}, timeout=30)
            assert r.status_code == 200
            deadline = time.monotonic() + 15
            while "/embedding.dialects.v1.OpenAI/CreateEmbedding" not in collector.spans:
                assert time.monotonic() < deadline, collector.spans
                time.sleep(0.2)
    finally:
        server.stop(0)


def test_tracing_is_off_by_default():
    from service import tracing
    from service.config import TracingConfig

    assert tracing.setup(TracingConfig()) is None
