"""`make run`: the gRPC server and Envoy in front of it, on the default model; Ctrl-C stops both."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from . import config as config_mod  # noqa: E402
from .launch import Stack  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="make run", description=__doc__)
    p.add_argument("--config", default=os.environ.get("EMBED_CONFIG"), help="YAML configuration file")
    p.add_argument("--replicas", type=int, default=int(os.environ.get("REPLICAS", "1")), help="server processes behind Envoy")
    args = p.parse_args(argv)
    try:
        cfg = config_mod.load(args.config)
    except config_mod.ConfigError as e:
        print(f"configuration error: {e}", file=sys.stderr)
        return 2
    if args.replicas > 1:
        cfg.server.grpc_port = cfg.server.metrics_port = 0  # each replica on free ports
    started = time.monotonic()
    # Server logs go to this terminal; Envoy's (warnings only) to a file.
    stack = Stack(cfg, replicas=args.replicas, inherit_output=True)
    print("embedding service: starting (first start loads the model: ~15 s)", flush=True)
    try:
        stack.start(progress=lambda msg: print(f"  … {msg}", flush=True))
    except (RuntimeError, TimeoutError) as e:
        print(f"failed to start: {e}\n{stack.logs()}", file=sys.stderr)
        return 1
    model = cfg.default_model().id
    url = stack.http_url
    print(
        f"""
ready in {time.monotonic() - started:.1f}s — model {model}

  REST (Envoy)        {url}/ml/v1alpha/embedding:embed
  gRPC (via Envoy)    {stack.envoy_target}   ai.inworld.embedding.v1alpha.EmbeddingService/Embed
  gRPC (direct)       {', '.join(stack.server_targets)}
  Envoy admin         {stack.admin_url}   (Envoy's own stats: {stack.admin_url}/stats/prometheus)
  metrics             {', '.join(stack.metrics_urls) or 'off'}
  Envoy log           {stack.log_dir}/envoy.log

Try it:

  curl {url}/ml/v1alpha/embedding:embed \\
    -H 'Content-Type: application/json' \\
    -d '{{"inputs": [{{"text": "Hello Inworld!"}}], "model": {{"model": "{model}", "serviceProvider": "SERVICE_PROVIDER_INWORLD"}}}}'

Ctrl-C stops the server and Envoy.""",
        flush=True,
    )
    stop = False

    def on_signal(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    while not stop:
        for proc in [stack.envoy, *stack.servers]:
            if proc is not None and proc.poll() is not None:
                print(f"\n{proc.args[0]} exited ({proc.returncode}); stopping.\n{stack.logs()}", file=sys.stderr)
                stop = True
        time.sleep(0.5)
    print("\nstopping (in-flight requests finish first)…", flush=True)
    stack.stop()
    print("stopped.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
