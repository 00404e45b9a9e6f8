"""TensorRT: the backend and ``far-export trt`` without tensorrt (typed errors naming what is missing);
the build flow and the backend's device loop against the simulated tensorrt + cuda-python of
tests/trt_sim.py, whose "engines" run the bundle's ONNX graphs in onnxruntime; and, in ``TestOnGPU``,
the real thing (skipped without tensorrt and a CUDA GPU). The engine cache's pure-Python parts are
tested in tests/test_trt_cache.py."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import trt_sim
from conftest import ROOT, rel_err
from trt_sim import ENV, write_fake_bundle

import far_sdk
from far_sdk.backends.tensorrt import cache as tc
from far_sdk.backends.tensorrt import cache_store as cs
from far_sdk.bundle.bundle import Bundle
from far_sdk.bundle.graphs import GRAPH_NAMES
from far_sdk.errors import (
    BackendUnavailableError,
    EngineProfileError,
    ExportError,
    IncompatibleBundleError,
    InvalidArgumentError,
)

OTHER_GPU = tc.BuildEnv("10.8.0.43", "NVIDIA A100-SXM4-80GB", "8.0")


def _installed(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


@pytest.fixture
def fake_bundle(tmp_path) -> Bundle:
    return write_fake_bundle(tmp_path / "fake")


# ---- without tensorrt ---------------------------------------------------------------------------


@pytest.mark.skipif(_installed("tensorrt"), reason="tensorrt is installed here")
class TestWithoutTensorRT:
    def test_generator_backend_tensorrt_names_tensorrt(self, fake_bundle):
        with pytest.raises(BackendUnavailableError, match="tensorrt"):
            far_sdk.Generator(fake_bundle.path, backend="tensorrt")

    def test_backend_class_names_what_is_missing(self, fake_bundle):
        from far_sdk.backends.tensorrt.backend import TensorRTBackend

        with pytest.raises(BackendUnavailableError, match=r"tensorrt.*pip install 'far-sdk\[gpu\]'"):
            TensorRTBackend(fake_bundle)

    def test_backend_names_cuda_python_when_only_it_is_missing(self, fake_bundle, monkeypatch):
        from far_sdk.backends.tensorrt.backend import TensorRTBackend

        monkeypatch.setitem(sys.modules, "tensorrt", SimpleNamespace(__version__="10.8.0"))
        monkeypatch.setitem(sys.modules, "cuda", None)  # import cuda... -> ImportError
        with pytest.raises(BackendUnavailableError, match="missing: cuda-python") as e:
            TensorRTBackend(fake_bundle)
        assert "tensorrt (" not in str(e.value)

    def test_build_engines_fails_first_with_install_hint(self, tmp_path):
        from export.trt_build import build_engines

        # An absent bundle: the missing runtime is reported before anything else is looked at.
        with pytest.raises(
            BackendUnavailableError,
            match=r"far-export trt needs the tensorrt package and an NVIDIA GPU: pip install 'far-sdk\[gpu\]'",
        ):
            build_engines(tmp_path / "absent")

    def test_cli_returns_the_runtime_status_with_the_message(self, fake_bundle, capsys):
        from export.trt_build import add_trt_subcommand, run_trt

        parser = argparse.ArgumentParser(prog="far-export")
        add_trt_subcommand(parser.add_subparsers(dest="command"))
        args = parser.parse_args(["trt", "--bundle", str(fake_bundle.path), "--precision", "fp16", "--batch", "1:4:8"])
        assert args.run is run_trt and args.batch == (1, 4, 8) and args.vae_precision == "fp32"
        assert run_trt(args) == 4  # far_sdk.errors.EXIT_RUNTIME: the backend is unavailable
        err = capsys.readouterr().err
        assert (
            err.startswith("far-export trt: error: far-export trt needs the tensorrt package") and "far-sdk[gpu]" in err
        )


def test_modules_import_without_tensorrt_or_torch():
    code = (
        "import sys, export.trt_build, far_sdk.backends.tensorrt.cache, far_sdk.backends.tensorrt.backend, "
        "far_sdk.backends.tensorrt.engine; "
        "print(sorted(m for m in ('tensorrt', 'torch', 'onnxruntime') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(cuda_graph=True), r"backend 'tensorrt' has no option\(s\) \['cuda_graph'\]; it takes device, precision"),
        (dict(max_cuda_graphs=0), "max_cuda_graphs must be a positive integer, got 0"),
        (dict(max_cuda_graphs=True), "max_cuda_graphs must be a positive integer, got True"),
        (dict(precision="int8"), "precision must be one of"),
    ],
)
def test_backend_rejects_bad_options_before_needing_tensorrt(fake_bundle, kwargs, match):
    """The rule of the other backends (far_sdk.backends.base.check_backend_options): an option no backend
    knows is an error, raised before the runtime is imported, so it is the same with or without tensorrt."""
    from far_sdk.backends.tensorrt.backend import TensorRTBackend

    with pytest.raises(InvalidArgumentError, match=match):
        TensorRTBackend(fake_bundle, **kwargs)


def test_cli_rejects_a_bad_batch_profile(capsys):
    from export.trt_build import add_trt_args

    p = argparse.ArgumentParser()
    add_trt_args(p)
    with pytest.raises(SystemExit):
        p.parse_args(["--bundle", "x", "--batch", "4:2:8"])
    assert "MIN:OPT:MAX" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_bundle_dir(tiny_bundle) -> Path:
    return tiny_bundle


@pytest.fixture
def sim(tiny_bundle_dir, tmp_path, monkeypatch):
    """A fresh copy of the tiny bundle and a simulated tensorrt/cuda-python patched in (``sim.install(...)``
    patches in another, e.g. one whose CUDA graph capture fails)."""
    bundle = tmp_path / "tiny"
    shutil.copytree(tiny_bundle_dir, bundle)
    s = trt_sim.install(monkeypatch)
    s.bundle, s.install = bundle, lambda **opts: trt_sim.install(monkeypatch, **opts)
    return s


FAST = dict(num_steps=4, inner_steps=[3, 4, 5, 6])


def _table(out: str) -> list[list[str]]:
    """The rows of run_trt's summary table (after its header line)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("graph "))
    return [line.split() for line in lines[start + 1 :]]


class TestSimulatedTensorRT:
    def test_build_writes_plans_sidecars_index_and_timing_cache(self, sim):
        from export.trt_build import build_engines

        before = (sim.bundle / "manifest.json").read_bytes()
        msgs = []
        res = build_engines(sim.bundle, batch=(1, 2, 2), progress=msgs.append)
        assert [r.graph for r in res] == list(GRAPH_NAMES) and not any(r.reused for r in res)
        assert [r.key.precision for r in res] == ["fp16", "fp16", "fp32"]  # the VAE decoder stays fp32
        flags = {b["graph"]: b["flags"] for b in sim.stats.builds}
        assert flags == {"transformer": ["FP16", "TF32"], "denoiser": ["FP16", "TF32"], "vae_decoder": []}
        tr = next(b for b in sim.stats.builds if b["graph"] == "transformer")
        assert [s[0] for s in tr["profile"]["tokens"]] == [2, 4, 4] and tr["opt_level"] == 3  # 2x CFG rows
        assert "level" not in tr["profile"]  # fixed-shape inputs need no profile
        assert [b["timing_cache_in"] for b in sim.stats.builds] == ["", "+", "++"]  # loaded and saved across builds
        for r in res:
            assert r.validation["max_rel"] == 0.0 and r.validation["images"] == 2
            assert tc.check_plan(Bundle.load(sim.bundle), r.key) == r.plan
        assert any("transformer: built in" in m for m in msgs)
        index = json.loads((sim.bundle / "trt" / "engines.json").read_text())
        assert len(index["engines"]) == 3
        assert (sim.bundle / "manifest.json").read_bytes() == before
        assert not [p for p in (sim.bundle / "trt").iterdir() if p.name.endswith(".tmp")]

    def test_second_build_reuses_rebuild_rebuilds_damage_is_repaired(self, sim):
        from export.trt_build import build_engines

        build_engines(sim.bundle, progress=lambda m: None)
        msgs = []
        assert all(r.reused for r in build_engines(sim.bundle, progress=msgs.append))
        assert len(sim.stats.builds) == 3 and sum("reusing" in m for m in msgs) == 3
        plan = build_engines(sim.bundle, graphs=["denoiser"], rebuild=True, progress=msgs.append)[0].plan
        assert len(sim.stats.builds) == 4
        plan.write_bytes(plan.read_bytes()[:-1] + b" ")
        msgs.clear()
        assert not build_engines(sim.bundle, graphs=["denoiser"], progress=msgs.append)[0].reused
        assert any("sha256" in m for m in msgs)

    def test_concurrent_builders_build_each_graph_once(self, sim):
        from export.trt_build import build_engines

        out = []
        threads = [
            threading.Thread(target=lambda: out.append(build_engines(sim.bundle, progress=lambda m: None)))
            for _ in range(2)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(out) == 2 and len(sim.stats.builds) == 3
        assert sorted(r.reused for rs in out for r in rs) == [False] * 3 + [True] * 3

    def test_vae_fp16_overflow_is_caught_and_not_written(self, sim):
        from export.trt_build import build_engines

        sim.install(overflow_vae_fp16=True)
        with pytest.raises(ExportError, match="the VAE decoder overflows in fp16.*--vae-precision fp32"):
            build_engines(sim.bundle, vae_precision="fp16", progress=lambda m: None)
        assert not list((sim.bundle / "trt").glob("vae_decoder-*"))
        assert len(list((sim.bundle / "trt").glob("*.plan"))) == 2  # the graphs before it were kept

    def test_cli_prints_per_graph_build_times(self, sim, capsys):
        from export.trt_build import add_trt_args, run_trt

        p = argparse.ArgumentParser()
        add_trt_args(p)
        assert run_trt(p.parse_args(["--bundle", str(sim.bundle), "--batch", "2"])) == 0
        out = capsys.readouterr().out
        assert "transformer: built in" in out
        assert [(r[2], r[3]) for r in _table(out)] == [("2:2:2", "built")] * 3
        assert run_trt(p.parse_args(["--bundle", str(sim.bundle), "--batch", "2"])) == 0
        assert [r[3] for r in _table(capsys.readouterr().out)] == ["reused"] * 3

    def _ort_generate(self, sim, *args, **kwargs):
        with far_sdk.Generator(sim.bundle, backend="onnxruntime", threads=2) as gen:
            return gen.generate(*args, **kwargs)

    def test_generator_matches_onnxruntime_with_cuda_graphs(self, sim):
        from export.trt_build import build_engines
        from far_sdk.backends.tensorrt.backend import TensorRTBackend

        build_engines(sim.bundle, batch=(1, 2, 2), progress=lambda m: None)
        be = TensorRTBackend(Bundle.load(sim.bundle))
        with far_sdk.Generator(sim.bundle, backend=be) as gen:
            out = gen.generate([1, 7, 3], seed=3, output_type="np", cfg=2.5, **FAST)  # 3 images: split 2 + 1
            ref = self._ort_generate(sim, [1, 7, 3], seed=3, output_type="np", cfg=2.5, **FAST)
            assert rel_err(out.latents, ref.latents) < 1e-6
            assert np.abs(out.images.astype(int) - ref.images.astype(int)).max() <= 1
            d = be.describe()
            assert (
                d["cuda_graphs"]
                and d["gpu"] == ENV.gpu
                and d["engines"]["vae_decoder"]["precision"] == "fp32"
                and be.max_batch == 2
            )
            # 2 batch sizes x 4 distinct step counts: 8 captures, one launch each
            assert sim.cuda.captures == 8 and sim.cuda.launches == 8
            gen.close()
            assert sim.cuda.mem == {}  # every buffer freed

    def test_other_backends_options_are_ignored_and_the_graph_cache_is_bounded(self, sim):
        from export.trt_build import build_engines
        from far_sdk.backends.tensorrt.backend import TensorRTBackend

        build_engines(sim.bundle, batch=(1, 1, 1), progress=lambda m: None)
        be = TensorRTBackend(Bundle.load(sim.bundle), threads=2, io_binding=True, max_cuda_graphs=2)
        with far_sdk.Generator(sim.bundle, backend=be) as gen:
            plan = dict(num_steps=4, inner_steps=[6, 5, 4, 3])  # largest first: the noise/step blocks never grow
            gen.generate([4], seed=1, output_type="latent", **plan)
            assert sim.cuda.captures == 4 and be.describe()["cuda_graphs_cached"] == 2  # the 2 latest kept
            gen.generate([4], seed=1, output_type="latent", **plan)
            assert sim.cuda.captures == 8 and sim.cuda.launches == 8  # all 4 evicted before reuse: captured again
            be.close()

    def test_one_host_sync_per_denoise_and_plain_fallback(self, sim):
        from export.trt_build import build_engines
        from far_sdk.backends.tensorrt.backend import TensorRTBackend

        build_engines(sim.bundle, batch=(1, 2, 2), progress=lambda m: None)
        outs = {}
        for fail in (False, True):
            cuda = sim.install(fail_capture=fail).cuda
            be = TensorRTBackend(Bundle.load(sim.bundle))
            rng = np.random.default_rng(0)
            x, noises = (
                rng.standard_normal((2, 256, 16), dtype=np.float32),
                rng.standard_normal((5, 2, 256, 16), dtype=np.float32),
            )
            from far_sdk.maths.diffusion import denoise_step_table

            steps = denoise_step_table(5, 3.0, 1.0)
            tokens = rng.standard_normal((4, 256, 16), dtype=np.float32)
            cond = be.transformer(tokens, {"class_ids": np.array([1, 2, 10, 10])}, 3)
            be.denoise(x, noises, cond, steps)  # first call: capture (or fail and fall back)
            syncs, launches = cuda.syncs, cuda.launches
            outs[fail] = be.denoise(x, noises, cond, steps)
            assert cuda.syncs == syncs + 1 and cuda.launches == launches + (not fail)  # the graph is replayed
            assert be.describe()["cuda_graphs"] is (not fail)
            host = be.run(
                "transformer",
                {"tokens": tokens, "class_ids": np.array([1, 2, 10, 10]), "level": np.array([3.0], np.float32)},
            )["cond"]
            ref = x
            for i in range(5):  # the same steps one graph call at a time, with cond from the host
                ref = be.run(
                    "denoiser", {"x": ref, "noise": noises[i], "cond": host.reshape(2, 2, 256, -1), "step": steps[i]}
                )["x_prev"]
            np.testing.assert_array_equal(outs[fail], ref)
            be.close()
        np.testing.assert_array_equal(outs[False], outs[True])

    def test_profile_stale_cond_and_closed_errors(self, sim):
        from export.trt_build import build_engines
        from far_sdk.backends.tensorrt.backend import TensorRTBackend

        build_engines(sim.bundle, batch=(1, 2, 2), progress=lambda m: None)
        be = TensorRTBackend(Bundle.load(sim.bundle))
        tok = np.zeros((6, 256, 16), np.float32)
        with pytest.raises(
            EngineProfileError, match=r"3 images per call.*take 1\.\.2.*far-export trt --bundle .* --batch 1:2:3"
        ):
            be.transformer(tok, {"class_ids": np.zeros(6, np.int64)}, 0)
        with pytest.raises(EngineProfileError, match="max_batch=5 exceeds"):
            far_sdk.Generator(sim.bundle, backend=be).generate([1], max_batch=5)
        c1 = be.transformer(tok[:2], {"class_ids": np.array([1, 10])}, 0)
        be.transformer(tok[:2], {"class_ids": np.array([2, 10])}, 0)
        with pytest.raises(InvalidArgumentError, match="cond is stale"):
            be.denoise(tok[:1], np.zeros((1, 1, 256, 16), np.float32), c1, np.zeros((1, 10), np.float32))
        be.close()
        be.close()  # idempotent
        with pytest.raises(BackendUnavailableError, match="closed"):
            be.decode(np.zeros((1, 16, 16, 16), np.float32))

    def test_sidecars_are_checked_before_any_plan_is_deserialized(self, sim):
        from export.trt_build import build_engines
        from far_sdk.backends.tensorrt.backend import TensorRTBackend

        build_engines(sim.bundle, progress=lambda m: None, validate=False)
        loads = sim.stats.deserialized
        bundle = Bundle.load(sim.bundle)
        vae = next((sim.bundle / "trt").glob("vae_decoder-*.plan.json"))
        side = json.loads(vae.read_text())
        side["key"]["gpu"], side["key"]["compute_capability"] = OTHER_GPU.gpu, OTHER_GPU.compute_capability
        vae.write_text(json.dumps(side))  # the VAE plan now claims another GPU
        with pytest.raises(
            tc.EngineNotBuiltError,
            match=r"vae_decoder.*A100-SXM4-80GB \(8\.0\), this is TensorRT .* H100 80GB HBM3 \(9\.0\)",
        ):
            TensorRTBackend(bundle)
        assert sim.stats.deserialized == loads  # no plan reached TensorRT
        with pytest.raises(tc.EngineNotBuiltError):
            TensorRTBackend(bundle, precision="bf16")
        assert sim.cuda.mem == {}

    def test_a_plan_tensorrt_refuses_is_reported(self, sim):
        from far_sdk.backends.tensorrt.backend import TensorRTBackend

        bundle = Bundle.load(sim.bundle)
        for g in GRAPH_NAMES:  # sidecars that match, plans TensorRT cannot read
            cs.record_plan(
                bundle,
                tc.key_for(bundle, g, precision="fp32", profile=(1, 1, 2), opt_level=3, env=ENV),
                b"\x00garbage",
                build_seconds=0,
                validation=None,
            )
        with pytest.raises(IncompatibleBundleError, match="could not deserialize the transformer engine"):
            TensorRTBackend(bundle)
        assert sim.cuda.mem == {}


# ---- the real thing ---------------------------------------------------------------------------------------


def _gpu_ready() -> str | None:
    try:
        from far_sdk.backends.tensorrt.backend import import_runtime, select_device

        _, cudart = import_runtime()
        select_device(cudart, 0)
    except Exception as e:  # noqa: BLE001 - any reason is a reason to skip
        return str(e)
    return None


@pytest.fixture(scope="module")
def gpu_built(request, tmp_path_factory) -> Path:
    """The tiny bundle with real fp32 and fp16 engines (skips before exporting anything without a GPU)."""
    why = _gpu_ready()
    if why:
        pytest.skip(f"needs tensorrt, cuda-python and a CUDA GPU: {why}")
    from export.trt_build import build_engines

    bundle = tmp_path_factory.mktemp("gpu") / "tiny"
    shutil.copytree(request.getfixturevalue("tiny_bundle_dir"), bundle)
    build_engines(bundle, precision="fp32", batch=(1, 2, 4), progress=print)
    build_engines(bundle, precision="fp16", batch=(1, 2, 4), progress=print)
    return bundle


@pytest.mark.gpu
class TestOnGPU:
    @pytest.mark.parametrize("precision, bound", [("fp32", 1e-3), ("fp16", 5e-2)])
    def test_generator_matches_onnxruntime(self, gpu_built, precision, bound):
        with far_sdk.Generator(gpu_built, backend="tensorrt", precision=precision) as gen:
            with far_sdk.Generator(gpu_built, backend="onnxruntime", device="cpu", threads=4) as ref_gen:
                out = gen.generate([1, 7, 3], seed=3, output_type="np", **FAST)
                ref = ref_gen.generate([1, 7, 3], seed=3, output_type="np", **FAST)
                err = float(np.abs(out.latents - ref.latents).max())
                scale = max(1.0, float(np.abs(ref.latents).max()))
                assert np.isfinite(out.latents).all() and err <= bound * scale, (
                    f"{precision}: max abs {err} (scale {scale})"
                )
                assert gen.backend.describe()["tensorrt"]
                gen.close()
