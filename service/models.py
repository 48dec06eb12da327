"""`python -m service.models`: models named by Hugging Face id, ahead of time.

    python -m service.models download sentence-transformers/all-mpnet-base-v2 [--revision REV]

fills the Hugging Face cache ($HF_HOME/hub, or $HF_HUB_CACHE) with what a server needs of the model, with progress,
honouring HF_TOKEN and HF_ENDPOINT (whatever HF_HUB_OFFLINE says: fetching is what it is for), and checks every file
against its hash; then a server started with HF_HUB_OFFLINE=1 (the default) serves it. For images and air-gapped hosts: download where the hub is reachable, copy the cache.
"""

from __future__ import annotations

import argparse
import os
import sys

from .config import Config


def ensure_models(cfg: Config, progress: bool = True) -> list[str]:
    """Before a server starts: every model named by id is in the cache and intact, downloaded when the hub may be
    reached. Returns one line per model that cannot be served (empty: all can)."""
    from .engine.hub import HubError, ensure

    problems = []
    for i, m in enumerate(cfg.models):
        if m.repo:
            try:
                snap = ensure(m.repo, m.revision, progress=progress)
            except HubError as e:
                problems.append(f"models[{i}] ({m.id}): {e}")
            except OSError as e:  # the cache's disk: full, read-only, not ours
                problems.append(f"models[{i}] ({m.id}): the Hugging Face cache: {e.strerror or type(e).__name__}")
            else:
                if progress:
                    print(f"model {m.id}: {snap.repo}@{snap.revision} is commit {snap.commit}", file=sys.stderr, flush=True)
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m service.models", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("download", help="fetch a model into the Hugging Face cache and verify it")
    d.add_argument("repo", help="a Hugging Face model id, e.g. BAAI/bge-small-en-v1.5 (ID@REVISION allowed)")
    d.add_argument("--revision", default="", help="a branch, tag or commit (default: main)")
    args = p.parse_args(argv)
    # A download is what this command is for: the service's HF_HUB_OFFLINE=1 (the image's too) is set aside here.
    os.environ["HF_HUB_OFFLINE"] = "0"
    from .engine.hub import HubError, ensure

    repo, _, at = args.repo.partition("@")
    try:
        snap = ensure(repo, args.revision or at)
    except HubError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: what was downloaded stays in the cache; run it again to finish", file=sys.stderr)
        return 130
    print(f"{snap.repo}@{snap.revision}: commit {snap.commit}\n{snap.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
