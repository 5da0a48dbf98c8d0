"""A Hugging Face hub without the network, for the base model's hub source (ftpipe/model/sources.py):

- `write_hub_cache`: a model folder laid out as huggingface_hub's cache holds it
  (models--org--name/{blobs,snapshots/<commit>,refs/main}, snapshot files symlinked to blobs named by their
  git blob id, or by their SHA-256 for the files the Hub stores with Git LFS);
- `FakeHub`: a loopback HTTP server (127.0.0.1, a thread) answering the requests snapshot_download makes for a
  pinned commit, as huggingface_hub 1.x makes them: the file listing GET /api/models/{repo}/tree/{commit}
  (a JSON list; huggingface_hub writes it to the cache's trees/ and uses it to tell a complete snapshot), the
  model info GET /api/models/{repo}/revision/{revision} (asked for a branch name), and each file's
  HEAD and GET /{repo}/resolve/{commit}/{path}, whose headers must carry X-Repo-Commit, an ETag (X-Linked-Etag
  and X-Linked-Size for an LFS file) and Content-Length. Unknown repos and revisions get the Hub's 404 with its
  X-Error-Code (RepoNotFound, RevisionNotFound), which huggingface_hub turns into its typed errors.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".model", ".gguf")   # what a Hub repo's .gitattributes stores with Git LFS


def git_blob_id(data: bytes) -> str:
    """git's object id of a file: the id the Hub gives a non-LFS file, and its ETag."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


def repo_files(model_dir: Path) -> dict[str, bytes]:
    return {path.relative_to(model_dir).as_posix(): path.read_bytes()
            for path in sorted(Path(model_dir).rglob("*")) if path.is_file()}


def is_lfs(name: str) -> bool:
    return name.endswith(LFS_SUFFIXES)


def blob_name(name: str, data: bytes) -> str:
    return hashlib.sha256(data).hexdigest() if is_lfs(name) else git_blob_id(data)


def write_hub_cache(cache: Path, repo_id: str, commit: str, files: dict[str, bytes], ref: str = "main") -> Path:
    """`files` as the snapshot `commit` of `repo_id` in the hub cache folder `cache`; returns the snapshot folder."""
    storage = Path(cache) / f"models--{repo_id.replace('/', '--')}"
    snapshot = storage / "snapshots" / commit
    for name, data in files.items():
        blob = storage / "blobs" / blob_name(name, data)
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / ref).write_text(commit)
    return snapshot


class FakeHub:
    """A loopback Hub serving `repos` ({repo_id: {commit: {path: bytes}}}); `branches` maps a branch to a commit.
    `requests` lists (method, path) of every request, for tests that check what was asked."""

    def __init__(self, repos: dict[str, dict[str, dict[str, bytes]]], branches: dict[str, str] | None = None):
        self.repos, self.branches, self.requests = repos, branches or {}, []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:   # quiet: pytest shows failures, not access logs
                pass

            def do_GET(self) -> None:
                hub.answer(self, body=True)

            def do_HEAD(self) -> None:
                hub.answer(self, body=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeHub":
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.server.shutdown()
        self.server.server_close()

    def answer(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlsplit(handler.path).path)
        self.requests.append((handler.command, path))
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("tree", "revision"):
            repo_id, kind, revision = "/".join(parts[2:4]), parts[4], parts[5]
            files = self.find(handler, repo_id, revision)
            if files is None:
                return
            commit = self.commit_of(revision)
            if kind == "tree":
                listing = [self.entry(name, data) for name, data in files.items()]
            else:
                listing = {"id": repo_id, "sha": commit, "siblings": [{"rfilename": name} for name in files]}
            self.send(handler, 200, json.dumps(listing).encode(), {"Content-Type": "application/json"}, body)
        elif len(parts) >= 5 and parts[2] == "resolve":
            repo_id, revision, name = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
            files = self.find(handler, repo_id, revision)
            if files is None:
                return
            if name not in files:
                self.send(handler, 404, b"", {"X-Error-Code": "EntryNotFound"}, body)
                return
            data = files[name]
            headers = {"X-Repo-Commit": self.commit_of(revision), "ETag": f'"{git_blob_id(data)}"'}
            if is_lfs(name):
                headers.update({"X-Linked-Etag": f'"{blob_name(name, data)}"', "X-Linked-Size": str(len(data))})
            self.send(handler, 200, data, headers, body)
        else:
            self.send(handler, 404, b"", {}, body)

    def commit_of(self, revision: str) -> str:
        return self.branches.get(revision, revision)

    def find(self, handler: BaseHTTPRequestHandler, repo_id: str, revision: str) -> dict[str, bytes] | None:
        """The files of `repo_id` at `revision`, or None once the Hub's 404 is sent."""
        if repo_id not in self.repos:
            self.send(handler, 404, b"", {"X-Error-Code": "RepoNotFound"}, handler.command == "GET")
            return None
        files = self.repos[repo_id].get(self.commit_of(revision))
        if files is None:
            self.send(handler, 404, b"", {"X-Error-Code": "RevisionNotFound"}, handler.command == "GET")
        return files

    @staticmethod
    def entry(name: str, data: bytes) -> dict:
        entry = {"type": "file", "path": name, "size": len(data), "oid": git_blob_id(data)}
        if is_lfs(name):
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return entry

    @staticmethod
    def send(handler: BaseHTTPRequestHandler, status: int, data: bytes, headers: dict[str, str], body: bool) -> None:
        handler.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(data))}.items():
            handler.send_header(key, value)
        handler.end_headers()
        if body:
            handler.wfile.write(data)
