"""`python -m service.healthcheck`: exit 0 while the service in this container is ready, 1 otherwise.

The image's HEALTHCHECK (plain Docker has no probes of its own): it asks Envoy's readiness listener, which answers 200
only while Envoy's health check of the server passes, i.e. the default model is loaded and nothing is draining; where
no Envoy runs (`--server-only`), the server's own gRPC health. (Ports from $EMBED__ENVOY__READINESS_PORT and
$EMBED__SERVER__GRPC_PORT, defaults otherwise: a port set in a configuration file is not seen here.)
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    port = os.environ.get("EMBED__ENVOY__READINESS_PORT", "9902")
    url = f"http://127.0.0.1:{port}/ready"
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through an HTTP_PROXY
    try:
        with direct.open(url, timeout=2) as r:
            return 0 if r.status == 200 else 1
    except urllib.error.HTTPError as e:  # Envoy answered: not ready (503)
        print(f"not ready: {url}: {e.code}", file=sys.stderr)
        return 1
    except (OSError, urllib.error.URLError):
        pass
    # No Envoy here (`--server-only`): the server's own gRPC health.
    return server_health()


def server_health() -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    host = os.environ.get("EMBED__SERVER__HOST", "127.0.0.1")
    target = f"{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{os.environ.get('EMBED__SERVER__GRPC_PORT', '50051')}"
    try:
        with grpc.insecure_channel(target) as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2).status
    except grpc.RpcError as e:
        print(f"not ready: neither Envoy's /ready nor the server's health at {target} answers ({e.code().name})", file=sys.stderr)
        return 1
    return 0 if status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
