"""The README a newcomer reads (issue 28.1): short, every link resolves, and its quick starts run as written.

The Python blocks marked `<!-- readme-test: NAME -->` run unchanged but for the address (the README's
127.0.0.1:8080 becomes the test stack's port) against a stack that requires the key in $EMBED_API_KEYS, as the
quick start sets it. The shell commands are checked for what they do here: `make run`'s expansion of MODEL_ID and
ARGS, the listener a keyed `--hostname 0.0.0.0` gets (the tests never listen beyond loopback), the files and
targets the container and Kubernetes steps name (the image and the pod themselves are `make test-image`'s).
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from service.launch import Stack

from .conftest import stack_config

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def block(name: str) -> str:
    m = re.search(rf"<!-- readme-test: {name} -->\n```python\n(.*?)```", README, re.S)
    assert m, f"README.md has no python block marked readme-test: {name}"
    return m.group(1)


def test_readme_is_short():
    assert len(README.splitlines()) <= 250, len(README.splitlines())


def _anchors(text: str) -> set[str]:
    out = set()
    for title in re.findall(r"(?m)^#+ (.+)$", text):
        slug = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
        out.add(slug)
    return out


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_link_resolves(doc):
    text = doc.read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        assert file.exists(), f"{doc.name}: {target}"
        if anchor and file.suffix == ".md":
            assert anchor in _anchors(file.read_text()), f"{doc.name}: {target}"


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    key = secrets.token_hex(16)
    with Stack(stack_config(), log_dir=tmp_path_factory.mktemp("readme"), extra_env={"EMBED_API_KEYS": key}) as s:
        yield s, key


@pytest.mark.parametrize("name, printed", [("openai", "384"), ("grpc", "384 6")])
def test_python_quick_starts_run_as_written(keyed, name, printed):
    stack, key = keyed
    port = stack.http_url.rsplit(":", 1)[1]
    code = block(name).replace("127.0.0.1:8080", f"127.0.0.1:{port}")
    env = {**os.environ, "EMBED_API_KEYS": key}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == printed, done.stdout
    # and the key is what let it in
    env["EMBED_API_KEYS"] = "x" * 32
    refused = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and ("401" in refused.stderr or "UNAUTHENTICATED" in refused.stderr), refused.stderr[-500:]


def test_the_shell_quick_starts_mean_what_they_say():
    from service.envoy import listen_host
    from service.run import build_config, parser

    # `make run ARGS="--hostname 0.0.0.0"` with a key listens on every address; without one, on loopback only
    make = subprocess.run(["make", "-n", "run", "ARGS=--hostname 0.0.0.0"], cwd=ROOT, capture_output=True, text=True)
    assert "-m service.run" in make.stdout and "--hostname 0.0.0.0" in make.stdout, make.stdout
    cfg = build_config(parser().parse_args(["--hostname", "0.0.0.0"]))
    assert listen_host(cfg, {"EMBED_API_KEYS": secrets.token_hex(16)}) == "0.0.0.0"
    assert listen_host(cfg, {}) == "127.0.0.1"
    # `make run MODEL_ID="A B"`: both, the first the default
    make = subprocess.run(["make", "-n", "run", "MODEL_ID=BAAI/bge-small-en-v1.5 sentence-transformers/all-MiniLM-L6-v2"],
                          cwd=ROOT, capture_output=True, text=True)
    assert "--model-id BAAI/bge-small-en-v1.5 --model-id sentence-transformers/all-MiniLM-L6-v2" in make.stdout, make.stdout
    assert "python -m service.models download" in README
    # the container and Kubernetes steps name what exists
    for target in ("image", "deploy"):
        assert subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True).returncode == 0, target
    assert (ROOT / "deploy" / "secret.example.yaml").exists() and (ROOT / "deploy" / "kustomization.yaml").exists()


def test_make_runs_banner_names_every_apis_base_url_and_the_docs():
    """Issue 28.5: `make run` ends by listing where each API's client points, native gRPC and the docs."""
    from types import SimpleNamespace

    from service.config import Config
    from service.run import banner

    stack = SimpleNamespace(http_url="http://127.0.0.1:8080", envoy_target="127.0.0.1:8080", ready_url="http://127.0.0.1:9902/ready",
                            metrics_urls=[])
    text = banner(Config(), stack, 1.0)
    for name, where in [("OpenAI", "http://127.0.0.1:8080/v1"), ("Text Embeddings Inference", "http://127.0.0.1:8080"),
                        ("Ollama", "http://127.0.0.1:8080"), ("Cohere", "http://127.0.0.1:8080"), ("Gemini", "http://127.0.0.1:8080"),
                        ("Hugging Face", "/models/{model}"), ("AIGNE Hub", "http://127.0.0.1:8080/api"), ("HrFlow", "http://127.0.0.1:8080/v1/"),
                        ("Inworld", "/ml/v1alpha/embedding:embed"), ("native gRPC", "127.0.0.1:8080"), ("API reference", "/docs")]:
        line = next((line for line in text.splitlines() if line.strip().startswith(name)), None)
        assert line is not None and where in line, (name, line)
    off = Config()
    off.dialects.disabled = ["reference"]
    assert "/docs" not in banner(off, stack, 1.0)
