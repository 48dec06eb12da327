"""ONNX export of a model folder's transformer, at first use, cached on disk.

The ONNX Runtime and OpenVINO runtimes both read this file. The cache key covers the folder's files (names and
content) and the export's format, so a changed model is exported again, and an export made elsewhere
serves the same files anywhere; files are written to a temporary name and renamed, so concurrent servers never read
a half-written model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

INPUTS = ["input_ids", "attention_mask", "token_type_ids"]


def cache_dirs() -> list[Path]:
    """$EMBED_CACHE_DIR: one folder, or several separated by `:` (searched in order; new exports go to the first),
    so that a writable cache can sit in front of a read-only one (the image's baked export)."""
    value = os.environ.get("EMBED_CACHE_DIR") or os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "embedding-service")
    return [Path(p) for p in value.split(":") if p] or [Path(value)]


def cache_dir() -> Path:
    """Where new exports are written."""
    return cache_dirs()[0]


# The export's own version: bumped when what `export` writes changes (opset, inputs, attention), so that cached
# exports are made again. Not torch's version: a runtime without torch (the image) must find the export its build made.
EXPORT_FORMAT = "1"


def _key(folder: str) -> str:
    """The folder's files by name and content (a hash of every byte), not by path or time: an export made on one
    machine (with torch) serves the same model copied anywhere else, a container included, and two models that differ
    anywhere never share one (sampling parts of the files could miss a fine-tune). ~0.1 s for 90 MB."""
    h = hashlib.blake2b(f"export format {EXPORT_FORMAT}".encode(), digest_size=16)
    for f in sorted(Path(folder).glob("*")):
        if f.is_file():
            h.update(f"{f.name}:{f.stat().st_size}:".encode())
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 22):
                    h.update(chunk)
    return h.hexdigest()[:16]


def _target(folder: str) -> Path:
    """The export of `folder`: the first cache folder that holds it, else where a new one goes."""
    key = _key(folder)
    for d in cache_dirs():
        if (d / "onnx" / key / "model.onnx").exists():
            return d / "onnx" / key / "model.onnx"
    return cache_dir() / "onnx" / key / "model.onnx"


def onnx_model(folder: str) -> Path:
    """The path of the exported fp32 ONNX model for `folder`, exporting it if needed.

    The export runs in a child process: it needs torch, which the serving process then never imports.
    """
    target = _target(folder)
    if target.exists():
        return target
    if importlib.util.find_spec("torch") is None:
        raise RuntimeError(
            f"{folder} has no ONNX export in {':'.join(map(str, cache_dirs()))}, and making one needs torch, which is not installed (the "
            "image ships without it): export it where torch is installed (EMBED_CACHE_DIR=DIR python -m "
            "service.runtimes.export FOLDER) and give this process that DIR as its EMBED_CACHE_DIR"
        )
    log.info("exporting to ONNX (first use of this model with an ONNX-based runtime)", extra={"folder": folder, "target": str(target)})
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "service.runtimes.export", folder], capture_output=True, text=True)
    if proc.returncode != 0 or not target.exists():
        raise RuntimeError(f"ONNX export of {folder} failed: {proc.stderr.strip().splitlines()[-1:] or proc.returncode}")
    log.info("exported", extra={"target": str(target), "seconds": round(time.perf_counter() - started, 1)})
    return target


def export(folder: str) -> Path:
    """Exports `folder`'s transformer to ONNX (in this process; torch required)."""
    target = _target(folder)
    target.parent.mkdir(parents=True, exist_ok=True)
    import torch
    from transformers import AutoModel

    # Eager attention exports to plain ONNX ops that every runtime fuses its own way.
    model = AutoModel.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32, local_files_only=True).eval()
    accepts_types = "token_type_ids" in model.forward.__code__.co_varnames
    names = INPUTS if accepts_types else INPUTS[:2]

    class LastHidden(torch.nn.Module):
        def __init__(self, m: torch.nn.Module) -> None:
            super().__init__()
            self.m = m

        def forward(self, *args: torch.Tensor) -> torch.Tensor:
            return self.m(**dict(zip(names, args))).last_hidden_state

    example = [torch.ones(2, 16, dtype=torch.long), torch.ones(2, 16, dtype=torch.long), torch.zeros(2, 16, dtype=torch.long)][: len(names)]
    example[1][1, 10:] = 0
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    torch.onnx.export(
        LastHidden(model),
        tuple(example),
        str(tmp),
        input_names=names,
        output_names=["last_hidden_state"],
        dynamic_axes={**{n: {0: "batch", 1: "seq"} for n in names}, "last_hidden_state": {0: "batch", 1: "seq"}},
        opset_version=17,
        do_constant_folding=True,
        dynamo=False,
    )
    os.replace(tmp, target)
    return target


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore")
    print(export(sys.argv[1]))
