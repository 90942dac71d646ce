"""A small Hugging Face Hub look-alike on 127.0.0.1 for tests (stdlib http.server in a thread).

It answers the endpoints huggingface_hub 2.x calls for ``snapshot_download`` / ``model_info``:

- ``GET /api/models/{repo}/revision/{rev}``: model info (``sha``, ``siblings``);
- ``GET /api/models/{repo}/tree/{rev}[/{path}]``: file listing (``type, path, size, oid``);
- ``HEAD|GET /{repo}/resolve/{rev}/{file}``: the file, with ``ETag``, ``X-Repo-Commit`` and
  ``Content-Length`` (what ``file_download.get_hf_file_metadata`` reads).

Errors carry ``X-Error-Code`` (RepoNotFound, RevisionNotFound, EntryNotFound) as the Hub's do,
so huggingface_hub raises its usual exception types. Every request is recorded with its
Authorization header, so tests can check that a token was sent. A repo can be made private:
then requests without the right bearer token get 401. ``fail_with = (status, reason)`` makes every
request fail with that answer (a Hub that is down or broken).
"""
from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


def git_blob_sha(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Commit:
    sha: str
    files: dict[str, bytes]


@dataclass
class Repo:
    repo_id: str
    commits: dict[str, Commit] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)   # branch/tag -> commit sha
    token: str | None = None                               # private repo: the token that can read it

    def add_commit(self, files: dict[str, bytes], *, refs: tuple[str, ...] = ("main",)) -> str:
        digest = hashlib.sha1()
        for name in sorted(files):
            digest.update(name.encode() + b"\0" + hashlib.sha1(files[name]).digest())
        digest.update(str(len(self.commits)).encode())
        sha = digest.hexdigest()
        self.commits[sha] = Commit(sha, dict(files))
        for ref in refs:
            self.refs[ref] = sha
        return sha

    def add_folder(self, folder: Path, *, refs: tuple[str, ...] = ("main",)) -> str:
        return self.add_commit({path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()},
                               refs=refs)

    def resolve(self, revision: str) -> Commit | None:
        if revision in self.commits:
            return self.commits[revision]
        sha = self.refs.get(revision)
        return self.commits.get(sha) if sha else None


@dataclass
class Request:
    method: str
    path: str
    authorization: str | None


class FakeHub:
    """``with FakeHub() as hub: hub.repo("org/name").add_folder(...); os.environ["HF_ENDPOINT"] = hub.url``"""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        # Set to e.g. (500, "Internal Server Error"): every request gets that answer (a failing Hub).
        self.fail_with: tuple[int, str] | None = None
        self._lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

            def do_HEAD(self) -> None:
                hub._handle(self, head=True)

            def do_GET(self) -> None:
                hub._handle(self, head=False)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def repo(self, repo_id: str) -> Repo:
        return self.repos.setdefault(repo_id, Repo(repo_id))

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    # -- request handling ---------------------------------------------------------------
    def _send(self, handler: BaseHTTPRequestHandler, status: int, body: bytes = b"", *, head: bool = False,
              headers: dict[str, str] | None = None) -> None:
        handler.send_response(status)
        for key, value in (headers or {}).items():
            handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        if not head:
            handler.wfile.write(body)

    def _error(self, handler: BaseHTTPRequestHandler, status: int, code: str, message: str, head: bool) -> None:
        body = json.dumps({"error": message}).encode()
        self._send(handler, status, body, head=head, headers={"Content-Type": "application/json",
                                                              "X-Error-Code": code, "X-Error-Message": message})

    def _json(self, handler: BaseHTTPRequestHandler, payload: object, head: bool) -> None:
        self._send(handler, 200, json.dumps(payload).encode(), head=head,
                   headers={"Content-Type": "application/json"})

    def _handle(self, handler: BaseHTTPRequestHandler, *, head: bool) -> None:
        raw_path = urlsplit(handler.path).path
        with self._lock:
            self.requests.append(Request(handler.command, raw_path, handler.headers.get("Authorization")))
        if self.fail_with is not None:
            status, reason = self.fail_with
            handler.send_response(status, reason)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return None
        parts = raw_path.strip("/").split("/")
        api = parts[:2] == ["api", "models"]
        if api:
            parts = parts[2:]
        if len(parts) < 3:
            return self._error(handler, 404, "RepoNotFound", "Repository not found", head)
        repo_id = f"{unquote(parts[0])}/{unquote(parts[1])}"
        repo = self.repos.get(repo_id)
        if repo is None:
            return self._error(handler, 401, "RepoNotFound", "Repository not found", head)
        if repo.token is not None and handler.headers.get("Authorization") != f"Bearer {repo.token}":
            return self._error(handler, 401, "RepoNotFound", "Repository not found", head)
        kind = parts[2]
        revision = unquote(parts[3]) if len(parts) > 3 else "main"
        commit = repo.resolve(revision)
        if commit is None:
            return self._error(handler, 404, "RevisionNotFound", f"Invalid rev id: {revision}", head)
        if api and kind == "revision":
            return self._json(handler, {
                "_id": repo_id, "id": repo_id, "modelId": repo_id, "sha": commit.sha, "private": repo.token is not None,
                "disabled": False, "gated": False, "tags": [], "downloads": 0, "likes": 0,
                "siblings": [{"rfilename": name} for name in sorted(commit.files)],
            }, head)
        if api and kind == "tree":
            prefix = "/".join(unquote(p) for p in parts[4:])
            entries = [{"type": "file", "path": name, "size": len(content), "oid": git_blob_sha(content)}
                       for name, content in sorted(commit.files.items())
                       if not prefix or name.startswith(prefix.rstrip("/") + "/")]
            return self._json(handler, entries, head)
        if not api and kind == "resolve" and len(parts) > 4:
            filename = "/".join(unquote(p) for p in parts[4:])
            content = commit.files.get(filename)
            if content is None:
                return self._error(handler, 404, "EntryNotFound", f"{filename} does not exist", head)
            return self._send(handler, 200, content, head=head, headers={
                "ETag": f'"{git_blob_sha(content)}"', "X-Repo-Commit": commit.sha,
                "Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"})
        return self._error(handler, 404, "EntryNotFound", f"unknown endpoint {raw_path}", head)
