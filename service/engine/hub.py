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

import fnmatch
import hashlib
import json
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
REVISION_PART = re.compile(r"^[A-Za-z0-9._-]+$")
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
    if not (REPO_ID.match(repo) and ".." not in repo and "--" not in repo and not repo.endswith((".", "-", ".git"))):
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError:
        return False
    return True


def valid_revision(revision: str) -> bool:
    """A branch, tag or commit as git allows them here: segments of [A-Za-z0-9._-] joined by single slashes, none of them
    `.` or `..` (huggingface_hub joins a revision into cache paths: `/etc/x` or `../..` would leave the cache)."""
    parts = revision.split("/")
    return 0 < len(revision) <= 128 and all(REVISION_PART.match(p) and p not in (".", "..") for p in parts)


def _check_names(repo: str, revision: str) -> None:
    if not valid_repo_id(repo):
        raise HubError(f"{repo!r} is not a Hugging Face repository id (owner/name)")
    if revision and not valid_revision(revision):
        raise HubError(f"{revision!r} is not a branch, tag or commit")


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def fetch_command(repo: str, revision: str = "") -> str:
    return f"python -m service.models download {repo}" + (f" --revision {revision}" if revision else "")


def snapshot(repo: str, revision: str = "", check: bool = True) -> Snapshot:
    """The cached snapshot of `repo` at `revision`, without any network access (what a server does at load), its
    files verified unless `check` is false (a lookup of the folder of a model already loaded)."""
    _check_names(repo, revision)
    path = _cached(repo, revision)
    if path is None:
        raise HubError(f"{repo}{'@' + revision if revision else ''} is not in the Hugging Face cache ({_cache_root()}); "
                       f"fetch it with `{fetch_command(repo, revision)}`")
    bad = verify(path) if check else []
    if bad:
        raise HubError(f"{repo}: {len(bad)} file(s) in the Hugging Face cache fail their hash check ({', '.join(bad[:3])}); "
                       f"fetch them again with `{fetch_command(repo, revision)}`")
    return Snapshot(repo, revision or "main", path.name, path)


def ensure(repo: str, revision: str = "", progress: bool = True) -> Snapshot:
    """The snapshot of `repo` at `revision`, downloaded (and corrupt files fetched again) if the hub may be reached."""
    _check_names(repo, revision)
    path = _cached(repo, revision)
    if path is not None:
        bad = verify(path)
        if not bad:
            return Snapshot(repo, revision or "main", path.name, path)
        if offline():
            raise HubError(f"{repo}: {len(bad)} file(s) in the Hugging Face cache fail their hash check ({', '.join(bad[:3])}) and "
                           f"HF_HUB_OFFLINE is set: fetch them again with `{fetch_command(repo, revision)}`")
        log.warning("corrupt files in the Hugging Face cache: fetching them again", extra={"model": repo, "files": bad})
        for name in bad:
            _remove(path, name)
    elif offline():
        raise HubError(f"{repo}{'@' + revision if revision else ''} is not in the Hugging Face cache ({_cache_root()}) and HF_HUB_OFFLINE is "
                       f"set: fetch it with `{fetch_command(repo, revision)}`, or start with HF_HUB_OFFLINE=0")
    path = _download(repo, revision, progress)
    bad = verify(path)
    if bad:
        raise HubError(f"{repo}: {len(bad)} file(s) downloaded fail their hash check ({', '.join(bad[:3])}); not served")
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
    except (LocalEntryNotFoundError, ValueError):  # not cached, or cached but incomplete (a subclass)
        return None
    except OSError as e:
        raise HubError(f"{repo}: the Hugging Face cache cannot be read ({e.strerror or type(e).__name__})") from None
    return path if _complete(path) else None


def _complete(path: Path) -> bool:
    """Whether a snapshot holds what a server reads: the transformer's config, tokenizer and weights. huggingface_hub
    itself knows a snapshot is partial only where it cached the repository's file list (1.22 and later), and another
    tool may have fetched a few files of it (transformers' config.json alone)."""
    if path.parent.name != "snapshots" or not COMMIT.match(path.name):
        return False
    try:
        modules = json.loads((path / "modules.json").read_text()) if (path / "modules.json").exists() else [{"path": ""}]
        transformer = path / (modules[0].get("path") or "")
    except (OSError, ValueError, AttributeError, IndexError, TypeError):
        return False
    weights = any(transformer.glob("*.safetensors")) or (transformer / "pytorch_model.bin").exists()
    return weights and (transformer / "config.json").exists() and (transformer / "tokenizer.json").exists()


def _download(repo: str, revision: str, progress: bool) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    (enable_progress_bars if progress else disable_progress_bars)()
    try:
        path = Path(snapshot_download(repo, revision=revision or None, allow_patterns=ALLOW, ignore_patterns=IGNORE))
        if not any(path.rglob("*.safetensors")):
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
    except OSError as e:
        if "Cannot find an appropriate cached snapshot" in str(e) or type(e).__name__ in ("LocalEntryNotFoundError", "OfflineModeIsEnabled"):
            raise HubError(f"{repo}: the hub at {_endpoint()} could not be reached") from None
        raise HubError(f"{repo}: download failed ({e.strerror or type(e).__name__})") from None
    except Exception as e:  # connection failures: one line, never the token
        raise HubError(f"{repo}: download failed ({type(e).__name__}) from {_endpoint()}") from None
    if not COMMIT.match(path.name) or path.parent.name != "snapshots":
        raise HubError(f"{repo}: the hub answered a commit that is not one ({path.name[:60]!r})")
    return path


def _endpoint() -> str:
    """The hub's address for a message: without any user:password a mirror's URL may carry."""
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    url = urlsplit(constants.ENDPOINT)
    return url._replace(netloc=url.hostname + (f":{url.port}" if url.port else "") if url.hostname else "").geturl()


def _wanted(name: str) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in ALLOW + _WEIGHTS_FALLBACK) and not any(fnmatch.fnmatch(name, p) for p in IGNORE)


def _listing(storage: Path, commit: str) -> dict[str, tuple[str, str]]:
    """What the hub said of each file at `commit` (huggingface_hub caches the listing in trees/<commit>.json since
    1.22): path -> ("sha256", LFS hash) or ("sha1", git blob id). Empty when there is none."""
    try:
        files = json.loads((storage / "trees" / f"{commit}.json").read_text())["files"]
        return {p: ("sha256", e["lfs_sha256"]) if e.get("lfs_sha256") else ("sha1", e["blob_id"]) for p, e in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def verify(folder: Path) -> list[str]:
    """Files of a cached snapshot a server reads whose content does not match their hash, or that cannot be checked
    (relative paths; empty: all good).

    The hash is the one the hub listed for the file (trees/<commit>.json), else the name of the blob the snapshot's
    link points to (sha256 for LFS files, git's blob sha1 for the others), which must lie in the repository's blobs/.
    A file with neither (a copied cache that lost its links and listing) counts as bad: it cannot be verified."""
    storage = folder.parent.parent
    listing = _listing(storage, folder.name)
    blobs = (storage / "blobs").resolve()
    bad = []
    for f in sorted(folder.rglob("*")):
        name = f.relative_to(folder).as_posix()
        if f.is_dir() or not _wanted(name):
            continue
        try:
            target = f.resolve(strict=True)
            if f.is_symlink() and target.parent != blobs:
                bad.append(name)  # a link out of this repository's blobs
                continue
            kind, digest = listing.get(name) or ("sha256" if len(target.name) == 64 else "sha1" if len(target.name) == 40 else "", target.name)
            if not kind or not f.is_symlink() and name not in listing or not target.is_file():
                bad.append(name)
                continue
            h = hashlib.sha256() if kind == "sha256" else hashlib.sha1(f"blob {target.stat().st_size}\0".encode())
            with open(target, "rb") as fh:
                while chunk := fh.read(1 << 22):
                    h.update(chunk)
        except (OSError, RuntimeError):
            bad.append(name)  # unreadable, or a dangling link: its blob is gone
            continue
        if h.hexdigest() != digest:
            bad.append(name)
    return bad


def _remove(folder: Path, name: str) -> None:
    """Removes a snapshot's file and its blob (only inside this repository's blobs/), so that the next download fetches
    it again."""
    link = folder / name
    try:
        blob = link.resolve()
        if blob.parent == (folder.parent.parent / "blobs").resolve() and blob.is_file():
            blob.unlink()
        link.unlink(missing_ok=True)
    except OSError as e:
        raise HubError(f"{name}: cannot be removed from the Hugging Face cache ({e.strerror})") from None
