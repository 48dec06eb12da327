"""`python -m service.healthcheck`: exit 0 while the service in this container is ready, 1 otherwise.

The image's HEALTHCHECK (plain Docker has no probes of its own): it asks Envoy's readiness listener, which answers 200
only while Envoy's health check of the server passes, i.e. the default model is loaded and nothing is draining.
Standard library only, so that it starts fast and needs nothing the image might lack.
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
            ok = r.status == 200
    except (OSError, urllib.error.URLError) as e:
        print(f"not ready: {url}: {e}", file=sys.stderr)
        return 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
