"""A Hugging Face Hub on 127.0.0.1 for tests: the part of the Hub's HTTP protocol huggingface_hub's
``hf_hub_download`` speaks, so the real download code runs against it (point ``HF_ENDPOINT`` at :attr:`url`).

``HEAD|GET /{owner}/{repo}/resolve/{revision}/{path}`` answers with the file's ``X-Repo-Commit`` (the commit the
revision resolves to), ``ETag`` and ``Content-Length``, and serves ``Range: bytes=N-`` requests with 206 (how a
download resumes). Errors carry the Hub's ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``,
``EntryNotFound``), which huggingface_hub turns into its typed errors. A private repository answers 401 without
``Authorization: Bearer <token>``. ``cut_once`` paths send half their body on the first GET and then close the
connection, as a dropped network does; every request is logged in :attr:`requests`.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote


@dataclass
class Repo:
    commits: dict[str, dict[str, bytes]]  # commit (40 hex) -> {path: content}
    refs: dict[str, str]  # branch or tag -> commit
    token: str | None = None  # private: this bearer token is required


@dataclass
class HubServer:
    repos: dict[str, Repo] = field(default_factory=dict)
    cut_once: set[str] = field(default_factory=set)  # "repo_id/path": the first GET is cut halfway
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # (method, url path, Range header)

    def __post_init__(self) -> None:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                hub._answer(self, body=False)

            def do_GET(self) -> None:
                hub._answer(self, body=True)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _answer(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        rng = h.headers.get("Range")
        self.requests.append((h.command, h.path, rng))
        parts = h.path.split("?")[0].split("/")  # "", owner, repo, "resolve", revision, path...
        if len(parts) < 6 or parts[3] != "resolve":
            return self._error(h, 404, "RepoNotFound")
        repo_id, revision, path = f"{parts[1]}/{parts[2]}", unquote(parts[4]), unquote("/".join(parts[5:]))
        repo = self.repos.get(repo_id)
        if repo is None or (repo.token and h.headers.get("Authorization") != f"Bearer {repo.token}"):
            return self._error(h, 401 if repo is not None else 404, "RepoNotFound")
        commit = repo.refs.get(revision, revision if revision in repo.commits else None)
        if commit is None:
            return self._error(h, 404, "RevisionNotFound")
        data = repo.commits[commit].get(path)
        if data is None:
            return self._error(h, 404, "EntryNotFound", {"X-Repo-Commit": commit})
        start = int(rng.removeprefix("bytes=").split("-")[0]) if rng else 0
        h.send_response(206 if start else 200)
        h.send_header("X-Repo-Commit", commit)
        h.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        h.send_header("Content-Length", str(len(data) - start))
        if start:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.end_headers()
        if not body:
            return
        key = f"{repo_id}/{path}"
        if key in self.cut_once and not start:
            self.cut_once.discard(key)
            h.wfile.write(data[: len(data) // 2])
            h.wfile.flush()
            h.close_connection = True
            return
        h.wfile.write(data[start:])

    @staticmethod
    def _error(h: BaseHTTPRequestHandler, status: int, code: str, headers: dict | None = None) -> None:
        msg = f'{{"error": "{code}"}}'.encode()
        h.send_response(status)
        h.send_header("X-Error-Code", code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(msg)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(msg)


def commit_of(text: str) -> str:
    """A 40-hex commit id derived from ``text`` (stable across runs)."""
    return hashlib.sha1(text.encode()).hexdigest()
