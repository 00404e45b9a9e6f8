"""Hostile input, part 2 (issue 12): what reaches a running SDK — non-finite noise and checkpoints, a
malicious pickle, bad Generator arguments, the CLIs (usage errors, unwritable outputs, Ctrl-C,
interrupted exports, one exit status per kind of failure) and concurrent use. Every case ends in a
typed far_sdk error or a one-line CLI exit with the documented status (far_sdk.errors.EXIT_CODES), and
leaves no file behind. Part 1, a bundle on disk that lies, is tests/test_hostile_bundle.py.

Run: ``python -m pytest -q tests/test_hostile_bundle.py tests/test_hostile_runtime.py``. Works on copies of
the committed demo bundle (engines/far-demo, 10 MB) in tmp_path.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import OFFICIAL_TINY, ROOT
from hostile import DEMO, copy_demo, one_line_error, run_cli

import far_sdk
from far_sdk.bundle.bundle import atomic_bundle_dir, clean_stale_partials
from far_sdk.cli.run import run_command
from far_sdk.errors import (
    EXIT_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_RUNTIME, EXIT_USAGE, CheckpointError, GeneratorClosedError,
    InvalidArgumentError, NumericalError, check_finite,
)


def _files(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*")}


# ==== non-finite values: noise, checkpoints ===============================================================


@pytest.fixture(scope="module")
def demo_gen():
    with far_sdk.Generator(DEMO, backend="onnxruntime", threads=1) as gen:
        yield gen


def test_a_noise_source_returning_nan_is_a_numerical_error(demo_gen):
    def nan_noise(shape):
        a = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        a[0, 0, 0] = np.nan
        return a

    with pytest.raises(NumericalError, match="noise draw 0.*1 NaN"):
        demo_gen.generate([1], noise=nan_noise, num_steps=1, inner_steps=1)
    with pytest.raises(InvalidArgumentError, match="shape"):
        demo_gen.generate([1], noise=lambda shape: np.zeros(3, np.float32), num_steps=1, inner_steps=1)


def test_check_finite_names_the_array_and_the_outer_step():
    check_finite(np.ones(4, np.float32), "latents", step=2)
    check_finite(np.arange(3), "ids")  # integers are always finite
    with pytest.raises(NumericalError, match="latents after outer step 2 holds non-finite values \\(1 NaN, 1 inf of 4\\)") as info:
        check_finite(np.array([1, np.nan, np.inf, 0], np.float32), "latents", step=2)
    assert info.value.step == 2 and isinstance(info.value, far_sdk.FarError)


@pytest.mark.parametrize("entry, use_ema", [("model_ema", True), ("model", False)])
def test_nan_in_an_official_checkpoint_is_a_checkpoint_error(tmp_path, entry, use_ema):
    torch = pytest.importorskip("torch")
    import argparse as ap

    from training import load_official_checkpoint

    with torch.serialization.safe_globals([ap.Namespace]):
        ckpt = torch.load(OFFICIAL_TINY / "checkpoint-last.pth", map_location="cpu", weights_only=True)
    name = sorted(ckpt[entry])[3]
    ckpt[entry][name] = ckpt[entry][name].clone()
    ckpt[entry][name].view(-1)[0] = float("inf")
    torch.save(ckpt, tmp_path / "c.pth")
    with pytest.raises(CheckpointError, match=f"\\[{entry!r}\\] has NaN or inf values in {name}"):
        load_official_checkpoint(tmp_path / "c.pth", use_ema=use_ema, config="far_parity_tiny")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_a_malicious_pickle_is_refused_without_suggesting_an_unsafe_load(tmp_path):
    torch = pytest.importorskip("torch")
    from training import load_official_checkpoint
    from training.vae import load_official_vae

    torch.save({"model": {}, "model_ema": {}, "args": _Evil()}, tmp_path / "c.pth")
    for load in (lambda: load_official_checkpoint(tmp_path / "c.pth", config="far_tiny"), lambda: load_official_vae(tmp_path / "c.pth")):
        with pytest.raises(CheckpointError, match="GLOBAL posix.system|system") as info:
            load()
        assert "weights_only=False" not in str(info.value) and "False" not in str(info.value)


# ==== 5. the Generator's arguments and lifecycle ==========================================================


@pytest.mark.parametrize("kwargs, match", [
    (dict(class_labels=None), "class_labels must be"),
    (dict(class_labels=[1], inner_steps=3.5), "inner_steps must be"),
    (dict(class_labels=[1], inner_steps="3"), "inner_steps must be"),
    (dict(class_labels=[1], noise=3), "noise must be a callable"),
    (dict(class_labels=[1.5]), "class id 1.5"),
    (dict(class_labels=[]), "empty"),
])
def test_bad_generate_arguments_are_invalid_argument_errors(demo_gen, kwargs, match):
    labels = kwargs.pop("class_labels")
    with pytest.raises(InvalidArgumentError, match=match):
        demo_gen.generate(labels, **kwargs)


def test_generate_after_close_says_the_generator_is_closed():
    gen = far_sdk.Generator(DEMO, backend="onnxruntime", threads=1)
    gen.close()
    gen.close()  # idempotent
    with pytest.raises(GeneratorClosedError, match="this Generator is closed"):
        gen.generate([1])


# ==== 4. the CLIs ========================================================================================


def _far(argv):
    from far_sdk.cli.main import main

    return run_cli(main, argv)


def _gen_args(bundle, tmp_path, *extra):
    return ["generate", "--bundle", str(bundle), "--class", "1", "--steps", "1", "--inner-steps", "1",
            "--backend", "onnxruntime", "--no-progress", *extra]


@pytest.fixture
def no_generation(monkeypatch):
    """Output checks must come before any work: building a Generator here fails the test."""
    import far_sdk.pipeline

    def refuse(*a, **k):
        raise AssertionError("a Generator was built before the output paths were checked")
    monkeypatch.setattr(far_sdk.pipeline.Generator, "__init__", refuse)


@pytest.mark.parametrize("extra, match", [
    (["--cols", "-1"], "--cols: expected a positive integer"),
    (["-n", "0"], "--num-per-class: expected a positive integer"),
    (["--seed", "-3"], "--seed: expected a non-negative integer"),
    (["--steps", "x"], "--steps: expected an integer, got 'x'"),
    (["--inner-steps", "1,x"], "--inner-steps: expected"),
    (["--backend", "cuda"], "invalid choice"),
    (["--out", "{tmp}/grid.xyz"], "unsupported file type '.xyz'"),
    (["--out", "{tmp}"], "is a directory"),
    (["--out", "{tmp}/file.txt/grid.png"], "is not a directory"),
    (["--out", "{tmp}/g.png", "--preview-gif", "{tmp}/steps.png"], "--preview-gif .*unsupported file type"),
    (["--out", "{tmp}/g.png", "--preview-gif", "{tmp}/file.txt/steps.gif"], "--preview-gif .*is not a directory"),
])
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
    rc, out, err = _far(_gen_args(DEMO, tmp_path, "--out", str(tmp_path / "g.png"), "--preview-gif", str(tmp_path / "s.gif")))
    assert rc == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.png", "s.gif"]


def test_far_info_into_a_closed_pipe_is_not_an_error(tmp_path):
    r, w = os.pipe()
    os.close(r)  # the reader is gone before the first write: every write is EPIPE
    try:
        proc = subprocess.run([sys.executable, "-m", "far_sdk.cli.main", "info", "--bundle", str(DEMO)], stdout=w,
                              stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=_env(), timeout=120)
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
    proc = subprocess.Popen([sys.executable, "-m", "far_sdk.cli.main", "generate", "--bundle", str(bundle), "--class", "1", "-n", "64",
                             "--backend", "onnxruntime", "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=tmp_path, env=_env(), preexec_fn=_interactive_sigint)
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
    assert lines == ["far generate: interrupted"], err   # progress bar redraws aside, one line
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
    argv = ["onnx", "--random-init", "--model", "far_tiny", "--vae-config", "kl16-tiny", "--out", str(tmp_path / "ro" / "b")]
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
    live = tmp_path / f".b.far-{os.getppid()}@{_HOST}.def456.partial"        # a running writer: kept
    old_elsewhere = tmp_path / ".b.far-1@otherhost.ghi789.partial"           # another host, untouched for a day: removed
    foreign = tmp_path / ".b.something.partial"                               # not ours: kept
    for d in (stale, live, old_elsewhere, foreign):
        d.mkdir()
        (d / "transformer.onnx").write_bytes(b"x" * 10)
    day_ago = time.time() - 86400
    os.utime(old_elsewhere / "transformer.onnx", (day_ago, day_ago))
    os.utime(old_elsewhere, (day_ago, day_ago))
    link = tmp_path / f".b.far-{dead}@{_HOST}.lnk000.partial"
    link.symlink_to(foreign)                                                  # a link is never followed or removed
    with pytest.raises(KeyboardInterrupt), atomic_bundle_dir(dest) as tmp:   # Ctrl-C mid-export
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
        _export(["onnx", "--checkpoint", str(garbage), "--vae", str(garbage), "--model", "far_tiny", "--out", str(tmp_path / "o")]),
        run_cli(train_main, ["-q", "train", "--data", str(bad_latents), "--model", "far_tiny", "--steps", "1", "--out", str(tmp_path / "r")]),
    ]
    usage_failures = [
        _far(["generate", "--bundle", str(DEMO), "--class", "1", "--cols", "0"]),
        _export(["onnx", "--random-init", "--model", "far_tiny", "--seed", "-1", "--out", str(tmp_path / "o")]),
        run_cli(train_main, ["train", "--data", "x.npz", "--model", "far_tiny", "--steps", "-5", "--out", str(tmp_path / "r")]),
        _far(["nonsense"]),
    ]
    for rc, out, err in input_failures:
        assert rc == EXIT_INPUT and one_line_error(err), err
    for rc, out, err in usage_failures:
        assert rc == EXIT_USAGE and one_line_error(err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "garbage.pth", "lat.npz"]


def test_an_unexpected_exception_is_one_line_with_status_1(capsys):
    def bug():
        raise TypeError("unsupported operand")

    assert run_command("far x", bug) == EXIT_INTERNAL
    err = capsys.readouterr().err
    assert one_line_error(err) and "internal error: TypeError: unsupported operand" in err
    assert run_command("far x", lambda: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device"))) == EXIT_RUNTIME
    assert "No space left on device" in capsys.readouterr().err


# ==== concurrency and memory ==============================================================================


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_eight_threads_on_one_generator_match_the_serial_run_bitwise(demo_gen):
    from concurrent.futures import ThreadPoolExecutor

    opts = dict(num_steps=2, inner_steps=2, output_type="latent")
    serial = [demo_gen.generate([i % 10], seed=i, **opts).latents for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        threaded = list(pool.map(lambda i: demo_gen.generate([i % 10], seed=i, **opts).latents, range(8)))
    assert all(np.array_equal(a, b) for a, b in zip(serial, threaded))


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="RSS read from /proc (Linux)")
def test_repeated_generation_does_not_grow_memory(demo_gen):
    opts = dict(num_steps=1, inner_steps=1, output_type="np")
    for _ in range(20):  # warm-up: allocator pools, session arenas
        demo_gen.generate([1], **opts)
    before = _rss_mb()
    for i in range(100):
        demo_gen.generate([i % 10], seed=i, **opts)
    assert _rss_mb() - before < 5.0
