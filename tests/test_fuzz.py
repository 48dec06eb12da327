"""Property-based tests: arbitrary JSON at every route gives a clear 4xx (or a 200), never a 5xx, a hang,
or a crash; successful answers hold only finite numbers; the wire encodings round-trip."""

from __future__ import annotations

import base64
import json
import threading
import time

import numpy as np
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.engine.encoding import base64_float32

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
ROUTES = {
    "/ml/v1alpha/embedding:embed": ["inputs", "model", "text", "serviceProvider", "service_provider"],
    "/v1/embeddings": ["input", "model", "encoding_format", "dimensions", "user"],
    "/api/embeddings": ["input", "model", "encoding_format", "dimensions"],
    f"/models/{MODEL}": ["inputs", "normalize", "prompt_name", "truncate", "truncation_direction", "parameters"],
    "/v1/document/embedding": ["item_type", "item", "return_sequences", "text", "name"],
}
# Ollama, Cohere and Gemini (their own fuzz runs are in their files) get the depth and size runs here too.
DEEP_ROUTES = {
    **ROUTES,
    "/api/embed": ["input", "model", "truncate", "dimensions", "options"],
    "/v2/embed": ["texts", "model", "input_type", "embedding_types", "truncate"],
    f"/v1beta/models/{MODEL}:embedContent": ["content", "taskType", "title", "outputDimensionality", "model"],
    f"/v1beta/models/{MODEL}:batchEmbedContents": ["requests", "model", "requests", "requests", "requests"],
    # Issue 30's routes
    "/api/show": ["model", "name", "verbose", "options"],
    "/similarity": ["inputs", "parameters", "inputs", "inputs", "inputs"],
    "/vertex": ["instances", "instances", "instances", "instances", "instances"],
    "/api/v1/embeddings": ["input", "model", "encoding_format", "dimensions"],
    f"/hf-inference/models/{MODEL}/pipeline/feature-extraction": ["inputs", "normalize", "truncate", "parameters"],
}
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
    st.sampled_from(["float", "base64", "profile", "job", "Left", "right", "SERVICE_PROVIDER_INWORLD", "query", MODEL, "", "True"]),
)


def json_values(field_names):
    keys = st.one_of(st.sampled_from(field_names), st.text(max_size=8))
    return st.recursive(scalars, lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(keys, children, max_size=4)), max_leaves=12)


def bodies(field_names):
    return st.dictionaries(st.one_of(st.sampled_from(field_names), st.text(max_size=8)), json_values(field_names), max_size=5)


@pytest.fixture(scope="module", autouse=True)
def canary(stack):
    """A one-text request every 50 ms for the whole fuzz run: it must always be answered, and answered fast
    (a body the fuzzer made must never stall the other callers; tests/test_trust.py bounds this precisely)."""
    stop = threading.Event()
    seen: list[tuple[int, float]] = []

    def loop():
        n = 0
        while not stop.is_set():
            n += 1
            t0 = time.perf_counter()
            try:
                status = requests.post(stack.http_url + "/v1/embeddings", json={"input": f"fuzz canary {n}", "model": MODEL}, timeout=30).status_code
            except requests.RequestException:
                status = 0
            seen.append((status, time.perf_counter() - t0))
            stop.wait(0.05)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    yield
    stop.set()
    thread.join(35)
    assert seen and all(status == 200 for status, _ in seen), [s for s in seen if s[0] != 200][:5]
    latencies = sorted(t for _, t in seen)
    assert latencies[int(0.99 * (len(latencies) - 1))] < 1.0, latencies[-5:]


def check(stack, path, body):
    r = requests.post(stack.http_url + path, json=body, timeout=30)
    assert r.status_code < 500, (path, body, r.status_code, r.text[:300])
    assert r.headers.get("content-type", "").startswith("application/json"), (path, body, r.status_code, r.text[:300])
    if r.status_code == 200 and path.startswith("/models/"):
        assert np.isfinite(np.array(r.json(), dtype=np.float64)).all()
    return r


@FUZZ
@given(body=bodies(ROUTES["/ml/v1alpha/embedding:embed"]))
def test_inworld_fuzz(stack, body):
    check(stack, "/ml/v1alpha/embedding:embed", body)


@FUZZ
@given(body=bodies(ROUTES["/v1/embeddings"]), route=st.sampled_from(["/v1/embeddings", "/api/embeddings"]))
def test_openai_fuzz(stack, body, route):
    check(stack, route, body)


@FUZZ
@given(body=bodies(ROUTES[f"/models/{MODEL}"]))
def test_huggingface_fuzz(stack, body):
    check(stack, f"/models/{MODEL}", body)


@FUZZ
@given(body=bodies(ROUTES["/v1/document/embedding"]))
def test_hrflow_fuzz(stack, body):
    check(stack, "/v1/document/embedding", body)


@FUZZ
@given(
    texts=st.lists(st.text(min_size=1, max_size=200), min_size=1, max_size=4),
    dims=st.one_of(st.none(), st.integers(min_value=-5, max_value=400)),
    fmt=st.sampled_from(["float", "base64", None]),
)
def test_openai_valid_shapes_always_answer(stack, texts, dims, fmt):
    body = {"input": texts, "model": MODEL}
    if dims is not None:
        body["dimensions"] = dims
    if fmt:
        body["encoding_format"] = fmt
    r = check(stack, "/v1/embeddings", body)
    if r.status_code == 200:
        data = r.json()["data"]
        assert [d["index"] for d in data] == list(range(len(texts)))
        for d in data:
            v = np.frombuffer(base64.b64decode(d["embedding"]), "<f4") if fmt == "base64" else np.array(d["embedding"])
            assert np.isfinite(v).all() and len(v) == (dims or 384)
    else:
        assert r.status_code == 400 and (dims is not None and not 1 <= dims <= 384 or any(not t for t in texts)), r.text


@given(st.lists(st.floats(width=32, allow_nan=False), min_size=1, max_size=64), st.sampled_from(["little", "big"]))
def test_base64_round_trips(values, order):
    v = np.array(values, dtype=np.float32)
    decoded = np.frombuffer(base64.b64decode(base64_float32(v, order)), "<f4" if order == "little" else ">f4")
    assert np.array_equal(decoded, v)


# -- hostile shapes: depth, size, huge numbers, wrong types at every level; answered in each dialect's own shape ----

def dialect_shaped(path: str, r: requests.Response) -> None:
    """A 4xx body in the route's own error shape."""
    body = r.json()
    if path in ("/api/embed", "/api/show"):  # Ollama
        assert set(body) == {"error"} and isinstance(body["error"], str), body
    elif path == "/v2/embed":  # Cohere
        assert set(body) >= {"id", "message"}, body
    elif path.startswith("/v1beta/"):  # Google
        assert set(body["error"]) >= {"code", "message", "status"}, body
    elif path.startswith("/ml/"):
        assert isinstance(body.get("code"), int) and isinstance(body.get("message"), str), body
    elif path.startswith(("/v1/embeddings", "/api/")):
        assert set(body["error"]) >= {"message", "type"}, body
    elif path.startswith(("/models/", "/hf-inference/", "/similarity", "/vertex")):  # Hugging Face, TEI
        assert isinstance(body["error"], str) and "error_type" in body, body
    else:
        assert set(body) == {"code", "message"}, body


def nest(value, depth: int, as_list: bool) -> str:
    inner = json.dumps(value)  # the stdlib prints any integer; orjson stops at 64 bits
    return ("[" * depth + inner + "]" * depth) if as_list else ('{"a":' * depth + inner + "}" * depth)


@FUZZ
@given(
    route=st.sampled_from(list(DEEP_ROUTES)),
    depth=st.integers(min_value=1, max_value=3000),
    as_list=st.booleans(),
    field_index=st.integers(min_value=0, max_value=4),
    leaf=st.one_of(st.text(max_size=5), st.integers(min_value=-(2**70), max_value=2**70), st.floats(allow_nan=False, allow_infinity=False)),
)
def test_any_nesting_depth_is_a_clear_answer(stack, route, depth, as_list, field_index, leaf):
    names = DEEP_ROUTES[route]
    field = names[field_index % len(names)]
    raw = '{"%s":%s}' % (field, nest(leaf, depth, as_list))
    r = requests.post(stack.http_url + route, data=raw, headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code < 500, (route, field, depth, r.status_code, r.text[:300])
    if r.status_code >= 400:
        dialect_shaped(route, r)


@FUZZ
@given(
    route=st.sampled_from(list(DEEP_ROUTES)),
    size=st.integers(min_value=0, max_value=6000),
    item=st.sampled_from([0, 2**31, 2**53, -1, 1.5, 1e308, "a", "", None, True, [], {}, [1, 2], [[1]]]),
    field_index=st.integers(min_value=0, max_value=4),
)
def test_huge_arrays_and_huge_numbers_are_a_clear_answer(stack, route, size, item, field_index):
    names = DEEP_ROUTES[route]
    field = names[field_index % len(names)]
    r = requests.post(stack.http_url + route, json={field: [item] * size, "model": MODEL, "item_type": "job"}, timeout=120)
    assert r.status_code < 500, (route, field, size, item, r.status_code, r.text[:300])
    if r.status_code >= 400:
        dialect_shaped(route, r)


@pytest.mark.parametrize("n", [7_000, 20_000, 50_000])
def test_long_paths_and_query_strings_are_answered_in_the_routes_shape(stack, n):
    """Envoy sends headers on to the server as gRPC metadata, which the server bounds (8 KiB soft, 16 KiB hard): the
    transcoder's copy of the whole path (x-envoy-original-path) made a 20 KB query string a 429 saying "received
    metadata size exceeds hard limit" (a retry invitation, in no API's shape), and the REST mark once carried the path
    too. Neither reaches the server now: a long path or query is what it would be short."""
    r = requests.get(stack.http_url + "/v1/models/" + "a" * n, timeout=30)
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text[:200]
    r = requests.post(stack.http_url + "/api/embed?x=" + "b" * n, json={"model": "nope", "input": "x"}, timeout=30)
    assert r.status_code == 404 and r.json() == {"error": 'model "nope" not found, try pulling it first'}, r.text[:200]
    r = requests.post(stack.http_url + "/v1/embeddings?x=" + "b" * n, json={"model": "sentence-transformers/all-MiniLM-L6-v2", "input": "x"}, timeout=30)
    assert r.status_code == 200, r.text[:200]
