"""`python -m service`: the gRPC server alone (see `python -m service.run` for server + Envoy)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# gRPC's C core logs to stderr past our structured logs; errors only.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from . import config as config_mod  # noqa: E402
from . import logs  # noqa: E402


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m service", description=__doc__)
    p.add_argument("--config", default=os.environ.get("EMBED_CONFIG"), help="YAML configuration file (or $EMBED_CONFIG)")
    p.add_argument("--host", help="address to listen on (server.host)")
    p.add_argument("--grpc-port", type=int, help="gRPC port (server.grpc_port); 0 picks a free one")
    from .run import add_model_flags

    add_model_flags(p)
    p.add_argument("--log-level", help="debug | info | warning (server.log_level)")
    p.add_argument("--log-format", help="json | text (server.log_format)")
    p.add_argument("--print-config", action="store_true", help="print the effective configuration and exit")
    return p


def build_config(args: argparse.Namespace) -> config_mod.Config:
    from .run import model_flags

    flags = {"server.host": args.host or None, "server.grpc_port": args.grpc_port, "server.log_level": args.log_level or None,
             "server.log_format": args.log_format or None, **model_flags(args)}
    return config_mod.apply_flags(config_mod.load(args.config), flags, args.model, args.model_id, args.revision, args.served_model_name)


def bound_runtime_caches(cfg: config_mod.Config) -> None:
    """Process-wide runtime settings that must precede any model's load (runtimes.threads.bound_onednn_cache)."""
    from .engine.models import resolve_mode
    from .runtimes.threads import bound_onednn_cache

    modes = []
    for model in cfg.models:
        if not model.provider:
            try:
                modes.append(resolve_mode(model))
            except ValueError:  # the model's load reports it
                pass
    bound_onednn_cache(modes)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        cfg = build_config(args)
    except config_mod.ConfigError as e:
        print(f"configuration error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(mask_secrets=True), sort_keys=False), end="")
        return 0
    from .launch import MODELS_FETCHED
    from .run import fetch_models

    if os.environ.get(MODELS_FETCHED) != "1" and not fetch_models(cfg):
        return 2
    return run_server(cfg)


def run_server(cfg: config_mod.Config) -> int:
    """Serves until SIGTERM or SIGINT, then drains (server.grace_seconds)."""
    logs.setup(cfg.server.log_level, cfg.server.log_format)
    bound_runtime_caches(cfg)
    from .auth import KeysFileError
    from .server import serve

    try:
        asyncio.run(serve(cfg))
    except KeysFileError as e:  # its message names the file and the problem, never the file's content
        print(f"configuration error: auth.keys_file: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
