"""Ollama, Cohere and Gemini on a stack with keys, whose model has task prompts: each route refuses a missing, a
wrong and a foreign credential in its API's own shape and status, lets the right one in (through the real
clients), and each API's task (Cohere's `input_type`, Gemini's `taskType`) picks the model's matching prompt."""

from __future__ import annotations

import pytest
import requests

from service.launch import Stack

from .conftest import stack_config
from .helpers import close

KEY = "sk-ocg-bearer-0123456789"
MODEL = "sentence-transformers/all-MiniLM-L6-v2"
PROMPTS = {"query": "query: ", "document": "passage: ", "classification": "classify: ", "semantic_similarity": "sts: "}
TEXT = "The food was delicious and the waiter..."
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:cohere")



@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    keys = tmp_path_factory.mktemp("ocg-keys") / "keys.yaml"
    keys.write_text(f"keys:\n  - name: ocg\n    key: {KEY}\n")
    cfg = stack_config()
    cfg.auth.keys_file = str(keys)
    cfg.models[0].prompts = dict(PROMPTS)
    with Stack(cfg.validate(), log_dir=tmp_path_factory.mktemp("ocg-logs")) as s:
        yield s


def post(stack, path, payload, headers=None):
    return requests.post(stack.http_url + path, json=payload, headers=headers or {}, timeout=60)


BEARER = {"Authorization": f"Bearer {KEY}"}
WRONG = {"Authorization": "Bearer sk-nope"}
FOREIGN = {"x-goog-api-key": KEY}  # another API's scheme
EMBED = {
    "ollama": ("/api/embed", {"model": MODEL, "input": "hi"}),
    "ollama-legacy": ("/api/embeddings", {"model": MODEL, "prompt": "hi"}),
    "cohere-v2": ("/v2/embed", {"model": MODEL, "texts": ["hi"]}),
    "cohere-v1": ("/v1/embed", {"model": MODEL, "texts": ["hi"]}),
}


@pytest.mark.parametrize("route", list(EMBED))
def test_bearer_routes(keyed, route):
    path, body = EMBED[route]
    for headers in ({}, WRONG, FOREIGN):
        r = post(keyed, path, body, headers)
        assert r.status_code == 401, (headers, r.text)
        assert r.headers["content-type"] == "application/json"
        out = r.json()
        if route == "ollama-legacy":
            # Refused before its body is read, so before it is told from AIGNE Hub's on the same path: OpenAI's shape.
            assert set(out["error"]) == {"message", "type", "param", "code"}
        elif route == "ollama":
            assert set(out) == {"error"} and isinstance(out["error"], str)
        else:
            assert set(out) == {"id", "message"}
            assert out["message"] == ("no api key supplied" if not headers else "invalid api token")
    assert post(keyed, path, body, BEARER).status_code == 200


def test_ollama_client_with_headers(keyed):
    import ollama

    with pytest.raises(ollama.ResponseError) as e:
        ollama.Client(host=keyed.http_url).embed(model=MODEL, input="hi")
    assert e.value.status_code == 401
    client = ollama.Client(host=keyed.http_url, headers={"Authorization": f"Bearer {KEY}"})
    assert len(client.embed(model=MODEL, input="hi").embeddings[0]) == 384
    assert len(client.embeddings(model=MODEL, prompt="hi").embedding) == 384
    assert [m.model for m in client.list().models] == [MODEL]
    assert requests.get(keyed.http_url + "/api/tags", timeout=10).status_code == 401


def test_cohere_clients(keyed):
    import cohere

    with pytest.raises(cohere.UnauthorizedError) as e:
        cohere.ClientV2(base_url=keyed.http_url, api_key="sk-nope").embed(model=MODEL, texts=["hi"], input_type="search_query",
                                                                          request_options={"max_retries": 0})
    assert e.value.body["message"] == "invalid api token"
    assert cohere.ClientV2(base_url=keyed.http_url, api_key=KEY).embed(model=MODEL, texts=["hi"], input_type="search_query").embeddings.float_
    assert cohere.Client(base_url=keyed.http_url, api_key=KEY).embed(model=MODEL, texts=["hi"]).embeddings


def test_gemini_keys(keyed):
    from google import genai
    from google.genai import errors, types

    path = f"/v1beta/models/{MODEL}:embedContent"
    body = {"content": {"parts": [{"text": "hi"}]}}
    r = post(keyed, path, body)
    assert r.status_code == 403 and r.json()["error"]["status"] == "PERMISSION_DENIED"
    for headers in ({"x-goog-api-key": "nope"}, {"Authorization": "Basic Zm9vOmJhcg=="}):
        r = post(keyed, path, body, headers)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert (err["code"], err["status"], err["message"]) == (400, "INVALID_ARGUMENT", "API key not valid. Please pass a valid API key.")
        assert err["details"][0]["reason"] == "API_KEY_INVALID"
    assert post(keyed, path, body, {"x-goog-api-key": KEY}).status_code == 200
    assert post(keyed, path, body, BEARER).status_code == 200
    assert post(keyed, f"{path}?key={KEY}", body).status_code == 200  # Envoy's Lua filter: ?key= → x-goog-api-key
    assert post(keyed, f"{path}?alt=json&key=sk-nope", body).status_code == 400

    wrong = genai.Client(api_key="sk-nope", http_options=types.HttpOptions(base_url=keyed.http_url))
    with pytest.raises(errors.ClientError) as e:
        wrong.models.embed_content(model=MODEL, contents="hi")
    assert (e.value.code, e.value.status) == (400, "INVALID_ARGUMENT")
    right = genai.Client(api_key=KEY, http_options=types.HttpOptions(base_url=keyed.http_url))
    assert len(right.models.embed_content(model=MODEL, contents=["a", "b"]).embeddings) == 2


# -- task prompts --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "input_type, prompt",
    [("search_query", "query: "), ("search_document", "passage: "), ("classification", "classify: "), ("clustering", None), (None, None)],
)
def test_cohere_input_type_picks_the_prompt(keyed, reference, input_type, prompt):
    body = {"model": MODEL, "texts": [TEXT]}
    if input_type:
        body["input_type"] = input_type
    r = post(keyed, "/v2/embed", body, BEARER)
    assert r.status_code == 200, r.text
    close(r.json()["embeddings"]["float"], reference.encode([TEXT], prompt=prompt))


@pytest.mark.parametrize(
    "task, title, prompt, text",
    [
        ("RETRIEVAL_QUERY", "", "query: ", TEXT),
        ("retrieval_document", "Dinner", "passage: ", "Dinner " + TEXT),
        ("RETRIEVAL_QUERY", "Dinner", "query: ", TEXT),  # a title only counts for documents
        ("SEMANTIC_SIMILARITY", "", "sts: ", TEXT),
        ("QUESTION_ANSWERING", "", "query: ", TEXT),
        ("CLASSIFICATION", "", "classify: ", TEXT),
        ("CLUSTERING", "", None, TEXT),
        ("TASK_TYPE_UNSPECIFIED", "", None, TEXT),
    ],
)
def test_gemini_task_type_picks_the_prompt(keyed, reference, task, title, prompt, text):
    item = {"content": {"parts": [{"text": TEXT}]}, "taskType": task}
    if title:
        item["title"] = title
    r = post(keyed, f"/v1beta/models/{MODEL}:batchEmbedContents", {"requests": [item, {**item, "taskType": "CLUSTERING"}]}, {"x-goog-api-key": KEY})
    assert r.status_code == 200, r.text
    first, second = (e["values"] for e in r.json()["embeddings"])
    close(first, reference.encode(text, prompt=prompt))
    close(second, reference.encode(TEXT))  # the same batch, another task: no prompt, and no title


def test_ollama_uses_the_default_prompt(keyed, reference):
    r = post(keyed, "/api/embed", {"model": MODEL, "input": TEXT}, BEARER)
    close(r.json()["embeddings"][0], reference.encode(TEXT))
