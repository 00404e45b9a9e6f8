"""Hostile input, part 2 (issue 12): what reaches a running SDK — non-finite noise and checkpoints, a
malicious pickle, bad Generator arguments, the CLIs (usage errors, unwritable outputs, Ctrl-C,
interrupted exports, one exit status per kind of failure) and concurrent use. Every case ends in a
typed far_sdk error or a one-line CLI exit with the documented status (far_sdk.errors.EXIT_CODES), and
leaves no file behind. Part 1, a bundle on disk that lies, is tests/test_hostile_bundle.py; part 3, the commands,
tests/test_hostile_cli.py.

Run: ``python -m pytest -q tests/test_hostile_bundle.py tests/test_hostile_runtime.py``. Works on copies of
the committed demo bundle (engines/far-demo, 10 MB) in tmp_path.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from conftest import OFFICIAL_TINY
from hostile import DEMO

import far_sdk
from far_sdk.errors import (
    CheckpointError,
    GeneratorClosedError,
    InvalidArgumentError,
    NumericalError,
    check_finite,
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
    with pytest.raises(
        NumericalError, match="latents after outer step 2 holds non-finite values \\(1 NaN, 1 inf of 4\\)"
    ) as info:
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
    for load in (
        lambda: load_official_checkpoint(tmp_path / "c.pth", config="far_tiny"),
        lambda: load_official_vae(tmp_path / "c.pth"),
    ):
        with pytest.raises(CheckpointError, match="GLOBAL posix.system|system") as info:
            load()
        assert "weights_only=False" not in str(info.value) and "False" not in str(info.value)


# ==== 5. the Generator's arguments and lifecycle ==========================================================


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(class_labels=None), "class_labels must be"),
        (dict(class_labels=[1], inner_steps=3.5), "inner_steps must be"),
        (dict(class_labels=[1], inner_steps="3"), "inner_steps must be"),
        (dict(class_labels=[1], noise=3), "noise must be a callable"),
        (dict(class_labels=[1.5]), "must be an integer class id or a class name, got float 1.5"),
        (dict(class_labels=[]), "empty"),
    ],
)
def test_bad_generate_arguments_are_invalid_argument_errors(demo_gen, kwargs, match):
    labels = kwargs.pop("class_labels")
    with pytest.raises(InvalidArgumentError, match=match):
        demo_gen.generate(labels, **kwargs)


def test_generate_after_close_says_the_generator_is_closed():
    with far_sdk.Generator(DEMO, backend="onnxruntime", threads=1) as gen:
        gen.close()
        gen.close()  # idempotent
        with pytest.raises(GeneratorClosedError, match="this Generator is closed"):
            gen.generate([1])


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
