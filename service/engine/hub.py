"""Models by Hugging Face id: found in the Hugging Face cache, downloaded into it when allowed, verified byte for byte.

`ensure` runs before a server starts (in `python -m service.run`, `python -m service` and `python -m service.models
download`): it downloads what the cache lacks, with progress, honouring HF_TOKEN and HF_ENDPOINT, unless HF_HUB_OFFLINE
is set, when a model not in the cache stops the start with one line naming the command that fetches it. `snapshot`
runs in the server at load: it never goes to the network.

Every file of a snapshot is checked against the name the cache stores it under, which is its hash (sha256 for files kept
in LFS, git's blob sha1 for the others): a corrupt or partial file is removed and fetched again, or refused when the
hub may not be reached; it is never served.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# What a sentence-transformers folder needs: its JSON and text files (configs, tokenizer, vocabulary), sentencepiece
# models, and safetensors weights (the transformer's and a Dense head's). Not the repository's ONNX, OpenVINO, TF,
# Flax or Rust copies, and not pytorch_model.bin when safetensors exist (see `_WEIGHTS_FALLBACK`).
ALLOW = ["*.json", "*.txt", "*.model", "*.safetensors"]
IGNORE = ["onnx/*", "openvino/*", "coreml/*", "tf_model*", "flax_model*", "rust_model*"]
# For repositories without safetensors weights: torch's pickles (read by the ONNX export, never by the server).
_WEIGHTS_FALLBACK = ["pytorch_model.bin", "*/pytorch_model.bin"]

REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")
COMMIT = re.compile(r"^[0-9a-f]{40}$")


class HubError(RuntimeError):
    """A model named by id cannot be served from the cache; the message is one line that says what to do."""


@dataclass(frozen=True)
class Snapshot:
    repo: str
    revision: str  # what was asked for ("main" when nothing was)
    commit: str  # what it resolved to
    path: Path


def valid_repo_id(repo: str) -> bool:
    return bool(REPO_ID.match(repo)) and ".." not in repo and not repo.endswith((".", "-"))


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def fetch_command(repo: str, revision: str = "") -> str:
    return f"python -m service.models download {repo}" + (f" --revision {revision}" if revision else "")


def snapshot(repo: str, revision: str = "", check: bool = True) -> Snapshot:
    """The cached snapshot of `repo` at `revision`, without any network access (what a server does at load), its
    files verified unless `check` is false (a lookup of the folder of a model already loaded)."""
    path = _cached(repo, revision)
    if path is None:
        raise HubError(f"{repo}{'@' + revision if revision else ''} is not in the Hugging Face cache ({_cache_root()}); "
                       f"fetch it with `{fetch_command(repo, revision)}`")
    bad = verify(path) if check else []
    if bad:
        raise HubError(f"{repo}: {len(bad)} file(s) in the Hugging Face cache do not match their hash ({', '.join(bad[:3])}); "
                       f"fetch them again with `{fetch_command(repo, revision)}`")
    return Snapshot(repo, revision or "main", path.name, path)


def ensure(repo: str, revision: str = "", progress: bool = True) -> Snapshot:
    """The snapshot of `repo` at `revision`, downloaded (and corrupt files fetched again) if the hub may be reached."""
    if not valid_repo_id(repo):
        raise HubError(f"{repo!r} is not a Hugging Face repository id (owner/name)")
    path = _cached(repo, revision)
    if path is not None:
        bad = verify(path)
        if not bad:
            return Snapshot(repo, revision or "main", path.name, path)
        if offline():
            raise HubError(f"{repo}: {len(bad)} file(s) in the Hugging Face cache do not match their hash ({', '.join(bad[:3])}) and "
                           f"HF_HUB_OFFLINE is set: fetch them again with `HF_HUB_OFFLINE=0 {fetch_command(repo, revision)}`")
        log.warning("corrupt files in the Hugging Face cache: fetching them again", extra={"model": repo, "files": bad})
        for name in bad:
            _remove(path, name)
    elif offline():
        raise HubError(f"{repo}{'@' + revision if revision else ''} is not in the Hugging Face cache ({_cache_root()}) and HF_HUB_OFFLINE is "
                       f"set: fetch it with `HF_HUB_OFFLINE=0 {fetch_command(repo, revision)}`, or start with HF_HUB_OFFLINE=0")
    path = _download(repo, revision, progress)
    bad = verify(path)
    if bad:
        raise HubError(f"{repo}: {len(bad)} file(s) downloaded do not match their hash ({', '.join(bad[:3])}); not served")
    snap = Snapshot(repo, revision or "main", path.name, path)
    log.info("model downloaded", extra={"model": repo, "revision": snap.revision, "commit": snap.commit})
    return snap


def _cache_root() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _cached(repo: str, revision: str) -> Path | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = Path(snapshot_download(repo, revision=revision or None, allow_patterns=ALLOW, ignore_patterns=IGNORE,
                                      local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):  # not cached, or cached but incomplete (a subclass)
        return None
    return path if (path / "config.json").exists() or (path / "modules.json").exists() else None


def _download(repo: str, revision: str, progress: bool) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    (enable_progress_bars if progress else disable_progress_bars)()
    try:
        path = Path(snapshot_download(repo, revision=revision or None, allow_patterns=ALLOW, ignore_patterns=IGNORE))
        if not any(path.glob("*.safetensors")):
            path = Path(snapshot_download(repo, revision=revision or None, allow_patterns=ALLOW + _WEIGHTS_FALLBACK, ignore_patterns=IGNORE))
    except RevisionNotFoundError:
        raise HubError(f"{repo}: no revision {revision!r} on the hub") from None
    except GatedRepoError:
        raise HubError(f"{repo}: a gated repository; accept its terms on the hub and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise HubError(f"{repo}: no such repository on the hub (or a private one: set HF_TOKEN)") from None
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", "?")
        raise HubError(f"{repo}: the hub answered HTTP {status}") from None
    except Exception as e:  # connection failures, disk full: one line, never the token
        raise HubError(f"{repo}: download failed ({type(e).__name__})") from None
    return path


def verify(folder: Path) -> list[str]:
    """Files of a cached snapshot whose content does not match the hash the cache names them by (relative paths).

    A snapshot's files are links to `blobs/<hash>`: sha256 for LFS files (64 hex digits), git's blob sha1 otherwise
    (40). A plain folder (not in the hub's cache layout) has nothing to check against and passes."""
    bad = []
    for f in sorted(folder.rglob("*")):
        if not f.is_symlink():
            continue
        name = f.relative_to(folder).as_posix()
        try:
            target = f.resolve(strict=True)
        except (OSError, RuntimeError):
            bad.append(name)  # a dangling link: its blob is gone
            continue
        digest = target.name
        if len(digest) == 64:
            h = hashlib.sha256()
        elif len(digest) == 40:
            h = hashlib.sha1(f"blob {target.stat().st_size}\0".encode())
        else:
            continue
        with open(target, "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
        if h.hexdigest() != digest:
            bad.append(name)
    return bad


def _remove(folder: Path, name: str) -> None:
    """Removes a snapshot's file and its blob, so that the next download fetches it again."""
    link = folder / name
    try:
        blob = link.resolve()
        if blob.exists():
            blob.unlink()
    except OSError:
        pass
    link.unlink(missing_ok=True)
