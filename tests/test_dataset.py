"""``far generate-dataset``: ADM-format shards whose bytes do not depend on how the job is run
(one process or Ray workers), a run killed midway resumes without redoing or corrupting shards, and a resumed run
never keeps a corrupted shard or one of another job (the merged file equals a clean run's, byte for byte)."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT

import far_sdk
from far_sdk.scale.dataset import DatasetJob, balanced_labels, generate_dataset

BUNDLE = ROOT / "engines" / "far-demo"
SETTINGS = {"num_steps": 2, "inner_steps": 2}


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_balanced_labels_are_blocks_of_n_over_c():
    np.testing.assert_array_equal(balanced_labels(6, [4, 7, 9]), [4, 4, 7, 7, 9, 9])
    lab = balanced_labels(2000, range(10))
    assert (np.bincount(lab) == 200).all() and (np.diff(lab) >= 0).all()
    assert np.bincount(balanced_labels(25, range(10)), minlength=10).tolist() == [3, 2, 3, 2, 3, 2, 3, 2, 3, 2]


@pytest.mark.slow
def test_two_ray_workers_write_the_bytes_of_one_process(tmp_path, ray_local):
    job = DatasetJob(bundle=str(BUNDLE), num_images=40, seed=1000, shard_size=10, settings=SETTINGS, batch=4)
    one = generate_dataset(job, tmp_path / "one", workers=0, progress=False)
    # another batch size and 2 Ray actors: only the speed may change
    two = generate_dataset(dataclasses.replace(job, batch=7), tmp_path / "two", workers=2, progress=False)
    assert one.generated == two.generated == (0, 1, 2, 3)
    a, b = _files(tmp_path / "one"), _files(tmp_path / "two")
    shards = [f"shard-{k:05d}-of-00004.{ext}" for k in range(4) for ext in ("json", "npz")]
    assert sorted(a) == ["dataset.json", "samples_40x32x32x3.npz", *shards]
    assert a == b
    with np.load(one.samples) as z:  # the ADM layout, as its evaluator reads it
        images, labels = z["arr_0"], z["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (40, 32, 32, 3) and labels.dtype == np.int64
    assert np.bincount(labels).tolist() == [4] * 10
    with far_sdk.Generator(BUNDLE, backend="onnxruntime", threads=1) as gen:
        for i in (0, 13, 39):  # image i is generate(label_i, seed=1000 + i)
            want = gen.generate([int(labels[i])], seed=1000 + i, output_type="np", **SETTINGS).images[0]
            np.testing.assert_array_equal(images[i], want)
    assert float(images.std()) > 1.0


@pytest.mark.slow
def test_a_killed_run_resumes_without_redoing_finished_shards(tmp_path):
    out = tmp_path / "job"
    cmd = [
        sys.executable,
        "-m",
        "far_sdk.cli.main",
        "generate-dataset",
        "--bundle",
        str(BUNDLE),
        "-n",
        "40",
        "--shard-size",
        "10",
        "--batch",
        "5",
        "--seed",
        "7",
        "--steps",
        "3",
        "--inner-steps",
        "3",
        "--out",
        str(out),
        "--no-progress",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    try:
        while not list(out.glob("shard-*.npz")) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.005)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    done = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("shard-*.npz")}
    assert 1 <= len(done) < 4, f"the run was not stopped midway: {sorted(done)}"
    for p in out.glob("shard-*.npz"):  # what the kill left is complete shards only
        with np.load(p) as z:
            assert z["arr_0"].shape == (10, 32, 32, 3) and z["arr_1"].shape == (10,)
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{4 - len(done)} generated, {len(done)} already done" in rerun.stdout
    assert {n: (p.stat().st_ino, p.stat().st_mtime_ns) for n, p in ((n, out / n) for n in done)} == done
    assert not list(out.glob(".*.tmp"))
    # the resumed job equals one run straight through
    job = DatasetJob(
        bundle=str(BUNDLE), num_images=40, seed=7, shard_size=10, settings={"num_steps": 3, "inner_steps": 3}, batch=5
    )
    straight = generate_dataset(job, tmp_path / "straight", progress=False)
    assert _files(out) == _files(straight.out)


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_flipped_byte_or_a_shard_of_another_job_is_regenerated_and_the_merge_equals_a_clean_run(tmp_path, caplog):
    job = DatasetJob(bundle=str(BUNDLE), num_images=12, seed=5, shard_size=5, settings=SETTINGS, batch=4)
    clean = generate_dataset(job, tmp_path / "clean", progress=False)
    other = generate_dataset(dataclasses.replace(job, seed=500), tmp_path / "other", merge=False, progress=False)
    out = tmp_path / "job"
    generate_dataset(job, out, merge=False, progress=False)
    shard = out / "shard-00001-of-00003.npz"
    with np.load(shard) as z:  # a byte inside image 2's pixels (the arr_0 member, past its .npy header)
        assert z["arr_0"].shape == (5, 32, 32, 3)
    _flip(shard, len(shard.read_bytes()) // 3)
    (out / "shard-00002-of-00003.npz").write_bytes((other.out / "shard-00002-of-00003.npz").read_bytes())
    for name in ("shard-00000-of-00003.npz", "shard-00000-of-00003.json"):  # another job's shard with its record
        (out / name).write_bytes((other.out / name).read_bytes())
    caplog.set_level("WARNING", logger="far_sdk.scale.dataset")
    r = generate_dataset(job, out, progress=False)
    why = dict(r.regenerated)
    assert r.generated == (0, 1, 2) and r.skipped == () and sorted(why) == [0, 1, 2]
    assert "written by another job" in why[0] and "sha256 differs" in why[1] and "sha256 differs" in why[2]
    assert sum("is generated again" in m for m in caplog.messages) == 3
    assert r.samples.read_bytes() == clean.samples.read_bytes()
    assert _files(out) == _files(clean.out)
    # and a run over the clean result keeps everything
    again = generate_dataset(job, out, progress=False)
    assert again.generated == () and again.skipped == (0, 1, 2) and again.regenerated == ()
