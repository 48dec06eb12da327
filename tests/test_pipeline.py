"""The core pipeline in process, on the real model, against `SentenceTransformer.encode`."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from service import errors
from service.config import Config
from service.engine.cache import EmbeddingCache
from service.engine.models import ModelRegistry
from service.engine.pipeline import EmbedRequest, Embedder

TEXTS = [
    "Hello Inworld!",
    "A much longer sentence about embeddings, batching and the cost of padding on a CPU.",
    "短い日本語の文です。",
    "ok",
    " ".join(["padding"] * 300),  # longer than the model's 256 tokens: truncated like sentence-transformers
    "Emoji 🙂 and accents: café, naïve, Zürich.",
]


@pytest.fixture(scope="module")
def registry():
    cfg = Config().validate()
    cfg.models[0].precision = "fp32"
    reg = ModelRegistry(cfg.models, cfg.limits)
    reg.load_now()
    yield reg
    reg.stop()


@pytest.fixture
def embedder(registry):
    cfg = Config().validate()
    with ThreadPoolExecutor(2) as pool:
        yield Embedder(registry, cfg.limits, EmbeddingCache(cfg.cache.max_bytes), pool)


async def test_vectors_equal_sentence_transformers_in_order(embedder, reference):
    result = await embedder.embed(EmbedRequest(inputs=TEXTS))
    want = reference.encode(TEXTS)
    assert result.vectors.shape == want.shape
    assert np.abs(result.vectors - want).max() <= 1e-5
    assert result.model == "sentence-transformers/all-MiniLM-L6-v2"
    want_tokens = [len(reference.tokenizer(t, truncation=True, max_length=256)["input_ids"]) for t in TEXTS]
    assert result.token_counts == want_tokens


async def test_concurrent_requests_get_their_own_vectors(embedder, reference):
    want = reference.encode(TEXTS)
    results = await asyncio.gather(*[embedder.embed(EmbedRequest(inputs=[t], use_cache=False)) for t in TEXTS * 3])
    for i, r in enumerate(results):
        assert np.abs(r.vectors[0] - want[i % len(TEXTS)]).max() <= 1e-5


async def test_unnormalized_is_the_raw_pooled_vector(embedder, reference):
    from sentence_transformers import SentenceTransformer

    raw_model = SentenceTransformer(modules=[reference[0], reference[1]], device="cpu")
    result = await embedder.embed(EmbedRequest(inputs=TEXTS[:3], normalize=False))
    assert np.abs(result.vectors - raw_model.encode(TEXTS[:3])).max() <= 1e-5
    assert not np.allclose(np.linalg.norm(result.vectors, axis=1), 1.0)


async def test_dimensions_truncate_and_renormalize(embedder, reference):
    result = await embedder.embed(EmbedRequest(inputs=TEXTS[:2], dimensions=64))
    full = reference.encode(TEXTS[:2])[:, :64]
    want = full / np.linalg.norm(full, axis=1, keepdims=True)
    assert result.vectors.shape == (2, 64)
    assert np.abs(result.vectors - want).max() <= 1e-5


async def test_over_long_input_refused_when_not_truncating(embedder, reference):
    with pytest.raises(errors.ServiceError) as e:
        await embedder.embed(EmbedRequest(inputs=[TEXTS[4]], truncate=False))
    assert e.value.code.name == "INVALID_ARGUMENT"
    full = len(reference.tokenizer(TEXTS[4])["input_ids"])
    assert f"{full} tokens" in e.value.message and "256" in e.value.message


async def test_left_truncation_keeps_the_end(embedder, reference):
    text = "start " * 300 + "the very end of the text"
    result = await embedder.embed(EmbedRequest(inputs=[text], truncation_direction="left"))
    tok = reference.tokenizer
    ids = tok(text, add_special_tokens=False)["input_ids"][-254:]
    tail = tok.decode(ids)
    assert np.abs(result.vectors[0] - reference.encode(tail)).max() <= 1e-4
    assert result.token_counts == [256]


async def test_token_id_inputs_are_used_as_given(embedder, reference):
    ids = reference.tokenizer("Hello Inworld!")["input_ids"]  # with [CLS] ... [SEP]
    result = await embedder.embed(EmbedRequest(inputs=[ids]))
    assert np.abs(result.vectors[0] - reference.encode("Hello Inworld!")).max() <= 1e-5
    with pytest.raises(errors.ServiceError):
        await embedder.embed(EmbedRequest(inputs=[[1, 2, 10**9]]))


async def test_cache_hits_give_identical_vectors(embedder):
    first = await embedder.embed(EmbedRequest(inputs=TEXTS[:3]))
    second = await embedder.embed(EmbedRequest(inputs=TEXTS[:3]))
    assert first.cache_hits == 0 and second.cache_hits == 3
    assert np.array_equal(first.vectors, second.vectors)
    bypass = await embedder.embed(EmbedRequest(inputs=TEXTS[:3], use_cache=False))
    assert bypass.cache_hits == 0
    assert embedder.cache.hit_rate > 0


def test_cache_is_bounded_by_memory():
    cache = EmbeddingCache(max_bytes=10_000)
    for i in range(100):
        cache.put(EmbeddingCache.key("m", np.array([i]), 0), np.zeros(384, dtype=np.float32))
    assert cache.bytes <= 10_000
    assert 0 < len(cache) < 100
    assert cache.get(EmbeddingCache.key("m", np.array([99]), 0)) is not None  # newest kept
    assert cache.get(EmbeddingCache.key("m", np.array([0]), 0)) is None  # oldest evicted


@pytest.mark.parametrize(
    "req, needle",
    [
        (EmbedRequest(inputs=[]), "At least one input"),
        (EmbedRequest(inputs=[""]), "empty string"),
        (EmbedRequest(inputs=["a"] * 2049), "Too many inputs"),
        (EmbedRequest(inputs=["a"], dimensions=0), "dimensions"),
        (EmbedRequest(inputs=["a"], dimensions=385), "dimensions"),
        (EmbedRequest(inputs=["a"], prompt_name="nope"), "prompt_name"),
        (EmbedRequest(inputs=["a", ["b"]]), "Input 1"),  # type: ignore[list-item]
    ],
)
async def test_invalid_requests(embedder, req, needle):
    with pytest.raises(errors.ServiceError) as e:
        await embedder.embed(req)
    assert e.value.code.name == "INVALID_ARGUMENT"
    assert needle in e.value.message


async def test_unknown_model_lists_the_served_ones(embedder):
    with pytest.raises(errors.ServiceError) as e:
        await embedder.embed(EmbedRequest(inputs=["a"], model="text-embedding-3-small"))
    assert e.value.code.name == "NOT_FOUND"
    assert "sentence-transformers/all-MiniLM-L6-v2" in e.value.message


async def test_tokenize_and_decode_hold_a_place_among_the_concurrent_requests(registry):
    """The Tokenize and Decode APIs run on the tokenizer pool that large embedding requests use: a flood of them must
    be refused like a flood of embeddings (429 at once), not queue on the pool without bound."""
    import threading

    from service.engine import tokenization

    cfg = Config().validate()
    cfg.limits.max_concurrent_requests = 1
    release = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        embedder = Embedder(registry, cfg.limits, EmbeddingCache(0), pool)
        pool.submit(release.wait, 30)  # the pool is busy: the first call waits there, holding its place
        try:
            first = asyncio.ensure_future(tokenization.tokenize(embedder, "", ["held"]))
            await asyncio.sleep(0.05)
            assert embedder.inflight == 1
            for call in (tokenization.tokenize(embedder, "", ["refused"]), tokenization.decode(embedder, "", [[101, 102]]),
                         embedder.embed(EmbedRequest(inputs=["refused too"]))):
                with pytest.raises(errors.ServiceError) as refused:
                    await call
                assert refused.value.code.name == "RESOURCE_EXHAUSTED" and refused.value.retry_after >= 1
        finally:
            release.set()
        assert (await first).encodings[0].ids[0] == 101
        assert embedder.inflight == 0
        assert (await tokenization.decode(embedder, "", [[101, 7592, 102]]))[1] == ["hello"]
        assert embedder.inflight == 0


async def test_callers_waiting_for_a_model_to_load_hold_no_place(monkeypatch):
    """A flood of callers naming a model that is still loading waits without taking the places of requests being
    worked on: the model already loaded keeps serving (before, every place was held by a waiter and it answered 429).
    Waiters past `max_concurrent_requests` are told when to come back; the rest wake when the load ends."""
    import threading

    from service.config import ModelConfig
    from service.engine import models

    cfg = Config().validate()
    cfg.models[0].precision = "fp32"
    cfg.models.append(ModelConfig(id="slow/minilm", load="lazy", precision="fp32"))
    cfg.limits.max_concurrent_requests = 4
    loading = threading.Event()  # the lazy model's load stays in progress until this is set
    real_load = models.load_model

    def held_load(config, *args, **kwargs):
        if config.id == "slow/minilm":
            loading.wait(60)
        return real_load(config, *args, **kwargs)

    monkeypatch.setattr(models, "load_model", held_load)
    registry = ModelRegistry(cfg.models, cfg.limits)
    registry.load_now()
    try:
        with ThreadPoolExecutor(2) as pool:
            embedder = Embedder(registry, cfg.limits, EmbeddingCache(0), pool)
            waiting = [asyncio.ensure_future(embedder.embed(EmbedRequest(inputs=[f"waits {i}"], model="slow/minilm"))) for i in range(4)]
            await asyncio.sleep(0.3)
            assert registry.state("slow/minilm") == "loading" and not any(w.done() for w in waiting)
            served = await asyncio.gather(*[embedder.embed(EmbedRequest(inputs=[f"served {i}"], use_cache=False)) for i in range(4)])
            assert [r.vectors.shape for r in served] == [(1, 384)] * 4
            with pytest.raises(errors.ServiceError) as refused:
                await embedder.embed(EmbedRequest(inputs=["one waiter too many"], model="slow/minilm"))
            assert refused.value.reason == "MODEL_LOADING" and refused.value.retry_after >= 1
            loading.set()
            woken = await asyncio.wait_for(asyncio.gather(*waiting), 60)
            assert [r.model for r in woken] == ["slow/minilm"] * 4 and embedder.inflight == 0
    finally:
        loading.set()
        registry.stop()
