"""Every dialect through the real Envoy, driven by the real client libraries, plus raw error bodies.

openai (Python SDK, default base64 and float), huggingface_hub's InferenceClient, and the HrFlow SDK
(hrflow==1.9.0, run from its own environment), against the vectors of SentenceTransformer.encode.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests

from ai.inworld.embedding.v1alpha import embedding_service_pb2 as inworld_pb
from ai.inworld.embedding.v1alpha import embedding_service_pb2_grpc as inworld_grpc
from service.dialects.hrflow import item_text
from tei.v1 import tei_pb2, tei_pb2_grpc

from .helpers import close, post

ROOT = Path(__file__).resolve().parents[1]
MODEL = "sentence-transformers/all-MiniLM-L6-v2"
TEXTS = ["Hello Inworld!", "The food was delicious and the waiter...", "Hola, ¿cómo estás hoy?"]
LONG = " ".join(["embedding"] * 300)  # 302 tokens: over all-MiniLM-L6-v2's 256
HUGE = " ".join(["embedding"] * 9000)  # 9,002 tokens: over limits.max_input_tokens

# The seed's example profile (000), trimmed of nothing that matters to the text.
PROFILE = {
    "info": {"full_name": "Harry Potter", "first_name": "Harry", "last_name": "Potter", "email": "harry.potter@gmail.com", "summary": "Brief summary"},
    "experiences": [{"title": "Lead", "company": "Mathematic Departement", "location": {"text": "Paris"}, "description": "Developping."}],
    "educations": [{"title": "Mathematicien", "school": "University", "description": "Description"}],
    "skills": [{"name": "manual skill", "type": "hard", "value": None}, {"name": "Creative spirit", "type": "soft", "value": None}],
    "languages": [{"name": "english", "value": None}],
    "interests": [{"name": "football", "value": None}],
    "tags": [{"name": "archive", "value": False}],
}




def json_error(r, status):
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    return r.json()


# -- OpenAI / AIGNE Hub --------------------------------------------------------------------------


# AIGNE Hub: its documented path (/api/embeddings, seed 001) and its server's own routes (/api/v1/, /api/v2/).
@pytest.fixture(scope="module", params=["/v1", "/api", "/api/v1", "/api/v2"], ids=["openai", "aigne", "aigne-v1", "aigne-v2"])
def openai_client(stack, request):
    from openai import OpenAI

    return OpenAI(base_url=stack.http_url + request.param, api_key="unused", max_retries=0)


def test_openai_sdk_default_base64(openai_client, reference):
    resp = openai_client.embeddings.create(model=MODEL, input=TEXTS)
    close([d.embedding for d in resp.data], reference.encode(TEXTS))
    assert [d.index for d in resp.data] == [0, 1, 2]
    assert resp.model == MODEL
    assert resp.usage.prompt_tokens == resp.usage.total_tokens > 0


def test_openai_sdk_float(openai_client, reference):
    resp = openai_client.embeddings.create(model=MODEL, input=TEXTS[0], encoding_format="float")
    close(resp.data[0].embedding, reference.encode(TEXTS[0]))


def test_openai_sdk_token_ids_and_dimensions(openai_client, reference):
    """Issue 30.A: OpenAI's clients send token ids of OpenAI's tokenizer (tiktoken cl100k_base: [15339, 1917] is "hello
    world"); read as this model's, they embedded other text (cosine 0.13). They are refused, saying how to send text;
    this model's own ids are read only when the caller says so (X-Token-Ids: model)."""
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        openai_client.embeddings.create(model=MODEL, input=[[15339, 1917]])
    assert "check_embedding_ctx_length=False" in e.value.message and "X-Token-Ids: model" in e.value.message
    assert e.value.body["param"] == "input"
    with pytest.raises(openai.BadRequestError):
        openai_client.embeddings.create(model=MODEL, input=[15339, 1917])
    ids = reference.tokenizer(TEXTS[1])["input_ids"]
    resp = openai_client.embeddings.create(model=MODEL, input=[ids], encoding_format="float", extra_headers={"X-Token-Ids": "model"})
    close(resp.data[0].embedding, reference.encode(TEXTS[1]))
    resp = openai_client.embeddings.create(model=MODEL, input=TEXTS[1], dimensions=8)
    v = reference.encode(TEXTS[1])[:8]
    close(resp.data[0].embedding, v / np.linalg.norm(v))


def test_openai_sdk_errors(openai_client):
    import openai

    with pytest.raises(openai.NotFoundError) as e:
        openai_client.embeddings.create(model="nope", input="a")
    assert "does not exist" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        openai_client.embeddings.create(model=MODEL, input="")
    assert e.value.code == "empty_input" and e.value.param == "input"


def test_openai_models(stack):
    from openai import OpenAI

    client = OpenAI(base_url=stack.http_url + "/v1", api_key="unused", max_retries=0)
    assert MODEL in [m.id for m in client.models.list()]
    m = client.models.retrieve(MODEL)  # sent as sentence-transformers%2Fall-MiniLM-L6-v2
    assert (m.id, m.object, m.owned_by) == (MODEL, "model", "embedding-service")


def test_openai_exact_response_shape(stack):
    r = post(stack, "/v1/embeddings", {"input": "hi", "model": MODEL, "encoding_format": "base64"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    body = r.json()
    assert list(body) == ["object", "data", "model", "usage"]
    assert body["object"] == "list" and body["model"] == MODEL
    assert body["data"][0].keys() == {"object", "embedding", "index"} and body["data"][0]["index"] == 0
    assert body["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    # little-endian float32, as np.frombuffer(..., "float32") reads it
    vec = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), dtype="<f4")
    assert vec.shape == (384,) and abs(np.linalg.norm(vec) - 1) < 1e-5


@pytest.mark.parametrize(
    "payload, status, param, needle",
    [
        ({"input": "", "model": MODEL}, 400, "input", "empty string"),
        ({"input": [], "model": MODEL}, 400, "input", "empty array"),
        ({"input": ["a", ""], "model": MODEL}, 400, "input", "input[1]"),
        ({"input": ["a"] * 2049, "model": MODEL}, 400, "input", "2048"),
        ({"input": HUGE, "model": MODEL}, 400, "input", "8192 tokens"),  # longer ones are chunked: tests/test_long_inputs.py
        ({"input": ["a", 1], "model": MODEL}, 400, "input", "mixes types"),
        ({"input": [[1, -2]], "model": MODEL}, 400, "input", "token ids"),
        ({"input": [[1, 2.5]], "model": MODEL}, 400, "input", "token ids"),
        ({"input": [[]], "model": MODEL}, 400, "input", "empty token array"),
        ({"model": MODEL}, 400, "input", "required"),
        ({"input": "a", "model": MODEL, "encoding_format": "int8"}, 400, "encoding_format", "float"),
        ({"input": "a", "model": MODEL, "dimensions": 0}, 400, "dimensions", "at least 1"),
        ({"input": "a", "model": MODEL, "dimensions": 385}, 400, "dimensions", "between 1 and 384"),
        ({"input": "a", "model": "text-embedding-3-small"}, 404, "model", "does not exist"),
        ({"input": "a", "model": "café 🙂 \\x41"}, 404, "model", "café 🙂 \\x41"),
    ],
)
@pytest.mark.parametrize("route", ["/v1/embeddings", "/api/embeddings"])
def test_openai_error_envelope(stack, route, payload, status, param, needle):
    if route == "/api/embeddings" and set(payload) == {"model"}:
        pytest.skip("only a model on /api/embeddings is Ollama's preload (tests/test_ollama.py)")
    err = json_error(post(stack, route, payload, headers={"X-Token-Ids": "model"}), status)["error"]  # the token arrays' checks
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param
    assert needle in err["message"]
    assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "send, status",
    [
        (lambda u: requests.post(u + "/v1/embeddings", data="{oops", headers={"content-type": "application/json"}), 400),
        (lambda u: requests.post(u + "/v1/embeddings", json={"input": "a", "dimensions": "many"}), 400),
        (lambda u: requests.get(u + "/v1/embeddings"), 404),
    ],
    ids=["malformed-json", "wrong-type", "wrong-method"],
)
def test_openai_envoy_replies_use_the_envelope(stack, send, status):
    err = json_error(send(stack.http_url), status)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]


# -- Hugging Face --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_client(stack):
    import huggingface_hub.constants
    from huggingface_hub import InferenceClient

    # This process runs HF_HUB_OFFLINE=1 (nothing may reach the hub), which also blocks the client from
    # calling our local server; the client alone is let online, and only towards 127.0.0.1.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        yield InferenceClient(model=f"{stack.http_url}/models/{MODEL}")


def test_hf_client_single_and_batch(hf_client, reference):
    one = hf_client.feature_extraction(TEXTS[0])
    assert one.shape == (1, 384)  # an array of arrays, a single string too
    close(one, reference.encode([TEXTS[0]]))
    close(hf_client.feature_extraction(TEXTS), reference.encode(TEXTS))


def test_hf_client_options(hf_client, reference):
    from sentence_transformers import SentenceTransformer

    raw = SentenceTransformer(modules=[reference[0], reference[1]], device="cpu")
    close(hf_client.feature_extraction(TEXTS[1], normalize=False), raw.encode([TEXTS[1]]))
    close(hf_client.feature_extraction(TEXTS[1], prompt_name="query"), reference.encode([TEXTS[1]], prompt_name="query"))
    left = hf_client.feature_extraction(LONG + " tail words here", truncate=True, truncation_direction="left")
    right = hf_client.feature_extraction(LONG + " tail words here", truncate=True, truncation_direction="right")
    close(right, reference.encode([LONG + " tail words here"]))
    assert not np.allclose(left, right)


def test_hf_errors(stack, hf_client):
    from huggingface_hub.errors import HfHubHTTPError

    with pytest.raises(HfHubHTTPError) as e:
        hf_client.feature_extraction(LONG)  # truncate defaults to false, as in TEI
    assert e.value.response.status_code == 422
    url = f"/models/{MODEL}"
    # TEI's status for a Validation error (router/src/http/server.rs, v1.9.3: 422); it was 400 here, 413 on TEI's route
    assert "256 tokens" in json_error(post(stack, url, {"inputs": LONG}), 422)["error"]
    assert "prompt_name" in json_error(post(stack, url, {"inputs": "a", "prompt_name": "nope"}), 422)["error"]
    assert "inputs" in json_error(post(stack, url, {"inputs": 5}), 422)["error"]
    assert "inputs" in json_error(post(stack, url, {"inputs": []}), 400)["error"]  # TEI's Empty
    assert "Left or Right" in json_error(post(stack, url, {"inputs": "a", "truncation_direction": "up"}), 422)["error"]
    assert "does not exist" in json_error(post(stack, "/models/nope/nothing", {"inputs": "a"}), 404)["error"]
    body = json_error(requests.post(stack.http_url + url, data="{oops", headers={"content-type": "application/json"}), 400)
    assert set(body) == {"error", "error_type"}


@pytest.mark.parametrize("path", [f"/hf-inference/models/{MODEL}/pipeline/feature-extraction", f"/models/{MODEL}/pipeline/feature-extraction",
                                  f"/hf-inference/models/{MODEL}"])
def test_hf_inference_provider_paths(stack, reference, path):
    # huggingface_hub 2.4.0, inference/_providers/hf_inference.py HFInferenceTask._prepare_url:
    # f"{base_url}/models/{mapped_model}/pipeline/{task}" with base_url "https://router.huggingface.co/hf-inference".
    r = post(stack, path, {"inputs": TEXTS})
    assert r.status_code == 200, r.text
    close(r.json(), reference.encode(TEXTS))
    err = json_error(post(stack, path.replace(MODEL, "nope"), {"inputs": "a"}), 404)
    assert set(err) == {"error", "error_type"} and "`nope`" in err["error"]


def test_unknown_paths_answer_in_the_shape_of_their_api(stack):
    """Issue 30.C: an unknown path under an API's prefix is that API's 404 (it was google.rpc's everywhere)."""
    def get(path):
        r = requests.get(stack.http_url + path, timeout=10)
        assert r.status_code == 404 and r.headers["content-type"] == "application/json", (path, r.status_code, r.text)
        return r.json()

    for path in ("/v1/nothing", "/api/v1/nothing", "/api/v2/chat/completions"):
        assert set(get(path)["error"]) == {"message", "type", "param", "code"}, path  # OpenAI's (AIGNE Hub's)
    assert set(get("/v2/rerank")) == {"id", "message"}  # Cohere's
    assert set(get("/api/generate")) == {"error"} and isinstance(get("/api/generate")["error"], str)  # Ollama's
    assert get("/v1beta/models/x:countTokens")["error"]["status"] == "NOT_FOUND"  # Google's
    assert set(get("/hf-inference/nothing")) == {"error", "error_type"}  # Hugging Face's
    assert set(get("/nothing/at/all")) == {"code", "message", "details"}  # no API's: google.rpc.Status


def test_aigne_v1_paths_are_never_ollamas(stack):
    # Ollama's older API shares only /api/embeddings: a `prompt` on AIGNE Hub's own routes is AIGNE's request.
    for path in ("/api/v1/embeddings", "/api/v2/embeddings"):
        assert post(stack, path, {"model": MODEL, "prompt": "hi"}).json()["error"]["param"] == "input"


def test_hf_accepts_lowercase_direction_and_nested_parameters(stack, reference):
    r = post(stack, f"/models/{MODEL}", {"inputs": [TEXTS[2]], "parameters": {"normalize": False}, "truncation_direction": "left", "dimensions": 3, "encoding_format": "float"})
    assert r.status_code == 200, r.text
    assert abs(np.linalg.norm(r.json()[0]) - 1) > 1e-3  # not normalized: `parameters` honoured, extra fields ignored


def test_hf_cache_headers(stack):
    url = f"/models/{MODEL}"
    text = {"inputs": "a text only this test sends"}
    assert post(stack, url, text).headers["x-cache"] == "miss"
    assert post(stack, url, text).headers["x-cache"] == "hit"
    assert post(stack, url, text, headers={"x-use-cache": "false"}).headers["x-cache"] == "miss"


# -- HrFlow --------------------------------------------------------------------------------------

HRFLOW_PYTHON = os.environ.get("HRFLOW_PYTHON", str(ROOT / ".venv-hrflow" / "bin" / "python"))

HRFLOW_SCRIPT = """
import json, sys
from hrflow import Hrflow
url, item_type, item, seqs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4] == "1"
client = Hrflow(api_url=url, api_secret="secret", api_user="user@example.com")
print(json.dumps(client.document.embedding.post(item_type=item_type, item=item, return_sequences=seqs)))
"""


def hrflow_sdk(stack, item_type, item, return_sequences=False):
    assert Path(HRFLOW_PYTHON).exists(), "the HrFlow SDK's environment is missing: run `make test`"
    out = subprocess.run(
        [HRFLOW_PYTHON, "-c", HRFLOW_SCRIPT, stack.http_url + "/v1/", item_type, json.dumps(item), "1" if return_sequences else "0"],
        capture_output=True, text=True, timeout=60, cwd="/",
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def decode_float_list(base64_string, dim=384):
    """The seed's own decoder (000), with its reshape reading the decoded array."""
    np_array = np.frombuffer(base64.b64decode(base64_string), dtype=np.dtype(">f4"))
    return np.reshape(np_array, (-1, dim)).tolist()


def test_hrflow_sdk_profile(stack, reference):
    resp = hrflow_sdk(stack, "profile", PROFILE)
    assert resp["code"] == 200 and resp["message"] == "Embedding results"
    close(decode_float_list(resp["data"]), reference.encode([item_text(PROFILE, "profile")]))


def test_hrflow_sdk_return_sequences(stack, reference):
    job = {"name": "Data Engineer", "summary": "Build pipelines.", "skills": [{"name": "python"}]}
    resp = hrflow_sdk(stack, "job", job, return_sequences=True)
    rows = np.array(decode_float_list(resp["data"]))
    want = reference.encode(item_text(job, "job"), output_value="token_embeddings")
    close(rows, want, tol=1e-4)


def test_hrflow_item_as_json_string_and_text_field(stack, reference):
    r = post(stack, "/v1/document/embedding", {"item_type": "job", "item": json.dumps({"text": "Chef de cuisine", "name": "x"}), "return_sequences": "False"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    close(decode_float_list(r.json()["data"]), reference.encode(["Chef de cuisine"]))


@pytest.mark.parametrize(
    "payload, message",
    [
        ({"item_type": "resume", "item": PROFILE}, "Invalid Item Type: resume"),
        ({"item": PROFILE}, "Invalid Item Type: "),
        ({"item_type": "job", "item": "not json"}, "Invalid Item"),
        ({"item_type": "job", "item": {"name": ""}}, "no text"),
        ({"item_type": "job", "item": {"name": "x"}, "return_sequences": "maybe"}, "return_sequences"),
    ],
)
def test_hrflow_errors(stack, payload, message):
    body = json_error(post(stack, "/v1/document/embedding", payload), 400)
    assert body == {"code": 400, "message": message} if message.startswith("Invalid Item Type") else body["code"] == 400
    assert message in body["message"]


def test_hrflow_envoy_reply_shape(stack):
    r = requests.post(stack.http_url + "/v1/document/embedding", data="{oops", headers={"content-type": "application/json"})
    body = json_error(r, 400)
    assert body["code"] == 400 and set(body) == {"code", "message"}


def test_item_text_rule():
    assert item_text({"text": "  given  ", "name": "ignored"}, "job") == "given"
    assert item_text(PROFILE, "profile").splitlines() == [
        "Brief summary",
        "Lead, Mathematic Departement: Developping.",
        "Mathematicien, University: Description",
        "Skills: manual skill, Creative spirit",
        "Languages: english",
        "Interests: football",
        "Tags: archive",
    ]
    job = {"name": "Chef", "summary": "Cooks.", "sections": [{"title": "Mission", "description": "Run the kitchen"}], "skills": ["knives"]}
    assert item_text(job, "job") == "Chef\nCooks.\nMission: Run the kitchen\nSkills: knives"


# -- the same text, the same vector, everywhere --------------------------------------------------


def test_every_dialect_gives_the_same_vectors(stack, reference):
    want = reference.encode(TEXTS)
    got = {}
    r = post(stack, "/ml/v1alpha/embedding:embed", {"inputs": [{"text": t} for t in TEXTS]})
    got["inworld-rest"] = [e["values"] for e in r.json()["embeddings"]]
    for route in ("/v1/embeddings", "/api/embeddings"):
        r = post(stack, route, {"input": TEXTS, "model": MODEL})
        got[route] = [d["embedding"] for d in r.json()["data"]]
        r = post(stack, route, {"input": TEXTS, "model": MODEL, "encoding_format": "base64"})
        got[route + "-b64"] = [np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in r.json()["data"]]
    got["huggingface"] = post(stack, f"/models/{MODEL}", {"inputs": TEXTS}).json()
    got["hrflow"] = [decode_float_list(post(stack, "/v1/document/embedding", {"item_type": "job", "item": {"text": t}}).json()["data"])[0] for t in TEXTS]
    got["ollama"] = post(stack, "/api/embed", {"model": MODEL, "input": TEXTS}).json()["embeddings"]
    # Ollama's older /api/embeddings answers the raw pooled vector (as Ollama does): the same vector before Normalize.
    legacy = np.array([post(stack, "/api/embeddings", {"model": MODEL, "prompt": t}).json()["embedding"] for t in TEXTS], dtype=np.float32)
    got["ollama-legacy"] = legacy / np.linalg.norm(legacy, axis=1, keepdims=True)
    for route in ("/v2/embed", "/v1/embed"):
        r = post(stack, route, {"model": MODEL, "texts": TEXTS, "embedding_types": ["float", "base64"]})
        got["cohere" + route] = r.json()["embeddings"]["float"]
        got["cohere" + route + "-b64"] = [np.frombuffer(base64.b64decode(s), "<f4") for s in r.json()["embeddings"]["base64"]]
    for version in ("v1", "v1beta"):
        contents = [{"parts": [{"text": t}]} for t in TEXTS]
        r = post(stack, f"/{version}/models/{MODEL}:batchEmbedContents", {"requests": [{"content": c} for c in contents]})
        got[f"gemini-{version}-batch"] = [e["values"] for e in r.json()["embeddings"]]
        got[f"gemini-{version}"] = [post(stack, f"/{version}/models/{MODEL}:embedContent", {"content": c}).json()["embedding"]["values"] for c in contents]
    for route in ("/embed", "/"):  # Text Embeddings Inference
        got["tei" + route] = post(stack, route, {"inputs": TEXTS}).json()
    with grpc.insecure_channel(stack.server_targets[0]) as ch:
        resp = inworld_grpc.EmbeddingServiceStub(ch).Embed(inworld_pb.EmbedRequest(inputs=[inworld_pb.EmbedRequest.Input(text=t) for t in TEXTS]))
        got["grpc"] = [list(e.values) for e in resp.embeddings]
    with grpc.insecure_channel(stack.envoy_target) as ch:  # TEI's own gRPC API (normalize is false unless asked, as in TEI)
        tei = tei_pb2_grpc.EmbedStub(ch)
        got["tei-grpc"] = [list(tei.Embed(tei_pb2.EmbedRequest(inputs=t, normalize=True)).embeddings) for t in TEXTS]
        got["tei-grpc-stream"] = [list(r.embeddings) for r in tei.EmbedStream(iter(tei_pb2.EmbedRequest(inputs=t, normalize=True) for t in TEXTS))]
    for name, vectors in got.items():
        np.testing.assert_allclose(np.asarray(vectors, dtype=np.float32), want, atol=1e-5, rtol=0, err_msg=name)
