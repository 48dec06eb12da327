"""Google's Gemini API embeddings through the real Envoy, driven by the real `google-genai` client (3.4.0, which
calls /v1/ by default and always `:batchEmbedContents`), plus raw requests to `:embedContent` and error bodies."""

from __future__ import annotations


import grpc
import numpy as np
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ai.inworld.embedding.v1alpha import embedding_service_pb2 as inworld_pb
from ai.inworld.embedding.v1alpha import embedding_service_pb2_grpc as inworld_grpc

from .helpers import close, post, unit

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
TEXTS = ["Hello Inworld!", "The food was delicious and the waiter...", "Hola, ¿cómo estás hoy?"]
LONG = " ".join(["embedding"] * 300)  # 302 tokens: over all-MiniLM-L6-v2's 256






def google_error(r, status, code_name):
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    err = r.json()["error"]
    assert {"code", "message", "status"} <= set(err) and (err["code"], err["status"]) == (status, code_name), err
    return err["message"]


def content(text):
    return {"parts": [{"text": text}]}


@pytest.fixture(scope="module", params=["v1", "v1beta"])
def client(stack, request):
    from google import genai
    from google.genai import types

    # Kept referenced for the module: a collected Client closes its HTTP client.
    return genai.Client(api_key="unused", http_options=types.HttpOptions(base_url=stack.http_url, api_version=request.param))


def grpc_vectors(stack, texts):
    with grpc.insecure_channel(stack.server_targets[0]) as ch:
        resp = inworld_grpc.EmbeddingServiceStub(ch).Embed(inworld_pb.EmbedRequest(inputs=[inworld_pb.EmbedRequest.Input(text=t) for t in texts]))
    return np.array([list(e.values) for e in resp.embeddings], dtype=np.float32)


# -- the client ----------------------------------------------------------------------------------


def test_embed_content(client, reference, stack):
    resp = client.models.embed_content(model=MODEL, contents=TEXTS)
    vectors = [e.values for e in resp.embeddings]
    close(vectors, reference.encode(TEXTS))
    close(vectors, grpc_vectors(stack, TEXTS))  # the same vector as native gRPC Inworld Embed
    one = client.models.embed_content(model=f"models/{MODEL}", contents=TEXTS[0])
    close(one.embeddings[0].values, reference.encode(TEXTS[0]))


def test_config(client, reference):
    from google.genai import types

    config = types.EmbedContentConfig(task_type="RETRIEVAL_DOCUMENT", title="Dinner", output_dimensionality=32)
    resp = client.models.embed_content(model=MODEL, contents=TEXTS[1:], config=config)
    close([e.values for e in resp.embeddings], unit(reference.encode(["Dinner " + t for t in TEXTS[1:]])[:, :32]))
    config = types.EmbedContentConfig(task_type="retrieval_query", title="ignored")  # any casing; title only for documents
    close(client.models.embed_content(model=MODEL, contents=TEXTS[0], config=config).embeddings[0].values, reference.encode(TEXTS[0]))


def test_several_parts_are_one_text(client, reference):
    from google.genai import types

    resp = client.models.embed_content(model=MODEL, contents=[types.Content(parts=[types.Part(text="Hello"), types.Part(text="Inworld!")])])
    assert len(resp.embeddings) == 1
    close(resp.embeddings[0].values, reference.encode("Hello Inworld!"))


def test_large_request(client, reference):
    # Over 64 KiB of body and 64k numbers of answer: parsed and printed in the offload worker.
    texts = [f"{i}: " + "a sentence about dinner, and the waiter " * 6 for i in range(300)]
    resp = client.models.embed_content(model=MODEL, contents=texts)
    assert len(resp.embeddings) == 300
    close([resp.embeddings[0].values, resp.embeddings[-1].values], reference.encode([texts[0], texts[-1]]))


def test_long_input_is_read_whole(client, reference):
    """Gemini reads 2,048 tokens: a longer input than the model's is read in windows (dialects.long_inputs.gemini)."""
    got = np.asarray(client.models.embed_content(model=MODEL, contents=LONG + " tail").embeddings[0].values)
    assert abs(np.linalg.norm(got) - 1) < 1e-5
    assert np.abs(got - reference.encode(LONG + " tail")).max() > 1e-3  # not the vector of its first 256 tokens


def test_client_errors(client):
    from google.genai import errors, types

    with pytest.raises(errors.ClientError) as e:
        client.models.embed_content(model="nope", contents="a")
    assert (e.value.code, e.value.status) == (404, "NOT_FOUND") and "nope" in e.value.message
    with pytest.raises(errors.ClientError) as e:
        client.models.embed_content(model=MODEL, contents="a", config=types.EmbedContentConfig(output_dimensionality=1000))
    assert (e.value.code, e.value.status) == (400, "INVALID_ARGUMENT")
    with pytest.raises(errors.ClientError) as e:
        client.models.embed_content(model=MODEL, contents="a", config=types.EmbedContentConfig(task_type="WRITE_POEMS"))
    assert (e.value.code, e.value.status) == (400, "INVALID_ARGUMENT") and "task_type" in e.value.message


# -- embedContent and raw requests ---------------------------------------------------------------


@pytest.mark.parametrize("version", ["v1", "v1beta"])
def test_embed_content_route(stack, reference, version):
    r = post(stack, f"/{version}/models/{MODEL}:embedContent", {"content": content(TEXTS[2]), "taskType": "SEMANTIC_SIMILARITY", "outputDimensionality": 8})
    assert r.status_code == 200 and list(r.json()) == ["embedding"]
    close(r.json()["embedding"]["values"], unit(reference.encode(TEXTS[2])[:8]))


def test_batch_mixes_tasks_and_dimensions_in_order(stack, reference):
    requests_ = [
        {"model": f"models/{MODEL}", "content": content(TEXTS[0]), "taskType": "RETRIEVAL_QUERY"},
        {"model": f"models/{MODEL}", "content": content(TEXTS[1]), "taskType": "RETRIEVAL_DOCUMENT", "title": "T", "outputDimensionality": 4},
        {"content": content(TEXTS[2]), "taskType": "CLUSTERING"},
    ]
    r = post(stack, f"/v1beta/models/{MODEL}:batchEmbedContents", {"requests": requests_})
    assert r.status_code == 200, r.text
    got = [e["values"] for e in r.json()["embeddings"]]
    close(got[0], reference.encode(TEXTS[0]))
    close(got[1], unit(reference.encode("T " + TEXTS[1])[:4]))
    close(got[2], reference.encode(TEXTS[2]))


@pytest.mark.parametrize(
    "path, payload, status, code_name, needle",
    [
        (f"/v1beta/models/{MODEL}:embedContent", {"content": {"parts": []}}, 400, "INVALID_ARGUMENT", "content must have at least one part"),
        (f"/v1beta/models/{MODEL}:embedContent", {"content": {"parts": [{"inlineData": {"data": "AA=="}}]}}, 400, "INVALID_ARGUMENT", "part with text"),
        (f"/v1beta/models/{MODEL}:embedContent", {}, 400, "INVALID_ARGUMENT", "content"),
        (f"/v1beta/models/{MODEL}:embedContent", {"content": content("a"), "outputDimensionality": 0}, 400, "INVALID_ARGUMENT", "at least 1"),
        (f"/v1beta/models/{MODEL}:embedContent", {"content": content("a"), "taskType": "NOPE"}, 400, "INVALID_ARGUMENT", "task_type"),
        (f"/v1beta/models/{MODEL}:batchEmbedContents", {"requests": []}, 400, "INVALID_ARGUMENT", "at least one request"),
        (f"/v1beta/models/{MODEL}:batchEmbedContents", {"requests": [{"model": "models/other", "content": content("a")}]}, 400,
         "INVALID_ARGUMENT", "must be the model of the URL"),
        (f"/v1beta/models/{MODEL}:batchEmbedContents", {"requests": [{"model": "other", "content": content("a")}]}, 400,
         "INVALID_ARGUMENT", "models/{model}"),
        (f"/v1beta/models/{MODEL}:batchEmbedContents", {"requests": [{"content": content("a")}] * 2049}, 400, "INVALID_ARGUMENT", "2048"),
        ("/v1beta/models/café:embedContent", {"content": content("a")}, 404, "NOT_FOUND", "café"),
        (f"/v1beta/models/{MODEL}:embedContent", {"content": content("a"), "outputDimensionality": "many"}, 400, "INVALID_ARGUMENT", "output"),
    ],
)
def test_error_bodies(stack, path, payload, status, code_name, needle):
    assert needle in google_error(post(stack, path, payload), status, code_name)


def test_envoy_replies_use_googles_shape(stack):
    for version in ("v1", "v1beta"):
        r = requests.post(f"{stack.http_url}/{version}/models/{MODEL}:embedContent", data="{oops", headers={"content-type": "application/json"}, timeout=10)
        google_error(r, 400, "INVALID_ARGUMENT")
    # OpenAI's model route next door keeps its own shape
    assert requests.get(f"{stack.http_url}/v1/models/{MODEL}", timeout=10).json()["id"] == MODEL


def test_envoy_replies_on_the_exact_route(stack):
    err = requests.get(f"{stack.http_url}/v1/models/{MODEL}:embedContent", timeout=10).json()["error"]
    assert err["code"] == 404 and err["message"]
    assert set(requests.post(f"{stack.http_url}/v1/models/{MODEL}", timeout=10).json()["error"]) == {"message", "type", "param", "code"}


# -- fuzz ----------------------------------------------------------------------------------------

FIELDS = ["model", "content", "parts", "text", "taskType", "task_type", "title", "outputDimensionality", "requests", "role"]
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**40), max_value=2**40), st.floats(allow_nan=False, allow_infinity=False),
                    st.text(max_size=40), st.sampled_from([f"models/{MODEL}", "", "RETRIEVAL_DOCUMENT", "retrieval_query", "CLUSTERING"]))
values = st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=4), st.dictionaries(st.sampled_from(FIELDS), c, max_size=4)), max_leaves=12)
bodies = st.dictionaries(st.one_of(st.sampled_from(FIELDS), st.text(max_size=8)), values, max_size=5)


@FUZZ
@given(body=bodies, method=st.sampled_from(["embedContent", "batchEmbedContents"]), version=st.sampled_from(["v1", "v1beta"]))
def test_fuzz(stack, body, method, version):
    r = post(stack, f"/{version}/models/{MODEL}:{method}", body)
    assert r.status_code < 500, (method, body, r.status_code, r.text[:300])
    assert r.headers["content-type"] == "application/json", (method, body, r.text[:300])
    out = r.json()
    if r.status_code == 200:
        rows = [out["embedding"]] if method == "embedContent" else out["embeddings"]
        assert all(np.isfinite(np.asarray(e["values"], dtype=np.float64)).all() for e in rows)
    else:
        assert set(out) == {"error"} and {"code", "message", "status"} <= set(out["error"]) and out["error"]["code"] == r.status_code


def test_a_batch_of_mixed_tasks_says_what_it_chunked(stack):
    requests_ = [{"content": {"parts": [{"text": LONG + " tail"}]}, "taskType": "RETRIEVAL_QUERY"},
                 {"content": {"parts": [{"text": "short"}]}, "taskType": "CLUSTERING"}]
    r = post(stack, f"/v1beta/models/{MODEL}:batchEmbedContents", {"requests": requests_})
    assert r.status_code == 200, r.text
    assert (r.headers["x-chunked-inputs"], r.headers["x-truncated-inputs"]) == ("1", "0")


# -- models.get / models.list ------------------------------------------------------------------------
# Google's Model resource (ai.google.dev/api/models, v1beta): name `models/{id}`, displayName, inputTokenLimit,
# supportedGenerationMethods; models.list pages by pageSize / pageToken → nextPageToken. google-genai 3.4.0 calls
# `GET {version}/models/{id}` and `GET {version}/models?pageSize=...` (models.py: get, _list).


def test_models_get_and_list_through_the_client(client, stack):
    got = client.models.get(model=MODEL)
    assert (got.name, got.display_name, got.input_token_limit) == (f"models/{MODEL}", MODEL, 256)
    assert "embedContent" in got.supported_actions
    assert client.models.get(model=f"models/{MODEL}").name == f"models/{MODEL}"
    listed = list(client.models.list())
    assert {m.name for m in listed} == {f"models/{n}" for n in stack_names(stack)}
    assert all(m.input_token_limit == 256 and "batchEmbedContents" in m.supported_actions for m in listed)
    # paged one by one: the client's Pager follows nextPageToken
    assert [m.name for m in client.models.list(config={"page_size": 1})] == [m.name for m in listed]
    from google.genai import errors as genai_errors

    with pytest.raises(genai_errors.ClientError) as e:
        client.models.get(model="no-such-model")
    assert e.value.code == 404 and e.value.status == "NOT_FOUND"


def stack_names(stack):
    return [m["id"] for m in requests.get(f"{stack.http_url}/v1/models", timeout=10).json()["data"]]


@pytest.mark.parametrize("how", [{"headers": {"x-goog-api-key": "k"}}, {"params": {"key": "k"}},
                                 {"headers": {"x-goog-api-client": "google-genai-sdk/3.4.0 gl-python/3.11"}}])
def test_v1_models_is_geminis_for_a_google_client(stack, how):
    r = requests.get(f"{stack.http_url}/v1/models", timeout=10, **how)
    assert r.status_code == 200 and set(r.json()) == {"models"}, r.text
    r = requests.get(f"{stack.http_url}/v1/models/{MODEL}", timeout=10, **how)
    assert r.json()["name"] == f"models/{MODEL}", r.text
    google_error(requests.get(f"{stack.http_url}/v1/models/nope", timeout=10, **how), 404, "NOT_FOUND")


def test_v1_models_stays_openais_for_everyone_else(stack):
    assert requests.get(f"{stack.http_url}/v1/models", timeout=10).json()["object"] == "list"
    assert requests.get(f"{stack.http_url}/v1/models", headers={"authorization": "Bearer x"}, timeout=10).json()["object"] == "list"
    # a POST is never rewritten, and /v1/modelsx is not /v1/models
    assert set(requests.post(f"{stack.http_url}/v1/models", headers={"x-goog-api-key": "k"}, timeout=10).json()["error"]) == {"message", "type", "param", "code"}
    assert requests.get(f"{stack.http_url}/v1/modelsx", headers={"x-goog-api-key": "k"}, timeout=10).status_code == 404


def test_list_pages(stack):
    names = stack_names(stack)
    r = requests.get(f"{stack.http_url}/v1beta/models", params={"pageSize": 1}, timeout=10).json()
    assert len(r["models"]) == 1 and (r.get("nextPageToken") is not None) == (len(names) > 1)
    google_error(requests.get(f"{stack.http_url}/v1beta/models", params={"pageToken": "junk"}, timeout=10), 400, "INVALID_ARGUMENT")
    google_error(requests.get(f"{stack.http_url}/v1beta/models", params={"pageSize": -1}, timeout=10), 400, "INVALID_ARGUMENT")
    google_error(requests.get(f"{stack.http_url}/v1beta/models", params={"pageToken": "99999999999999999999"}, timeout=10), 400, "INVALID_ARGUMENT")
    # digits Python reads as digits but int() refuses, and a number past int()'s digit limit: 400s, never a 500
    for token in ("²", "٣", "1" * 5000):
        google_error(requests.get(f"{stack.http_url}/v1beta/models", params={"pageToken": token}, timeout=10), 400, "INVALID_ARGUMENT")


def test_a_key_is_read_from_the_query_string_only(stack):
    # `&key=` inside the path is part of a model name, not Google's ?key=: the GET stays OpenAI's
    r = requests.get(f"{stack.http_url}/v1/models/x&key=abc", timeout=10)
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text
    # an unknown verb under /v1/models/...: Google's 404
    google_error(requests.post(f"{stack.http_url}/v1/models/{MODEL}:countTokens", json={}, timeout=10), 404, "NOT_FOUND")


def test_envoys_own_replies_name_their_status(stack):
    # An unknown path under /v1beta/ is Google's 404 NOT_FOUND (it was "status": "INVALID_ARGUMENT" whatever the code).
    google_error(requests.get(f"{stack.http_url}/v1beta/tunedModels", timeout=10), 404, "NOT_FOUND")
    google_error(requests.post(f"{stack.http_url}/v1beta/models/{MODEL}:generateContent", json={}, timeout=10), 404, "NOT_FOUND")
