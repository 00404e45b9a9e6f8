"""Hostile input, part 3 (issue 12): the three commands. Usage errors are one line before any work, outputs are
written atomically or not at all, a closed pipe is no error, Ctrl-C exits 130 with one line, an interrupted export
leaves nothing, and the same kind of failure ends every command with the same status (far_sdk.errors.EXIT_CODES).
Part 1 is tests/test_hostile_bundle.py, part 2 tests/test_hostile_runtime.py."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT
from hostile import DEMO, copy_demo, one_line_error, run_cli

from far_sdk.bundle.bundle import atomic_bundle_dir, clean_stale_partials
from far_sdk.cli.run import run_command
from far_sdk.errors import (
    EXIT_INPUT,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_RUNTIME,
    EXIT_USAGE,
)


def _files(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*")}


# ==== the CLIs ========================================================================================


def _far(argv):
    from far_sdk.cli.main import main

    return run_cli(main, argv)


def _gen_args(bundle, tmp_path, *extra):
    return [
        "generate",
        "--bundle",
        str(bundle),
        "--class",
        "1",
        "--steps",
        "1",
        "--inner-steps",
        "1",
        "--backend",
        "onnxruntime",
        "--no-progress",
        *extra,
    ]


@pytest.fixture
def no_generation(monkeypatch):
    """Output checks must come before any work: building a Generator here fails the test."""
    import far_sdk.pipeline

    def refuse(*a, **k):
        raise AssertionError("a Generator was built before the output paths were checked")

    monkeypatch.setattr(far_sdk.pipeline.Generator, "__init__", refuse)


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--cols", "-1"], "--cols: expected a positive integer"),
        (["-n", "0"], "--num-per-class: expected a positive integer"),
        (["--seed", "-3"], "--seed: expected a non-negative integer"),
        (["--steps", "x"], "--steps must be an integer in 1..16, got 'x'"),
        (["--inner-steps", "1,x"], "--inner-steps must be one of"),
        (["--backend", "cuda"], "--backend must be one of .*got .cuda."),
        (["--out", "{tmp}/grid.xyz"], "unsupported file type '.xyz'"),
        (["--out", "{tmp}"], "is a directory"),
        (["--out", "{tmp}/file.txt/grid.png"], "is not a directory"),
        (["--out", "{tmp}/g.png", "--preview-gif", "{tmp}/steps.png"], "--preview-gif .*unsupported file type"),
        (["--out", "{tmp}/g.png", "--preview-gif", "{tmp}/file.txt/steps.gif"], "--preview-gif .*is not a directory"),
    ],
)
def test_far_generate_usage_errors_are_one_line_before_any_work(tmp_path, no_generation, extra, match):
    (tmp_path / "file.txt").write_text("x")
    before = _files(tmp_path)
    rc, out, err = _far(_gen_args(DEMO, tmp_path, *[e.format(tmp=tmp_path) for e in extra]))
    assert rc == EXIT_USAGE and one_line_error(err), err
    assert __import__("re").search(match, err), err
    assert _files(tmp_path) == before  # nothing written, no probe left


def test_an_unwritable_out_is_refused_before_generation(tmp_path, no_generation, monkeypatch):
    import far_sdk.cli.run

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(far_sdk.cli.run.tempfile, "mkstemp", read_only)
    rc, out, err = _far(_gen_args(DEMO, tmp_path, "--out", str(tmp_path / "g.png")))
    assert rc == EXIT_USAGE and one_line_error(err) and "--out" in err and "Read-only file system" in err
    assert list(tmp_path.iterdir()) == []


def test_far_generate_writes_exactly_the_png_and_the_gif(tmp_path):
    rc, out, err = _far(
        _gen_args(DEMO, tmp_path, "--out", str(tmp_path / "g.png"), "--preview-gif", str(tmp_path / "s.gif"))
    )
    assert rc == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.png", "s.gif"]


def test_far_info_into_a_closed_pipe_is_not_an_error(tmp_path):
    r, w = os.pipe()
    os.close(r)  # the reader is gone before the first write: every write is EPIPE
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "far_sdk.cli.main", "info", "--bundle", str(DEMO)],
            stdout=w,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
            env=_env(),
            timeout=120,
        )
    finally:
        os.close(w)
    assert proc.returncode == 0 and proc.stderr == ""


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("FAR_TRACEBACK", None)
    return env


def _interactive_sigint() -> None:
    """The child starts as from an interactive shell: SIGINT at its default and not blocked, whatever this
    test process inherited or changed (a child inherits ignored and blocked signals, and Python installs
    its KeyboardInterrupt handler only when SIGINT is not ignored at start-up)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def test_ctrl_c_during_far_generate_exits_130_with_one_line(tmp_path):
    bundle = copy_demo(tmp_path)
    out = tmp_path / "grid.png"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "far_sdk.cli.main",
            "generate",
            "--bundle",
            str(bundle),
            "--class",
            "1",
            "-n",
            "64",
            "--backend",
            "onnxruntime",
            "--out",
            str(out),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
        env=_env(),
        preexec_fn=_interactive_sigint,
    )
    seen = b""
    deadline = time.monotonic() + 120
    while b"FAR 10 steps" not in seen:  # the progress bar: the sampling loop is running
        chunk = os.read(proc.stderr.fileno(), 4096)
        assert chunk and time.monotonic() < deadline, (seen, proc.poll())
        seen += chunk
    time.sleep(0.5)  # inside the loop, not inside the progress bar's constructor
    proc.send_signal(signal.SIGINT)
    rest_out, rest_err = proc.communicate(timeout=120)
    err = (seen + rest_err).decode()
    lines = [seg for line in err.split("\n") for seg in line.split("\r")[-1:] if seg.strip()]
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert lines == ["far generate: interrupted"], err  # progress bar redraws aside, one line
    assert "Traceback" not in err and rest_out == b""
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def _export(argv):
    from export.cli import main

    return run_cli(main, argv)


def test_far_export_onto_a_read_only_destination_is_one_line(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    import far_sdk.cli.run

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(far_sdk.cli.run.tempfile, "mkstemp", read_only)
    argv = [
        "onnx",
        "--random-init",
        "--model",
        "far_tiny",
        "--vae-config",
        "kl16-tiny",
        "--out",
        str(tmp_path / "ro" / "b"),
    ]
    rc, out, err = _export(argv)
    assert rc == EXIT_USAGE and one_line_error(err) and "Read-only file system" in err, err
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    rc, out, err = _export(argv[:-1] + ["/proc/self/b"])  # a directory the kernel refuses entries in, even to root
    assert rc == EXIT_USAGE and one_line_error(err) and "cannot write in /proc/self" in err, err


def test_an_interrupted_export_leaves_nothing_and_its_partial_is_cleaned_later(tmp_path):
    dest = tmp_path / "b"
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(done.stdout)
    from far_sdk.bundle.bundle import _HOST

    stale = tmp_path / f".b.far-{dead}@{_HOST}.abc123.partial"
    live = tmp_path / f".b.far-{os.getppid()}@{_HOST}.def456.partial"  # a running writer: kept
    old_elsewhere = tmp_path / ".b.far-1@otherhost.ghi789.partial"  # another host, untouched for a day: removed
    foreign = tmp_path / ".b.something.partial"  # not ours: kept
    for d in (stale, live, old_elsewhere, foreign):
        d.mkdir()
        (d / "transformer.onnx").write_bytes(b"x" * 10)
    day_ago = time.time() - 86400
    os.utime(old_elsewhere / "transformer.onnx", (day_ago, day_ago))
    os.utime(old_elsewhere, (day_ago, day_ago))
    link = tmp_path / f".b.far-{dead}@{_HOST}.lnk000.partial"
    link.symlink_to(foreign)  # a link is never followed or removed
    with pytest.raises(KeyboardInterrupt), atomic_bundle_dir(dest) as tmp:  # Ctrl-C mid-export
        (tmp / "manifest.json").write_text("{}")
        raise KeyboardInterrupt
    assert not dest.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (live, foreign, link))
    assert clean_stale_partials(dest) == []


def test_the_three_clis_give_the_same_status_for_the_same_kind_of_failure(tmp_path):
    pytest.importorskip("torch")
    from training.cli import main as train_main

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    bad_bundle = copy_demo(tmp_path, "bad")
    (bad_bundle / "manifest.json").write_text("{")
    bad_latents = tmp_path / "lat.npz"
    bad_latents.write_bytes(b"PK\x03\x04 broken")
    input_failures = [
        _far(["info", "--bundle", str(bad_bundle)]),
        _export(
            [
                "onnx",
                "--checkpoint",
                str(garbage),
                "--vae",
                str(garbage),
                "--model",
                "far_tiny",
                "--out",
                str(tmp_path / "o"),
            ]
        ),
        run_cli(
            train_main,
            [
                "-q",
                "train",
                "--data",
                str(bad_latents),
                "--model",
                "far_tiny",
                "--steps",
                "1",
                "--out",
                str(tmp_path / "r"),
            ],
        ),
    ]
    usage_failures = [
        _far(["generate", "--bundle", str(DEMO), "--class", "1", "--cols", "0"]),
        _export(["onnx", "--random-init", "--model", "far_tiny", "--seed", "-1", "--out", str(tmp_path / "o")]),
        run_cli(
            train_main,
            ["train", "--data", "x.npz", "--model", "far_tiny", "--steps", "-5", "--out", str(tmp_path / "r")],
        ),
        _far(["nonsense"]),
    ]
    for rc, _out, err in input_failures:
        assert rc == EXIT_INPUT and one_line_error(err), err
    for rc, _out, err in usage_failures:
        assert rc == EXIT_USAGE and one_line_error(err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "garbage.pth", "lat.npz"]


def test_an_unexpected_exception_is_one_line_with_status_1(capsys):
    def bug():
        raise TypeError("unsupported operand")

    assert run_command("far x", bug) == EXIT_INTERNAL
    err = capsys.readouterr().err
    assert one_line_error(err) and "internal error: TypeError: unsupported operand" in err
    assert (
        run_command("far x", lambda: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
        == EXIT_RUNTIME
    )
    assert "No space left on device" in capsys.readouterr().err
