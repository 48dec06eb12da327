"""Several models, aliases, lazy loading: HF's 503 + estimated_time and x-wait-for-model, per-model health."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import requests
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.config import ModelConfig
from service.launch import Stack

from .conftest import stack_config

LAZY = "lazy/minilm"


@pytest.fixture(scope="module")
def lazy_stack(tmp_path_factory):
    cfg = stack_config()
    cfg.models.append(ModelConfig(id=LAZY, load="lazy", aliases=["text-embedding-3-small"], precision="fp32"))
    cfg.dialects.model["tei"] = LAZY  # TEI's routes (and its /health) use the lazy model
    with Stack(cfg.validate(), log_dir=tmp_path_factory.mktemp("lazy-logs")) as s:
        yield s


def health(stack, service):
    with grpc.insecure_channel(stack.server_targets[0]) as ch:
        try:
            return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
        except grpc.RpcError as e:
            return e.code()


def test_a_probe_never_loads_a_lazy_model(lazy_stack):
    """Issue 27.9: TEI's GET /health (no key, a load balancer's probe) started loading the lazy model it asked about.
    Now it only looks: 200 (a lazy model not loaded yet serves, by loading, on its first request), and nothing loads."""
    import time

    for _ in range(5):
        r = requests.get(f"{lazy_stack.http_url}/health", timeout=10)
        assert r.status_code == 200, r.text
    time.sleep(1.0)
    assert health(lazy_stack, f"model:{LAZY}") != health_pb2.HealthCheckResponse.SERVING
    assert not [line for line in lazy_stack.logs().splitlines() if "loading model" in line and LAZY in line], "a probe started its load"


def test_lazy_model_answers_503_then_waits_on_request(lazy_stack, reference):
    url = f"{lazy_stack.http_url}/models/{LAZY}"
    assert health(lazy_stack, f"model:{LAZY}") != health_pb2.HealthCheckResponse.SERVING
    r = requests.post(url, json={"inputs": "hello"}, timeout=60)
    assert r.status_code == 503, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert "currently loading" in body["error"] and body["estimated_time"] > 0
    assert int(r.headers["retry-after"]) >= 1
    r = requests.post(url, json={"inputs": "hello"}, headers={"x-wait-for-model": "true"}, timeout=120)
    assert r.status_code == 200, r.text
    assert np.abs(np.array(r.json()[0]) - reference.encode("hello")).max() <= 1e-5
    assert health(lazy_stack, f"model:{LAZY}") == health_pb2.HealthCheckResponse.SERVING


def test_alias_and_model_list(lazy_stack, reference):
    r = requests.post(f"{lazy_stack.http_url}/v1/embeddings", json={"input": "hello", "model": "text-embedding-3-small", "encoding_format": "float"}, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "text-embedding-3-small"
    assert np.abs(np.array(r.json()["data"][0]["embedding"]) - reference.encode("hello")).max() <= 1e-5
    ids = [m["id"] for m in requests.get(f"{lazy_stack.http_url}/v1/models", timeout=10).json()["data"]]
    assert ids == ["sentence-transformers/all-MiniLM-L6-v2", LAZY, "text-embedding-3-small"]
