"""The service: the gRPC server and Envoy in front of it (REST for every API and native gRPC on one port).

`make run` and the image both start here. Ctrl-C or SIGTERM drains the server, then stops Envoy. Nothing is written
to disk: the server reads its configuration from a pipe and Envoy from its command line.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from . import config as config_mod  # noqa: E402

EPILOG = """\
Every configuration key also reads EMBED__SECTION__KEY (e.g. EMBED__LIMITS__MAX_BATCH_TOKENS=4096); flags win.
API keys: EMBED_API_KEYS="key" or "key:secret", comma-separated, 16 or more characters each (or auth.keys_file).
Without keys the service is open, so it listens on loopback only (inside a container: unreachable from outside).
Models by Hugging Face id come from the Hugging Face cache ($HF_HOME/hub). With HF_HUB_OFFLINE=1 (the default) a model
not there stops the start: fetch it first (python -m service.models download ID), or start with HF_HUB_OFFLINE=0."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m service.run", description=__doc__.split("\n\n")[0],
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=os.environ.get("EMBED_CONFIG"), help="YAML configuration file (or $EMBED_CONFIG)")
    add_model_flags(p)
    p.add_argument("--port", type=int, help="port of Envoy's listener, REST and gRPC (envoy.listen_port, EMBED__ENVOY__LISTEN_PORT; "
                                            "default 8080)")
    p.add_argument("--hostname", help="address Envoy listens on (envoy.listen_host, EMBED__ENVOY__LISTEN_HOST; 0.0.0.0 in the image)")
    p.add_argument("--api-key", help="require this key (EMBED_API_KEYS; prefer the variable: a flag shows in `ps`)")
    p.add_argument("--replicas", type=int, default=int(os.environ.get("REPLICAS", "1")), help="server processes behind Envoy")
    p.add_argument("--server-only", action="store_true",
                   help="run the gRPC server alone, without Envoy (a pod's layout, where Envoy is its own container)")
    p.add_argument("--log-format", help="json | text (server.log_format)")
    p.add_argument("--print-config", action="store_true", help="print the effective configuration and exit")
    return p


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """The flags Text Embeddings Inference's users know, for what this service has (shared with `python -m service`)."""
    p.add_argument("--model-id", action="append", default=[], metavar="ID",
                   help="a Hugging Face model id (e.g. BAAI/bge-small-en-v1.5, ID@REVISION allowed) or a sentence-transformers "
                        "folder; repeatable, the first the default; replaces the configured models (EMBED__MODELS=ID,ID)")
    p.add_argument("--revision", help="the branch, tag or commit of the first --model-id (models[0].revision)")
    p.add_argument("--served-model-name", help="the name the first model is served as; its id stays an alias (models[0].id)")
    p.add_argument("--model", action="append", default=[], metavar="ID=PATH",
                   help="serve the sentence-transformers folder PATH as ID (repeatable; replaces the configured models)")
    p.add_argument("--max-batch-tokens", type=int, help="tokens in one forward pass (limits.max_batch_tokens, "
                                                        "EMBED__LIMITS__MAX_BATCH_TOKENS; default 2048)")
    p.add_argument("--max-client-batch-size", type=int, help="inputs in one request (limits.max_client_batch_size, "
                                                             "EMBED__LIMITS__MAX_CLIENT_BATCH_SIZE; default 2048)")
    p.add_argument("--auto-truncate", nargs="?", const=True, type=_bool, metavar="BOOL",
                   help="TEI's flag: true (or no value) truncates over-long inputs where an API would refuse or chunk them "
                        "(limits.auto_truncate, EMBED__LIMITS__AUTO_TRUNCATE); false makes TEI's routes refuse them "
                        "(dialects.long_inputs.tei: refuse). Left out, each API's own default (TEI's: truncate)")


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes", "on"):
        return True
    if text.lower() in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def model_flags(args: argparse.Namespace) -> dict:
    return {"limits.max_batch_tokens": args.max_batch_tokens, "limits.max_client_batch_size": args.max_client_batch_size,
            "limits.auto_truncate": args.auto_truncate,  # false beats a file's or the environment's true
            "dialects.long_inputs.tei": "refuse" if args.auto_truncate is False else None}


def build_config(args: argparse.Namespace) -> config_mod.Config:
    flags = {"envoy.listen_port": args.port, "envoy.listen_host": args.hostname or None, "server.log_format": args.log_format or None,
             **model_flags(args)}
    return config_mod.apply_flags(config_mod.load(args.config), flags, args.model, args.model_id, args.revision, args.served_model_name)


def fetch_models(cfg: config_mod.Config) -> bool:
    """Models named by Hugging Face id are in the cache (downloaded, with progress, when allowed): else one line each."""
    from .models import ensure_models

    problems = ensure_models(cfg)
    for line in problems:
        print(f"model error: {line}", file=sys.stderr, flush=True)
    return not problems


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.api_key:
        os.environ["EMBED_API_KEYS"] = args.api_key  # the server and Envoy's rendering read it there
    try:
        cfg = build_config(args)
    except config_mod.ConfigError as e:
        print(f"configuration error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(mask_secrets=True), sort_keys=False), end="")
        return 0
    if not fetch_models(cfg):
        return 2
    if args.server_only:
        from .__main__ import run_server

        return run_server(cfg)
    return run_stack(cfg, args.replicas)


def run_stack(cfg: config_mod.Config, replicas: int) -> int:
    from . import envoy
    from .launch import Stack

    if replicas > 1:
        cfg.server.grpc_port = cfg.server.metrics_port = 0  # each replica on free ports
    elif not cfg.server.sidecar_admin_url:
        # One server behind its own Envoy, as in a pod: on SIGTERM it fails Envoy's health checks, so Envoy closes its
        # callers' keep-alive connections while the server drains.
        cfg.server.sidecar_admin_url = f"http://127.0.0.1:{cfg.envoy.admin_port}"
    if envoy.listen_host(cfg) != cfg.envoy.listen_host:
        print(f"embedding service: no API keys, so the service is open and Envoy listens on 127.0.0.1, not "
              f"{cfg.envoy.listen_host} (inside a container: unreachable from outside). Set EMBED_API_KEYS (16 or more "
              "characters) or --api-key, or EMBED__AUTH__ALLOW_OPEN_NON_LOOPBACK=true for an open service.",
              file=sys.stderr, flush=True)
    started = time.monotonic()
    stack = Stack(cfg, replicas=replicas, inherit_output=True)
    stop = False

    def on_signal(*_: object) -> None:
        nonlocal stop
        stop = True

    # Installed before anything starts: a SIGTERM while the model loads stops the start cleanly, too.
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    print("embedding service: starting (the model loads in the background)", flush=True)
    try:
        stack.start(progress=lambda msg: print(f"  … {msg}", flush=True), should_stop=lambda: stop)
    except (RuntimeError, TimeoutError) as e:
        print(f"failed to start: {e}\n{stack.logs()}", file=sys.stderr)
        return 1
    except InterruptedError:
        print("stopped before it was ready.", flush=True)
        return 0
    print(banner(cfg, stack, time.monotonic() - started), flush=True)
    code = 0
    while not stop:
        for proc in [stack.envoy, *stack.servers]:
            if proc is not None and proc.poll() is not None:
                print(f"\n{proc.args[0]} exited ({proc.returncode}); stopping.", file=sys.stderr, flush=True)
                stop, code = True, 1
        time.sleep(0.05)
    print("stopping: in-flight requests finish first", flush=True)
    stack.stop(timeout=cfg.server.grace_seconds + 3)
    if stack.envoy_connections_at_stop:
        print(f"Envoy was stopped holding {stack.envoy_connections_at_stop} callers' connections", file=sys.stderr, flush=True)
    print("stopped.", flush=True)
    return code


def banner(cfg: config_mod.Config, stack, seconds: float) -> str:
    url = stack.http_url.replace("127.0.0.1", cfg.envoy.listen_host) if cfg.envoy.listen_host not in ("127.0.0.1", "0.0.0.0", "::") else stack.http_url
    from .envoy import keys_configured

    model = cfg.default_model().id
    keyed = keys_configured(cfg)
    # Where each API's client points (its base URL), then native gRPC and the docs.
    apis = [
        ("OpenAI", f"{url}/v1   (openai: base_url)"),
        ("Text Embeddings Inference", f"{url}   (gRPC tei.v1 on {stack.envoy_target})"),
        ("Ollama", f"{url}   (ollama: host)"),
        ("Cohere", f"{url}   (cohere: base_url; /v2/embed, /v1/embed)"),
        ("Gemini", f"{url}   (google-genai: http_options base_url; /v1beta/, /v1/)"),
        ("Hugging Face", f"{url}/models/{{model}}"),
        ("AIGNE Hub", f"{url}/api"),
        ("HrFlow", f"{url}/v1/   (hrflow: api_url)"),
        ("Inworld", f"{url}/ml/v1alpha/embedding:embed"),
        ("native gRPC", f"{stack.envoy_target}   (reflection on; e.g. grpcurl -plaintext {stack.envoy_target} list)"),
    ]
    from .dialects import enabled

    if any(d.name == "reference" for d in enabled(cfg)):
        apis.append(("API reference", f"{url}/docs   (OpenAPI: {url}/openapi.json; and docs/apis.md)"))
    width = max(len(name) for name, _ in apis)
    lines = [f"ready in {seconds:.1f}s: model {model}", ""]
    lines += [f"  {name:<{width}}  {where}" for name, where in apis]
    lines += [
        "",
        f"  readiness  {stack.ready_url}",
        f"  metrics    {', '.join(stack.metrics_urls) or 'off'}",
        "",
        "Try it:",
        "",
        f"  curl {url}/v1/embeddings -H 'Content-Type: application/json' \\",
        *(["    -H \"Authorization: Bearer $EMBED_API_KEYS\" \\"] if keyed else []),
        f"    -d '{{\"model\": \"{model}\", \"input\": \"Hello!\"}}'",
        "",
        "Ctrl-C stops the server and Envoy.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
