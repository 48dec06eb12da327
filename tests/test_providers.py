"""SERVICE_PROVIDER_OPENAI and forwarded models, against a second instance of this service as the upstream.

Every dialect reaches a forwarded model and gets the upstream's vectors (encoded by us); upstream down,
slow (deadline), 429 with Retry-After and 401 each become a clear answer of ours; the upstream key never
reaches a log line or a response.
"""

from __future__ import annotations

import base64
import http.server
import json
import threading
import time

import grpc
import numpy as np
import pytest
import requests

from ai.inworld.embedding.v1alpha import embedding_service_pb2 as pb
from ai.inworld.embedding.v1alpha import embedding_service_pb2_grpc as pb_grpc
from service.config import Config, ModelConfig, ProviderConfig
from service.launch import Stack, free_port

from .conftest import stack_config

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
UPSTREAM_KEY = "sk-upstream-secret-31415926"
TEXTS = ["forwarded text one", "forwarded text two", "Hola, ¿cómo estás hoy?"]


def front_config(base_url: str, **provider) -> Config:
    """A server with no local model: its default model is forwarded to the `openai` provider."""
    cfg = stack_config()
    cfg.providers = [ProviderConfig(name="openai", base_url=base_url, api_key_env="UPSTREAM_KEY", timeout_seconds=10, **provider)]
    cfg.models = [ModelConfig(id="remote/minilm", provider="openai", upstream_model=MODEL, default=True, aliases=["text-embedding-3-small"])]
    return cfg.validate()


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    with Stack(stack_config(), log_dir=tmp_path_factory.mktemp("upstream-logs"), extra_env={"EMBED_API_KEYS": UPSTREAM_KEY}) as s:
        yield s


@pytest.fixture(scope="module")
def front(upstream, tmp_path_factory):
    cfg = front_config(upstream.http_url + "/v1", max_batch=2)
    with Stack(cfg, log_dir=tmp_path_factory.mktemp("front-logs"), extra_env={"UPSTREAM_KEY": UPSTREAM_KEY}) as s:
        yield s


def direct(upstream, texts):
    r = requests.post(upstream.http_url + "/v1/embeddings", json={"input": texts, "model": MODEL, "encoding_format": "float"},
                      headers={"Authorization": f"Bearer {UPSTREAM_KEY}"}, timeout=30)
    assert r.status_code == 200, r.text
    return np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)


def close(a, b):
    np.testing.assert_allclose(np.asarray(a, dtype=np.float32), b, atol=1e-6, rtol=0)


def test_service_provider_openai_over_grpc(front, upstream):
    want = direct(upstream, TEXTS)
    with grpc.insecure_channel(front.server_targets[0]) as ch:
        resp = pb_grpc.EmbeddingServiceStub(ch).Embed(
            pb.EmbedRequest(inputs=[pb.EmbedRequest.Input(text=t) for t in TEXTS], model=pb.ModelId(model=MODEL, service_provider=pb.SERVICE_PROVIDER_OPENAI)),
            timeout=30,
        )
    close([list(e.values) for e in resp.embeddings], want)
    assert resp.usage.model.service_provider == pb.SERVICE_PROVIDER_OPENAI
    assert resp.usage.token_count > 0


def test_every_dialect_reaches_the_forwarded_model(front, upstream):
    want = direct(upstream, TEXTS)
    u = front.http_url
    r = requests.post(u + "/ml/v1alpha/embedding:embed", json={"inputs": [{"text": t} for t in TEXTS], "model": {"serviceProvider": "SERVICE_PROVIDER_OPENAI", "model": MODEL}}, timeout=30)
    close([e["values"] for e in r.json()["embeddings"]], want)
    r = requests.post(u + "/ml/v1alpha/embedding:embed", json={"inputs": [{"text": t} for t in TEXTS]}, timeout=30)  # default model is forwarded
    close([e["values"] for e in r.json()["embeddings"]], want)
    for route in ("/v1/embeddings", "/api/embeddings"):
        r = requests.post(u + route, json={"input": TEXTS, "model": "text-embedding-3-small", "encoding_format": "base64"}, timeout=30)
        assert r.status_code == 200, r.text
        close([np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in r.json()["data"]], want)
    r = requests.post(u + "/models/remote/minilm", json={"inputs": TEXTS}, timeout=30)
    close(r.json(), want)
    for i, t in enumerate(TEXTS):
        r = requests.post(u + "/v1/document/embedding", json={"item_type": "job", "item": {"text": t}}, timeout=30)
        close(np.frombuffer(base64.b64decode(r.json()["data"]), ">f4"), want[i])


def test_dimensions_and_batching_stay_ours(front, upstream):
    texts = [f"batched forwarded text {i}" for i in range(7)]  # the provider's max_batch is 2: four upstream calls
    want = direct(upstream, texts)
    r = requests.post(front.http_url + "/v1/embeddings", json={"input": texts, "model": "remote/minilm", "dimensions": 8, "encoding_format": "float"}, timeout=30)
    got = np.array([d["embedding"] for d in r.json()["data"]])
    cut = want[:, :8] / np.linalg.norm(want[:, :8], axis=1, keepdims=True)
    close(got, cut)


def test_the_upstream_key_never_leaks(front):
    r = requests.post(front.http_url + "/v1/embeddings", json={"input": "leak check", "model": "remote/minilm"}, timeout=30)
    assert UPSTREAM_KEY not in r.text and UPSTREAM_KEY not in str(r.headers)
    assert UPSTREAM_KEY not in front.logs(tail=None)
    import subprocess
    import sys

    cfg = front_config("http://127.0.0.1:9/v1")
    cfg.providers[0].api_key = "sk-written-in-the-file"
    import yaml

    out = subprocess.run([sys.executable, "-m", "service", "--print-config"], input="", capture_output=True, text=True,
                         env={"EMBED__PROVIDERS": yaml.safe_dump([vars(cfg.providers[0])]), "PATH": "/usr/bin:/bin"}, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "sk-written-in-the-file" not in out.stdout and "***" in out.stdout


# -- upstream failures -----------------------------------------------------------------------------


def test_upstream_down_is_unavailable(tmp_path):
    closed = free_port()  # never handed out again, outside the ephemeral range: nothing listens there
    with Stack(front_config(f"http://127.0.0.1:{closed}/v1", max_retries=1), log_dir=tmp_path) as s:
        r = requests.post(s.http_url + "/v1/embeddings", json={"input": "x", "model": "remote/minilm"}, timeout=30)
        assert r.status_code == 503, r.text
        assert "could not be reached" in r.json()["error"]["message"]


def test_upstream_401_is_our_503_never_the_callers_401(upstream, tmp_path):
    with Stack(front_config(upstream.http_url + "/v1"), log_dir=tmp_path, extra_env={"UPSTREAM_KEY": "sk-wrong"}) as s:
        r = requests.post(s.http_url + "/v1/embeddings", json={"input": "x", "model": "remote/minilm"}, timeout=30)
        assert r.status_code == 503, r.text
        assert "credentials" in r.json()["error"]["message"]
        assert "sk-wrong" not in r.text


class ScriptedUpstream:
    """A stand-in upstream with a script (429 then 200, or slow), for the failures a real one rarely shows."""

    def __init__(self, script: list[str]) -> None:
        self.script, self.calls = list(script), []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                owner.calls.append((time.monotonic(), body))
                step = owner.script.pop(0) if owner.script else "ok"
                if step == "429":
                    self._send(429, {"error": {"message": "slow down"}}, {"Retry-After": "1"})
                elif step.isdigit():  # any other status, with OpenAI's error body
                    self._send(int(step), {"error": {"message": f"upstream says {step}"}})
                elif step == "slow":
                    time.sleep(5)
                    self._send(200, owner.answer(body))
                else:
                    self._send(200, owner.answer(body))

            def _send(self, code, payload, headers=None):
                data = json.dumps(payload).encode()
                self.send_response(code)
                for k, v in {"Content-Type": "application/json", "Content-Length": str(len(data)), **(headers or {})}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @staticmethod
    def answer(body):
        vec = np.array([0.5, 0.5, 0.5, 0.5], dtype="<f4")
        return {"object": "list", "model": body["model"], "usage": {"prompt_tokens": 2, "total_tokens": 2},
                "data": [{"object": "embedding", "index": i, "embedding": base64.b64encode(vec.tobytes()).decode()} for i in range(len(body["input"]))]}


def test_upstream_429_is_retried_after_retry_after(tmp_path):
    fake = ScriptedUpstream(["429", "ok"])
    try:
        with Stack(front_config(fake.url), log_dir=tmp_path) as s:
            t0 = time.monotonic()
            r = requests.post(s.http_url + "/v1/embeddings", json={"input": "x", "model": "remote/minilm", "encoding_format": "float"}, timeout=30)
            assert r.status_code == 200, r.text
            assert r.json()["data"][0]["embedding"] == [0.5] * 4
            assert len(fake.calls) == 2 and fake.calls[1][0] - fake.calls[0][0] >= 0.95
            assert time.monotonic() - t0 >= 0.95
    finally:
        fake.server.shutdown()


def test_slow_upstream_honours_the_callers_deadline(tmp_path):
    fake = ScriptedUpstream(["slow"])
    try:
        with Stack(front_config(fake.url), log_dir=tmp_path) as s:
            with grpc.insecure_channel(s.server_targets[0]) as ch:
                t0 = time.monotonic()
                with pytest.raises(grpc.RpcError) as e:
                    pb_grpc.EmbeddingServiceStub(ch).Embed(pb.EmbedRequest(inputs=[pb.EmbedRequest.Input(text="x")]), timeout=1.0)
                assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                assert time.monotonic() - t0 < 3
    finally:
        fake.server.shutdown()
