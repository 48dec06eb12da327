"""The int8 tier (issue 13, item 4): its corpus, its metric, its cache, and that it stays off until a scheme passes.

The full judgement (≥ 5,000 texts, speed side by side) is `python -m bench.int8` → bench/INT8.md; these
tests are small and fast. The quantizer itself is exercised on a tiny calibration set, and its output is checked
with exact int8 arithmetic (OpenVINO's low-precision transformations off), so the check means the same on every CPU.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from service.runtimes import realtext
from bench.int8 import Corpus, embed, retrieval
from service.config import default_model_path
from service.engine.folder import read_folder
from service.runtimes import MODES, int8

ROOT = Path(__file__).resolve().parent.parent


def test_real_text_corpus_is_large_deterministic_and_split():
    ev, cal = realtext.evaluation_texts(), realtext.calibration_texts()
    assert len(ev) >= 5000 and len(cal) >= 300
    assert not set(ev) & set(cal)
    assert ev == realtext.evaluation_texts()  # cached, but also: sorted by hash, so the same order on every machine
    assert all(realtext.MIN_WORDS <= len(t.split()) <= realtext.MAX_WORDS for t in ev[:500])
    queries, docs = realtext.retrieval_split(500)
    assert len(queries) == 500 and queries[-1] != docs[0] and len(docs) == len(ev) - 500


def test_retrieval_metric():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(300, 16)).astype(np.float32)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    same = retrieval(ref, ref, 50)
    assert same["recall"] == 1.0 and same["cos_min"] == pytest.approx(1.0)
    noisy = ref + rng.normal(scale=0.3, size=ref.shape).astype(np.float32)
    noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
    worse = retrieval(ref, noisy, 50)
    assert 0.0 < worse["recall"] < 1.0 and worse["cos_mean"] < 1.0


def test_int8_is_off_until_a_scheme_passes():
    if int8.CHOSEN is None:
        assert ("openvino", "int8") not in MODES
        with pytest.raises(ValueError, match="not offered"):
            int8.int8_model(default_model_path())
    else:
        assert ("openvino", "int8") in MODES and int8.CHOSEN in int8.SCHEMES


def test_serving_imports_neither_torch_nor_nncf():
    code = (
        "import sys, service.runtimes.openvino, service.runtimes.int8;"
        "bad = [m for m in ('torch', 'nncf', 'transformers') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


@pytest.fixture(scope="module")
def tiny_scheme_model(tmp_path_factory):
    """A `ptq` model calibrated on 16 texts, built the way the server builds it: a child process, a cache dir."""
    pytest.importorskip("nncf")
    from service.runtimes.export import cache_dir, onnx_model

    folder = read_folder(default_model_path())
    onnx_model(str(folder.transformer_path))  # the shared export, so the test cache does not export again
    cache = tmp_path_factory.mktemp("cache")
    (cache / "onnx").symlink_to(cache_dir() / "onnx", target_is_directory=True)
    scheme = dataclasses.replace(int8.SCHEMES["ptq"], name="ptq-test", calibration_texts=16)
    env = {**os.environ, "EMBED_CACHE_DIR": str(cache)}
    code = (
        "import dataclasses, sys; from service.runtimes import int8;"
        f"int8.SCHEMES['ptq-test'] = dataclasses.replace(int8.SCHEMES['ptq'], name='ptq-test', calibration_texts=16);"
        f"print(int8.build({str(folder.transformer_path)!r}, 'ptq-test'))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    path = Path(proc.stdout.strip().splitlines()[-1])
    assert path.exists() and path.with_suffix(".bin").exists() and (path.parent / "scheme.json").exists()
    assert str(path).startswith(str(cache / "int8"))
    assert scheme.key() in (path.parent / "scheme.json").read_text()
    return folder, path


def test_quantized_model_runs_int8_and_stays_close(tiny_scheme_model):
    import openvino as ov

    from bench.int8 import int8_share

    folder, path = tiny_scheme_model
    core = ov.Core()
    texts = realtext.evaluation_texts()[:160]
    corpus = Corpus(folder, texts)
    exact = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 2}
    from service.runtimes.export import onnx_model

    want = embed(core.compile_model(core.read_model(str(onnx_model(str(folder.transformer_path)))), "CPU", exact), corpus, folder)
    model = core.read_model(str(path))
    assert int8_share(core.compile_model(model, "CPU", exact)) == 1.0  # every Linear runs in int8
    got = embed(core.compile_model(model, "CPU", {**exact, "LP_TRANSFORMS_MODE": "NO"}), corpus, folder)
    r = retrieval(want, got, 40)
    # Loose bars for 16 calibration texts; the real bar is bench/INT8.md's.
    assert r["cos_mean"] >= 0.99 and r["cos_min"] >= 0.95 and r["recall"] >= 0.8, r


def test_openvino_runtime_refuses_int8_while_it_is_off():
    from service.runtimes.openvino import OpenVinoRuntime

    folder = read_folder(default_model_path())
    if int8.CHOSEN is None:
        # On a CPU without VNNI/AMX the refusal names the missing units; elsewhere it says no scheme passed.
        with pytest.raises(ValueError, match="int8"):
            OpenVinoRuntime(str(folder.transformer_path), "int8", 1, folder.hidden_size)
