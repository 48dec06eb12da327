"""Deployment: the committed manifests are current, valid against the Kubernetes schemas (offline), and
agree with the configuration (command, ports, probes, drain period); the Dockerfile exposes the same ports."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from service import deploy, envoy
from service.config import Config, load
from service.launch import envoy_binary

ROOT = Path(__file__).resolve().parents[1]
K8S_VERSION = "1.33.0"


@pytest.fixture(scope="module")
def rendered():
    return deploy.render(Config().validate())


def test_committed_manifests_are_current(rendered):
    for name, doc in rendered.items():
        assert (ROOT / "deploy" / name).read_text() == deploy.dump(doc), f"run: python -m service.deploy  ({name})"


@pytest.mark.parametrize("name", ["configmap.yaml", "deployment.yaml", "service.yaml", "hpa.yaml", "pdb.yaml", "secret.example.yaml"])
def test_manifests_validate_against_kubernetes_schemas(name):
    doc = yaml.safe_load((ROOT / "deploy" / name).read_text())
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_descriptor_configmap_validates():
    doc = deploy.descriptor_configmap(envoy.DESCRIPTOR)
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_pod_agrees_with_its_configuration(rendered, tmp_path):
    cm = rendered["configmap.yaml"]["data"]
    (tmp_path / "config.yaml").write_text(cm["config.yaml"])
    pod_cfg = yaml.safe_load(cm["config.yaml"])
    pod_cfg["auth"]["keys_file"] = ""  # the Secret isn't mounted here
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(pod_cfg))
    cfg = load(tmp_path / "config.yaml", env={})
    spec = rendered["deployment.yaml"]["spec"]["template"]["spec"]
    server, sidecar = spec["containers"]
    assert server["command"] == ["python", "-m", "service", "--config", "/etc/embedding/config.yaml"]
    ports = {p["name"]: p["containerPort"] for c in (server, sidecar) for p in c["ports"]}
    assert ports["grpc"] == cfg.server.grpc_port and ports["metrics"] == cfg.server.metrics_port
    assert ports["http"] == cfg.envoy.listen_port and ports["envoy-admin"] == cfg.envoy.admin_port
    assert server["readinessProbe"]["grpc"]["port"] == cfg.server.grpc_port  # the server's gRPC health service
    assert spec["terminationGracePeriodSeconds"] > cfg.server.grace_seconds  # the drain fits in the pod's grace
    assert cfg.server.host == "0.0.0.0"
    # Envoy in the pod listens on the http port and forwards to the server's gRPC port on localhost.
    ev = yaml.safe_load(cm["envoy.yaml"])
    listener = ev["static_resources"]["listeners"][0]["address"]["socket_address"]
    endpoint = ev["static_resources"]["clusters"][0]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    assert (listener["port_value"], endpoint["address"], endpoint["port_value"]) == (cfg.envoy.listen_port, "127.0.0.1", cfg.server.grpc_port)
    service_ports = {p["name"]: p["targetPort"] for p in rendered["service.yaml"]["spec"]["ports"]}
    assert set(service_ports.values()) <= set(ports)  # every Service port targets a named container port


def test_pod_envoy_config_is_accepted_by_envoy(rendered, tmp_path):
    text = rendered["configmap.yaml"]["data"]["envoy.yaml"].replace("/etc/envoy/descriptor/descriptor.pb", str(envoy.DESCRIPTOR))
    (tmp_path / "envoy.yaml").write_text(text)
    r = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(tmp_path / "envoy.yaml")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dockerfile_exposes_the_configured_ports():
    cfg = Config().validate()
    exposed = {int(p) for p in re.search(r"^EXPOSE (.+)$", (ROOT / "Dockerfile").read_text(), re.M).group(1).split()}
    assert exposed == {cfg.server.grpc_port, cfg.server.metrics_port}
