"""Hostile input on ``far generate-dataset``: a malformed ``dataset.json``, damaged, foreign or misplaced shards and
records, a second run in the same ``--out``, foreign or unwritable output directories, a disk that fills up (a fake
ENOSPC and a real RLIMIT_FSIZE), another job's shards, stale temporaries, and bad flag combinations. Every case ends
in the documented behaviour or in one line on stderr with the documented status (far_sdk.errors.EXIT_CODES), and a
resumed run always ends with the merged file of a clean run, byte for byte."""

from __future__ import annotations

import collections
import contextlib
import errno
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from hostile import DEMO, one_line_error, run_cli

import far_sdk.scale.dataset
import far_sdk.scale.shards
from far_sdk.cli.main import main
from far_sdk.errors import EXIT_INPUT, EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, InvalidArgumentError
from far_sdk.scale.dataset import DatasetJob

MERGED = "samples_6x32x32x3.npz"
FAST = ["--steps", "2", "--inner-steps", "2", "--shard-size", "3", "--batch", "3", "--no-progress"]


def _ds(out: Path, *extra: str, n: int = 6, bundle: Path = DEMO) -> tuple[int, str, str]:
    return run_cli(main, ["generate-dataset", "--bundle", str(bundle), "-n", str(n), *FAST, "--out", str(out), *extra])


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    """The 6-image job (2 shards) run straight through: what every resumed run must end with."""
    out = tmp_path_factory.mktemp("clean") / "job"
    rc, _, err = _ds(out)
    assert rc == EXIT_OK, err
    return out


def _done(tmp_path: Path, clean: Path) -> Path:
    """A finished --no-merge job (the clean run's shards, records and dataset.json)."""
    out = tmp_path / "job"
    shutil.copytree(clean, out)
    (out / MERGED).unlink()
    return out


def _names(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


# ---- dataset.json ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content,why",
    [
        (b"[1, 2]", "holds a JSON list"),
        (b"42", "holds a JSON int"),
        (b'"job"', "holds a JSON str"),
        (b"\xff\xfe{}", "unreadable (UnicodeDecodeError"),
        (b"[" * 100_000, "unreadable (RecursionError"),
        (b"", "unreadable (JSONDecodeError"),
        (b'{"format": "far-dataset-v2"', "unreadable (JSONDecodeError"),
    ],
)
def test_a_dataset_json_that_is_not_a_job_object_is_a_one_line_input_error(tmp_path, content, why):
    out = tmp_path / "job"
    out.mkdir()
    (out / "dataset.json").write_bytes(content)
    rc, _, err = _ds(out)
    assert rc == EXIT_INPUT and one_line_error(err) and why in err and "dataset.json" in err, err
    assert "internal error" not in err and _names(out) == ["dataset.json"]


@pytest.mark.parametrize("kind", ["symlink", "directory"])
def test_a_dataset_json_that_is_a_link_or_a_directory_is_refused(tmp_path, clean, kind):
    out = _done(tmp_path, clean)
    (out / "dataset.json").unlink()
    if kind == "symlink":
        (out / "dataset.json").symlink_to(clean / "dataset.json")
    else:
        (out / "dataset.json").mkdir()
    rc, _, err = _ds(out)
    assert rc == EXIT_INPUT and one_line_error(err) and "dataset.json" in err, err


# ---- shards and their records ------------------------------------------------------------------------

SHARD, RECORD = "shard-00000-of-00002.npz", "shard-00000-of-00002.json"


def _truncate(out: Path) -> None:
    p = out / SHARD
    p.write_bytes(p.read_bytes()[:-100])


def _set_record(value) -> callable:
    def fault(out: Path) -> None:
        (out / RECORD).write_text(value if isinstance(value, str) else json.dumps(value))

    return fault


def _edit_record(**fields) -> callable:
    def fault(out: Path) -> None:
        rec = json.loads((out / RECORD).read_text())
        (out / RECORD).write_text(json.dumps({**rec, **fields}))

    return fault


def _symlinked(out: Path) -> None:
    (out / SHARD).rename(out.parent / "elsewhere.npz")
    (out / SHARD).symlink_to(out.parent / "elsewhere.npz")  # the right bytes, but not a file of this directory


@pytest.mark.parametrize(
    "fault,why",
    [
        (_truncate, "its size"),
        (lambda out: (out / SHARD).write_bytes(b""), "its size"),
        (lambda out: (out / RECORD).unlink(), "no integrity record"),
        (_set_record("{not json"), "is unreadable"),
        (_set_record([1, 2, 3]), "is not a far-dataset-shard-v1 record"),
        (lambda out: (out / RECORD).write_bytes(b'{"format": "\xff"}'), "is unreadable"),
        (_edit_record(job_sha256="0" * 64), "written by another job"),
        (_edit_record(shard=1), "describes another shard"),
        (_edit_record(sha256="0" * 64), "sha256 differs"),
        (_symlinked, "not a regular file"),
        (lambda out: (out / SHARD).rename(out / "shard-00001-of-00002.npz"), "sha256 differs"),
    ],
)
def test_a_damaged_or_misplaced_shard_is_generated_again_and_said_so(tmp_path, clean, fault, why, caplog):
    out = _done(tmp_path, clean)
    fault(out)
    rc, stdout, err = _ds(out)
    assert rc == EXIT_OK, err
    assert "(1 of them failed verification: regenerated)" in stdout or "(2 of them" in stdout, stdout
    assert any(why in m for m in caplog.messages), caplog.messages
    assert (out / MERGED).read_bytes() == (clean / MERGED).read_bytes()
    assert _names(out) == _names(clean) and not (out / SHARD).is_symlink()


@pytest.mark.parametrize("name", [SHARD, RECORD, "shard-00001-of-00002.json"])
def test_a_directory_where_a_shard_or_its_record_goes_is_refused(tmp_path, clean, name):
    out = _done(tmp_path, clean)
    (out / SHARD).unlink()  # shard 0 pending: its files are written anew, if they can be
    (out / name).unlink(missing_ok=True)
    (out / name).mkdir()
    rc, _, err = _ds(out)
    assert rc == EXIT_INPUT and one_line_error(err) and "is a directory" in err and "remove it" in err, err


def test_stale_temporaries_are_removed_and_other_files_kept(tmp_path, clean):
    out = _done(tmp_path, clean)
    stale = [f".{SHARD}.abc123.tmp", f".{RECORD}.def456.tmp", f".{MERGED}.x.tmp", ".dataset.json.y.tmp"]
    for name in [*stale, ".notes.tmp", "README.txt"]:
        (out / name).write_bytes(b"left over")
    rc, stdout, err = _ds(out)
    assert rc == EXIT_OK and "0 generated, 2 already done" in stdout, err
    assert _names(out) == sorted([*_names(clean), ".notes.tmp", "README.txt"])


# ---- the output directory ----------------------------------------------------------------------------


def test_a_second_run_in_the_same_out_is_refused_at_once(tmp_path, clean):
    fcntl = pytest.importorskip("fcntl")
    out = _done(tmp_path, clean)
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a running far generate-dataset holds
        rc, _, err = _ds(out)
    finally:
        os.close(fd)
    assert rc == EXIT_RUNTIME and one_line_error(err) and "another far generate-dataset is writing into" in err, err
    assert not (out / MERGED).exists()
    assert _ds(out)[0] == EXIT_OK  # once it is gone


def test_an_out_that_is_a_file_a_foreign_directory_or_unwritable_is_refused_before_any_work(tmp_path):
    (tmp_path / "file").write_text("x")
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("mine")
    for out, why in (
        (tmp_path / "file", "is not a directory"),
        (foreign, "is not empty (thesis.tex) and holds no dataset.json"),
        (Path("/proc/self/job"), "cannot write in /proc/self"),
        (DEMO, "is not empty"),  # the bundle itself
    ):
        rc, _, err = _ds(out)
        assert rc == EXIT_USAGE and one_line_error(err) and why in err, err
    assert _names(foreign) == ["thesis.tex"]


def test_another_jobs_shards_are_refused_naming_the_field_and_a_job_without_shards_is_replaced(tmp_path, clean):
    out = _done(tmp_path, clean)
    rc, _, err = _ds(out, "--seed", "6")
    assert rc == EXIT_USAGE and one_line_error(err) and "holds shards of another job (seed: 0 here, 6 asked)" in err
    old = json.loads((out / "dataset.json").read_text())
    (out / "dataset.json").write_text(json.dumps({**old, "format": "far-dataset-v1"}))
    rc, _, err = _ds(out)
    assert rc == EXIT_USAGE and "another far-sdk version ('far-dataset-v1'" in err, err
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "dataset.json").write_text(json.dumps({**old, "seed": 99}))  # a job that never wrote a shard
    rc, _, err = _ds(fresh)
    assert rc == EXIT_OK and (fresh / MERGED).read_bytes() == (clean / MERGED).read_bytes(), err


# ---- a full disk ---------------------------------------------------------------------------------------


class _Disk:
    """A file whose writes fail with ENOSPC once ``budget`` bytes are written (the rest delegated)."""

    def __init__(self, f, budget: int):
        self._f, self._left = f, budget

    def write(self, data) -> int:
        n = len(memoryview(data))
        if n > self._left:
            raise OSError(errno.ENOSPC, "No space left on device")
        self._left -= n
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)


def test_a_disk_that_fills_up_mid_shard_is_one_line_and_the_rerun_resumes(tmp_path, clean, monkeypatch):
    real, calls = far_sdk.scale.shards.atomic_writer, []

    @contextlib.contextmanager
    def filling(path):
        calls.append(path.name)
        with real(path) as f:
            yield _Disk(f, 1 << 30 if len(calls) == 1 else 4000)  # the second shard hits the full disk

    monkeypatch.setattr(far_sdk.scale.shards, "atomic_writer", filling)
    out = tmp_path / "job"
    rc, _, err = _ds(out)
    assert rc == EXIT_RUNTIME and one_line_error(err), err
    assert "No space left on device while writing into" in err and "run the same command again to resume" in err
    assert _names(out) == ["dataset.json", RECORD, SHARD]  # the failed shard left nothing, not even a temporary
    monkeypatch.undo()
    rc, stdout, err = _ds(out)
    assert rc == EXIT_OK and "1 generated, 1 already done" in stdout, err
    assert (out / MERGED).read_bytes() == (clean / MERGED).read_bytes()


def test_a_real_file_size_limit_during_the_merge_is_one_line_and_the_rerun_merges(tmp_path, clean):
    out = tmp_path / "job"
    argv = [*FAST, "--bundle", str(DEMO), "-n", "6", "--out", str(out)]
    cmd = [sys.executable, "-m", "far_sdk.cli.main", "generate-dataset", *argv]
    limit = 14_000  # the kernel refuses writes past it (EFBIG): the 9.6 kB shards fit, the 19 kB merged file does not
    proc = subprocess.run(
        cmd,
        env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)),
    )
    assert proc.returncode == EXIT_RUNTIME and one_line_error(proc.stderr), proc.stderr
    assert "File too large while writing into" in proc.stderr and "run the same command again" in proc.stderr
    assert not (out / MERGED).exists() and not list(out.glob(".*.tmp"))
    rc, stdout, err = _ds(out)
    assert rc == EXIT_OK and "0 generated, 2 already done" in stdout, err
    assert (out / MERGED).read_bytes() == (clean / MERGED).read_bytes()


def test_a_job_the_free_space_cannot_hold_is_refused_before_any_work(tmp_path, monkeypatch):
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(far_sdk.scale.dataset.shutil, "disk_usage", lambda _p: usage(10**6, 10**6 - 20_000, 20_000))
    out = tmp_path / "job"
    rc, _, err = _ds(out)  # 6 x 3,080 bytes of shards + as much again merged = 36,960 > 20,000
    assert rc == EXIT_USAGE and one_line_error(err) and "has 20 kB free but this job needs 37 kB more" in err, err
    assert "lower -n, or pass --no-merge" in err and not list(out.glob("shard-*"))
    rc, _, err = _ds(out, "--no-merge")  # 18,480 fits
    assert rc == EXIT_OK, err


# ---- flags -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra,n,why",
    [
        (["--class", "10"], 6, "--class 10 is outside 0..9"),
        (["--class", "3", "--class", "3"], 6, "--class 3 is given twice"),
        (["--mode", "mask", "--steps", "4"], 6, "--levels"),
        (["--seed", str(2**63 - 3)], 6, "--seed"),
        ([], 2**41, "-n) must be at most 2**40"),
        (["--preset", "turbo"], 6, "--preset must be one of 'distilled', 'fast', 'official', 'paper', got 'turbo'"),
    ],
)
def test_bad_flags_are_refused_before_anything_is_written(tmp_path, extra, n, why):
    out = tmp_path / "job"
    rc, _, err = _ds(out, *extra, n=n)
    assert rc == EXIT_USAGE and one_line_error(err) and why in err, err
    assert not out.exists() or _names(out) == []


def test_a_shard_size_past_the_image_count_makes_one_shard(tmp_path, clean):
    out = tmp_path / "job"
    rc, stdout, err = _ds(out, "--shard-size", "100")
    assert rc == EXIT_OK and "6 images in 1 shard(s)" in stdout, err
    assert (out / MERGED).read_bytes() == (clean / MERGED).read_bytes()


@pytest.mark.parametrize(
    "kw,why",
    [
        (dict(classes="012"), "classes must be a list"),
        (dict(classes=[1, 1]), "distinct"),
        (dict(classes=[True]), "each class id must be an integer"),
        (dict(settings=["fast"]), "settings must be a dict"),
        (dict(settings={"preset": ["fast"]}), "preset must be one preset name"),
        (dict(settings={"levels": 5}), "levels must be a list"),
        (dict(settings={"sampler": "ddim"}), "unknown setting(s) sampler"),
        (dict(num_images=0), "num_images must be an integer >= 1"),
        (dict(captions=["a", 3]), r"captions\[1\] is a int"),
        (dict(captions=["a"], classes=[1]), "not both"),
    ],
)
def test_a_dataset_job_is_checked_where_it_is_built(kw, why):
    with pytest.raises(InvalidArgumentError, match=why.replace("(", r"\(").replace(")", r"\)")):
        DatasetJob(**{"bundle": str(DEMO), "num_images": 4, **kw})
