"""The output directory of ``far generate-dataset``: who may write into it, what it may already hold, and its
``dataset.json`` (the job). Shard files are :mod:`far_sdk.scale.shards`'.

- One run at a time: the run holds an exclusive ``flock`` on the directory (:func:`exclusive`); a second run is
  refused at once (:class:`DatasetBusyError`) instead of racing the first.
- A directory without ``dataset.json`` must hold nothing but far generate-dataset's own files: the command never
  scatters shards among someone else's files.
- ``dataset.json`` must be the regular file far-sdk wrote: a JSON object (anything else, e.g. a JSON array, a
  symbolic link or invalid UTF-8, is a :class:`~far_sdk.errors.DataError` naming it). Another job's
  ``dataset.json`` is refused while any of its shards exists, and replaced when none does (nothing to lose).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from far_sdk.errors import DataError, FarError, InvalidArgumentError
from far_sdk.fileio import atomic_write_json
from far_sdk.scale.npzfile import read_regular

log = logging.getLogger(__name__)

JOB_FILE = "dataset.json"
MAX_JOB_FILE_BYTES = 256 << 20
_SHARD_FILE = re.compile(r"shard-\d{5,}-of-\d{5,}\.(npz|json)")
_TEMPORARY = re.compile(r"\.(shard-\d{5,}-of-\d{5,}\.(npz|json)|samples_\d+(x\d+)+\.npz|dataset\.json)\..+\.tmp")
_OURS = re.compile(rf"{re.escape(JOB_FILE)}|{_SHARD_FILE.pattern}|samples_\d+(x\d+)+\.npz|{_TEMPORARY.pattern}")
_PROBE = ".far-write-probe."  # far_sdk.cli.run.check_writable_dir's probe, perhaps another run's


class DatasetBusyError(FarError, RuntimeError):
    """Another run holds the output directory."""


@contextlib.contextmanager
def exclusive(out: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the directory ``out`` (POSIX); a second run gets DatasetBusyError at once."""
    try:
        import fcntl  # noqa: PLC0415 - POSIX only: Windows has none (no lock there)
    except ImportError:
        yield
        return
    fd = os.open(out, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DatasetBusyError(
                f"another far generate-dataset is writing into {out}; wait for it (or stop it), or use another --out"
            ) from None
        except OSError as e:  # e.g. a filesystem without locks
            log.warning("cannot lock %s (%s): make sure no other run writes into it", out, e)
        yield
    finally:
        os.close(fd)


def check_contents(out: Path) -> None:
    """No directory where a file of this command goes (it could not be replaced), and a directory without
    ``dataset.json`` may hold only this command's own files."""
    for p in out.iterdir():
        if _OURS.fullmatch(p.name) and not _TEMPORARY.fullmatch(p.name) and p.is_dir() and not p.is_symlink():
            raise DataError(f"{p} is a directory where far generate-dataset writes a file: remove it")
    if os.path.lexists(out / JOB_FILE):
        return
    foreign = sorted(p.name for p in out.iterdir() if not (_OURS.fullmatch(p.name) or p.name.startswith(_PROBE)))
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise InvalidArgumentError(
            f"{out} is not empty ({shown}) and holds no {JOB_FILE}: it is not a far generate-dataset directory; "
            "give a new or empty --out"
        )


def read_job_file(path: Path) -> dict[str, Any] | None:
    """The job recorded in ``dataset.json`` (None when there is none); DataError when it is not far-sdk's."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    hint = f"remove it (or use a new --out): far generate-dataset writes {JOB_FILE} itself"
    if stat.S_ISLNK(st.st_mode):
        raise DataError(f"{path} is a symbolic link; {hint}")
    try:
        job = json.loads(read_regular(path, MAX_JOB_FILE_BYTES).decode("utf-8"))
    except (OSError, DataError, ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise DataError(f"{path} is unreadable ({type(e).__name__}: {e}); {hint}") from e
    if not isinstance(job, dict):
        raise DataError(f"{path} holds a JSON {type(job).__name__}, not the job object far-sdk writes; {hint}")
    return job


def sync_job_file(out: Path, identity: dict[str, Any]) -> None:
    """Write ``dataset.json`` for a new job; accept the same job; replace another job's when none of its shards
    exists; else refuse, saying which fields differ."""
    path = out / JOB_FILE
    old = read_job_file(path)
    if old == identity:
        return
    if old is not None and any(_SHARD_FILE.fullmatch(p.name) for p in out.iterdir()):
        if old.get("format") != identity["format"]:
            raise InvalidArgumentError(
                f"{out} holds a dataset of another far-sdk version ({old.get('format')!r}; this one writes "
                f"{identity['format']!r}); use a new --out, or remove {out} to start over"
            )
        diff = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
        shown = "; ".join(f"{k}: {_short(old.get(k))} here, {_short(identity.get(k))} asked" for k in diff)
        raise InvalidArgumentError(
            f"{out} holds shards of another job ({shown}); use a new --out, or remove {out} to start over"
        )
    if old is not None:
        log.info("%s: replacing the job of %s (none of its shards was written)", out, JOB_FILE)
    atomic_write_json(path, identity)


def _short(v: Any, n: int = 60) -> str:
    r = repr(v)
    return r if len(r) <= n else r[: n - 3] + "..."


def clear_temporaries(out: Path) -> None:
    """Remove what killed runs left: their temporaries were never renamed (this run holds the lock)."""
    for p in out.iterdir():
        if _TEMPORARY.fullmatch(p.name) and not p.is_dir():
            p.unlink(missing_ok=True)
