"""Inworld's Embed end to end: REST through Envoy, native gRPC direct and through Envoy, health, reflection."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import requests
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from ai.inworld.embedding.v1alpha import embedding_service_pb2 as pb
from ai.inworld.embedding.v1alpha import embedding_service_pb2_grpc as pb_grpc

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
ROUTE = "/ml/v1alpha/embedding:embed"

# The seed page's own examples (002), with the default model instead of the multilingual one.
SEED_EXAMPLES = {
    "single_text": ["Hello Inworld!"],
    "multiple_texts": ["Hello Inworld!", "Could you please generate embeddings?", "Thanks!"],
    "semantic_search": [
        "How to implement machine learning models in production",
        "Best practices for deploying AI systems at scale",
        "Monitoring and observability for ML applications",
    ],
    "multilingual_content": [
        "Hello, how are you today?",
        "Hola, ¿cómo estás hoy?",
        "Bonjour, comment allez-vous aujourd'hui?",
        "こんにちは、今日はいかがですか？",
    ],
    "long_text_content": [
        "Artificial intelligence has revolutionized the way we interact with technology. From voice assistants to "
        "recommendation systems, AI is becoming increasingly integrated into our daily lives. Machine learning "
        "algorithms can now process vast amounts of data to identify patterns and make predictions with remarkable "
        "accuracy. The field continues to evolve rapidly, with new breakthroughs in deep learning, natural language "
        "processing, and computer vision emerging regularly."
    ],
    "batch_processing_large": [
        "Customer service inquiry about order status",
        "Product return request for damaged item",
        "Technical support ticket for login issues",
        "Billing question about subscription charges",
        "Feature request for mobile app improvement",
        "Feedback on recent website update",
        "Question about shipping options and delivery times",
        "Request for product catalog and pricing information",
    ],
}


def body(texts, model=MODEL, provider="SERVICE_PROVIDER_INWORLD"):
    return {"inputs": [{"text": t} for t in texts], "model": {"model": model, "serviceProvider": provider}}


def post(stack, payload, route=ROUTE, **kw):
    return requests.post(stack.http_url + route, json=payload, timeout=60, **kw)


@pytest.mark.parametrize("name", SEED_EXAMPLES)
def test_seed_examples_match_sentence_transformers(stack, reference, name):
    texts = SEED_EXAMPLES[name]
    r = post(stack, body(texts))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    data = r.json()
    got = np.array([e["values"] for e in data["embeddings"]], dtype=np.float32)
    want = reference.encode(texts)
    assert got.shape == want.shape == (len(texts), 384)
    assert np.abs(got - want).max() <= 1e-5
    tokens = sum(len(reference.tokenizer(t, truncation=True, max_length=256)["input_ids"]) for t in texts)
    assert data["usage"] == {"tokenCount": tokens, "model": {"model": MODEL, "serviceProvider": "SERVICE_PROVIDER_INWORLD"}}


def test_second_binding_and_default_model(stack, reference):
    # No model at all, and the additional binding: the default model answers.
    r = post(stack, {"inputs": [{"text": "Thanks!"}]}, route="/embeddings/v1alpha/content:embed")
    assert r.status_code == 200, r.text
    got = np.array(r.json()["embeddings"][0]["values"], dtype=np.float32)
    assert np.abs(got - reference.encode("Thanks!")).max() <= 1e-5
    # An empty model name and UNSPECIFIED provider are the default model too.
    r = post(stack, body(["Thanks!"], model="", provider="SERVICE_PROVIDER_UNSPECIFIED"))
    assert r.status_code == 200
    assert r.json()["usage"]["model"]["model"] == MODEL


def test_text_longer_than_the_model_reads_is_truncated_like_sentence_transformers(stack, reference):
    text = " ".join(["embedding"] * 400)
    r = post(stack, body([text]))
    assert r.status_code == 200
    got = np.array(r.json()["embeddings"][0]["values"], dtype=np.float32)
    assert np.abs(got - reference.encode(text)).max() <= 1e-5
    assert r.json()["usage"]["tokenCount"] == 256


def test_timing_headers(stack):
    r = post(stack, body(["Hello Inworld!"]))
    assert float(r.headers["x-inference-time"]) >= 0
    assert r.headers["x-compute-tokens"] == "6"
    assert "grpc-status" not in r.headers


def status_body(r):
    assert r.headers["content-type"] == "application/json", r.text
    return r.json()


@pytest.mark.parametrize(
    "payload, http, code, needle",
    [
        ({"inputs": []}, 400, 3, "At least one input"),
        ({}, 400, 3, "At least one input"),
        ({"inputs": [{"text": ""}]}, 400, 3, "inputs[0].text is empty"),
        ({"inputs": [{"text": "a"}, {}]}, 400, 3, "inputs[1] has no text"),
        ({"inputs": [{"text": 5}]}, 400, 3, "inputs[0].text"),
        ({"inputs": [{"text": ["a"]}]}, 400, 3, "inputs[0]"),
        ({"inputs": [{"text": "a"}], "model": {"model": "nope"}}, 404, 5, "sentence-transformers/all-MiniLM-L6-v2"),
        ({"inputs": [{"text": "a"}], "model": {"serviceProvider": "SERVICE_PROVIDER_NOPE"}}, 400, 3, "service_provider"),
        ({"inputs": [{"text": "a"}], "model": {"serviceProvider": 9}}, 400, 3, "Unknown service provider"),
        ({"inputs": [{"text": "a"}], "model": {"serviceProvider": "SERVICE_PROVIDER_OPENAI"}}, 400, 9, "no OpenAI provider is configured"),
        ({"inputs": [{"text": "a"}] * 2049}, 400, 3, "Too many inputs"),
    ],
)
def test_errors_are_rpc_status_json(stack, payload, http, code, needle):
    r = post(stack, payload)
    assert r.status_code == http, r.text
    data = status_body(r)
    assert data["code"] == code
    assert needle in data["message"]
    assert isinstance(data["details"], list)


def test_error_details_are_typed(stack):
    data = status_body(post(stack, {"inputs": [{"text": "a"}], "model": {"model": "nope"}}))
    types = {d["@type"] for d in data["details"]}
    assert "type.googleapis.com/google.rpc.ErrorInfo" in types
    assert "type.googleapis.com/google.rpc.ResourceInfo" in types
    data = status_body(post(stack, {"inputs": [{"text": ""}]}))
    bad = next(d for d in data["details"] if d["@type"].endswith("BadRequest"))
    assert bad["fieldViolations"][0]["field"] == "inputs[0].text"


@pytest.mark.parametrize(
    "send, http",
    [
        (lambda url: requests.post(url + ROUTE, data="{not json", headers={"content-type": "application/json"}), 400),
        (lambda url: requests.post(url + "/no/such/route", json={}), 404),
        (lambda url: requests.get(url + ROUTE), 404),
        (lambda url: requests.post(url + ROUTE + "?x=1", json={"inputs": []}), 400),
        (lambda url: requests.post(url + ROUTE, data=b'{"inputs": [{"text": "' + b"a" * (9 * 1024 * 1024) + b'"}]}', headers={"content-type": "application/json"}), 413),
    ],
    ids=["malformed-json", "unknown-route", "wrong-method", "unknown-query-param", "body-too-large"],
)
def test_envoy_own_replies_are_json_4xx(stack, send, http):
    r = send(stack.http_url)
    assert r.status_code == http, r.text
    data = status_body(r)
    assert set(data) == {"code", "message", "details"}
    assert data["code"] in (3, 5, 12)


def test_unknown_body_fields_are_ignored(stack):
    r = post(stack, {**body(["Thanks!"]), "extra": {"x": 1}})
    assert r.status_code == 200


# -- native gRPC --------------------------------------------------------------------------------


@pytest.fixture(params=["direct", "envoy"])
def channel(stack, request):
    target = stack.server_targets[0] if request.param == "direct" else stack.envoy_target
    with grpc.insecure_channel(target) as ch:
        yield ch


def test_grpc_embed_matches_reference(channel, reference):
    texts = SEED_EXAMPLES["batch_processing_large"]
    stub = pb_grpc.EmbeddingServiceStub(channel)
    req = pb.EmbedRequest(
        inputs=[pb.EmbedRequest.Input(text=t) for t in texts],
        model=pb.ModelId(model=MODEL, service_provider=pb.SERVICE_PROVIDER_INWORLD),
    )
    resp = stub.Embed(req, timeout=30)
    got = np.array([list(e.values) for e in resp.embeddings], dtype=np.float32)
    assert np.abs(got - reference.encode(texts)).max() <= 1e-5
    assert resp.usage.model.model == MODEL
    assert resp.usage.token_count > len(texts)


def test_grpc_errors_carry_rich_status(channel):
    stub = pb_grpc.EmbeddingServiceStub(channel)
    with pytest.raises(grpc.RpcError) as e:
        stub.Embed(pb.EmbedRequest(inputs=[pb.EmbedRequest.Input(text="a")], model=pb.ModelId(model="nope")), timeout=10)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    status = rpc_status.from_call(e.value)
    assert isinstance(status, status_pb2.Status)
    info = error_details_pb2.ErrorInfo()
    assert any(d.Unpack(info) for d in status.details)
    assert info.reason == "model_not_found"

    with pytest.raises(grpc.RpcError) as e:
        stub.Embed(pb.EmbedRequest(), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    with pytest.raises(grpc.RpcError) as e:
        stub.Embed(pb.EmbedRequest(inputs=[pb.EmbedRequest.Input(text="a")], model=pb.ModelId(service_provider=2)), timeout=10)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "no OpenAI provider" in e.value.details()


def test_health_is_serving(channel):
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ["", "ai.inworld.embedding.v1alpha.EmbeddingService", f"model:{MODEL}"]:
        assert stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_service(stack):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(stack.server_targets[0]) as ch:
        db = ProtoReflectionDescriptorDatabase(ch)
        services = db.get_services()
        assert "ai.inworld.embedding.v1alpha.EmbeddingService" in services
        assert "grpc.health.v1.Health" in services
        # grpcurl needs the whole file, with the request message, from reflection alone.
        fd = db.FindFileContainingSymbol("ai.inworld.embedding.v1alpha.EmbeddingService")
        assert "EmbedRequest" in [m.name for m in fd.message_type]


# -- Tokenize -----------------------------------------------------------------------------------------------------

TOKENIZE_ROUTE = "/ml/v1alpha/embedding:tokenize"


def test_tokenize_rest_gives_the_ids_embed_reads(stack, reference):
    texts = SEED_EXAMPLES["multilingual_content"] + [" ".join(["embedding"] * 400)]
    r = post(stack, body(texts), route=TOKENIZE_ROUTE)
    assert r.status_code == 200, r.text
    data = r.json()
    want = [reference.tokenizer(t, truncation=True, max_length=256)["input_ids"] for t in texts]
    assert [t["tokenIds"] for t in data["tokens"]] == want
    assert [t["tokenCount"] for t in data["tokens"]] == [len(w) for w in want]
    assert [t["truncated"] for t in data["tokens"]] == [False] * 4 + [True]
    assert data["usage"] == {"tokenCount": sum(len(w) for w in want), "model": {"model": MODEL, "serviceProvider": "SERVICE_PROVIDER_INWORLD"}}
    # What Embed reports reading for the same body.
    assert post(stack, body(texts)).json()["usage"]["tokenCount"] == data["usage"]["tokenCount"]


def test_tokenize_grpc(channel, reference):
    stub = pb_grpc.EmbeddingServiceStub(channel)
    texts = SEED_EXAMPLES["multiple_texts"]
    resp = stub.Tokenize(pb.TokenizeRequest(inputs=[pb.EmbedRequest.Input(text=t) for t in texts]), timeout=30)
    assert [list(t.token_ids) for t in resp.tokens] == [reference.tokenizer(t)["input_ids"] for t in texts]
    assert [t.token_count for t in resp.tokens] == [len(t.token_ids) for t in resp.tokens]
    assert not any(t.truncated for t in resp.tokens)
    assert resp.usage.model.model == MODEL and resp.usage.token_count == sum(t.token_count for t in resp.tokens)
    with pytest.raises(grpc.RpcError) as e:
        stub.Tokenize(pb.TokenizeRequest(inputs=[pb.EmbedRequest.Input(text="a")], model=pb.ModelId(model="nope")), timeout=10)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as e:
        stub.Tokenize(pb.TokenizeRequest(inputs=[pb.EmbedRequest.Input(text="a")], model=pb.ModelId(service_provider=2)), timeout=10)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.parametrize(
    "payload, http, code, needle",
    [
        ({"inputs": []}, 400, 3, "At least one input"),
        ({"inputs": [{"text": ""}]}, 400, 3, "inputs[0].text is empty"),
        ({"inputs": [{"text": "a"}, {}]}, 400, 3, "inputs[1] has no text"),
        ({"inputs": [{"text": 5}]}, 400, 3, "inputs[0].text"),
        ({"inputs": [{"text": "a"}], "model": {"model": "nope"}}, 404, 5, "sentence-transformers/all-MiniLM-L6-v2"),
        ({"inputs": [{"text": "a"}], "model": {"serviceProvider": "SERVICE_PROVIDER_OPENAI"}}, 400, 9, "Tokenize is not available"),
        ({"inputs": [{"text": "a"}] * 2049}, 400, 3, "Too many inputs"),
    ],
)
def test_tokenize_errors_are_rpc_status_json(stack, payload, http, code, needle):
    r = post(stack, payload, route=TOKENIZE_ROUTE)
    assert r.status_code == http, r.text
    data = status_body(r)
    assert data["code"] == code and needle in data["message"]
