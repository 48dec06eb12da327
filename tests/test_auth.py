"""Keys: every route refuses no key, a wrong key and another dialect's scheme, in its own error shape;
the right scheme gets in; health stays open; SIGHUP reloads keys; no secret ever reaches the logs."""

from __future__ import annotations

import base64
import signal
import time

import grpc
import pytest
import requests
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ai.inworld.embedding.v1alpha import embedding_service_pb2 as pb
from ai.inworld.embedding.v1alpha import embedding_service_pb2_grpc as pb_grpc
from service.launch import Stack

from .conftest import stack_config

BEARER = "sk-test-bearer-0123456789"
INWORLD_KEY, INWORLD_SECRET = "iw-key-abcdef-0123", "iw-secret-987654"
HRFLOW_KEY = "hf-askw-secret-55555"
NEW_KEY = "sk-rotated-key-424242"
SECRETS = [BEARER, INWORLD_SECRET, HRFLOW_KEY, NEW_KEY, base64.b64encode(f"{INWORLD_KEY}:{INWORLD_SECRET}".encode()).decode()]
MODEL = "sentence-transformers/all-MiniLM-L6-v2"

BASIC = "Basic " + base64.b64encode(f"{INWORLD_KEY}:{INWORLD_SECRET}".encode()).decode()
GOOD = {
    "inworld": {"Authorization": BASIC},
    "openai": {"Authorization": f"Bearer {BEARER}"},
    "aigne": {"Authorization": f"Bearer {BEARER}"},
    "huggingface": {"Authorization": f"Bearer {BEARER}"},
    "hrflow": {"X-API-KEY": HRFLOW_KEY, "X-USER-EMAIL": "me@example.com"},
    "tei": {"Authorization": f"Bearer {BEARER}"},
}
ROUTES = {
    "inworld": ("/ml/v1alpha/embedding:embed", {"inputs": [{"text": "hi"}]}),
    "openai": ("/v1/embeddings", {"input": "hi", "model": MODEL}),
    "aigne": ("/api/embeddings", {"input": "hi", "model": MODEL}),
    "huggingface": (f"/models/{MODEL}", {"inputs": "hi"}),
    "hrflow": ("/v1/document/embedding", {"item_type": "job", "item": {"name": "Chef"}}),
    "tei": ("/embed", {"inputs": "hi"}),
}


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "keys.yaml"
    path.write_text(
        f"keys:\n  - name: bearer\n    key: {BEARER}\n  - name: inworld\n    key: {INWORLD_KEY}\n    secret: {INWORLD_SECRET}\n"
        f"  - name: hrflow\n    key: {HRFLOW_KEY}\n"
    )
    return path


@pytest.fixture(scope="module")
def secured(keys_file, tmp_path_factory):
    cfg = stack_config()
    cfg.auth.keys_file = str(keys_file)
    cfg.server.log_level = "debug"  # the strictest test of what reaches the logs
    log_dir = tmp_path_factory.mktemp("auth-logs")
    with Stack(cfg.validate(), log_dir=log_dir) as s:
        yield s


def post(stack, dialect, headers):
    path, body = ROUTES[dialect]
    return requests.post(stack.http_url + path, json=body, headers=headers, timeout=30)


def assert_unauthorized_body(dialect, r, key_sent=None):
    assert r.status_code == 401, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    if dialect == "inworld":
        assert body["code"] == 16 and body["message"]
    elif dialect in ("openai", "aigne"):
        assert set(body["error"]) == {"message", "type", "param", "code"}
    elif dialect == "huggingface":
        assert isinstance(body["error"], str)
    elif dialect == "tei":
        assert set(body) == {"error", "error_type"} and body["error_type"] == "Unauthorized"
    else:
        assert body["code"] == 401 and body["message"].startswith("Unauthorized.")
        if key_sent:
            # HrFlow quotes the refused key: masked here, and never its secret.
            shown = key_sent.partition(":")[0][:4] if len(key_sent.partition(":")[0]) >= 16 else ""
            assert body["message"] == f"Unauthorized. Invalid secret key: {shown}****"
            assert key_sent not in body["message"]


OTHER_SCHEME = {
    "inworld": {"Authorization": f"Bearer {BEARER}"},  # Inworld's REST API takes Basic
    "openai": {"X-API-KEY": HRFLOW_KEY, "X-USER-EMAIL": "me@example.com"},
    "aigne": {"Authorization": BASIC},
    "huggingface": {"X-API-KEY": BEARER},
    "hrflow": {"Authorization": f"Bearer {HRFLOW_KEY}"},
    "tei": {"Authorization": BASIC},
}


@pytest.mark.parametrize("dialect", ROUTES)
def test_every_route_refuses_missing_wrong_and_foreign_keys(secured, dialect):
    assert_unauthorized_body(dialect, post(secured, dialect, {}))
    wrong = {k: (v[:-3] + "xyz" if k.lower() in ("authorization", "x-api-key") else v) for k, v in GOOD[dialect].items()}
    if dialect == "inworld":
        wrong = {"Authorization": "Basic " + base64.b64encode(f"{INWORLD_KEY}:nope".encode()).decode()}
    assert_unauthorized_body(dialect, post(secured, dialect, wrong), key_sent=wrong.get("X-API-KEY"))
    assert_unauthorized_body(dialect, post(secured, dialect, OTHER_SCHEME[dialect]))
    r = post(secured, dialect, GOOD[dialect])
    assert r.status_code == 200, r.text


def test_hrflow_needs_the_user_email(secured):
    r = post(secured, "hrflow", {"X-API-KEY": HRFLOW_KEY})
    assert r.status_code == 401 and "X-USER-EMAIL" in r.json()["message"]


def test_models_list_needs_a_key(secured):
    assert requests.get(secured.http_url + "/v1/models", timeout=10).status_code == 401
    r = requests.get(secured.http_url + "/v1/models", headers=GOOD["openai"], timeout=10)
    assert r.status_code == 200 and r.json()["data"]


def test_native_grpc_uses_bearer_and_health_stays_open(secured):
    with grpc.insecure_channel(secured.server_targets[0]) as ch:
        stub = pb_grpc.EmbeddingServiceStub(ch)
        req = pb.EmbedRequest(inputs=[pb.EmbedRequest.Input(text="hi")])
        with pytest.raises(grpc.RpcError) as e:
            stub.Embed(req, timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert stub.Embed(req, metadata=[("authorization", f"Bearer {BEARER}")], timeout=10).embeddings
        assert stub.Embed(req, metadata=[("authorization", BASIC)], timeout=10).embeddings
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_sighup_reloads_keys(secured, keys_file):
    original = keys_file.read_text()
    try:
        keys_file.write_text(original + f"  - name: rotated\n    key: {NEW_KEY}\n")
        secured.stop_server(0, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while post(secured, "openai", {"Authorization": f"Bearer {NEW_KEY}"}).status_code != 200:
            assert time.monotonic() < deadline, "the new key was never accepted"
            time.sleep(0.2)
        assert post(secured, "openai", GOOD["openai"]).status_code == 200  # old keys still work
    finally:
        keys_file.write_text(original)
        secured.stop_server(0, signal.SIGHUP)


def test_no_secret_reaches_the_logs(secured):
    for dialect in ROUTES:  # make sure every path, good and bad, has been logged by now
        post(secured, dialect, GOOD[dialect])
        post(secured, dialect, OTHER_SCHEME[dialect])
    post(secured, "hrflow", {"X-API-KEY": "sk-leaky-guess-1234", "X-USER-EMAIL": "x@y.z"})
    logs = secured.logs(tail=None)
    assert "credentials loaded" in logs  # the logs are there, at debug level
    for secret in [*SECRETS, "sk-leaky-guess-1234", INWORLD_KEY]:
        assert secret not in logs


def test_the_load_tests_keys_are_keys_the_server_takes():
    # `make load` runs with keys on; a key the server refuses (under 16 characters) stopped it from starting.
    from service import auth
    from bench import load

    creds = auth.parse_env(f"{load.KEY},{load.REFERENCE_KEY},{load.INWORLD_KEY}:{load.INWORLD_SECRET}")
    assert len(creds) == 3 and creds[2].secret_digest is not None
