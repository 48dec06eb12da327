"""fastembed, run as its users run it: `TextEmbedding(...).embed(texts, batch_size=...)` in process.

Runs in .venv-peers-fastembed. The model is fastembed's own `sentence-transformers/all-MiniLM-L6-v2` entry
(mean pooling over the attention mask, then L2 normalization), loaded offline from a local folder
(`specific_model_path`, `local_files_only=True`) that holds our ONNX export of the same weights and the
model's own tokenizer files: fastembed would otherwise download Qdrant's ONNX file from the hub.
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from _common import load_job, save_run, time_calls, versions, write  # noqa: E402


def main() -> None:
    job, folder = load_job()
    import onnxruntime
    from fastembed import TextEmbedding

    result = {
        "versions": versions("fastembed", "onnxruntime", "tokenizers", "numpy"),
        "runs": [],
        "short": {},
        "notes": [],
    }
    t0 = time.perf_counter()
    model = TextEmbedding(job["model_name"], specific_model_path=job["model_dir"], local_files_only=True)
    session = model.model.model
    result["load_s"] = time.perf_counter() - t0
    result["notes"].append(
        f"{type(model.model).__name__}, onnxruntime {onnxruntime.__version__} {session.get_providers()[0]}, "
        f"intra-op threads {session.get_session_options().intra_op_num_threads or 'default'}"
    )
    texts = job["texts"]
    list(model.embed(texts[:64], batch_size=32))  # warm-up
    for cfg in job["configs"]:
        bs, parallel = cfg["batch_size"], cfg.get("parallel")
        t0 = time.perf_counter()
        vectors = np.stack(list(model.embed(texts, batch_size=bs, parallel=parallel)))
        seconds = time.perf_counter() - t0
        name = f"TextEmbedding.embed(batch_size={bs}" + (f", parallel={parallel}" if parallel is not None else "") + ")"
        save_run(folder, result, name, vectors, seconds=seconds, concurrency=parallel or 1, per_request=bs, errors=0)
    short = job["short_text"]
    result["short"]["TextEmbedding.embed([text])"] = time_calls(lambda: list(model.embed([short])), job["short_count"])
    write(folder, result)


if __name__ == "__main__":
    main()
