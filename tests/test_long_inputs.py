"""Long documents (issue 14): never a 400 for an ordinary RAG chunk, never a silent loss.

The chunking is checked against its definition (the token-weighted mean of the windows embedded one by one, in
fp32, ≤ 1e-5), a one-window input is unchanged, every response says what was truncated or chunked, the caps hold,
and a real ingestion pipeline (the OpenAI SDK, LangChain's OpenAIEmbeddings) ingests 1,000+-token chunks with
every request a 200. That chunking helps retrieval is measured in `make bench` (bench/RESULTS.md).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from service import errors
from service.config import Config
from service.engine.cache import EmbeddingCache
from service.engine.long_inputs import windows
from service.engine.models import ModelRegistry
from service.engine.pipeline import EmbedRequest, Embedder

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
WORDS = ("the river carried silt past towns where bakers argued about bread while engineers measured bridges "
         "and children counted boats under a pale sky that promised rain by evening").split()


def document(n_words: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    words = rng.choice(WORDS, n_words)
    return " ".join(f"{w}{'.' if i % 13 == 12 else ''}" for i, w in enumerate(words))


@pytest.fixture(scope="module")
def engine():
    cfg = Config()
    cfg.models[0].precision = "fp32"
    cfg.limits.max_windows_per_request = 64
    cfg.validate()
    registry = ModelRegistry(cfg.models, cfg.limits)
    registry.load_now()
    pool = ThreadPoolExecutor(2)
    yield Embedder(registry, cfg.limits, EmbeddingCache(0), pool)
    registry.stop()
    pool.shutdown()


async def test_a_long_input_is_the_weighted_mean_of_its_windows(engine):
    text = document(700, seed=1)  # ~800 tokens: windows of 256 sharing 32
    model = await engine.registry.get("")
    enc = model.tokenizer.encode_detailed([text])[0]
    ids = np.asarray(enc.ids, dtype=np.int64)
    parts = windows(ids, enc.special_tokens_mask, 256, 0, engine.limits.chunk_overlap_tokens)
    assert len(parts) >= 3 and all(len(p) <= 256 for p in parts)
    assert all(p[0] == ids[0] and p[-1] == ids[-1] for p in parts)  # [CLS] … [SEP] in every window
    one_by_one = (await engine.embed(EmbedRequest(inputs=[p for p in parts], normalize=False, truncate=False))).vectors
    lengths = np.array([len(p) for p in parts], dtype=np.float64)
    want = (one_by_one.astype(np.float64) * lengths[:, None]).sum(axis=0) / lengths.sum()
    want /= np.linalg.norm(want)
    got = await engine.embed(EmbedRequest(inputs=[text], long_inputs="chunk"))
    assert np.abs(got.vectors[0] - want).max() <= 1e-5
    assert got.chunked == 1 and got.truncated == 0
    assert got.token_counts == [len(ids)] < [int(lengths.sum())]  # the input's tokens, once (not the windows' repeats)


async def test_an_input_of_one_window_is_unchanged(engine, reference):
    model = await engine.registry.get("")
    text = document(400, seed=2)
    enc = model.tokenizer.encode_detailed([text])[0]
    exact = model.tokenizer.decode([enc.ids[1:255]])[0]  # 254 words' worth: 256 tokens with [CLS] and [SEP]
    n = len(model.tokenizer.encode_detailed([exact])[0].ids)
    assert n <= 256
    got = await engine.embed(EmbedRequest(inputs=[exact], long_inputs="chunk"))
    assert got.chunked == 0
    assert np.abs(got.vectors[0] - reference.encode([exact])[0]).max() <= 1e-5


async def test_policies_and_caps(engine):
    text = document(700, seed=3)
    cut = await engine.embed(EmbedRequest(inputs=[text, "short"], long_inputs="truncate"))
    assert (cut.truncated, cut.chunked) == (1, 0) and cut.token_counts[0] == 256
    with pytest.raises(errors.ServiceError) as e:
        await engine.embed(EmbedRequest(inputs=["short", text], long_inputs="refuse"))
    assert e.value.reason == "context_length_exceeded" and "Input 1 is" in e.value.message
    with pytest.raises(errors.ServiceError) as e:
        await engine.embed(EmbedRequest(inputs=[document(9000, seed=4)], long_inputs="chunk"))
    assert e.value.reason == "INPUT_TOO_LONG" and "8192" in e.value.message
    with pytest.raises(errors.ServiceError) as e:  # 30 inputs of 3 windows: past this engine's 64 windows
        await engine.embed(EmbedRequest(inputs=[document(700, seed=i) for i in range(30)], long_inputs="chunk"))
    assert e.value.reason == "TOO_MANY_WINDOWS"
    with pytest.raises(errors.ServiceError) as e:
        await engine.embed(EmbedRequest(inputs=[text], long_inputs="chunk", token_embeddings=True))
    assert e.value.reason == "CHUNKING_WITH_TOKEN_EMBEDDINGS"
    # Token ids (used as given) are chunked too, as plain slices.
    ids = list(range(1000, 1700))
    got = await engine.embed(EmbedRequest(inputs=[ids], long_inputs="chunk"))
    assert got.chunked == 1 and got.token_counts[0] == 700


async def test_the_windows_cap_binds_a_request_that_chunks_and_no_other(engine):
    """More inputs than this engine's 64 windows, each fitting one window, is an ordinary batch; the same with one
    input that is chunked is past the cap, wherever that input stands (the cheap check before admission and the
    exact one after tokenizing agree)."""
    fitting_texts = [document(150, seed=100 + i) for i in range(80)]  # 150 words: long enough to be counted
    fitting_ids = [list(range(2000 + i, 2200 + i)) for i in range(80)]
    assert len((await engine.embed(EmbedRequest(inputs=fitting_texts, long_inputs="chunk"))).vectors) == 80
    assert len((await engine.embed(EmbedRequest(inputs=fitting_ids, long_inputs="chunk"))).vectors) == 80
    long_text, long_ids = document(700, seed=5), list(range(1000, 1700))
    for inputs in ([long_text, *fitting_texts], [*fitting_texts, long_text], [long_ids, *fitting_ids], [*fitting_ids, long_ids]):
        with pytest.raises(errors.ServiceError) as e:
            await engine.embed(EmbedRequest(inputs=inputs, long_inputs="chunk"))
        assert e.value.reason == "TOO_MANY_WINDOWS", e.value.message


# -- through Envoy, with real ingestion clients ------------------------------------------------------------------


def test_responses_say_what_was_truncated_and_chunked(stack, reference):
    long = document(900, seed=5)
    r = requests.post(stack.http_url + "/v1/embeddings", json={"input": [long, "short"], "model": MODEL}, timeout=60)
    assert r.status_code == 200, r.text
    assert (r.headers["x-chunked-inputs"], r.headers["x-truncated-inputs"]) == ("1", "0")
    # The input's own tokens, once (issue 30.D): the windows repeat [CLS]/[SEP] and 32 tokens of overlap, which were
    # counted too (1,000 words billed 1,138 tokens).
    own = sum(len(reference.tokenizer(t, truncation=False)["input_ids"]) for t in (long, "short"))
    assert r.json()["usage"]["prompt_tokens"] == own > 900
    r = requests.post(stack.http_url + "/ml/v1alpha/embedding:embed", json={"inputs": [{"text": long}]}, timeout=60)
    assert r.status_code == 200 and (r.headers["x-chunked-inputs"], r.headers["x-truncated-inputs"]) == ("0", "1")
    assert r.json()["usage"]["tokenCount"] == 256
    metrics = requests.get(stack.metrics_urls[0], timeout=10).text
    assert 'embedding_long_inputs_total{action="chunked",model="%s"}' % MODEL in metrics
    assert 'embedding_long_inputs_total{action="truncated",model="%s"}' % MODEL in metrics
    # Native gRPC says it in trailers.
    import grpc

    from ai.inworld.embedding.v1alpha import embedding_service_pb2 as pb
    from ai.inworld.embedding.v1alpha import embedding_service_pb2_grpc as pb_grpc

    with grpc.insecure_channel(stack.server_targets[0]) as ch:
        request = pb.EmbedRequest(inputs=[pb.EmbedRequest.Input(text=long), pb.EmbedRequest.Input(text="short")])
        _, call = pb_grpc.EmbeddingServiceStub(ch).Embed.with_call(request, timeout=60)
        trailers = dict(call.trailing_metadata())
    assert (trailers["x-truncated-inputs"], trailers["x-chunked-inputs"]) == ("1", "0")


def test_a_request_past_the_windows_cap_is_refused_in_the_dialects_shape(stack):
    # 150 inputs of ~2,000 tokens: each under limits.max_input_tokens, together past limits.max_windows_per_request
    # (1,024 windows of 256): refused before any of it is embedded, in OpenAI's envelope.
    inputs = [document(1800, seed=i) for i in range(150)]
    r = requests.post(stack.http_url + "/v1/embeddings", json={"input": inputs, "model": MODEL}, timeout=120)
    assert r.status_code in (400, 413), r.text[:300]
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and "max_windows_per_request" in error["message"], error


def test_the_openai_sdk_and_langchain_ingest_long_chunks(stack):
    from langchain_openai import OpenAIEmbeddings
    from openai import OpenAI

    chunks = [document(n, seed=100 + i) for i, n in enumerate([300, 700, 1000, 1200, 1500, 60, 900, 1100])]
    client = OpenAI(base_url=stack.http_url + "/v1", api_key="unused", max_retries=0)
    data = client.embeddings.create(model=MODEL, input=chunks).data
    sdk = np.array([d.embedding for d in data])
    lc = OpenAIEmbeddings(model=MODEL, base_url=stack.http_url + "/v1", api_key="unused", check_embedding_ctx_length=False,
                          max_retries=0, chunk_size=3)  # several requests, as an ingestion pipeline sends them
    docs = np.array(lc.embed_documents(chunks))
    query = np.array(lc.embed_query(chunks[3]))
    for vectors in (sdk, docs):
        assert vectors.shape == (len(chunks), 384) and np.isfinite(vectors).all()
        assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert np.abs(sdk - docs).max() <= 1e-5 and np.abs(query - sdk[3]).max() <= 1e-5


@pytest.fixture(autouse=True, scope="module")
def _no_proxy():
    old = os.environ.get("NO_PROXY")
    os.environ["NO_PROXY"] = "127.0.0.1,localhost"
    yield
    if old is None:
        os.environ.pop("NO_PROXY", None)
    else:
        os.environ["NO_PROXY"] = old


async def test_token_ids_and_text_of_one_long_input_are_different_inputs():
    """A text's windows repeat [CLS]/[SEP]; the same ids sent as token ids are cut as plain slices: two vectors, and
    neither may be served from the other's cache entry."""
    cfg = Config()
    cfg.models[0].precision = "fp32"
    cfg.validate()
    registry = ModelRegistry(cfg.models, cfg.limits)
    registry.load_now()
    pool = ThreadPoolExecutor(2)
    cached = Embedder(registry, cfg.limits, EmbeddingCache(1 << 24), pool)
    try:
        text = document(700, seed=9)
        model = await cached.registry.get("")
        ids = list(model.tokenizer.encode_detailed([text])[0].ids)
        as_ids = await cached.embed(EmbedRequest(inputs=[ids], long_inputs="chunk"))
        as_text = await cached.embed(EmbedRequest(inputs=[text], long_inputs="chunk"))
        assert as_text.cache_hits == 0
        fresh = await Embedder(registry, cfg.limits, EmbeddingCache(0), pool).embed(EmbedRequest(inputs=[text], long_inputs="chunk"))
        assert np.abs(as_text.vectors - fresh.vectors).max() <= 1e-6
        assert np.abs(as_ids.vectors - fresh.vectors).max() > 1e-4
    finally:
        registry.stop()
        pool.shutdown()


async def test_a_huge_input_is_tokenized_only_as_far_as_it_is_read(engine):
    """Truncating or refusing reads the first 256 tokens: a 200,000-character input gives exactly the ids of its whole
    tokenization cut to 256, from a clipped part of it; whitespace that holds no token is tokenized whole."""
    model = await engine.registry.get("")
    huge = document(30_000, seed=11)[:199_000]
    want = model.tokenizer.encode_detailed([huge], truncate=True)[0].ids
    got = await engine.embed(EmbedRequest(inputs=[huge], long_inputs="truncate"))
    assert got.truncated == 1 and got.token_counts == [len(want)]
    from service.engine import long_inputs

    tokenized = long_inputs.tokenize(model.tokenizer, [huge], "truncate", "right", "input", 0, 8192, 1024, 32)
    assert list(tokenized.items[0].ids) == list(want)
    spaced = "word " + " " * 150_000 + "end"  # two tokens and a lot of nothing
    tokenized = long_inputs.tokenize(model.tokenizer, [spaced], "refuse", "right", "input", 0, 8192, 1024, 32)
    assert len(tokenized.items[0]) == 4
    with pytest.raises(errors.ServiceError) as e:
        await engine.embed(EmbedRequest(inputs=[huge], long_inputs="refuse"))
    assert "at least" in e.value.message and "256 tokens" in e.value.message
    with pytest.raises(errors.ServiceError) as e:  # chunking: refused by its word count before any tokenizing
        await engine.embed(EmbedRequest(inputs=[huge], long_inputs="chunk"))
    assert e.value.reason == "INPUT_TOO_LONG" and "words" in e.value.message


def test_a_callers_token_limit_cuts_the_text_never_the_prompt():
    """Issue 30 review: Ollama's num_ctx and Cohere's max_tokens cut an input's text; its special tokens and the model's
    prompt stay (as in a window), and a limit with no room for text is a 400, never the prompt alone."""
    import numpy as np
    import pytest

    from service import errors
    from service.engine.long_inputs import Tokenized, cap
    from service.engine.tokenizer import Tokens

    def one(ids):
        out = Tokenized()
        a = np.asarray(ids, dtype=np.int64)
        out.add([Tokens(a, np.zeros_like(a))], a.tobytes())
        return out

    # [CLS] p1 p2 t1 … t6 [SEP]: prompt of 2 tokens, 6 of text; a limit of 6 keeps [CLS] p1 p2 + 2 of text + [SEP]
    ids = [101, 7, 8, 1, 2, 3, 4, 5, 6, 102]
    out = one(ids)
    cap(out, 6, (1, 1), 2, "truncate", "right", "input", set())
    assert out.items[0].ids.tolist() == [101, 7, 8, 1, 2, 102] and out.lengths == [6] and out.truncated == 1
    assert out.keys[0] == np.asarray([101, 7, 8, 1, 2, 102], dtype=np.int64).tobytes()
    out = one(ids)
    cap(out, 6, (1, 1), 2, "truncate", "left", "input", set())
    assert out.items[0].ids.tolist() == [101, 7, 8, 5, 6, 102]
    out = one(ids)
    cap(out, 6, (1, 1), 2, "truncate", "right", "input", {0})  # the model's limit cut it already: counted once
    assert out.truncated == 0
    with pytest.raises(errors.ServiceError) as e:
        cap(one(ids), 4, (1, 1), 2, "truncate", "right", "input", set())
    assert e.value.reason == "MAX_TOKENS_TOO_SMALL" and "take 4" in e.value.message
    with pytest.raises(errors.ServiceError) as e:
        cap(one(ids), 6, (1, 1), 2, "refuse", "right", "input", set())
    assert e.value.reason == "context_length_exceeded"
    fits = one([101, 1, 102])
    cap(fits, 3, (1, 1), 0, "refuse", "right", "input", set())  # within the limit: as it is
    assert fits.items[0].ids.tolist() == [101, 1, 102] and fits.truncated == 0
