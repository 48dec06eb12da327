"""A local stand-in for the Hugging Face hub: the one service this machine cannot reach.

It serves real model folders as repositories, at commits and branches, the way huggingface_hub reads the hub (its
`HF_ENDPOINT`): `GET /api/models/{repo}/revision/{rev}` (what a revision resolves to), `GET /api/models/{repo}/tree/{rev}`
(the files, with git blob ids, LFS sha256 and sizes) and `HEAD`/`GET /{repo}/resolve/{rev}/{path}` (a file, with
`X-Repo-Commit`, `ETag`, `X-Linked-Etag` and `X-Linked-Size`). Errors carry `X-Error-Code` as the hub's do. A repository
may be private (a bearer token required), and a file may be served corrupted, to test what the client does with it.
Every request is recorded.
"""

from __future__ import annotations

import hashlib
import json
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

LFS_MIN_BYTES = 1 << 20  # files this large are "in LFS", as the hub stores weights


@dataclass
class File:
    path: str
    source: Path
    size: int
    blob_id: str  # git's blob sha1
    sha256: str | None  # LFS files only


@dataclass
class Repo:
    files_by_commit: dict[str, dict[str, File]]
    refs: dict[str, str]  # branch or tag -> commit
    token: str = ""  # private: this bearer token is required
    corrupt: set[str] = field(default_factory=set)  # paths served with one byte changed


def _file(path: str, source: Path) -> File:
    data = source.read_bytes()
    blob = hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()
    sha = hashlib.sha256(data).hexdigest() if len(data) >= LFS_MIN_BYTES else None
    return File(path, source, len(data), blob, sha)


def folder_files(folder: Path, skip: tuple[str, ...] = ("desktop.ini", "README.md")) -> dict[str, File]:
    return {p.relative_to(folder).as_posix(): _file(p.relative_to(folder).as_posix(), p)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in skip}


class HubStub:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str, str]] = []  # (method, path, authorization)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def add(self, repo: str, folder: Path, commit: str, refs: dict[str, str] | None = None, token: str = "") -> None:
        """Serves `folder` as `repo` at `commit`; `refs` name it (default: main)."""
        entry = self.repos.setdefault(repo, Repo({}, {}, token))
        entry.files_by_commit[commit] = folder_files(folder)
        entry.refs.update(refs or {"main": commit})

    def __enter__(self) -> HubStub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def downloads(self, name: str) -> int:
        return sum(1 for m, p, _ in self.requests if m == "GET" and "/resolve/" in p and p.endswith("/" + name))

    def _handler(self):
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:  # noqa: N802
                self._serve(body=False)

            def do_GET(self) -> None:  # noqa: N802
                self._serve(body=True)

            def _error(self, status: int, code: str, message: str) -> None:
                data = json.dumps({"error": message}).encode()
                self.send_response(status)
                self.send_header("X-Error-Code", code)
                self.send_header("X-Error-Message", message)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _json(self, value: object, headers: dict[str, str] | None = None) -> None:
                data = json.dumps(value).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _repo(self, name: str) -> Repo | None:
                repo = stub.repos.get(name)
                if repo is None:
                    self._error(404, "RepoNotFound", f"Repository {name} not found")
                    return None
                if repo.token and self.headers.get("Authorization", "") != f"Bearer {repo.token}":
                    self._error(401, "RepoNotFound", "Invalid credentials in Authorization header")
                    return None
                return repo

            def _commit(self, repo: Repo, rev: str) -> str | None:
                commit = rev if rev in repo.files_by_commit else repo.refs.get(rev)
                if commit is None:
                    self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
                return commit

            def _resolve(self, name: str, rev: str) -> tuple[Repo, str] | None:
                """The repository and the commit `rev` names, or None when an error was answered."""
                repo = self._repo(name)
                commit = self._commit(repo, rev) if repo is not None else None
                return (repo, commit) if repo is not None and commit is not None else None

            def _serve(self, body: bool) -> None:
                url = urllib.parse.urlsplit(self.path)
                path = urllib.parse.unquote(url.path)
                stub.requests.append((self.command, path, self.headers.get("Authorization", "")))
                parts = path.strip("/").split("/")
                if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("revision", "tree"):
                    name, kind, rev = "/".join(parts[2:4]), parts[4], parts[5]
                    found = self._resolve(name, rev)
                    if found is None:
                        return
                    repo, commit = found
                    files = repo.files_by_commit[commit]
                    if kind == "revision":
                        return self._json({"_id": name, "id": name, "modelId": name, "sha": commit, "private": bool(repo.token),
                                           "tags": [], "siblings": [{"rfilename": p} for p in files]})
                    prefix = "/".join(parts[6:])
                    entries = []
                    dirs = sorted({"/".join(p.split("/")[:i]) for p in files for i in range(1, p.count("/") + 1)})
                    for d in dirs:
                        if d.startswith(prefix):
                            entries.append({"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d})
                    for p, f in files.items():
                        if p.startswith(prefix):
                            e = {"type": "file", "oid": f.blob_id, "size": f.size, "path": p}
                            if f.sha256:
                                e["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": 134}
                            entries.append(e)
                    return self._json(entries)
                if len(parts) >= 5 and parts[2] == "resolve":
                    name, rev, file_path = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
                    found = self._resolve(name, rev)
                    if found is None:
                        return
                    repo, commit = found
                    f = repo.files_by_commit[commit].get(file_path)
                    if f is None:
                        return self._error(404, "EntryNotFound", f"{file_path} does not exist at {rev}")
                    data = f.source.read_bytes()
                    if file_path in repo.corrupt:
                        data = bytes([data[0] ^ 0xFF]) + data[1:]
                    start = 0
                    ranged = self.headers.get("Range", "")
                    if ranged.startswith("bytes=") and ranged.endswith("-"):
                        start = int(ranged[6:-1] or 0)
                    self.send_response(206 if start else 200)
                    self.send_header("X-Repo-Commit", commit)
                    self.send_header("ETag", f'"{f.sha256 or f.blob_id}"')
                    if f.sha256:
                        self.send_header("X-Linked-Etag", f'"{f.sha256}"')
                        self.send_header("X-Linked-Size", str(f.size))
                    self.send_header("Content-Type", "application/octet-stream")
                    self.send_header("Content-Length", str(len(data) - start))
                    if start:
                        self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                    self.end_headers()
                    if body:
                        self.wfile.write(data[start:])
                    return
                self._error(404, "EntryNotFound", f"no route {path}")

        return Handler
