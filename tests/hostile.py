"""Helpers for tests/test_hostile_bundle.py and tests/test_hostile_runtime.py: bundles altered the way a
hostile user (or a bad disk) would."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conftest import ROOT

from far_sdk.bundle.bundle import sha256_file
from far_sdk.bundle.manifest import dump_manifest

DEMO = ROOT / "engines" / "far-demo"


def copy_demo(tmp_path: Path, name: str = "b") -> Path:
    dest = tmp_path / name
    shutil.copytree(DEMO, dest)
    return dest


def manifest(bundle: Path) -> dict[str, Any]:
    return json.loads((bundle / "manifest.json").read_text())


def reseal(bundle: Path, mutate: Callable[[dict[str, Any]], Any]) -> None:
    """Apply ``mutate`` to the manifest and write it back with a valid digest (what an attacker who knows
    the digest rule does): only the schema and the file checks stand in the way."""
    m = manifest(bundle)
    mutate(m)
    (bundle / "manifest.json").write_bytes(dump_manifest(m))


def rehash(bundle: Path, *names: str) -> None:
    """Record the current size and sha256 of ``names`` in the manifest and re-seal it."""

    def update(m):
        for n in names:
            m["files"][n] = {"size": (bundle / n).stat().st_size, "sha256": sha256_file(bundle / n)}

    reseal(bundle, update)


def run_cli(main: Callable[[list[str]], int], argv: list[str]) -> tuple[int, str, str]:
    """Run a CLI ``main`` in-process; returns (status, stdout, stderr), argparse's SystemExit included."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
    return rc, out.getvalue(), err.getvalue()


def one_line_error(err: str) -> bool:
    """stderr is exactly one line and holds no traceback (one-line warnings, ``PROG: warning: ...``, aside)."""
    err = "".join(line for line in err.splitlines(keepends=True) if ": warning: " not in line)
    return err.count("\n") == 1 and err.endswith("\n") and "Traceback" not in err


# ---- safetensors files, built byte by byte ---------------------------------------------------------------


def safetensors_bytes(header: dict[str, Any] | bytes, data: bytes, *, n: int | None = None) -> bytes:
    """8-byte little-endian header length (``n`` overrides it), the header, the data."""
    raw = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(raw) if n is None else n) + raw + data


def two_tensors() -> tuple[dict[str, Any], bytes]:
    """A valid header and data: a [2, 2] and a [3] float32 tensor."""
    header = {
        "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "b": {"dtype": "F32", "shape": [3], "data_offsets": [16, 28]},
    }
    return header, bytes(range(28))
