"""Writing into a bundle's TensorRT engine cache (:mod:`far_sdk.backends.tensorrt.cache` reads it): the build
lock, a plan and its sidecar written atomically, and the index ``engines.json`` rebuilt from the sidecars."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from far_sdk.backends.tensorrt.cache import (
    INDEX_NAME,
    LOCK_NAME,
    SIDECAR_FORMAT,
    EngineKey,
    format_profile,
    plan_path,
    sidecar_path,
    sidecars,
    trt_dir,
)
from far_sdk.fileio import atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)


@contextlib.contextmanager
def build_lock(bundle: Any) -> Iterator[Path]:
    """Hold an exclusive ``flock`` on ``bundle/trt/.lock``: a second builder waits here, then finds the plan built."""
    d = trt_dir(bundle)
    d.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl  # noqa: PLC0415 - POSIX only: Windows has none (handled below)
    except ImportError:  # Windows: no flock; concurrent builds there are the caller's business
        log.warning("no file locking on this platform: do not build engines for %s from two processes at once", d)
        yield d
        return
    with open(d / LOCK_NAME, "a+b") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process is building engines in %s; waiting for it", d)
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield d
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def record_plan(
    bundle: Any,
    key: EngineKey,
    plan: bytes | memoryview,
    *,
    build_seconds: float,
    validation: dict[str, Any] | None,
    far_sdk_version: str | None = None,
) -> Path:
    """Write ``plan`` and its sidecar atomically (call under :func:`build_lock`), then refresh the index.

    The old sidecar goes first, so a crash in between leaves a plan without a sidecar (rejected
    and rebuilt), never a sidecar describing another plan.
    """
    path = plan_path(bundle, key)
    side_p = sidecar_path(path)
    with contextlib.suppress(FileNotFoundError):
        side_p.unlink()
    view = memoryview(plan).cast("B")
    atomic_write_bytes(path, view)
    now = time.time()
    atomic_write_json(
        side_p,
        {
            "format": SIDECAR_FORMAT,
            "key": key.to_dict(),
            "digest": key.digest(),
            "graph_batch": list(key.graph_profile),
            "plan": path.name,
            "plan_size": view.nbytes,
            "plan_sha256": hashlib.sha256(view).hexdigest(),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
            "built_at_unix": now,
            "build_seconds": round(float(build_seconds), 3),
            "far_sdk": far_sdk_version,
            "validation": validation,
        },
    )
    write_index(bundle)
    return path


def write_index(bundle: Any) -> Path:
    """Rewrite ``bundle/trt/engines.json`` from the sidecars (so it never disagrees with them)."""
    engines = []
    for key, side, p in sidecars(bundle):
        engines.append(
            {
                "graph": key.graph,
                "precision": key.precision,
                "profile": format_profile(key.profile),
                "opt_level": key.opt_level,
                "tensorrt": key.tensorrt,
                "gpu": key.gpu,
                "compute_capability": key.compute_capability,
                "plan": p.name[:-5],
                "plan_size": side.get("plan_size"),
                "built_at": side.get("built_at"),
                "build_seconds": side.get("build_seconds"),
                "validation": side.get("validation"),
            }
        )
    path = trt_dir(bundle) / INDEX_NAME
    atomic_write_json(
        path,
        {
            "format": "far-trt-index",
            "note": "TensorRT engines built on this machine; manifest.json (hashed, immutable) does not list them.",
            "engines": engines,
        },
    )
    return path
