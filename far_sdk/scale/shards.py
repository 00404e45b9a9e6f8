"""The shards of ``far generate-dataset`` and their integrity records.

Shard K of S is ``shard-KKKKK-of-SSSSS.npz`` (ADM's layout: ``arr_0`` uint8 [n, H, W, 3], ``arr_1`` int64 [n]: the
class ids, or for a text job each image's caption index into ``dataset.json``'s ``captions``; a text job adds
``captions``: each image's caption). Beside it, ``shard-KKKKK-of-SSSSS.json`` records what the shard must be::

    {"format": "far-dataset-shard-v1", "job_sha256": ..., "shard": K, "num_shards": S, "images": [start, stop],
     "file": "shard-KKKKK-of-SSSSS.npz", "size": ..., "sha256": ...}

``job_sha256`` is the sha256 of the job's canonical JSON (what ``dataset.json`` holds). The record is written
atomically *before* the shard is renamed into place, so a shard under its final name always has its record (a kill
in between leaves a record whose shard is missing or stale: it is regenerated). A resumed job keeps a shard only
when its record names this job and shard and the file's size and sha256 match it, and checks the sha256 again
while it merges: a flipped byte, a truncated file or a shard of another job is found, never merged.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from far_sdk.bundle.bundle import sha256_file
from far_sdk.errors import DataError
from far_sdk.fileio import atomic_write_json, atomic_writer
from far_sdk.scale.npzfile import (
    load_arrays,
    npz_headers,
    open_zip,
    read_regular,
    sha256_of_fd,
    stream_array,
    write_array,
)

RECORD_FORMAT = "far-dataset-shard-v1"
MAX_RECORD_BYTES = 1 << 16


def canonical_sha256(obj: Any) -> str:
    """sha256 of ``obj``'s canonical JSON (sorted keys, no spaces, ASCII): a job's identity in its shard records."""
    return hashlib.sha256(
        json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    ).hexdigest()


def shard_path(out: Path, k: int, n: int) -> Path:
    return out / f"shard-{k:05d}-of-{n:05d}.npz"


def record_path(shard: Path) -> Path:
    return shard.with_suffix(".json")


def write_shard(path: Path, record: dict[str, Any], fill: Callable[[Any], None]) -> dict[str, Any]:
    """Write a shard atomically: ``fill(zip)`` adds its members; then its record (``record`` + size + sha256) is
    written, then the shard gets its name. Returns the record."""
    with atomic_writer(path) as f:
        with open_zip(f) as zf:
            fill(zf)
        f.flush()
        digest, size = sha256_of_fd(f.fileno())
        record = {"format": RECORD_FORMAT, **record, "file": path.name, "size": size, "sha256": digest}
        atomic_write_json(record_path(path), record)  # before the rename: a named shard always has its record
    return record


def _read_record(path: Path) -> dict[str, Any] | str:
    """The record as a dict, or why there is none usable."""
    try:
        if stat.S_ISLNK(os.lstat(path).st_mode):
            return f"its record {path.name} is a symbolic link"
        rec = json.loads(read_regular(path, MAX_RECORD_BYTES))
    except FileNotFoundError:
        return "it has no integrity record (written by an older far-sdk, or copied in)"
    except (OSError, DataError, ValueError, RecursionError) as e:
        return f"its record {path.name} is unreadable ({e})"
    if not isinstance(rec, dict) or rec.get("format") != RECORD_FORMAT:
        return f"its record {path.name} is not a {RECORD_FORMAT} record"
    return rec


def verify_shard(
    path: Path, *, job_sha256: str, k: int, num_shards: int, arrays: dict[str, tuple]
) -> dict[str, Any] | str:
    """The record of ``path`` when it is shard ``k`` of this job, complete and unaltered; else why not (the shard
    is then generated again). ``arrays``: {name: (shape, dtype)} the shard must hold. FileNotFoundError when there
    is no shard; a directory in its place is a DataError (it cannot be replaced)."""
    st = os.lstat(path)
    if stat.S_ISDIR(st.st_mode):
        raise DataError(f"{path} is a directory where far generate-dataset writes a shard: remove it")
    if not stat.S_ISREG(st.st_mode):
        return "it is not a regular file (a symbolic link or a special file)"
    if os.path.isdir(record_path(path)):
        raise DataError(f"{record_path(path)} is a directory where far generate-dataset writes a record: remove it")
    rec = _read_record(record_path(path))
    if isinstance(rec, str):
        return rec
    if rec.get("job_sha256") != job_sha256:
        return (
            f"it was written by another job (its record names job {str(rec.get('job_sha256'))[:12]}..., this job is "
            f"{job_sha256[:12]}...)"
        )
    if (rec.get("shard"), rec.get("num_shards"), rec.get("file")) != (k, num_shards, path.name):
        return "its record describes another shard"
    if st.st_size != rec.get("size"):
        return f"its size {st.st_size} differs from the {rec.get('size')} bytes recorded (truncated or altered)"
    if sha256_file(path) != rec.get("sha256"):
        return "its sha256 differs from the one recorded when it was written (corrupted or altered)"
    try:
        got = {n: (h.shape, h.dtype) for n, h in npz_headers(path).items()}
    except DataError as e:
        return str(e)
    if got != {n: (tuple(s), np.dtype(d)) for n, (s, d) in arrays.items()}:
        return f"it holds {got}, not this job's arrays"
    return rec


def verified_shard(path: Path, record: dict[str, Any], names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Arrays ``names`` of a shard whose bytes still have the recorded sha256 (read once: hashed, then parsed)."""
    data = read_regular(path)
    if hashlib.sha256(data).hexdigest() != record["sha256"]:
        raise DataError(
            f"{path} changed after it was verified (its sha256 no longer matches its record {record_path(path).name}):"
            " run the same command again; it generates that shard anew"
        )
    return load_arrays(data, names, what=str(path))


def merge(dest: Path, shards: list[tuple[Path, dict[str, Any]]], shapes: dict[str, tuple]) -> None:
    """Write ``dest`` (the shards' arrays concatenated, ADM's layout) atomically, one shard in memory at a time,
    each shard's sha256 checked against its record as it is read. ``shapes``: {name: (full shape, dtype)};
    ``arr_0`` is streamed, the small arrays are collected and written after it."""
    names = tuple(shapes)
    small: dict[str, list[np.ndarray]] = {n: [] for n in names[1:]}
    with atomic_writer(dest) as f, open_zip(f) as zf:
        with stream_array(zf, names[0], shapes[names[0]][1], shapes[names[0]][0]) as put:
            for path, record in shards:
                arrays = verified_shard(path, record, names)
                put(arrays[names[0]])
                for n in small:
                    small[n].append(arrays[n])
        for n, parts in small.items():
            write_array(zf, n, np.concatenate(parts).astype(shapes[n][1]))
