"""Shared fixtures: one real stack (server + Envoy + real model) per session, and the reference model.

Integration tests go through a real Envoy to a real gRPC server running the real default model; the
reference vectors come from `SentenceTransformer(path).encode`, the thing this service must agree with.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from service.config import Config, default_model_path  # noqa: E402
from service.launch import Stack  # noqa: E402


def stack_config() -> Config:
    """Defaults on free loopback ports, in fp32: the runtime held to max abs difference ≤ 1e-5.

    The default precision (bf16 where the CPU has it) has its own fidelity bar, tested in test_runtimes.py.
    """
    cfg = Config()
    cfg.models[0].precision = "fp32"
    cfg.server.grpc_port = 0
    cfg.server.metrics_port = 0
    cfg.envoy.listen_port = 0
    cfg.envoy.admin_port = 0
    cfg.envoy.readiness_port = 0
    cfg.envoy.metrics_port = 0  # none: stack.metrics_urls is the server's own (tests/test_trust.py tests Envoy's)
    return cfg.validate()


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory):
    s = Stack(stack_config(), log_dir=tmp_path_factory.mktemp("stack-logs"))
    s.start(timeout=240)
    yield s
    s.stop()


@pytest.fixture(scope="session")
def reference():
    """The fp32 reference: sentence-transformers' own encode on the same folder."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(default_model_path(), device="cpu")


@pytest.fixture(scope="session")
def image():
    """The image, built by `make image` on a Debian base made here (tests/image.py); `make test-image` only."""
    from . import image as img

    return img.build()
