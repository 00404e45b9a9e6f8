"""GPU engines that cannot misbehave quietly, checked without a GPU: older cuda-python bindings fall back with a
typed error (simulated), engine caches live in the user's cache so a read-only bundle works (TensorRT through the
simulator of tests/trt_sim.py; ONNX Runtime's TensorRT EP through its provider options), and the EP's fp16
sessions run the mixed-precision graph and are validated before use (ONNX Runtime's CPU kernels stand in for the
EP: the gate is the same code)."""

from __future__ import annotations

import os
import shutil
import stat
from types import SimpleNamespace

import numpy as np
import pytest
import trt_sim

from far_sdk.backends.tensorrt import cache as tc
from far_sdk.backends.tensorrt.engine import CudaError
from far_sdk.backends.tensorrt.graphs import instantiate_graph
from far_sdk.bundle.bundle import Bundle
from far_sdk.errors import NumericalError
from far_sdk.maths.diffusion import denoise_step_table

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


def _read_only_copy(src, dst):
    shutil.copytree(src, dst)
    for p in [dst, *dst.rglob("*")]:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    return dst


@pytest.fixture
def read_only_bundle(tiny_bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("FAR_SDK_CACHE", str(tmp_path / "cache"))
    d = _read_only_copy(tiny_bundle, tmp_path / "ro")
    yield d
    for p in [d, *d.rglob("*")]:  # let pytest clean up
        p.chmod(p.stat().st_mode | stat.S_IWUSR)


# ---- cuda-python: the CUDA 11.x bindings' cudaGraphInstantiate ---------------------------------------------


class OldCuda(trt_sim.FakeCuda):
    """CUDA 11.x bindings: cudaGraphInstantiate(graph, error node, log size); no cudaGraphInstantiateWithFlags."""

    def cudaGraphInstantiate(self, graph, error_node, log_size):  # noqa: N802 - the binding's name
        raise AssertionError("never reached: the two-argument call fails first")


class Old114Cuda(trt_sim.FakeCuda):
    """CUDA 11.4+ bindings: the three-argument cudaGraphInstantiate, and cudaGraphInstantiateWithFlags."""

    def cudaGraphInstantiate(self, graph, error_node, log_size):  # noqa: N802
        raise AssertionError("never called: WithFlags is preferred")

    def cudaGraphInstantiateWithFlags(self, graph, flags):  # noqa: N802
        return trt_sim.OK, SimpleNamespace(ops=list(graph.ops))


def test_instantiate_graph_call_forms():
    graph = SimpleNamespace(ops=[])
    assert instantiate_graph(trt_sim.FakeCuda(), graph).ops == []  # CUDA 12: cudaGraphInstantiate(graph, 0)
    assert instantiate_graph(Old114Cuda(), graph).ops == []
    with pytest.raises(CudaError, match=r"none of the call forms.*cudaGraphInstantiate.*cuda-python >= 12"):
        instantiate_graph(OldCuda(), graph)


@pytest.mark.parametrize("cuda_class, graphs", [(OldCuda, False), (Old114Cuda, True)])
def test_old_cuda_python_falls_back_without_a_type_error(tiny_bundle, tmp_path, monkeypatch, cuda_class, graphs):
    from export.trt_build import build_engines
    from far_sdk.backends.tensorrt.backend import TensorRTBackend

    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    sim = trt_sim.install(monkeypatch, cuda_class=cuda_class)
    build_engines(bundle, precision="fp32", batch=(1, 1, 1), graphs=["denoiser"], progress=lambda m: None)
    trt_sim.install(monkeypatch)  # the other engines built by current bindings (the fallback is in the runtime)
    build_engines(bundle, precision="fp32", batch=(1, 1, 1), progress=lambda m: None)
    sim = trt_sim.install(monkeypatch, cuda_class=cuda_class)
    be = TensorRTBackend(Bundle.load(bundle))
    rng = np.random.default_rng(0)
    x, noises = rng.standard_normal((1, 256, 16), dtype=np.float32), rng.standard_normal((3, 1, 256, 16), np.float32)
    cond = rng.standard_normal((2, 1, 256, be.bundle.manifest["mlp_width"]), dtype=np.float32)
    steps = denoise_step_table(3, 3.0, 1.0)
    a = be.denoise(x, noises, cond, steps)  # captures (or fails to instantiate and falls back)
    b = be.denoise(x, noises, cond, steps)
    np.testing.assert_array_equal(a, b)
    assert be.describe()["cuda_graphs"] is graphs and sim.cuda.launches == (2 if graphs else 0)
    be.close()


# ---- read-only bundles: every engine cache lives in the user's cache ------------------------------------------


def test_tensorrt_builds_and_runs_from_a_read_only_bundle(read_only_bundle, monkeypatch):
    import far_sdk
    from export.trt_build import build_engines
    from far_sdk.backends.tensorrt.backend import TensorRTBackend

    trt_sim.install(monkeypatch)
    res = build_engines(read_only_bundle, precision="fp32", batch=(1, 1, 1), progress=lambda m: None)
    cache = tc.trt_dir(read_only_bundle)
    assert all(r.plan.parent == cache for r in res) and not cache.is_relative_to(read_only_bundle)
    with far_sdk.Generator(read_only_bundle, backend=TensorRTBackend(Bundle.load(read_only_bundle))) as gen:
        assert np.isfinite(gen.generate([3], seed=1, num_steps=2, inner_steps=2, output_type="latent").latents).all()


def test_ort_tensorrt_ep_options_profiles_and_cache_outside_the_bundle(read_only_bundle):
    from far_sdk.backends.ort_tensorrt import provider_options

    bundle = Bundle.load(read_only_bundle)
    opts = provider_options(bundle, "transformer", 0, (1, 2, 4), fp16=False)
    assert opts["trt_profile_min_shapes"] == "tokens:2x256x16,class_ids:2"  # the CFG batch: 2 rows per image
    assert opts["trt_profile_opt_shapes"] == "tokens:4x256x16,class_ids:4"
    assert opts["trt_profile_max_shapes"] == "tokens:8x256x16,class_ids:8"
    w = bundle.manifest["mlp_width"]
    den = provider_options(bundle, "denoiser", 0, (1, 2, 4), fp16=True)
    assert den["trt_profile_max_shapes"] == f"x:4x256x16,noise:4x256x16,cond:2x4x256x{w}"
    assert den["trt_fp16_enable"] == "0"  # fp16 comes from the mixed graph: a strongly typed network
    for o in (opts, den):
        path = os.path.realpath(o["trt_engine_cache_path"])
        assert os.path.isdir(path) and not path.startswith(os.path.realpath(read_only_bundle))


def test_ort_fp16_sessions_run_the_mixed_graph_and_are_validated(read_only_bundle):
    from far_sdk.backends.mixed_precision import mixed_precision
    from far_sdk.backends.ort_tensorrt import model_path, validate_denoiser

    bundle = Bundle.load(read_only_bundle)
    path = model_path(bundle, "denoiser", fp16=True)  # written into the user's cache, not the read-only bundle
    assert path.is_file() and model_path(bundle, "denoiser", fp16=False) == bundle.graph_file("denoiser")
    cpu = ort.InferenceSession(str(bundle.graph_file("denoiser")), providers=["CPUExecutionProvider"])
    mixed = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    errors = validate_denoiser(bundle, mixed, cpu, 1)
    assert set(errors) == {"t=999", "t=0", "outer step"} and 0 < max(errors.values()) < 3e-2
    import onnx

    everywhere = mixed_precision(onnx.load(str(bundle.graph_file("denoiser"))), "fp16", everything=True)
    weak = ort.InferenceSession(everywhere.SerializeToString(), providers=["CPUExecutionProvider"])
    with pytest.raises(NumericalError, match="fails validation at t=999"):  # what trt_fp16_enable may build
        validate_denoiser(bundle, weak, cpu, 1)


class NoMemoryCuda(trt_sim.FakeCuda):
    def cudaMalloc(self, n):  # noqa: N802
        return 2, 0  # cudaErrorMemoryAllocation


def test_tensorrt_out_of_gpu_memory_is_typed(tiny_bundle, tmp_path, monkeypatch):
    from export.trt_build import build_engines
    from far_sdk.backends.tensorrt.backend import TensorRTBackend
    from far_sdk.errors import DeviceOutOfMemoryError

    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    trt_sim.install(monkeypatch)
    build_engines(bundle, precision="fp32", batch=(1, 1, 1), validate=False, progress=lambda m: None)
    trt_sim.install(monkeypatch, cuda_class=NoMemoryCuda)
    with pytest.raises(DeviceOutOfMemoryError, match="out of GPU memory.*smaller max_batch"):
        TensorRTBackend(Bundle.load(bundle), precision="fp32")
