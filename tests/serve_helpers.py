"""Shared by tests/test_serve*.py: one Ray Serve HTTP proxy for the test session, apps deployed on it per module,
and HTTP helpers that send paths exactly as written (http.client does not normalise ``/x/../generate``).

Every call carries a timeout, so a hang fails the test instead of stalling the suite."""

from __future__ import annotations

import base64
import contextlib
import http.client
import io
import json
import socket
from urllib.parse import urlsplit

import numpy as np

TIMEOUT = 60.0  # seconds any one HTTP call may take before the test fails
_PORT: list[int] = []  # the session's Serve HTTP port, once started


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_port() -> int:
    """Start Ray Serve's HTTP proxy once per session (on the session's local Ray) and return its port: Serve
    keeps the HTTP options of its first start, so every module deploys its apps behind this one proxy."""
    from ray import serve

    if not _PORT:
        _PORT.append(free_port())
        serve.start(http_options={"host": "127.0.0.1", "port": _PORT[0]})
    return _PORT[0]


@contextlib.contextmanager
def deployed(cfg):
    """Deploy ``cfg`` (a ServeConfig) as its own app at its route prefix; yields its base URL; deletes it after."""
    from ray import serve

    from far_sdk.scale.serve import build_app
    from far_sdk.scale.serve.deploy import quiet_serve_logs

    port = serve_port()
    with quiet_serve_logs():
        serve.run(build_app(cfg), name=cfg.app_name, route_prefix=cfg.route_prefix)
    try:
        yield f"http://127.0.0.1:{port}{cfg.route_prefix.rstrip('/')}"
    finally:
        with quiet_serve_logs():
            serve.delete(cfg.app_name)


def request(
    url: str,
    path: str = "",
    body: bytes | str | dict | None = None,
    method: str | None = None,
    timeout: float = TIMEOUT,
) -> tuple[int, dict, bytes]:
    """(status, lower-cased headers, body) of one request to ``url`` + ``path``, the path sent verbatim."""
    u = urlsplit(url)
    data = json.dumps(body).encode() if isinstance(body, dict) else body.encode() if isinstance(body, str) else body
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        conn.putrequest(method or ("POST" if data is not None else "GET"), (u.path.rstrip("/") + path) or "/")
        conn.putheader("Content-Length", str(len(data or b"")))
        if data is not None:
            conn.putheader("Content-Type", "application/json")
        conn.endheaders(data)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def events(payload: bytes) -> list[tuple[str, dict]]:
    """A Server-Sent Events body -> [(event, data)], comments dropped."""
    out = []
    for block in payload.decode().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if line and not line.startswith(":"))
        if fields:
            out.append((fields["event"], json.loads(fields["data"])))
    return out


def decode_pngs(images: list[str]) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(s)))) for s in images])


def settings_of(body: dict) -> dict:
    """The generate() keywords of a request body (its sampling options and preset)."""
    return {k: v for k, v in body.items() if k not in ("class_labels", "prompt", "seed", "output_format")}
