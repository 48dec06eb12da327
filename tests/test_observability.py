"""Metrics on their own port, timing headers and trailers, x-request-id in the request's log lines."""

from __future__ import annotations

import grpc
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from ai.inworld.embedding.v1alpha import embedding_service_pb2 as pb
from ai.inworld.embedding.v1alpha import embedding_service_pb2_grpc as pb_grpc
from service.launch import Stack

from .conftest import stack_config

MODEL = "sentence-transformers/all-MiniLM-L6-v2"


@pytest.fixture(scope="module")
def observed(tmp_path_factory):
    cfg = stack_config()
    cfg.server.log_level = "debug"
    with Stack(cfg.validate(), log_dir=tmp_path_factory.mktemp("obs-logs")) as s:
        yield s


def scrape(stack) -> dict[str, list]:
    text = requests.get(stack.metrics_urls[0], timeout=10).text
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def value(samples, name, **labels):
    return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def test_metrics_cover_requests_stages_batches_queue_cache_and_load(observed):
    for _ in range(2):
        requests.post(observed.http_url + "/v1/embeddings", json={"input": ["metrics one", "metrics two"], "model": MODEL}, timeout=30)
    requests.post(observed.http_url + "/v1/embeddings", json={"input": "", "model": MODEL}, timeout=30)
    m = scrape(observed)
    assert value(m["embedding_requests"], "embedding_requests_total", dialect="openai", model=MODEL, code="OK") >= 2
    assert value(m["embedding_requests"], "embedding_requests_total", dialect="openai", code="INVALID_ARGUMENT") >= 1
    assert value(m["embedding_stage_duration_seconds"], "embedding_stage_duration_seconds_count", stage="inference") >= 1
    assert value(m["embedding_request_duration_seconds"], "embedding_request_duration_seconds_count", dialect="openai") >= 3
    assert value(m["embedding_batch_size"], "embedding_batch_size_count", model=MODEL) >= 1
    assert value(m["embedding_batch_tokens"], "embedding_batch_tokens_sum", model=MODEL) > 0
    assert value(m["embedding_tokens"], "embedding_tokens_total", model=MODEL) > 0
    assert "embedding_queue_inputs" in m and "embedding_queue_tokens" in m
    assert value(m["embedding_cache_hits"], "embedding_cache_hits_total") >= 2  # the second request was cached
    assert value(m["embedding_model_load_seconds"], "embedding_model_load_seconds", model=MODEL) > 0


def test_timing_headers_on_rest_and_trailers_on_grpc(observed):
    r = requests.post(observed.http_url + "/v1/embeddings", json={"input": "timed", "model": MODEL}, timeout=30)
    for h in ("x-compute-time", "x-queue-time", "x-inference-time", "x-compute-tokens", "x-tokenization-time"):
        assert float(r.headers[h]) >= 0
    with grpc.insecure_channel(observed.server_targets[0]) as ch:
        _, call = pb_grpc.EmbeddingServiceStub(ch).Embed.with_call(pb.EmbedRequest(inputs=[pb.EmbedRequest.Input(text="timed")]), timeout=10)
        trailers = dict(call.trailing_metadata())
        assert float(trailers["x-inference-time"]) >= 0 and trailers["x-compute-tokens"] == "3"
        # Trailers only: headers too would cost a native call a send of their own.
        assert "x-compute-time" not in dict(call.initial_metadata())
    # A REST caller's headers come from the initial metadata alone, whatever a native caller gets.
    r = requests.post(observed.http_url + "/ml/v1alpha/embedding:embed", json={"inputs": [{"text": "timed again"}]}, timeout=30)
    assert r.status_code == 200 and float(r.headers["x-compute-time"]) >= 0


def test_request_id_is_in_the_request_log_lines(observed):
    rid = "test-request-id-7f3a"
    requests.post(observed.http_url + "/v1/embeddings", json={"input": "traced text", "model": MODEL}, headers={"x-request-id": rid}, timeout=30)
    requests.post(observed.http_url + "/v1/embeddings", json={"input": "", "model": MODEL}, headers={"x-request-id": rid + "-bad"}, timeout=30)
    logs = observed.logs(tail=None)
    assert any(rid in line and '"embedded"' in line for line in logs.splitlines()), logs[-2000:]
    assert any(rid + "-bad" in line and "request refused" in line for line in logs.splitlines())


def test_envoy_stats_stay_reachable(observed):
    r = requests.get(observed.admin_url + "/stats/prometheus", timeout=10)
    assert r.status_code == 200 and "envoy_cluster_upstream_rq" in r.text
