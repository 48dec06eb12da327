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

from bench.corpus import make_corpus
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
    """A lone input of a width in `lone_widths` runs on a model compiled for [1, width]; wider ones on the dynamic one."""
    from service.runtimes.openvino import OpenVinoRuntime

    texts, _ = sample
    lengths = {t: len(reference.tokenizer(t)["input_ids"]) for t in texts}
    widths = sorted(OpenVinoRuntime.lone_widths)
    picked = []
    for low, high in zip([0, *widths], [*widths, widths[-1] + 32]):  # a few of each static width, and wider
        picked += [t for t in texts if low < lengths[t] <= high][:4]
    assert len(picked) == 4 * (len(widths) + 1)
    runtime, precision = resolve_mode(Config().validate().default_model())
    if runtime != "openvino":
        pytest.skip("the default mode here is not OpenVINO")
    got = embed_with(runtime, precision, picked, one_at_a_time=True)
    assert cosines(got, reference.encode(picked)).min() >= 0.9999



def test_a_torch_bf16_server_bounds_onednns_primitive_cache_and_the_operators_value_wins():
    from service.runtimes.threads import ONEDNN_PRIMITIVE_CACHE, bound_onednn_cache

    env: dict[str, str] = {}
    assert not bound_onednn_cache([("openvino", "bf16"), ("torch", "fp32")], env) and env == {}
    assert bound_onednn_cache([("openvino", "bf16"), ("torch", "bf16")], env)
    assert env == {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": str(ONEDNN_PRIMITIVE_CACHE)} and ONEDNN_PRIMITIVE_CACHE == 16
    for name in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "DNNL_PRIMITIVE_CACHE_CAPACITY"):  # oneDNN reads either name
        env = {name: "1024"}
        assert not bound_onednn_cache([("torch", "bf16")], env) and env == {name: "1024"}


def test_the_servers_start_bounds_the_cache_before_any_model_loads(monkeypatch):
    """`python -m service` sets it from the configured models' modes, before serve() loads any of them."""
    import service.__main__ as entry

    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "x")  # so that teardown restores the variable's absence
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY")
    monkeypatch.delenv("DNNL_PRIMITIVE_CACHE_CAPACITY", raising=False)
    cfg = Config().validate()
    cfg.models[0].runtime, cfg.models[0].precision = "openvino", "bf16"
    entry.bound_runtime_caches(cfg)
    assert "ONEDNN_PRIMITIVE_CACHE_CAPACITY" not in os.environ
    cfg.models[0].runtime, cfg.models[0].precision = "torch", "bf16"
    entry.bound_runtime_caches(cfg)
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "16"


PROBE_CACHE = """
import ctypes
import os
import numpy as np
from service.config import default_model_path
from service.engine.folder import read_folder
from service.runtimes.threads import bound_onednn_cache
bound_onednn_cache([("torch", "bf16")])
from service.runtimes.pytorch import TorchRuntime
rt = TorchRuntime(str(read_folder(default_model_path()).transformer_path), "bf16", 1)
def run(width):
    ids = np.full((2, width), 1000, dtype=np.int64)
    rt.forward(ids, np.ones_like(ids), np.zeros_like(ids))
run(16)
for width in range(17, 31):  # 14 other shapes, ~4 new primitives each
    run(width)
ctypes.CDLL(None).fflush(None)  # oneDNN's lines go through C's stdout buffer; the marker after them
os.write(1, b"=== the first shape again\\n")
run(16)
"""


@pytest.mark.parametrize("operator_value, rebuilt", [(None, True), ("1024", False)])
def test_the_bound_takes_effect_in_onednn(operator_value, rebuilt):
    """What oneDNN itself reports (ONEDNN_VERBOSE): bounded, the first shape's primitives were evicted by the 14
    shapes after it and are built again; with the operator's 1,024 they are all still cached."""
    import subprocess
    import sys

    from service.engine.models import cpu_has_bf16

    if not cpu_has_bf16():  # torch runs bf16 matmuls through oneDNN only on CPUs with bf16 units (AVX512-BF16, AMX)
        pytest.skip("this CPU has no bf16 units: oneDNN builds no bf16 primitives, so there is no cache to bound")
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "DNNL_PRIMITIVE_CACHE_CAPACITY")}
    env["ONEDNN_VERBOSE"] = "profile_create"
    if operator_value:
        env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = operator_value
    out = subprocess.run([sys.executable, "-c", PROBE_CACHE], env=env, capture_output=True, text=True, timeout=300,
                         cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    assert out.returncode == 0, out.stderr[-2000:]
    verbose = out.stdout
    last = verbose[verbose.index("=== the first shape again"):]
    assert "create:cache_hit" in last
    assert ("create:cache_miss" in last) == rebuilt


def test_an_export_is_found_by_content_in_any_cache_folder_and_made_in_the_first(tmp_path, monkeypatch):
    """The image bakes the default model's export at build time and runs without torch: the export must be found
    whatever path the model folder has and whatever its files' times (a copy, another machine), in any of the cache
    folders $EMBED_CACHE_DIR lists (a writable one in front of the image's read-only one), and a changed model is
    never taken for the exported one."""
    import shutil

    from service.config import default_model_path
    from service.runtimes import export

    folder = default_model_path()
    copy = tmp_path / "copied-model"
    shutil.copytree(folder, copy, copy_function=shutil.copy)  # new path, new mtimes
    key = export._key(folder)
    assert export._key(str(copy)) == key
    writable, baked = tmp_path / "writable", tmp_path / "baked"
    (baked / "onnx" / key).mkdir(parents=True)
    (baked / "onnx" / key / "model.onnx").write_bytes(b"stand-in")
    monkeypatch.setenv("EMBED_CACHE_DIR", f"{writable}:{baked}")
    assert export.onnx_model(str(copy)) == baked / "onnx" / key / "model.onnx"  # found: no export made
    assert not writable.exists()
    (copy / "config.json").write_text((copy / "config.json").read_text().replace("}", ', "changed": 1}', 1))
    assert export._key(str(copy)) != key
    assert export._target(str(copy)).parent.parent.parent == writable  # a changed model: a new export, in the first
