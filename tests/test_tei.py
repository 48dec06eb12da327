"""Text Embeddings Inference through the real Envoy: its HTTP routes driven by huggingface_hub's InferenceClient,
LangChain's HuggingFaceEndpointEmbeddings and LlamaIndex's TextEmbeddingsInference (those two from their own
environment, .venv-tei), its gRPC API driven by a stub generated from TEI's own proto in a fresh process, TEI's
error bodies and statuses, its auth, and the same vectors as native Inworld gRPC."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ai.inworld.embedding.v1alpha import embedding_service_pb2 as inworld_pb
from ai.inworld.embedding.v1alpha import embedding_service_pb2_grpc as inworld_grpc
from service.launch import Stack

from .conftest import stack_config
from .helpers import close, post

ROOT = Path(__file__).resolve().parents[1]
MODEL = "sentence-transformers/all-MiniLM-L6-v2"
TEXTS = ["Hello Inworld!", "The food was delicious and the waiter...", "Hola, ¿cómo estás hoy?"]
LONG = " ".join(["embedding"] * 300)  # 902 tokens: over all-MiniLM-L6-v2's 256
TEI_PROTO = ROOT / "proto" / "tei" / "v1" / "tei.proto"
# proto/tei.proto of huggingface/text-embeddings-inference v1.9.3 (commit 06670157fb6c), byte for byte.
TEI_PROTO_MD5 = "5022d3ed26d5f6931c81d8ab22e2b41e"
TEI_PYTHON = os.environ.get("TEI_CLIENTS_PYTHON", str(ROOT / ".venv-tei" / "bin" / "python"))




def tei_error(r, status, error_type=None):
    """TEI's error body: exactly {"error": str, "error_type": str}, as JSON, with TEI's status."""
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert set(body) == {"error", "error_type"} and isinstance(body["error"], str) and body["error"], body
    if error_type:
        assert body["error_type"] == error_type, body
    return body


@pytest.fixture(scope="module")
def raw_model(reference):
    """The model without its Normalize module: what `normalize: false` returns."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(modules=[reference[0], reference[1]], device="cpu")


# -- HTTP, with huggingface_hub ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hub(stack):
    import huggingface_hub.constants
    from huggingface_hub import InferenceClient

    # HF_HUB_OFFLINE=1 in this process (nothing may reach the hub) also blocks the client from our local server.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        # A base URL: feature_extraction POSTs to it, i.e. TEI's `POST /`.
        yield InferenceClient(model=stack.http_url)


def test_hub_feature_extraction_posts_to_the_root(hub, reference):
    one = hub.feature_extraction(TEXTS[0])
    assert one.shape == (1, 384)
    close(one, reference.encode([TEXTS[0]]))
    close(hub.feature_extraction(TEXTS), reference.encode(TEXTS))


def test_hub_options(hub, reference, raw_model):
    close(hub.feature_extraction(TEXTS[1], normalize=False), raw_model.encode([TEXTS[1]]))
    close(hub.feature_extraction(TEXTS[1], prompt_name="query"), reference.encode([TEXTS[1]], prompt_name="query"))
    text = LONG + " tail words here"
    right = hub.feature_extraction(text, truncate=True, truncation_direction="right")  # the hub sends lowercase
    left = hub.feature_extraction(text, truncate=True, truncation_direction="left")
    close(right, reference.encode([text]))
    assert not np.allclose(left, right)
    v = reference.encode(TEXTS[1])[:8]
    close(hub.feature_extraction(TEXTS[1], dimensions=8), [v / np.linalg.norm(v)])


def test_hub_errors_are_raised(hub):
    from huggingface_hub.errors import HfHubHTTPError

    with pytest.raises(HfHubHTTPError) as e:
        hub.feature_extraction(LONG, truncate=False)
    assert e.value.response.status_code == 422  # TEI 1.9's status for a Validation error
    assert "256 tokens" in str(e.value)


# -- HTTP, the routes as TEI answers them -----------------------------------------------------------------------


def test_embed_route_and_root_are_the_same(stack, reference):
    for path in ("/embed", "/"):
        r = post(stack, path, {"inputs": TEXTS, "normalize": True, "truncate": False, "truncation_direction": "Right"})
        assert r.status_code == 200 and r.headers["content-type"] == "application/json", r.text
        close(r.json(), reference.encode(TEXTS))
    r = post(stack, "/embed", {"inputs": TEXTS[0]})
    assert len(r.json()) == 1  # a single string is still a batch of one
    for h in ("x-compute-time", "x-total-time", "x-tokenization-time", "x-queue-time", "x-inference-time"):
        assert r.headers[h].isdigit(), (h, r.headers[h])  # whole milliseconds (lib.rs: `as_millis().to_string()`)
    assert r.headers["x-compute-tokens"] == "6" and r.headers["x-compute-characters"] == str(len(TEXTS[0]))


def test_embed_takes_token_ids_and_nulls(stack, reference):
    ids = reference.tokenizer(TEXTS[1])["input_ids"]
    close(post(stack, "/embed", {"inputs": ids}).json(), reference.encode([TEXTS[1]]))  # one sequence of ids
    close(post(stack, "/embed", {"inputs": [ids, ids]}).json(), reference.encode([TEXTS[1]] * 2))
    r = post(stack, "/embed", {"inputs": TEXTS[0], "truncate": None, "prompt_name": None, "dimensions": None, "normalize": None})
    close(r.json(), reference.encode([TEXTS[0]]))


def test_auto_truncate_is_the_truncate_default(stack, tmp_path_factory, reference):
    # TEI 1.9 (router/src/main.rs): `--auto-truncate` defaults to true; `req.truncate.unwrap_or(info.auto_truncate)`.
    close(post(stack, "/embed", {"inputs": LONG}).json(), reference.encode([LONG]))
    tei_error(post(stack, "/embed", {"inputs": LONG, "truncate": False}), 422, "Validation")
    assert requests.get(stack.http_url + "/info", timeout=10).json()["auto_truncate"] is True
    # `--auto-truncate false`, as TEI's flag: TEI's routes refuse an over-long input the caller did not ask to cut
    from service.run import build_config, parser

    cfg = build_config(parser().parse_args(["--auto-truncate", "false"]))
    assert cfg.dialects.long_inputs["tei"] == "refuse" and cfg.limits.auto_truncate is False
    os.environ["EMBED__LIMITS__AUTO_TRUNCATE"] = "true"  # the flag beats the environment (and a file)
    try:
        assert build_config(parser().parse_args(["--auto-truncate", "false"])).limits.auto_truncate is False
    finally:
        del os.environ["EMBED__LIMITS__AUTO_TRUNCATE"]
    assert build_config(parser().parse_args(["--auto-truncate"])).limits.auto_truncate is True
    off = stack_config()
    off.dialects.long_inputs["tei"] = "refuse"
    with Stack(off.validate(), log_dir=tmp_path_factory.mktemp("tei-auto-truncate")) as s:
        tei_error(post(s, "/embed", {"inputs": LONG}), 422, "Validation")
        close(post(s, "/embed", {"inputs": LONG, "truncate": True}).json(), reference.encode([LONG]))
        assert requests.get(s.http_url + "/info", timeout=10).json()["auto_truncate"] is False


def test_embed_all_gives_every_token(stack, reference):
    r = post(stack, "/embed_all", {"inputs": [TEXTS[0], TEXTS[2]]})
    assert r.status_code == 200, r.text
    got = r.json()
    for text, matrix in zip([TEXTS[0], TEXTS[2]], got):
        close(matrix, reference.encode(text, output_value="token_embeddings"), tol=1e-4)
    assert float(r.headers["x-inference-time"]) >= 0


def test_tokenize_as_tei(stack, reference):
    r = post(stack, "/tokenize", {"inputs": "Hello café au lait"})
    assert r.status_code == 200, r.text
    [tokens] = r.json()
    want = reference.tokenizer("Hello café au lait", return_offsets_mapping=True)
    assert [t["id"] for t in tokens] == want["input_ids"]
    assert tokens[0] == {"id": 101, "text": "[CLS]", "special": True, "start": None, "stop": None}
    assert tokens[-1] == {"id": 102, "text": "[SEP]", "special": True, "start": None, "stop": None}
    raw = "Hello café au lait".encode()
    for t, (start, stop) in zip(tokens[1:-1], want["offset_mapping"][1:-1]):
        assert list(t) == ["id", "text", "special", "start", "stop"]
        assert t["text"] == "Hello café au lait"[start:stop]  # the input's own characters (café, not cafe)
        # byte offsets, as TEI (core/src/tokenization.rs: `input.bytes().skip(start).take(stop - start)`)
        assert t["special"] is False and raw[t["start"]:t["stop"]].decode() == t["text"]
    assert [(t["start"], t["stop"]) for t in tokens if t["text"] == "au"] == [(12, 14)]  # characters 11-13
    assert "x-compute-time" not in r.headers  # TEI sends no timing on /tokenize
    r = post(stack, "/tokenize", {"inputs": ["a b", "c"], "add_special_tokens": False})
    assert [[t["text"] for t in row] for row in r.json()] == [["a", "b"], ["c"]]
    long = post(stack, "/tokenize", {"inputs": LONG}).json()[0]
    assert len(long) == len(reference.tokenizer(LONG)["input_ids"]) > 256  # not truncated: every token of the input


def test_decode_as_tei(stack, reference):
    ids = reference.tokenizer("Hello café")["input_ids"]
    assert post(stack, "/decode", {"ids": ids}).json() == [reference.tokenizer.decode(ids, skip_special_tokens=True)]
    r = post(stack, "/decode", {"ids": [ids, ids[1:2]], "skip_special_tokens": False})
    assert r.json() == [reference.tokenizer.decode(ids), reference.tokenizer.decode(ids[1:2])]


def test_info_and_health(stack):
    r = requests.get(stack.http_url + "/info", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    info = r.json()
    # TEI 1.9.3's Info (router/src/lib.rs), in its order; None is null
    assert list(info) == ["model_id", "model_sha", "model_dtype", "served_model_name", "model_type", "max_concurrent_requests",
                          "max_input_length", "max_batch_tokens", "max_batch_requests", "max_client_batch_size", "auto_truncate",
                          "tokenization_workers", "version", "sha", "docker_label"]
    assert info["model_id"] == info["served_model_name"] == MODEL and info["model_dtype"] == "float32"  # the test stack runs fp32
    assert info["model_type"] == {"embedding": {"pooling": "mean"}}
    assert info["max_input_length"] == 256 and info["max_client_batch_size"] == 2048 and info["auto_truncate"] is True
    assert info["version"] == "1.9.3" and info["docker_label"].startswith("embedding-service ")
    for path in ("/health", "/ping"):  # /ping: SageMaker's health check, TEI's `health` too
        r = requests.get(stack.http_url + path, timeout=10)
        assert r.status_code == 200 and r.content == b"", path


def test_similarity(stack, reference):
    # TEI's /similarity (router/src/http/server.rs `similarity`): 1 - cosine distance of each sentence to the source.
    sentences = [TEXTS[1], TEXTS[2], TEXTS[0]]
    r = post(stack, "/similarity", {"inputs": {"source_sentence": TEXTS[0], "sentences": sentences}})
    assert r.status_code == 200, r.text
    v = reference.encode([TEXTS[0], *sentences])
    np.testing.assert_allclose(r.json(), v[1:] @ v[0], atol=1e-5)
    assert abs(r.json()[2] - 1) < 1e-5 and r.headers["x-compute-tokens"].isdigit()
    # huggingface_hub's sentence_similarity sends the same body
    from huggingface_hub import InferenceClient

    got = InferenceClient(model=stack.http_url + "/similarity").sentence_similarity(TEXTS[0], other_sentences=sentences)
    np.testing.assert_allclose(got, v[1:] @ v[0], atol=1e-5)


def test_vertex_and_invocations(stack, reference):
    # /vertex: {"instances": [EmbedRequest]} → {"predictions": [EmbedResponse]}; /invocations: /embed (SageMaker).
    r = post(stack, "/vertex", {"instances": [{"inputs": TEXTS[:2]}, {"inputs": TEXTS[2], "dimensions": 8}]})
    assert r.status_code == 200, r.text
    first, second = r.json()["predictions"]
    close(first, reference.encode(TEXTS[:2]))
    v = reference.encode(TEXTS[2])[:8]
    close(second, [v / np.linalg.norm(v)])
    assert r.headers["x-compute-tokens"] == str(sum(len(reference.tokenizer(t)["input_ids"]) for t in TEXTS))  # all instances
    close(post(stack, "/invocations", {"inputs": TEXTS}).json(), reference.encode(TEXTS))


def test_openai_path_of_tei(stack, reference):
    # TEI serves OpenAI's embeddings at /v1/embeddings and /embeddings.
    body = post(stack, "/embeddings", {"input": TEXTS, "model": MODEL}).json()
    close([d["embedding"] for d in body["data"]], reference.encode(TEXTS))


# TEI 1.9.3's statuses (router/src/http/server.rs): Empty 400, Validation and a body of the wrong shape 422, Backend 424.
ERRORS = [
    ("/embed", {"inputs": []}, 400, "Empty", "cannot be empty"),
    ("/embed", {"inputs": ""}, 400, "Empty", "empty"),
    ("/", {"inputs": ["a", ""]}, 400, "Empty", "Input 1"),
    ("/embed", {}, 422, "Validation", "missing field `inputs`"),
    ("/embed", {"inputs": 5}, 422, "Validation", "invalid type: integer `5`"),
    ("/embed", {"inputs": [["a"]]}, 422, "Validation", "inputs"),
    ("/embed", {"inputs": ["a", [101, 102]]}, 422, "Validation", "mixes texts and token ids"),
    ("/embed", {"inputs": [[101, -1]]}, 422, "Validation", "token ids"),
    ("/embed", {"inputs": "a", "normalize": "yes"}, 422, "Validation", "normalize: invalid type: string"),
    ("/embed", {"inputs": "a", "truncation_direction": "up"}, 422, "Validation", "expected `Left` or `Right`"),
    ("/embed", {"inputs": "a", "dimensions": -1}, 422, "Validation", "dimensions"),
    ("/embed", {"inputs": "a", "dimensions": 1000}, 422, "Validation", "between 1 and 384"),
    ("/embed", {"inputs": LONG, "truncate": False}, 422, "Validation", "256 tokens"),
    ("/", {"inputs": ["a"] * 2049}, 422, "Validation", "2048"),
    ("/embed", {"inputs": "a", "prompt_name": "nope"}, 422, "Validation", "prompt_name"),
    ("/embed_all", {"inputs": LONG, "truncate": False}, 422, "Validation", "256 tokens"),
    ("/similarity", {"inputs": {"source_sentence": "a", "sentences": []}}, 400, "Empty", "`sentences` cannot be empty"),
    ("/similarity", {"inputs": {"sentences": ["a"]}}, 422, "Validation", "source_sentence"),
    ("/similarity", {"inputs": "a"}, 422, "Validation", "inputs"),
    ("/similarity", {"inputs": {"source_sentence": "a", "sentences": ["b"]}, "parameters": {"truncate": "yes"}}, 422, "Validation", "truncate"),
    ("/rerank", {"query": "q", "texts": ["a"]}, 424, "Backend", "Backend error: model is not a re-ranker model"),
    ("/rerank", {"query": "q", "texts": []}, 400, "Empty", "`texts` cannot be empty"),
    ("/rerank", {"texts": ["a"]}, 422, "Validation", "query"),
    ("/predict", {"inputs": "a"}, 424, "Backend", "Backend error: Model is not a classifier model"),
    ("/predict", {"inputs": []}, 400, "Empty", "cannot be empty"),
    ("/vertex", {"instances": [{"query": "q", "texts": ["a"]}]}, 424, "Backend", "re-ranker"),
    ("/vertex", {"instances": []}, 400, "Empty", "cannot be empty"),
    ("/vertex", {"instances": [{"inputs": 5}]}, 422, "Validation", "inputs"),
    ("/vertex", {"instances": ["a"]}, 422, "Validation", "instances[0]"),
    ("/vertex", {"instances": [{"inputs": ["a"] * 1025}, {"inputs": ["a"] * 1024}]}, 422, "Validation", "batch size"),
    ("/embed_all", {"inputs": []}, 400, "Empty", "cannot be empty"),
    ("/embed_sparse", {"inputs": "a"}, 424, "Backend", "SPLADE"),
    ("/tokenize", {"inputs": [101, 102]}, 422, "Validation", "expected a string"),
    ("/tokenize", {"inputs": []}, 400, "Empty", "cannot be empty"),
    ("/tokenize", {"inputs": "a", "prompt_name": "nope"}, 422, "Validation", "prompt_name"),
    ("/tokenize", {"inputs": "a", "add_special_tokens": 1}, 422, "Validation", "add_special_tokens"),
    ("/decode", {"ids": "x"}, 422, "Validation", "expected a sequence"),
    ("/decode", {"ids": []}, 400, "Empty", "cannot be empty"),
    ("/decode", {"ids": [[]]}, 400, "Empty", "empty"),
    ("/decode", {"ids": [1.5]}, 422, "Validation", "token ids"),
]


@pytest.mark.parametrize("path, payload, status, error_type, needle", ERRORS, ids=[f"{e[0]}-{i}" for i, e in enumerate(ERRORS)])
def test_errors_in_tei_shape_and_status(stack, path, payload, status, error_type, needle):
    body = tei_error(post(stack, path, payload), status, error_type)
    assert needle in body["error"], body


@pytest.mark.parametrize("path", ["/embed", "/", "/embed_all", "/embed_sparse", "/tokenize", "/decode"])
def test_malformed_json_is_a_400_in_tei_shape(stack, path):
    r = requests.post(stack.http_url + path, data="{oops", headers={"content-type": "application/json"}, timeout=10)
    tei_error(r, 400)


def test_body_too_large_in_tei_shape(stack):
    big = b'{"inputs": "' + b"a" * (9 * 1024 * 1024) + b'"}'
    for path in ("/tokenize", "/embed", "/", "/embed?x=1"):
        r = requests.post(stack.http_url + path, data=big, headers={"content-type": "application/json"}, timeout=30)
        tei_error(r, 413)
    # `/embed` and `/` are exact paths: Inworld's `/embeddings/v1alpha/content:embed` keeps its own shape.
    r = requests.post(stack.http_url + "/embeddings/v1alpha/content:embed", data=big, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 413 and set(r.json()) == {"code", "message", "details"}


# -- the same text, the same vector ------------------------------------------------------------------------------


def test_tei_vectors_equal_native_inworld_grpc(stack, grpc_results):
    with grpc.insecure_channel(stack.server_targets[0]) as ch:
        native = inworld_grpc.EmbeddingServiceStub(ch).Embed(inworld_pb.EmbedRequest(inputs=[inworld_pb.EmbedRequest.Input(text=t) for t in TEXTS]))
    want = np.array([list(e.values) for e in native.embeddings], dtype=np.float32)
    got = {
        "/embed": post(stack, "/embed", {"inputs": TEXTS}).json(),
        "/": post(stack, "/", {"inputs": TEXTS}).json(),
        "tei.v1.Embed": grpc_results["envoy"]["embed_texts"],
        "tei.v1.EmbedStream": grpc_results["envoy"]["stream_texts"],
    }
    for name, vectors in got.items():
        np.testing.assert_allclose(np.asarray(vectors, dtype=np.float32), want, atol=1e-5, rtol=0, err_msg=name)


# -- gRPC: a stub generated from TEI's own proto, in a process of its own ---------------------------------------

STREAM_TEXTS = [f"Streamed text number {i}: {'lorem ipsum ' * (i % 7)}".strip() for i in range(300)]

# Generated in a fresh directory from TEI's proto and run in a fresh interpreter, so nothing of this repository's
# generated code is on its path: what calls the server is code generated from TEI's file alone.
GRPC_CLIENT = r'''
import json, sys, queue, time
sys.path.insert(0, sys.argv[1])
import grpc
import tei_pb2 as pb, tei_pb2_grpc as pbg

target, texts, stream_texts, long = sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4]), sys.argv[5]
out = {}

def status(fn):
    try:
        fn()
        return ["OK", ""]
    except grpc.RpcError as e:
        return [e.code().name, e.details()]

with grpc.insecure_channel(target) as ch:
    info, embed, tok = pbg.InfoStub(ch), pbg.EmbedStub(ch), pbg.TokenizeStub(ch)
    i = info.Info(pb.InfoRequest(), timeout=10)
    out["info"] = {"model_id": i.model_id, "model_type": i.model_type, "max_input_length": i.max_input_length,
                   "model_dtype": i.model_dtype, "max_client_batch_size": i.max_client_batch_size}
    out["embed_texts"] = [list(embed.Embed(pb.EmbedRequest(inputs=t, normalize=True), timeout=10).embeddings) for t in texts]
    r, call = embed.Embed.with_call(pb.EmbedRequest(inputs=texts[0]), timeout=10)  # normalize unset: true (TEI 1.9)
    out["embed_default"] = list(r.embeddings)
    out["embed_raw"] = list(embed.Embed(pb.EmbedRequest(inputs=texts[0], normalize=False), timeout=10).embeddings)
    out["embed_dims"] = list(embed.Embed(pb.EmbedRequest(inputs=texts[0], dimensions=8), timeout=10).embeddings)
    out["embed_dims_raw"] = list(embed.Embed(pb.EmbedRequest(inputs=texts[0], dimensions=8, normalize=False), timeout=10).embeddings)
    out["embed_dims_zero"] = status(lambda: embed.Embed(pb.EmbedRequest(inputs=texts[0], dimensions=0), timeout=10))
    out["embed_dims_over"] = status(lambda: embed.Embed(pb.EmbedRequest(inputs=texts[0], dimensions=385), timeout=10))
    out["embed_metadata"] = {"compute_tokens": r.metadata.compute_tokens, "compute_chars": r.metadata.compute_chars,
                             "total_time_ns": r.metadata.total_time_ns}
    out["embed_headers"] = sorted(k for k, _ in call.initial_metadata())
    out["embed_long"] = status(lambda: embed.Embed(pb.EmbedRequest(inputs=long), timeout=10))
    left = embed.Embed(pb.EmbedRequest(inputs=long + " tail", truncate=True, normalize=True,
                                       truncation_direction=pb.TRUNCATION_DIRECTION_LEFT), timeout=10)
    out["embed_left"] = list(left.embeddings)
    out["embed_empty"] = status(lambda: embed.Embed(pb.EmbedRequest(inputs=""), timeout=10))
    out["embed_prompt"] = status(lambda: embed.Embed(pb.EmbedRequest(inputs="a", prompt_name="nope"), timeout=10))
    out["stream_texts"] = [list(x.embeddings) for x in embed.EmbedStream(iter(pb.EmbedRequest(inputs=t, normalize=True) for t in texts), timeout=30)]
    t0 = time.perf_counter()
    streamed = list(embed.EmbedStream(iter(pb.EmbedRequest(inputs=t, normalize=True) for t in stream_texts), timeout=120))
    out["stream_seconds"] = time.perf_counter() - t0
    out["stream"] = [list(x.embeddings) for x in streamed]
    out["stream_tokens"] = [x.metadata.compute_tokens for x in streamed]
    got = []
    def broken():
        for x in embed.EmbedStream(iter([pb.EmbedRequest(inputs="a"), pb.EmbedRequest(inputs="b"), pb.EmbedRequest(inputs=""),
                                         pb.EmbedRequest(inputs="c")]), timeout=10):
            got.append(x)
    out["stream_broken"] = status(broken) + [len(got)]
    # A caller that waits for each answer before it sends the next request.
    answered = queue.Queue()
    def interleaved():
        def requests():
            for t in texts:
                yield pb.EmbedRequest(inputs=t, normalize=True)
                answered.get(timeout=4)
        for x in embed.EmbedStream(requests(), timeout=6):
            answered.put(1)
    out["stream_interleaved"] = status(interleaved)
    all_ = embed.EmbedAll(pb.EmbedAllRequest(inputs=texts[0]), timeout=10)
    out["embed_all"] = [list(t.embeddings) for t in all_.token_embeddings]
    out["embed_all_stream"] = [len(x.token_embeddings) for x in embed.EmbedAllStream(iter(pb.EmbedAllRequest(inputs=t) for t in texts), timeout=30)]
    out["sparse"] = status(lambda: embed.EmbedSparse(pb.EmbedSparseRequest(inputs="a"), timeout=10))
    out["sparse_stream"] = status(lambda: list(embed.EmbedSparseStream(iter([pb.EmbedSparseRequest(inputs="a")]), timeout=10)))
    out["predict"] = status(lambda: pbg.PredictStub(ch).Predict(pb.PredictRequest(inputs="a"), timeout=10))
    out["rerank"] = status(lambda: pbg.RerankStub(ch).Rerank(pb.RerankRequest(query="a", texts=["b"]), timeout=10))
    def tokens(r):
        return [[t.id, t.text, t.special, t.start if t.HasField("start") else None, t.stop if t.HasField("stop") else None] for t in r.tokens]
    out["tokenize_plain"] = tokens(tok.Tokenize(pb.EncodeRequest(inputs=texts[0]), timeout=10))  # add_special_tokens false
    out["tokenize_special"] = tokens(tok.Tokenize(pb.EncodeRequest(inputs=texts[0], add_special_tokens=True), timeout=10))
    encodes = iter(pb.EncodeRequest(inputs=t, add_special_tokens=True) for t in texts)
    out["tokenize_stream"] = [tokens(r) for r in tok.TokenizeStream(encodes, timeout=10)]
    ids = [t[0] for t in out["tokenize_special"]]
    out["decode_default"] = tok.Decode(pb.DecodeRequest(ids=ids), timeout=10).text  # skip_special_tokens false
    out["decode_skip"] = tok.Decode(pb.DecodeRequest(ids=ids, skip_special_tokens=True), timeout=10).text
    out["decode_stream"] = [r.text for r in tok.DecodeStream(iter([pb.DecodeRequest(ids=ids, skip_special_tokens=True)] * 3), timeout=10)]
    out["decode_empty"] = status(lambda: tok.Decode(pb.DecodeRequest(ids=[]), timeout=10))
print(json.dumps(out))
'''


@pytest.fixture(scope="module")
def tei_stub(tmp_path_factory):
    """Python stubs generated by grpcio-tools from TEI's proto, in a directory of their own."""
    assert hashlib.md5(TEI_PROTO.read_bytes()).hexdigest() == TEI_PROTO_MD5, "proto/tei/v1/tei.proto must stay TEI's file (v1.9.3) verbatim"
    out = tmp_path_factory.mktemp("tei-stub")
    (out / "tei.proto").write_bytes(TEI_PROTO.read_bytes())
    r = subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{out}", f"--python_out={out}", f"--grpc_python_out={out}", "tei.proto"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def grpc_results(stack, tei_stub):
    """What the generated client got, directly from the server and through Envoy (h2c passed through)."""
    results = {}
    for name, target in (("direct", stack.server_targets[0]), ("envoy", stack.envoy_target)):
        r = subprocess.run(
            [sys.executable, "-c", GRPC_CLIENT, str(tei_stub), target, json.dumps(TEXTS), json.dumps(STREAM_TEXTS), LONG],
            capture_output=True, text=True, timeout=300, cwd=str(tei_stub), env={**os.environ, "PYTHONPATH": ""},
        )
        assert r.returncode == 0, r.stderr[-3000:]
        results[name] = json.loads(r.stdout)
    return results


@pytest.fixture(params=["direct", "envoy"])
def via(request, grpc_results):
    return grpc_results[request.param]


def test_grpc_info(via):
    assert via["info"] == {"model_id": MODEL, "model_type": 0, "max_input_length": 256, "model_dtype": "float32", "max_client_batch_size": 2048}


def test_grpc_embed(via, reference, raw_model):
    close(via["embed_texts"], reference.encode(TEXTS))
    # TEI 1.9.3's proto: `optional bool normalize` (unset is true) and `optional uint32 dimensions` (the first N, normalized
    # again unless normalize is false; 0 and more than the model's are refused).
    close(via["embed_default"], reference.encode(TEXTS[0]))
    close(via["embed_raw"], raw_model.encode(TEXTS[0]))
    raw = raw_model.encode(TEXTS[0])
    close(via["embed_dims_raw"], raw[:8])
    close(via["embed_dims"], raw[:8] / np.linalg.norm(raw[:8]))
    assert via["embed_dims_zero"] == ["INVALID_ARGUMENT", "`dimensions` should be positive"]
    assert via["embed_dims_over"][0] == "INVALID_ARGUMENT" and "384" in via["embed_dims_over"][1]
    assert via["embed_metadata"]["compute_tokens"] == 6 and via["embed_metadata"]["compute_chars"] == len(TEXTS[0])
    assert via["embed_metadata"]["total_time_ns"] > 0
    assert {"x-compute-time", "x-inference-time", "x-compute-tokens"} <= set(via["embed_headers"])
    assert via["embed_long"][0] == "INVALID_ARGUMENT" and "256 tokens" in via["embed_long"][1]
    close(via["embed_left"], _left_reference(reference, LONG + " tail"))
    assert via["embed_empty"][0] == "INVALID_ARGUMENT"
    assert via["embed_prompt"][0] == "INVALID_ARGUMENT" and "prompt_name" in via["embed_prompt"][1]


def _left_reference(reference, text):
    """The vector of `text` cut from the left to 256 tokens, as TEI's TRUNCATION_DIRECTION_LEFT reads it."""
    reference.tokenizer.truncation_side = "left"
    try:
        return reference.encode(text)
    finally:
        reference.tokenizer.truncation_side = "right"


def test_grpc_embed_stream_answers_every_request_in_order(via, reference):
    close(via["stream_texts"], reference.encode(TEXTS))
    assert len(via["stream"]) == len(STREAM_TEXTS)
    close(via["stream"], reference.encode(STREAM_TEXTS))
    assert via["stream_tokens"] == [len(reference.tokenizer(t)["input_ids"]) for t in STREAM_TEXTS]
    # The first failure ends the stream, after the answers to the requests before it (as TEI's tonic stream does).
    code, message, answered = via["stream_broken"]
    assert (code, answered) == ("INVALID_ARGUMENT", 2) and "empty" in message


def test_grpc_embed_stream_interleaves_with_its_caller(via):
    # Through Envoy too: native gRPC bypasses the buffer filter, which would hold the request stream until it ended.
    assert via["stream_interleaved"] == ["OK", ""]


def test_grpc_embed_all_and_sparse(via, reference):
    close(via["embed_all"], reference.encode(TEXTS[0], output_value="token_embeddings"), tol=1e-4)
    assert via["embed_all_stream"] == [len(reference.tokenizer(t)["input_ids"]) for t in TEXTS]
    for key in ("sparse", "sparse_stream"):
        assert via[key][0] == "FAILED_PRECONDITION" and "SPLADE" in via[key][1]
    assert via["predict"][0] == via["rerank"][0] == "UNIMPLEMENTED"


def test_grpc_tokenize_and_decode(via, reference):
    want = reference.tokenizer(TEXTS[0], return_offsets_mapping=True)
    ids, offsets = want["input_ids"], want["offset_mapping"]
    assert [t[0] for t in via["tokenize_plain"]] == ids[1:-1]  # add_special_tokens is false unless asked
    special = via["tokenize_special"]
    assert [t[0] for t in special] == ids
    assert special[0] == [101, "[CLS]", True, None, None] and special[-1] == [102, "[SEP]", True, None, None]
    for t, (start, stop) in zip(special[1:-1], offsets[1:-1]):
        assert t[1:] == [TEXTS[0][start:stop], False, start, stop]
    assert [[t[0] for t in row] for row in via["tokenize_stream"]] == [reference.tokenizer(t)["input_ids"] for t in TEXTS]
    assert via["decode_default"] == reference.tokenizer.decode(ids)  # skip_special_tokens false unless asked
    assert via["decode_skip"] == via["decode_stream"][0] == reference.tokenizer.decode(ids, skip_special_tokens=True)
    assert len(via["decode_stream"]) == 3
    assert via["decode_empty"][0] == "INVALID_ARGUMENT"


# -- LangChain and LlamaIndex (their own environment: LangChain's last URL-taking release needs huggingface_hub<2) --

CLIENTS_SCRIPT = r'''
import json, sys
url, texts = sys.argv[1], json.loads(sys.argv[2])
out = {}
from langchain_huggingface import HuggingFaceEndpointEmbeddings
lc = HuggingFaceEndpointEmbeddings(model=url)
out["langchain_documents"] = lc.embed_documents(texts)
out["langchain_query"] = lc.embed_query(texts[0])
from llama_index.embeddings.text_embeddings_inference import TextEmbeddingsInference
li = TextEmbeddingsInference(model_name="sentence-transformers/all-MiniLM-L6-v2", base_url=url, timeout=60)
out["llamaindex_texts"] = li.get_text_embedding_batch(texts)
out["llamaindex_query"] = li.get_query_embedding(texts[0])
print(json.dumps(out))
'''


def test_langchain_and_llamaindex(stack, reference):
    assert Path(TEI_PYTHON).exists(), "the TEI clients' environment (.venv-tei) is missing: run `make test`"
    r = subprocess.run([TEI_PYTHON, "-c", CLIENTS_SCRIPT, stack.http_url, json.dumps(TEXTS)], capture_output=True, text=True, timeout=120,
                       cwd="/", env={**os.environ, "HF_HUB_OFFLINE": "0"})  # the clients talk to 127.0.0.1 only
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    want = reference.encode(TEXTS)
    close(out["langchain_documents"], want)  # POST / with {"inputs": [...]}
    close(out["langchain_query"], want[0])
    close(out["llamaindex_texts"], want)  # POST /embed with {"inputs": [...], "truncate": true}
    close(out["llamaindex_query"], want[0])


# -- keys, and TEI's 429 ---------------------------------------------------------------------------------------

KEY = "sk-tei-test-key-0123456789"


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    cfg = stack_config()
    path = tmp_path_factory.mktemp("tei-keys") / "keys.yaml"
    path.write_text(f"keys:\n  - name: tei\n    key: {KEY}\n")
    cfg.auth.keys_file = str(path)
    cfg.limits.max_concurrent_requests = 2
    with Stack(cfg.validate(), log_dir=tmp_path_factory.mktemp("tei-secured-logs")) as s:
        yield s


@pytest.mark.parametrize("path, payload", [("/embed", {"inputs": "hi"}), ("/", {"inputs": "hi"}), ("/tokenize", {"inputs": "hi"}),
                                           ("/decode", {"ids": [101]}), ("/embed_all", {"inputs": "hi"})])
def test_keys_bearer_over_http(secured, path, payload):
    for headers in ({}, {"Authorization": f"Bearer {KEY[:-2]}xx"}, {"X-API-KEY": KEY}, {"Authorization": f"Basic {KEY}"}):
        tei_error(requests.post(secured.http_url + path, json=payload, headers=headers, timeout=30), 401, "Unauthorized")
    r = requests.post(secured.http_url + path, json=payload, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert r.status_code == 200, r.text
    tei_error(requests.get(secured.http_url + "/info", timeout=30), 401)
    assert requests.get(secured.http_url + "/info", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).status_code == 200


def test_keys_with_the_hub_client(secured, reference):
    import huggingface_hub.constants
    from huggingface_hub import InferenceClient
    from huggingface_hub.errors import HfHubHTTPError

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        close(InferenceClient(model=secured.http_url, api_key=KEY).feature_extraction(TEXTS[0]), reference.encode([TEXTS[0]]))
        with pytest.raises(HfHubHTTPError) as e:
            InferenceClient(model=secured.http_url, api_key="sk-wrong").feature_extraction(TEXTS[0])
        assert e.value.response.status_code == 401


def test_keys_bearer_over_grpc(secured, tei_stub):
    script = r'''
import sys, json
sys.path.insert(0, sys.argv[1])
import grpc, tei_pb2 as pb, tei_pb2_grpc as pbg
out = []
with grpc.insecure_channel(sys.argv[2]) as ch:
    for md in ([], [("authorization", "Bearer nope")], [("authorization", "Bearer " + sys.argv[3])]):
        try:
            pbg.EmbedStub(ch).Embed(pb.EmbedRequest(inputs="hi"), metadata=md, timeout=10)
            out.append("OK")
        except grpc.RpcError as e:
            out.append(e.code().name)
        try:
            list(pbg.EmbedStub(ch).EmbedStream(iter([pb.EmbedRequest(inputs="hi")]), metadata=md, timeout=10))
            out.append("OK")
        except grpc.RpcError as e:
            out.append(e.code().name)
print(json.dumps(out))
'''
    for target in (secured.server_targets[0], secured.envoy_target):
        r = subprocess.run([sys.executable, "-c", script, str(tei_stub), target, KEY], capture_output=True, text=True, timeout=60,
                           env={**os.environ, "PYTHONPATH": ""})
        assert r.returncode == 0, r.stderr[-2000:]
        assert json.loads(r.stdout) == ["UNAUTHENTICATED"] * 4 + ["OK", "OK"]


def test_overload_is_tei_429_while_streams_wait(secured, tei_stub, reference):
    """At the server's limit (2 requests here) a request is TEI's 429 at once; a stream's requests wait instead."""
    auth = {"Authorization": f"Bearer {KEY}"}
    heavy = {"inputs": [f"{i} " + LONG for i in range(48)], "truncate": True}
    stream_done = {}

    def stream():
        script = r'''
import sys, json
sys.path.insert(0, sys.argv[1])
import grpc, tei_pb2 as pb, tei_pb2_grpc as pbg
with grpc.insecure_channel(sys.argv[2]) as ch:
    out = pbg.EmbedStub(ch).EmbedStream(iter(pb.EmbedRequest(inputs=f"waiting stream {i}", normalize=True) for i in range(200)),
                                        metadata=[("authorization", "Bearer " + sys.argv[3])], timeout=120)
    print(json.dumps([list(x.embeddings)[:4] for x in out]))
'''
        r = subprocess.run([sys.executable, "-c", script, str(tei_stub), secured.envoy_target, KEY], capture_output=True, text=True,
                           timeout=180, env={**os.environ, "PYTHONPATH": ""})
        stream_done["result"] = r

    t = threading.Thread(target=stream)
    t.start()
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda _: requests.post(secured.http_url + "/embed", json=heavy, headers=auth, timeout=120), range(24)))
    t.join(180)
    statuses = sorted({r.status_code for r in answers})
    assert 429 in statuses and set(statuses) <= {200, 429}, statuses
    tei_error(next(r for r in answers if r.status_code == 429), 429, "Overloaded")
    r = stream_done["result"]
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout)
    assert len(got) == 200
    close([v for v in got], reference.encode([f"waiting stream {i}" for i in range(200)])[:, :4])


def test_tokenize_and_decode_streams_wait_for_a_place_rather_than_end(secured, tei_stub):
    """Tokenize and Decode hold a place among `limits.max_concurrent_requests` (2 here), and a stream runs several
    groups of its messages at once: a fast stream must wait for places, as EmbedStream does, not refuse itself."""
    script = r'''
import sys, json
sys.path.insert(0, sys.argv[1])
import grpc, tei_pb2 as pb, tei_pb2_grpc as pbg
md = [("authorization", "Bearer " + sys.argv[3])]
with grpc.insecure_channel(sys.argv[2]) as ch:
    stub = pbg.TokenizeStub(ch)
    tokens = [list(r.tokens) for r in stub.TokenizeStream(iter(pb.EncodeRequest(inputs=f"word {i}", add_special_tokens=True)
                                                           for i in range(400)), metadata=md, timeout=120)]
    texts = [r.text for r in stub.DecodeStream(iter(pb.DecodeRequest(ids=[101, 2773, 102], skip_special_tokens=True)
                                                      for _ in range(400)), metadata=md, timeout=120)]
    print(json.dumps([len(tokens), [t.id for t in tokens[7]], len(texts), sorted(set(texts))]))
'''
    r = subprocess.run([sys.executable, "-c", script, str(tei_stub), secured.envoy_target, KEY], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "PYTHONPATH": ""})
    assert r.returncode == 0, r.stderr[-2000:]
    n_tokens, seventh, n_texts, texts = json.loads(r.stdout)
    assert n_tokens == 400 and seventh[0] == 101 and seventh[-1] == 102 and len(seventh) == 4
    assert n_texts == 400 and texts == ["word"]


# -- in process: /health when the model does not serve, and the configuration knob -------------------------------


def test_health_is_503_unhealthy_when_the_model_does_not_serve():
    from service import errors
    from service.dialects import tei
    from service.dialects.tei.http_api import healthy

    class Registry:
        def peek(self, name):
            return "loading", None

    class Embedder:
        registry = Registry()

    assert asyncio.run(healthy(Embedder(), "")) is False
    err = errors.ServiceError(grpc.StatusCode.UNAVAILABLE, "unhealthy", reason="UNHEALTHY")
    assert tei.error_body(err) == {"error": "unhealthy", "error_type": "Unhealthy"} and tei.http_status(err) == 503


def test_tei_model_knob():
    from types import SimpleNamespace

    from service.dialects import tei

    assert tei.configured_model(SimpleNamespace(dialects=SimpleNamespace())) == ""
    assert tei.configured_model(SimpleNamespace(dialects=SimpleNamespace(model={"tei": "multilingual"}))) == "multilingual"


# -- fuzz: any JSON at any TEI route is a 200 or a 4xx in TEI's shape, never a 5xx --------------------------------

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
FIELDS = ["inputs", "normalize", "truncate", "truncation_direction", "prompt_name", "dimensions", "add_special_tokens", "ids",
          "skip_special_tokens", "source_sentence", "sentences", "parameters", "instances", "query", "texts"]
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**40), max_value=2**40), st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40), st.sampled_from(["Left", "right", "query", "", 101, 102, 7592]),
)
values = st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=4), st.dictionaries(st.sampled_from(FIELDS), c, max_size=3)), max_leaves=12)
bodies = st.dictionaries(st.one_of(st.sampled_from(FIELDS), st.text(max_size=6)), values, max_size=5)


@FUZZ
@given(body=bodies, path=st.sampled_from(["/embed", "/", "/embed_all", "/tokenize", "/decode", "/similarity", "/vertex", "/rerank",
                                          "/predict", "/invocations"]))
def test_tei_fuzz(stack, body, path):
    r = requests.post(stack.http_url + path, json=body, timeout=30)
    assert r.status_code < 500, (path, body, r.status_code, r.text[:300])
    assert r.headers.get("content-type", "").startswith("application/json"), (path, body, r.status_code, r.text[:300])
    if r.status_code == 200:
        data = r.json()
        if path in ("/embed", "/", "/embed_all", "/invocations", "/similarity"):
            assert all(np.isfinite(np.asarray(x, dtype=np.float64)).all() for x in data)
        if path == "/vertex":
            assert all(np.isfinite(np.asarray(x, dtype=np.float64)).all() for x in data["predictions"])
    else:
        tei_error(r, r.status_code)


TEI_ROUTES = {"/embed": ["inputs", "normalize", "truncate", "truncation_direction", "dimensions"], "/": ["inputs", "prompt_name", "truncate"],
              "/embed_all": ["inputs", "truncate", "truncation_direction"], "/tokenize": ["inputs", "add_special_tokens", "prompt_name"],
              "/decode": ["ids", "skip_special_tokens"], "/similarity": ["inputs", "source_sentence", "sentences", "parameters"],
              "/vertex": ["instances", "inputs", "normalize"], "/rerank": ["query", "texts"]}


def nest(value, depth: int, as_list: bool) -> str:
    inner = json.dumps(value)
    return ("[" * depth + inner + "]" * depth) if as_list else ('{"a":' * depth + inner + "}" * depth)


@FUZZ
@given(route=st.sampled_from(list(TEI_ROUTES)), depth=st.integers(min_value=1, max_value=3000), as_list=st.booleans(),
       field_index=st.integers(min_value=0, max_value=4),
       leaf=st.one_of(st.text(max_size=5), st.integers(min_value=-(2**70), max_value=2**70), st.floats(allow_nan=False, allow_infinity=False)))
def test_tei_any_nesting_depth_is_a_clear_answer(stack, route, depth, as_list, field_index, leaf):
    names = TEI_ROUTES[route]
    raw = '{"%s":%s}' % (names[field_index % len(names)], nest(leaf, depth, as_list))
    r = requests.post(stack.http_url + route, data=raw, headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code < 500, (route, depth, r.status_code, r.text[:300])
    if r.status_code >= 400:
        tei_error(r, r.status_code)


@FUZZ
@given(route=st.sampled_from(list(TEI_ROUTES)), size=st.integers(min_value=0, max_value=6000),
       item=st.sampled_from([0, 101, 2**31, 2**53, -1, 1.5, 1e308, "a", "", None, True, [], {}, [1, 2], [[1]]]),
       field_index=st.integers(min_value=0, max_value=4))
def test_tei_huge_arrays_and_huge_numbers_are_a_clear_answer(stack, route, size, item, field_index):
    names = TEI_ROUTES[route]
    r = requests.post(stack.http_url + route, json={names[field_index % len(names)]: [item] * size}, timeout=120)
    assert r.status_code < 500, (route, size, item, r.status_code, r.text[:300])
    if r.status_code >= 400:
        tei_error(r, r.status_code)


# -- /health without a key, `dialects.model.tei`, and dialects switched off -------------------------------------


def test_health_needs_no_key_tei_routes_follow_the_knob_and_switched_off_dialects_are_gone(tmp_path_factory):
    import time

    from service.config import ModelConfig, default_model_path

    cfg = stack_config()
    keys = tmp_path_factory.mktemp("tei-knob-keys") / "keys.yaml"
    keys.write_text(f"keys:\n  - name: tei\n    key: {KEY}\n")
    cfg.auth.keys_file = str(keys)
    cfg.models.append(ModelConfig(id="second-model", path=default_model_path(), precision="fp32", max_seq_length=128, aliases=["second"]))
    cfg.dialects.model = {"tei": "second"}
    cfg.dialects.disabled = ["ollama", "cohere", "gemini"]  # switched off: Envoy's routes follow
    auth = {"Authorization": f"Bearer {KEY}"}
    with Stack(cfg.validate(), log_dir=tmp_path_factory.mktemp("tei-knob-logs")) as s:
        deadline = time.monotonic() + 120
        while (r := requests.get(s.http_url + "/health", timeout=10)).status_code == 503:  # no key; 503 while it loads
            assert r.json() == {"error": "unhealthy", "error_type": "Unhealthy"} and time.monotonic() < deadline
            time.sleep(0.5)
        assert r.status_code == 200 and r.content == b"", r.text
        tei_error(requests.get(s.http_url + "/info", timeout=10), 401)
        info = requests.get(s.http_url + "/info", headers=auth, timeout=10).json()
        assert info["model_id"] == "second-model" and info["max_input_length"] == 128, info
        assert post(s, "/embed", {"inputs": "hi"}, headers=auth).headers["x-model-id"] == "second-model"
        for route, body in [("/api/embed", {"model": "m", "input": "hi"}), ("/v2/embed", {"model": "m", "texts": ["hi"]}),
                            ("/v1beta/models/m:embedContent", {"content": {"parts": [{"text": "hi"}]}})]:
            r = requests.post(s.http_url + route, json=body, headers=auth, timeout=10)
            assert r.status_code == 404, (route, r.status_code, r.text[:200])
        assert requests.post(s.http_url + "/v1/embeddings", json={"model": "second", "input": "hi"}, headers=auth, timeout=30).status_code == 200


# -- in process: the stream machinery's order and bounds --------------------------------------------------------


def test_streams_answer_in_order_and_never_read_far_ahead_of_a_slow_caller():
    import random

    from service import errors, streams

    pulled = []

    async def requests_(n):
        for i in range(n):
            pulled.append(i)
            yield i

    async def run(group):
        await asyncio.sleep(random.random() / 200)  # groups finish out of order
        return [x * 10 for x in group], None

    async def main():
        got = [x async for x in streams.in_order(requests_(3000), run, group_size=16, size=lambda m: 8)]
        assert got == [i * 10 for i in range(3000)]
        # A caller that reads one answer and stops: the stream reads only what its window and inbox hold.
        pulled.clear()
        stream = streams.in_order(requests_(100_000), run, group_size=16, size=lambda m: 8)
        assert await stream.__anext__() == 0
        await asyncio.sleep(0.2)
        assert len(pulled) <= 16 * (streams.WINDOW + 3), len(pulled)
        await stream.aclose()

        async def failing(group):
            if 7 in group:
                i = group.index(7)
                return [x * 10 for x in group[:i]], errors.invalid_argument("seven")
            return [x * 10 for x in group], None

        seen = []
        with pytest.raises(errors.ServiceError, match="seven"):
            async for x in streams.in_order(requests_(50), failing, group_size=4, size=lambda m: 8):
                seen.append(x)
        assert seen == [i * 10 for i in range(7)]

    asyncio.run(main())


def test_answers_that_grow_with_tokens_are_refused_before_the_work(stack):
    """A 174 KiB body asking every token's embedding (or every token's details) would build an answer of hundreds of
    megabytes: refused at once with TEI's 422, before anything is computed."""
    many = ["word " * 250] * 128
    r = requests.post(stack.http_url + "/embed_all", json={"inputs": many, "truncate": True}, timeout=60)
    assert "max_output_values" in tei_error(r, 422, "Validation")["error"]
    r = requests.post(stack.http_url + "/tokenize", json={"inputs": ["word " * 39_000] * 30}, timeout=60)
    assert "max_output_values" in tei_error(r, 422, "Validation")["error"]


def test_a_malformed_stream_message_is_the_callers_error(stack):
    import asyncio

    async def main():
        from tei.v1 import tei_pb2

        async with grpc.aio.insecure_channel(stack.envoy_target) as ch:
            stream = ch.stream_stream("/tei.v1.Embed/EmbedStream", request_serializer=lambda b: b, response_deserializer=lambda b: b)

            async def requests_():
                yield tei_pb2.EmbedRequest(inputs="hello").SerializeToString()
                yield b"\x0a\xff\xff\xff\xff\x0f"  # a length of 4 GiB, then nothing

            answers = 0
            with pytest.raises(grpc.aio.AioRpcError) as e:
                async for _ in stream(requests_(), timeout=30):
                    answers += 1
            return answers, e.value.code()

    answers, code = asyncio.run(main())
    assert (answers, code) == (1, grpc.StatusCode.INVALID_ARGUMENT)
    assert "Backend error" not in stack.logs(tail=20000)


# -- a stream outlives the route timeout ------------------------------------------------------------------------


def test_a_stream_through_envoy_outlives_the_route_timeout(tmp_path):
    """Bulk ingestion streams for minutes: Envoy's route timeout (2 s here) cuts unary calls, never a live stream."""
    from tei.v1 import tei_pb2 as pb
    from tei.v1 import tei_pb2_grpc as pbg

    cfg = stack_config()
    cfg.envoy.route_timeout_seconds = 2
    with Stack(cfg.validate(), log_dir=tmp_path) as s, grpc.insecure_channel(s.envoy_target) as ch:

        def slowly():
            for i in range(8):  # 4 s in all, twice the route timeout
                yield pb.EmbedRequest(inputs=f"slow stream {i}", normalize=True)
                threading.Event().wait(0.5)

        answers = list(pbg.EmbedStub(ch).EmbedStream(slowly(), timeout=60))
        assert len(answers) == 8 and all(len(a.embeddings) == 384 for a in answers)
