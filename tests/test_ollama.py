"""Ollama's API through the real Envoy, driven by the real `ollama` client (0.6.3), plus raw error bodies.

`/api/embed` normalizes (and renormalizes after `dimensions`), `/api/embeddings` (Ollama's older API, which shares
its path with AIGNE Hub's OpenAI-shaped one) gives the raw pooled vector; errors are `{"error": "..."}`.
"""

from __future__ import annotations


import grpc
import numpy as np
import orjson
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ai.inworld.embedding.v1alpha import embedding_service_pb2 as inworld_pb
from ai.inworld.embedding.v1alpha import embedding_service_pb2_grpc as inworld_grpc
from service.config import Config
from service.dialects import enabled, ollama
from service.envoy import render

from .helpers import close, post, unit

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
TEXTS = ["Hello Inworld!", "The food was delicious and the waiter...", "Hola, ¿cómo estás hoy?"]
LONG = " ".join(["embedding"] * 300)  # 902 tokens: over all-MiniLM-L6-v2's 256






def ollama_error(r, status):
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"], body
    return body["error"]


@pytest.fixture(scope="module")
def client(stack):
    import ollama as ollama_client

    return ollama_client.Client(host=stack.http_url)


def grpc_vectors(stack, texts):
    with grpc.insecure_channel(stack.server_targets[0]) as ch:
        resp = inworld_grpc.EmbeddingServiceStub(ch).Embed(inworld_pb.EmbedRequest(inputs=[inworld_pb.EmbedRequest.Input(text=t) for t in texts]))
    return np.array([list(e.values) for e in resp.embeddings], dtype=np.float32)


# -- the client ----------------------------------------------------------------------------------


def test_embed(client, reference, stack):
    resp = client.embed(model=MODEL, input=TEXTS)
    close(resp.embeddings, reference.encode(TEXTS))
    close(resp.embeddings, grpc_vectors(stack, TEXTS))  # the same vector as native gRPC Inworld Embed
    assert resp.model == MODEL
    assert resp.prompt_eval_count == sum(len(reference.tokenizer(t)["input_ids"]) for t in TEXTS)
    assert isinstance(resp.total_duration, int) and isinstance(resp.load_duration, int)
    assert 0 <= resp.load_duration <= resp.total_duration


def test_embed_one_string_dimensions_and_options(client, reference):
    resp = client.embed(model=MODEL, input=TEXTS[1], dimensions=8, truncate=True, keep_alive="5m", options={"num_ctx": 512})
    assert len(resp.embeddings) == 1
    close(resp.embeddings[0], unit(reference.encode(TEXTS[1])[:8]))
    # 0 and ≥ the model's dimension are ignored, as Ollama does
    for dims in (0, 384, 4096):
        close(client.embed(model=MODEL, input=TEXTS[1], dimensions=dims).embeddings[0], reference.encode(TEXTS[1]))


def test_embed_truncates_by_default(client, reference):
    close(client.embed(model=MODEL, input=LONG + " tail").embeddings[0], reference.encode(LONG + " tail"))
    import ollama as ollama_client

    with pytest.raises(ollama_client.ResponseError) as e:
        client.embed(model=MODEL, input=LONG, truncate=False)
    assert (e.value.status_code, e.value.error) == (400, "the input length exceeds the context length")


def test_embed_empty_input_loads_the_model(client):
    for empty in ("", []):
        resp = client.embed(model=MODEL, input=empty)
        assert resp.embeddings == [] and resp.model == MODEL


def test_embeddings_legacy(client, reference, stack):
    from sentence_transformers import SentenceTransformer

    raw = SentenceTransformer(modules=[reference[0], reference[1]], device="cpu")  # no Normalize: Ollama's legacy vector
    resp = client.embeddings(model=MODEL, prompt=TEXTS[0], options={"temperature": 0}, keep_alive=0)
    close(resp.embedding, raw.encode(TEXTS[0]))
    assert abs(np.linalg.norm(resp.embedding) - 1) > 1e-3
    assert client.embeddings(model=MODEL, prompt="").embedding == []
    # AIGNE Hub's body on the same path still gets OpenAI's answer
    body = post(stack, "/api/embeddings", {"model": MODEL, "input": TEXTS[0]}).json()
    close(body["data"][0]["embedding"], reference.encode(TEXTS[0]))


def test_list_and_version(client, stack):
    models = client.list().models
    assert [m.model for m in models] == [MODEL]
    m = models[0]
    assert m.modified_at is not None and m.size > 0 and len(m.digest) == 64 and m.details.family == "bert"
    assert requests.get(stack.http_url + "/api/tags", timeout=10).json()["models"][0]["name"] == MODEL
    assert requests.get(stack.http_url + "/api/version", timeout=10).json() == {"version": ollama.OLLAMA_VERSION}
    r = requests.get(stack.http_url + "/", timeout=10)
    assert r.status_code == 200 and r.text == "Ollama is running"
    # Issue 30.3: the Go client's Heartbeat (HEAD /) and HEAD probes of /api/version and /api/tags: 200, no body, as Ollama.
    for path in ("/", "/api/version", "/api/tags"):
        r = requests.head(stack.http_url + path, timeout=10)
        assert (r.status_code, r.content) == (200, b""), path


def test_large_request(client, reference):
    # Over 64 KiB of body and 64k numbers of answer: parsed and printed in the offload worker.
    texts = [f"{i}: " + "a sentence about dinner, and the waiter " * 6 for i in range(300)]
    resp = client.embed(model=MODEL, input=texts)
    assert len(resp.embeddings) == 300
    close([resp.embeddings[0], resp.embeddings[-1]], reference.encode([texts[0], texts[-1]]))


def test_latest_tag_names_the_model(client, reference):
    close(client.embed(model=MODEL + ":latest", input=TEXTS[0]).embeddings[0], reference.encode(TEXTS[0]))


def test_client_errors(client):
    import ollama as ollama_client

    with pytest.raises(ollama_client.ResponseError) as e:
        client.embed(model="nope", input="a")
    assert (e.value.status_code, e.value.error) == (404, 'model "nope" not found, try pulling it first')
    with pytest.raises(ollama_client.ResponseError) as e:
        client.embeddings(model="nope", prompt="a")
    assert (e.value.status_code, e.value.error) == (404, 'model "nope" not found, try pulling it first')


# -- Ollama's own rules (server/routes.go at ollama/ollama fb30760; ollama-python 0.6.x _client.py, _types.py) --------


def test_a_model_is_required(stack):
    # EmbedHandler: a missing or empty model is `model '' not found` (404); EmbeddingsHandler: `model is required` (400).
    assert ollama_error(post(stack, "/api/embed", {"input": "a"}), 404) == "model '' not found"
    assert ollama_error(post(stack, "/api/embed", {"model": " ", "input": "a"}), 404) == "model ' ' not found"
    assert ollama_error(post(stack, "/api/embeddings", {"prompt": "a"}), 400) == "model is required"
    assert ollama_error(post(stack, "/api/embeddings", {"model": "", "prompt": "a"}), 400) == "model is required"


def test_num_ctx_on_the_older_api(stack):
    cut = post(stack, "/api/embeddings", {"model": MODEL, "prompt": LONG, "options": {"num_ctx": 16}}).json()["embedding"]
    whole = post(stack, "/api/embeddings", {"model": MODEL, "prompt": LONG}).json()["embedding"]
    assert len(cut) == 384 and not np.allclose(cut, whole)
    assert "num_ctx" in ollama_error(post(stack, "/api/embeddings", {"model": MODEL, "prompt": "a", "options": {"num_ctx": "16"}}), 400)


def test_num_ctx_reads_that_many_tokens(client, reference):
    # EmbedHandler: ctxLen = min(opts.NumCtx, the model's); an input past it is cut (truncate true), else a 400.
    resp = client.embed(model=MODEL, input=[LONG, "short text"], options={"num_ctx": 16})
    limit = reference.max_seq_length
    try:
        reference.max_seq_length = 16  # sentence-transformers' own cut: 14 tokens of text, [CLS] and [SEP]
        close(resp.embeddings, reference.encode([LONG, "short text"]))
    finally:
        reference.max_seq_length = limit
    assert resp.prompt_eval_count == 16 + len(reference.tokenizer("short text")["input_ids"])
    import ollama as ollama_client

    with pytest.raises(ollama_client.ResponseError) as e:
        client.embed(model=MODEL, input=LONG, truncate=False, options={"num_ctx": 16})
    assert (e.value.status_code, e.value.error) == (400, "the input length exceeds the context length")
    close(client.embed(model=MODEL, input="short text", truncate=False, options={"num_ctx": 16}).embeddings[0], reference.encode("short text"))
    # at or above the model's 256, and 0, change nothing; a non-integer is a 400
    for n in (256, 4096, 0):
        close(client.embed(model=MODEL, input=LONG, options={"num_ctx": n}).embeddings[0], reference.encode(LONG))
    assert "num_ctx" in ollama_error(post(stack_of(client), "/api/embed", {"model": MODEL, "input": "a", "options": {"num_ctx": "16"}}), 400)


def stack_of(client):
    class _S:
        http_url = str(client._client.base_url).rstrip("/")
    return _S


def test_show(client, stack):
    shown = client.show(MODEL)
    assert shown.capabilities == ["embedding"] and shown.modified_at is not None
    assert (shown.details.family, shown.details.format, shown.details.parameter_size) == ("bert", "safetensors", "22.7M")
    info = shown.modelinfo
    assert (info["general.architecture"], info["bert.context_length"], info["bert.embedding_length"]) == ("bert", 256, 384)
    assert 22_000_000 < info["general.parameter_count"] < 23_000_000
    assert client.show(MODEL + ":latest").modelinfo == info
    assert post(stack, "/api/show", {"name": MODEL}).json()["model_info"] == info  # the older field
    import ollama as ollama_client

    with pytest.raises(ollama_client.ResponseError) as e:
        client.show("nope")
    assert (e.value.status_code, e.value.error) == (404, "model 'nope' not found")
    assert ollama_error(post(stack, "/api/show", {}), 400) == "model is required"


def test_ps(client):
    running = client.ps().models
    assert [m.model for m in running] == [MODEL]
    assert running[0].context_length == 256 and running[0].expires_at.year > 2100 and running[0].size > 0


# -- raw error bodies ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload, status, needle",
    [
        ({"model": MODEL, "input": [1]}, 400, "invalid input type"),
        ({"model": MODEL, "input": {"a": 1}}, 400, "invalid input type"),
        ({"model": MODEL, "input": ["a", ""]}, 400, "empty string"),
        ({"model": MODEL, "input": ["a"] * 2049}, 400, "2048"),
        ({"model": MODEL, "input": LONG, "truncate": False}, 400, "the input length exceeds the context length"),
        ({"model": "café 🙂", "input": "a"}, 404, 'model "café 🙂" not found, try pulling it first'),
        ({"model": MODEL, "input": "a", "truncate": [1]}, 400, "not repeating"),
        ({"model": MODEL, "input": "a", "dimensions": "many"}, 400, "dimensions"),
    ],
)
def test_error_bodies(stack, payload, status, needle):
    assert needle in ollama_error(post(stack, "/api/embed", payload), status)


def test_envoy_replies_use_ollamas_shape(stack):
    for path in ("/api/embed", "/api/embeddings"):
        r = requests.post(stack.http_url + path, data="{oops", headers={"content-type": "application/json"}, timeout=10)
        assert r.status_code == 400
        if path == "/api/embed":
            ollama_error(r, 400)  # /api/embeddings' malformed body cannot tell which API it meant: OpenAI's shape
    ollama_error(requests.post(stack.http_url + "/api/tags", timeout=10), 404)


def test_envoy_replies_on_the_exact_route(stack):
    ollama_error(requests.get(stack.http_url + "/api/embed", timeout=10), 404)
    assert set(requests.get(stack.http_url + "/api/embeddings", timeout=10).json()["error"]) == {"message", "type", "param", "code"}


def test_legacy_errors_are_ollamas(stack):
    assert ollama_error(post(stack, "/api/embeddings", {"model": "nope", "prompt": "a"}), 404) == 'model "nope" not found, try pulling it first'
    # Issue 30.3: only the model (and options) is how Ollama's clients preload it: {"embedding": []}, as Ollama answers;
    # the same body on OpenAI's own route is OpenAI's error, and a body with `input` is AIGNE Hub's request.
    for body in ({"model": MODEL}, {"model": MODEL, "keep_alive": "5m", "options": {}}):
        r = post(stack, "/api/embeddings", body)
        assert (r.status_code, r.json()) == (200, {"embedding": []}), r.text
    assert post(stack, "/v1/embeddings", {"model": MODEL}).json()["error"]["param"] == "input"
    assert post(stack, "/api/embeddings", {"model": MODEL, "input": []}).json()["error"]["param"] == "input"


# -- routing: the body chooses the API, the configuration the routes ------------------------------


def test_legacy_body_is_told_by_its_fields():
    from google.api import httpbody_pb2

    from service import rpc
    from service.dialects import openai

    def api(**fields):
        body = httpbody_pb2.HttpBody(data=orjson.dumps(fields))
        return openai.to_core(body, rpc.Call(settings={"ollama_legacy": True})).echo.get("api")

    assert api(model="m", prompt="hi") == ollama.LEGACY
    assert api(model="m", prompt="") == ollama.LEGACY  # present, empty (Ollama answers [])
    assert api(model="m", input="x", prompt="p") is None  # `input` wins: AIGNE Hub's
    assert api(model="m", input="x" * 1_000_000) is None


def test_disabling_ollama_removes_its_routes():
    cfg = Config()
    cfg.dialects.disabled = ["ollama"]
    assert ollama.DIALECT not in enabled(cfg)
    hcm = render(cfg)["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    transcoder = next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.grpc_json_transcoder")["typed_config"]
    assert "embedding.dialects.v1.Ollama" not in transcoder["services"]
    assert "embedding.dialects.v1.Ollama" in next(
        f for f in render(Config())["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]
        if f["name"] == "envoy.filters.http.grpc_json_transcoder"
    )["typed_config"]["services"]


# -- fuzz ----------------------------------------------------------------------------------------

FIELDS = ["model", "input", "truncate", "dimensions", "keep_alive", "options", "prompt"]
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**40), max_value=2**40), st.floats(allow_nan=False, allow_infinity=False),
                    st.text(max_size=40), st.sampled_from([MODEL, MODEL + ":latest", "", "5m"]))
values = st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=4), st.dictionaries(st.text(max_size=8), c, max_size=4)), max_leaves=10)
bodies = st.dictionaries(st.one_of(st.sampled_from(FIELDS), st.text(max_size=8)), values, max_size=5)


@FUZZ
@given(body=bodies, path=st.sampled_from(["/api/embed", "/api/embeddings"]))
def test_fuzz(stack, body, path):
    r = post(stack, path, body)
    assert r.status_code < 500, (path, body, r.status_code, r.text[:300])
    assert r.headers["content-type"] == "application/json", (path, body, r.text[:300])
    out = r.json()
    if r.status_code == 200:
        vectors = out["embeddings"] if "embeddings" in out else [out["embedding"]] if "embedding" in out else [d["embedding"] for d in out["data"]]
        assert all(np.isfinite(np.asarray(v, dtype=np.float64)).all() for v in vectors if isinstance(v, list))
    elif path == "/api/embed":
        assert set(out) == {"error"} and isinstance(out["error"], str)


def test_an_ollama_legacy_error_never_reshapes_a_shared_error():
    """Issue 27.8: a batcher that is down raises one error object to every caller; the legacy Ollama route set its
    `dialect` in place, so after one legacy request every other dialect's error came out in Ollama's shape."""
    import grpc as grpc_

    from service import errors
    from service.dialects import by_name
    from service.dialects.ollama import _legacy_error

    shared = errors.ServiceError(grpc_.StatusCode.UNAVAILABLE, "The model is down.", reason="MODEL_UNAVAILABLE")
    openai_body = errors.render_body(shared, by_name("openai"))
    mine = _legacy_error(shared)
    assert mine is not shared and mine.dialect == "ollama" and shared.dialect is None
    assert errors.render_body(mine, by_name("openai")) == errors.render_body(shared, by_name("ollama"))  # Ollama's shape
    assert errors.render_body(shared, by_name("openai")) == openai_body  # the shared one: still OpenAI's for OpenAI
