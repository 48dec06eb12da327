"""Every runtime mode against the fp32 reference, on a sample of the benchmark corpus.

The bars: fp32 modes equal sentence-transformers within 1e-5; a reduced-precision mode is offered only if
its cosine to fp32 stays ≥ 0.999 on every text; the default (auto) mode must stay ≥ 0.9999.
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from service.bench.corpus import make_corpus
from service.config import Config
from service.engine.cache import EmbeddingCache
from service.engine.models import ModelRegistry, resolve_mode
from service.engine.pipeline import EmbedRequest, Embedder
from service.runtimes import MODES

SAMPLE = 192


@pytest.fixture(scope="module")
def sample(reference):
    corpus = make_corpus(list(reference.tokenizer.get_vocab()))
    # Every 11th text: short and long ones alike, spread over the whole corpus.
    texts = corpus[:: len(corpus) // SAMPLE][:SAMPLE]
    return texts, reference.encode(texts, batch_size=32)


def embed_with(runtime: str, precision: str, texts: list[str], one_at_a_time: bool = False) -> np.ndarray:
    cfg = Config().validate()
    cfg.models[0].runtime, cfg.models[0].precision = runtime, precision
    registry = ModelRegistry(cfg.models, cfg.limits)
    registry.load_now()
    try:
        assert registry.state(cfg.models[0].id) == "ready"
        with ThreadPoolExecutor(2) as pool:
            embedder = Embedder(registry, cfg.limits, EmbeddingCache(0), pool)

            async def run():
                if one_at_a_time:  # each a lone request, as a search query arrives
                    return np.concatenate([(await embedder.embed(EmbedRequest(inputs=[t]))).vectors for t in texts])
                # Concurrent requests, so the batcher mixes them as under load.
                parts = await asyncio.gather(*[embedder.embed(EmbedRequest(inputs=texts[i : i + 16])) for i in range(0, len(texts), 16)])
                return np.concatenate([p.vectors for p in parts])

            return asyncio.run(run())
    finally:
        registry.stop()


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.parametrize("runtime, precision", MODES, ids=[f"{r}-{p}" for r, p in MODES])
def test_mode_fidelity(sample, runtime, precision):
    texts, want = sample
    got = embed_with(runtime, precision, texts)
    if precision == "fp32":
        assert np.abs(got - want).max() <= 1e-5
    assert cosines(got, want).min() >= 0.999


def test_default_mode_keeps_cosine_0_9999(sample):
    texts, want = sample
    runtime, precision = resolve_mode(Config().validate().default_model())
    got = embed_with(runtime, precision, texts)
    assert cosines(got, want).min() >= 0.9999, (runtime, precision)


def test_openvino_lone_inputs_on_static_shape_models_keep_cosine_0_9999(sample, reference):
    """A lone input of a width in `LONE_WIDTHS` runs on a model compiled for [1, width]; wider ones on the dynamic one."""
    from service.runtimes.openvino import OpenVinoRuntime

    texts, _ = sample
    lengths = {t: len(reference.tokenizer(t)["input_ids"]) for t in texts}
    widths = sorted(OpenVinoRuntime.LONE_WIDTHS)
    picked = []
    for low, high in zip([0, *widths], [*widths, widths[-1] + 32]):  # a few of each static width, and wider
        picked += [t for t in texts if low < lengths[t] <= high][:4]
    assert len(picked) == 4 * (len(widths) + 1)
    runtime, precision = resolve_mode(Config().validate().default_model())
    if runtime != "openvino":
        pytest.skip("the default mode here is not OpenVINO")
    got = embed_with(runtime, precision, picked, one_at_a_time=True)
    assert cosines(got, reference.encode(picked)).min() >= 0.9999


def test_torch_bf16_bounds_onednns_primitive_cache_unless_the_operator_set_it(monkeypatch):
    """oneDNN's default cache of 1,024 primitives took a served torch/bf16 process past the memory line (see
    service/runtimes/pytorch.py); the runtime bounds it before its first forward pass, and an operator's value wins."""
    from service.config import default_model_path
    from service.runtimes.pytorch import ONEDNN_PRIMITIVE_CACHE, TorchRuntime

    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    TorchRuntime(default_model_path(), "fp32")
    assert "ONEDNN_PRIMITIVE_CACHE_CAPACITY" not in os.environ  # fp32 (694 MiB served) is under the line: left alone
    TorchRuntime(default_model_path(), "bf16")
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == str(ONEDNN_PRIMITIVE_CACHE) == "16"
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "1024")
    TorchRuntime(default_model_path(), "bf16")
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "1024"
