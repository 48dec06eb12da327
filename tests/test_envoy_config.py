"""Envoy's configuration: the committed file is current, and Envoy itself accepts what we render."""

from __future__ import annotations

import subprocess
from pathlib import Path

from service import envoy
from service.config import Config
from service.launch import envoy_binary

ROOT = Path(__file__).resolve().parents[1]


def test_committed_envoy_yaml_is_the_rendering_of_the_defaults():
    rendered = envoy.dump(envoy.render(Config().validate(), descriptor="gen/descriptor.pb"))
    assert (ROOT / "envoy.yaml").read_text() == rendered, "run: python -m service.envoy > envoy.yaml"


def test_envoy_validates_the_committed_config():
    r = subprocess.run([envoy_binary(), "--mode", "validate", "-c", "envoy.yaml"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "OK" in r.stdout + r.stderr


def test_envoy_config_has_the_settings_the_transcoder_needs():
    doc = envoy.render(Config().validate())
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    t = next(f for f in hcm["http_filters"] if f["name"].endswith("grpc_json_transcoder"))["typed_config"]
    assert t["convert_grpc_status"] is True
    assert t["request_validation_options"]["reject_unknown_method"] is True
    assert t["ignore_unknown_query_parameters"] is True
    assert t["max_request_body_size"] >= 8 * 1024 * 1024
    cluster = doc["static_resources"]["clusters"][0]
    assert "http2_protocol_options" in str(cluster)  # gRPC upstream
    assert doc["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"


def test_the_gemini_models_rewrite_is_there_only_with_gemini():
    from service import dialects

    assert "/v1beta" in envoy.lua(dialects.enabled(Config()))
    off = Config()
    off.dialects.disabled = ["gemini"]
    code = envoy.lua(dialects.enabled(off))
    assert "/v1beta" not in code and "{GEMINI_MODELS}" not in code
