"""TensorRT engines: cache keys, sidecars and their error messages, profile parsing, atomic writes
and locking (pure Python); the build flow and the backend's device loop against a simulated
tensorrt + cuda-python whose "engines" run the bundle's ONNX graphs in onnxruntime; and, in
``TestOnGPU``, the real thing (skipped without tensorrt and a CUDA GPU)."""

from __future__ import annotations

import argparse
import ctypes
import enum
import hashlib
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import ROOT, rel_err

import far_sdk
from far_sdk import trt_cache as tc
from far_sdk.bundle import Bundle, write_manifest
from far_sdk.errors import (
    BackendUnavailableError, EngineProfileError, ExportError, IncompatibleBundleError, InvalidArgumentError,
)
from far_sdk.graphs import GRAPH_NAMES, graph_specs

ENV = tc.BuildEnv("10.8.0.43", "NVIDIA H100 80GB HBM3", "9.0")
OTHER_TRT = tc.BuildEnv("10.3.0.26", "NVIDIA H100 80GB HBM3", "9.0")
OTHER_GPU = tc.BuildEnv("10.8.0.43", "NVIDIA A100-SXM4-80GB", "8.0")


def _installed(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


# ---- a bundle without real graphs (create_backend and the cache never parse them) -----------------------


@pytest.fixture
def fake_bundle(tmp_path) -> Bundle:
    d = tmp_path / "fake"
    d.mkdir()
    specs = graph_specs(seq_len=4, token_channels=2, mlp_width=8, grid_size=2, image_size=32)
    graphs = {}
    for i, g in enumerate(GRAPH_NAMES):
        # a ModelProto holding only ir_version (field 1) and a doc_string (field 6): well-formed protobuf, no graph
        doc = b"not really onnx %d" % i
        (d / f"{g}.onnx").write_bytes(bytes([0x08, 9, 0x32, len(doc)]) + doc)
        graphs[g] = {"file": f"{g}.onnx", "opset": 17, **specs[g].to_dict(), "validation": None}
    model = {"encoder_embed_dim": 8, "encoder_depth": 1, "encoder_num_heads": 2, "decoder_embed_dim": 8, "decoder_depth": 1,
             "decoder_num_heads": 2, "mlp_ratio": 4.0, "token_channels": 2, "grid_size": 2, "buffer_size": 4, "num_classes": 10,
             "diffloss_d": 1, "diffloss_w": 8, "mask": False, "label_drop_prob": 0.1, "attn_dropout": 0.1, "proj_dropout": 0.1,
             "diffusion_batch_mul": 1, "num_sampling_steps": 100}
    vae = {"embed_dim": 2, "z_channels": 2, "ch": 8, "ch_mult": [1, 1, 1, 1, 1], "num_res_blocks": 1, "in_channels": 3, "out_ch": 3,
           "resolution": 32, "attn_resolutions": [], "dropout": 0.0, "gn_groups": 4, "eps": 1e-6}
    write_manifest(d, {"name": "fake", "created_by": {"far_sdk": far_sdk.__version__}, "model": model, "vae": vae, "latent_scale": 0.2325, "null_class_id": 10, "mlp_width": 8,
                       "image_size": 32, "defaults": {}, "graphs": graphs, "source": {"kind": "unspecified"}})
    return Bundle.load(d)


def _key(bundle, graph="denoiser", env=ENV, **kw) -> tc.EngineKey:
    args = dict(precision="fp16", profile=(1, 2, 4), opt_level=3, env=env) | kw
    return tc.key_for(bundle, graph, **args)


def _record(bundle, key, data=b"plan bytes") -> Path:
    return tc.record_plan(bundle, key, data, build_seconds=1.5, validation=None)


# ---- without tensorrt ---------------------------------------------------------------------------


@pytest.mark.skipif(_installed("tensorrt"), reason="tensorrt is installed here")
class TestWithoutTensorRT:
    def test_generator_backend_tensorrt_names_tensorrt(self, fake_bundle):
        with pytest.raises(BackendUnavailableError, match="tensorrt"):
            far_sdk.Generator(fake_bundle.path, backend="tensorrt")

    def test_backend_class_names_what_is_missing(self, fake_bundle):
        from far_sdk.backends.tensorrt import TensorRTBackend

        with pytest.raises(BackendUnavailableError, match=r"tensorrt.*pip install 'far-sdk\[gpu\]'"):
            TensorRTBackend(fake_bundle)

    def test_backend_names_cuda_python_when_only_it_is_missing(self, fake_bundle, monkeypatch):
        from far_sdk.backends.tensorrt import TensorRTBackend

        monkeypatch.setitem(sys.modules, "tensorrt", SimpleNamespace(__version__="10.8.0"))
        monkeypatch.setitem(sys.modules, "cuda", None)  # import cuda... -> ImportError
        with pytest.raises(BackendUnavailableError, match="missing: cuda-python") as e:
            TensorRTBackend(fake_bundle)
        assert "tensorrt (" not in str(e.value)

    def test_build_engines_fails_first_with_install_hint(self, tmp_path):
        from export.trt_build import build_engines

        # An absent bundle: the missing runtime is reported before anything else is looked at.
        with pytest.raises(BackendUnavailableError, match=r"far-export trt needs the tensorrt package and an NVIDIA GPU: pip install 'far-sdk\[gpu\]'"):
            build_engines(tmp_path / "absent")

    def test_cli_returns_the_runtime_status_with_the_message(self, fake_bundle, capsys):
        from export.trt_build import add_trt_subcommand, run_trt

        parser = argparse.ArgumentParser(prog="far-export")
        add_trt_subcommand(parser.add_subparsers(dest="command"))
        args = parser.parse_args(["trt", "--bundle", str(fake_bundle.path), "--precision", "fp16", "--batch", "1:4:8"])
        assert args.run is run_trt and args.batch == (1, 4, 8) and args.vae_precision == "fp32"
        assert run_trt(args) == 4  # far_sdk.errors.EXIT_RUNTIME: the backend is unavailable
        err = capsys.readouterr().err
        assert err.startswith("far-export trt: error: far-export trt needs the tensorrt package") and "far-sdk[gpu]" in err


def test_modules_import_without_tensorrt_or_torch():
    code = ("import sys, export.trt_build, far_sdk.trt_cache, far_sdk.backends.tensorrt; "
            "print(sorted(m for m in ('tensorrt', 'torch', 'onnxruntime') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_cli_rejects_a_bad_batch_profile(capsys):
    from export.trt_build import add_trt_args

    p = argparse.ArgumentParser()
    add_trt_args(p)
    with pytest.raises(SystemExit):
        p.parse_args(["--bundle", "x", "--batch", "4:2:8"])
    assert "MIN:OPT:MAX" in capsys.readouterr().err


# ---- profiles --------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, want", [("1:4:8", (1, 4, 8)), ("4", (4, 4, 4)), (" 2 : 2 : 3 ", (2, 2, 3)),
                                        ((1, 1, 8), (1, 1, 8)), ([3, 3, 3], (3, 3, 3)), (5, (5, 5, 5))])
def test_parse_batch_profile_valid(text, want):
    assert tc.parse_batch_profile(text) == want


@pytest.mark.parametrize("text", ["", "0:1:2", "4:2:8", "1:8:4", "a:b:c", "1:2", "1:2:3:4", "-1:1:1", "1.5:2:3",
                                  "1::3", 0, True, (1, 2), (1, 2.0, 3)])
def test_parse_batch_profile_invalid(text):
    with pytest.raises(InvalidArgumentError, match="MIN:OPT:MAX") as e:
        tc.parse_batch_profile(text)
    assert isinstance(e.value, ValueError)


def test_transformer_profile_counts_cfg_rows(fake_bundle):
    assert _key(fake_bundle, "transformer", profile=(1, 4, 8)).graph_profile == (2, 8, 16)
    assert _key(fake_bundle, "denoiser", profile=(1, 4, 8)).graph_profile == (1, 4, 8)


# ---- keys ------------------------------------------------------------------------------------------


def test_key_digest_is_sha256_of_sorted_compact_json(fake_bundle):
    key = _key(fake_bundle)
    d = {"graph": "denoiser", "onnx_sha256": fake_bundle.manifest["files"]["denoiser.onnx"]["sha256"], "precision": "fp16",
         "profile": [1, 2, 4], "opt_level": 3, "tensorrt": ENV.tensorrt, "gpu": ENV.gpu, "compute_capability": "9.0",
         "external_data_sha256": None, "key_version": tc.KEY_VERSION}
    want = hashlib.sha256(json.dumps(d, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert key.digest() == want
    assert key.plan_name == f"denoiser-fp16-{want[:12]}.plan"
    assert tc.EngineKey.from_dict(json.loads(json.dumps(key.to_dict()))) == key
    assert _key(fake_bundle, profile=[1, 2, 4]).digest() == want  # a list profile is the same key


@pytest.mark.parametrize("field, value", [
    ("graph", "transformer"), ("onnx_sha256", "0" * 64), ("precision", "fp32"), ("profile", (1, 2, 8)),
    ("opt_level", 5), ("tensorrt", "10.9.0.34"), ("gpu", "NVIDIA L40S"), ("compute_capability", "8.9"),
    ("external_data_sha256", "1" * 64), ("key_version", tc.KEY_VERSION + 1),
])
def test_key_digest_changes_with_every_field(fake_bundle, field, value):
    from dataclasses import replace

    key = _key(fake_bundle)
    assert replace(key, **{field: value}).digest() != key.digest()


def test_key_rejects_bad_values(fake_bundle):
    with pytest.raises(InvalidArgumentError, match="precision"):
        _key(fake_bundle, precision="int8")
    with pytest.raises(InvalidArgumentError, match="optimisation level"):
        _key(fake_bundle, opt_level=7)
    with pytest.raises(IncompatibleBundleError, match="not an engine key"):
        tc.EngineKey.from_dict({"graph": "denoiser"})


# ---- check_plan and its messages ---------------------------------------------------------------------


def test_check_plan_accepts_the_recorded_plan(fake_bundle):
    key = _key(fake_bundle)
    path = _record(fake_bundle, key)
    assert tc.check_plan(fake_bundle, key) == path
    assert tc.read_plan(fake_bundle, key) == b"plan bytes"
    side = json.loads(tc.sidecar_path(path).read_text())
    assert side["plan_sha256"] == hashlib.sha256(b"plan bytes").hexdigest() and side["key"] == key.to_dict()
    assert side["build_seconds"] == 1.5 and side["graph_batch"] == [1, 2, 4]


def test_check_plan_without_any_engine_says_how_to_build(fake_bundle):
    with pytest.raises(tc.EngineNotBuiltError, match=r"no TensorRT engine for graph 'denoiser'.*far-export trt --bundle .* --precision fp16 --batch 1:2:4") as e:
        tc.check_plan(fake_bundle, _key(fake_bundle))
    assert isinstance(e.value, IncompatibleBundleError) and isinstance(e.value, BackendUnavailableError)


def test_check_plan_for_another_tensorrt_version(fake_bundle):
    _record(fake_bundle, _key(fake_bundle, env=OTHER_TRT))
    with pytest.raises(tc.EngineNotBuiltError) as e:
        tc.check_plan(fake_bundle, _key(fake_bundle))
    msg = str(e.value)
    assert "built for TensorRT 10.3.0.26 on NVIDIA H100 80GB HBM3 (9.0), this is TensorRT 10.8.0.43 on NVIDIA H100 80GB HBM3 (9.0)" in msg
    assert "far-export trt --bundle" in msg and "precision" not in msg.split("Rebuild")[0]


def test_check_plan_for_another_gpu(fake_bundle):
    _record(fake_bundle, _key(fake_bundle, env=OTHER_GPU))
    with pytest.raises(tc.EngineNotBuiltError, match=r"on NVIDIA A100-SXM4-80GB \(8\.0\), this is TensorRT 10\.8\.0\.43 on NVIDIA H100 80GB HBM3 \(9\.0\)"):
        tc.check_plan(fake_bundle, _key(fake_bundle))


def test_check_plan_for_another_precision_and_profile(fake_bundle):
    _record(fake_bundle, _key(fake_bundle, precision="fp32", profile=(1, 1, 8)))
    with pytest.raises(tc.EngineNotBuiltError) as e:
        tc.check_plan(fake_bundle, _key(fake_bundle))
    msg = str(e.value)
    assert "built in fp32, wanted fp16" in msg and "built for batch 1:1:8 images per call, wanted 1:2:4" in msg
    assert "TensorRT 10" not in msg.split("Rebuild")[0]  # the machine matches: not mentioned


def test_check_plan_for_a_reexported_graph(fake_bundle):
    from dataclasses import replace

    _record(fake_bundle, replace(_key(fake_bundle), onnx_sha256="f" * 64))
    with pytest.raises(tc.EngineNotBuiltError, match="built from another denoiser graph.*re-exported"):
        tc.check_plan(fake_bundle, _key(fake_bundle))


def test_check_plan_detects_tampered_and_truncated_plans(fake_bundle):
    key = _key(fake_bundle)
    path = _record(fake_bundle, key)
    path.write_bytes(b"plan bytez")  # same size, other bytes
    with pytest.raises(IncompatibleBundleError, match=r"fails its sha256 check.*--rebuild") as e:
        tc.check_plan(fake_bundle, key)
    assert not isinstance(e.value, tc.EngineNotBuiltError)
    with pytest.raises(IncompatibleBundleError, match="sha256"):
        tc.read_plan(fake_bundle, key)
    path.write_bytes(b"plan")
    with pytest.raises(IncompatibleBundleError, match="truncated"):
        tc.check_plan(fake_bundle, key)


def test_check_plan_sidecar_without_plan_and_plan_without_sidecar(fake_bundle):
    key = _key(fake_bundle)
    path = _record(fake_bundle, key)
    path.unlink()
    with pytest.raises(tc.EngineNotBuiltError, match="has no plan"):
        tc.check_plan(fake_bundle, key)
    path.write_bytes(b"plan bytes")
    tc.sidecar_path(path).unlink()
    with pytest.raises(tc.EngineNotBuiltError, match="has no sidecar"):
        tc.check_plan(fake_bundle, key)


def test_find_plan_picks_this_machine_and_prefers_fp16(fake_bundle):
    _record(fake_bundle, _key(fake_bundle, env=OTHER_GPU))
    fp32 = _key(fake_bundle, precision="fp32")
    fp16 = _key(fake_bundle, precision="fp16")
    _record(fake_bundle, fp32)
    _record(fake_bundle, fp16)
    assert tc.find_plan(fake_bundle, "denoiser", env=ENV)[0] == fp16
    assert tc.find_plan(fake_bundle, "denoiser", env=ENV, precision="fp32")[0] == fp32
    assert tc.find_plan(fake_bundle, "denoiser", env=ENV, prefer=("fp32", "fp16"))[0] == fp32
    with pytest.raises(tc.EngineNotBuiltError, match="wanted 1:4:8"):
        tc.find_plan(fake_bundle, "denoiser", env=ENV, profile=(1, 4, 8))
    with pytest.raises(tc.EngineNotBuiltError, match=r"built for TensorRT 10\.8\.0\.43 on NVIDIA H100.*this is TensorRT 10\.8\.0\.43 on NVIDIA L4"):
        tc.find_plan(fake_bundle, "denoiser", env=tc.BuildEnv("10.8.0.43", "NVIDIA L4", "8.9"))


def test_index_lists_engines_and_manifest_is_untouched(fake_bundle):
    before = (fake_bundle.path / "manifest.json").read_bytes()
    _record(fake_bundle, _key(fake_bundle))
    _record(fake_bundle, _key(fake_bundle, "vae_decoder", precision="fp32"))
    index = json.loads((fake_bundle.path / "trt" / tc.INDEX_NAME).read_text())
    assert sorted((e["graph"], e["precision"], e["profile"]) for e in index["engines"]) == [("denoiser", "fp16", "1:2:4"), ("vae_decoder", "fp32", "1:2:4")]
    assert "manifest.json" in index["note"]
    assert (fake_bundle.path / "manifest.json").read_bytes() == before
    Bundle.load(fake_bundle.path)  # still verifies


# ---- atomic writes and the lock ------------------------------------------------------------------------


def test_atomic_writer_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "trt" / "x.plan"
    tc.atomic_write_bytes(target, b"old")
    with pytest.raises(RuntimeError, match="disk full"):
        with tc.atomic_writer(target) as f:
            f.write(b"half of the new")
            raise RuntimeError("disk full")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["x.plan"]


def test_record_plan_failure_leaves_no_temp_files(fake_bundle, monkeypatch):
    key = _key(fake_bundle)
    import far_sdk.fileio as fio  # the atomic writer lives there

    monkeypatch.setattr(fio.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(OSError, match="No space"):
        _record(fake_bundle, key)
    assert [p.name for p in (fake_bundle.path / "trt").iterdir()] == []


def test_build_lock_excludes_a_second_holder(fake_bundle):
    order = []
    first_in = threading.Event()

    def second():
        first_in.wait()
        with tc.build_lock(fake_bundle):
            order.append("second")

    t = threading.Thread(target=second)
    t.start()
    with tc.build_lock(fake_bundle):
        first_in.set()
        time.sleep(0.2)  # the second holder must still be waiting
        order.append("first")
    t.join(5)
    assert order == ["first", "second"]
    assert (fake_bundle.path / "trt" / ".lock").exists()


# ---- build-time validation helpers ---------------------------------------------------------------------


def test_compare_outputs_reports_vae_fp16_overflow():
    from export.trt_build import compare_outputs

    bad = {"image": np.array([[0.5, np.inf]], dtype=np.float32)}
    with pytest.raises(ExportError, match=r"the VAE decoder overflows in fp16 .*rebuild with --vae-precision fp32"):
        compare_outputs("vae_decoder", "fp16", bad, None)
    with pytest.raises(ExportError, match="denoiser engine \\(fp16\\) produced NaN/inf.*--precision fp32"):
        compare_outputs("denoiser", "fp16", {"x_prev": np.array([np.nan], dtype=np.float32)}, None)


def test_compare_outputs_measures_and_bounds_the_error():
    from export.trt_build import compare_outputs

    ref = {"x_prev": np.array([1.0, -2.0, 4.0], dtype=np.float32)}
    got = {"x_prev": np.array([1.0, -2.0, 4.04], dtype=np.float32)}
    r = compare_outputs("denoiser", "fp16", got, ref)
    assert r["max_abs"] == pytest.approx(0.04, rel=1e-4) and r["max_rel"] == pytest.approx(0.01, rel=1e-4)
    with pytest.raises(ExportError, match="disagrees with onnxruntime.*--precision fp32.*--no-validate"):
        compare_outputs("denoiser", "fp32", got, ref)


def test_sample_feeds_shapes_and_null_half(fake_bundle):
    from export.trt_build import sample_feeds

    f = sample_feeds(fake_bundle.graph_spec("transformer"), 3, fake_bundle.manifest)
    assert f["tokens"].shape == (6, 4, 2) and f["class_ids"].dtype == np.int64 and f["level"].shape == (1,)
    assert (f["class_ids"][3:] == 10).all() and (f["class_ids"][:3] < 10).all()
    d = sample_feeds(fake_bundle.graph_spec("denoiser"), 3, fake_bundle.manifest)
    assert d["cond"].shape == (2, 3, 4, 8) and d["step"].shape == (10,) and d["step"][-1] > 0


def test_format_parser_error_names_the_node():
    from export.trt_build import format_parser_error

    err = SimpleNamespace(desc=lambda: "Unsupported operator Foo", node=lambda: 12, node_name=lambda: "/blocks.0/Foo", node_operator=lambda: "Foo")
    assert format_parser_error(err) == "Unsupported operator Foo (node 12 '/blocks.0/Foo', Foo)"
    assert format_parser_error(SimpleNamespace(desc=lambda: "bad graph", node=lambda: -1)) == "bad graph"


def test_build_options_validation():
    from export.trt_build import BuildOptions

    assert BuildOptions(graphs=("vae_decoder", "transformer")).graphs == ("transformer", "vae_decoder")
    for bad in (dict(precision="int8"), dict(vae_precision="fp8"), dict(opt_level=6), dict(workspace_gb=0),
                dict(graphs=("unet",)), dict(graphs=()), dict(profile="8:1:1")):
        with pytest.raises(InvalidArgumentError):
            BuildOptions(**bad)


def test_set_precision_flags_and_tensorrt_11():
    from export.trt_build import set_precision

    class Config:
        def __init__(self):
            self.set, self.cleared = [], []

        def set_flag(self, f):
            self.set.append(f)

        def clear_flag(self, f):
            self.cleared.append(f)

    trt10 = SimpleNamespace(__version__="10.8", BuilderFlag=SimpleNamespace(FP16="FP16", BF16="BF16", TF32="TF32"))
    c = Config()
    set_precision(trt10, c, "fp32")
    assert c.cleared == ["TF32"] and c.set == []
    set_precision(trt10, c, "bf16")
    assert c.set == ["BF16"]
    trt11 = SimpleNamespace(__version__="11.4", BuilderFlag=SimpleNamespace(TF32="TF32"))
    with pytest.raises(ExportError, match="TensorRT 11 builds strongly typed networks only.*--precision fp32"):
        set_precision(trt11, Config(), "fp16")


# ---- a simulated tensorrt + cuda-python ------------------------------------------------------------------


class CudaErr(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorStreamCaptureUnsupported = 900


OK = CudaErr.cudaSuccess


class FakeStream:
    def __int__(self):
        return 77


class FakeCuda:
    """Device memory in NumPy (fresh allocations read as NaN), synchronous copies, stream capture
    recording enqueued work for replay. Only what the backend and the builder call."""

    cudaStreamNonBlocking = 1
    cudaMemcpyKind = SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2)
    cudaStreamCaptureMode = SimpleNamespace(cudaStreamCaptureModeGlobal=0, cudaStreamCaptureModeThreadLocal=1)

    def __init__(self, fail_capture=False):
        self.mem: dict[int, np.ndarray] = {}
        self.next, self.capture, self.fail_capture = 1 << 32, None, fail_capture
        self.syncs = self.launches = self.captures = 0

    def view(self, ptr, n):
        for base, buf in self.mem.items():
            if base <= ptr and ptr + n <= base + buf.size:
                return buf[ptr - base: ptr - base + n]
        raise AssertionError(f"access of {n} bytes at {ptr:#x} outside every allocation")

    def cudaGetDeviceCount(self):
        return OK, 1

    def cudaSetDevice(self, i):
        return (OK,)

    def cudaGetDeviceProperties(self, i):
        return OK, SimpleNamespace(name=ENV.gpu.encode() + b"\0\0garbage", major=9, minor=0)

    def cudaMalloc(self, n):
        assert self.capture is None
        base, self.next = self.next, self.next + (-(-n // 4096)) * 4096
        self.mem[base] = np.full(n, 0xFF, dtype=np.uint8)
        return OK, base

    def cudaFree(self, ptr):
        del self.mem[ptr]
        return (OK,)

    def cudaStreamCreateWithFlags(self, flags):
        return OK, FakeStream()

    cudaStreamCreate = lambda self: self.cudaStreamCreateWithFlags(0)  # noqa: E731

    def cudaStreamDestroy(self, s):
        return (OK,)

    def cudaStreamSynchronize(self, s):
        assert self.capture is None
        self.syncs += 1
        return (OK,)

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):
        assert self.capture is None, "copies from pageable memory cannot be captured"
        if kind == 1:
            self.view(dst, n)[:] = np.frombuffer(ctypes.string_at(src, n), dtype=np.uint8)
        else:
            ctypes.memmove(dst, self.view(src, n).ctypes.data, n)
        return (OK,)

    def cudaMemcpy2DAsync(self, dst, dpitch, src, spitch, width, height, kind, stream):
        assert kind == 1 and width <= dpitch and width <= spitch
        for row in range(height):
            self.cudaMemcpyAsync(dst + row * dpitch, src + row * spitch, width, kind, stream)
        return (OK,)

    def cudaStreamBeginCapture(self, stream, mode):
        if self.fail_capture:
            return (CudaErr.cudaErrorStreamCaptureUnsupported,)
        self.capture = []
        return (OK,)

    def cudaStreamEndCapture(self, stream):
        ops, self.capture = self.capture, None
        self.captures += 1
        return OK, SimpleNamespace(ops=ops)

    def cudaGraphInstantiate(self, graph, flags):
        return OK, SimpleNamespace(ops=list(graph.ops))

    def cudaGraphLaunch(self, exe, stream):
        self.launches += 1
        for op in exe.ops:
            op()
        return (OK,)

    def cudaGraphExecDestroy(self, exe):
        return (OK,)

    def cudaGraphDestroy(self, g):
        return (OK,)

    def cudaGetLastError(self):
        return (OK,)


def make_fake_trt(cuda: FakeCuda, *, overflow_vae_fp16=False):
    """A tensorrt stand-in: the 'plan' is JSON naming the ONNX file, its profile and flags; the
    engine runs the ONNX graph in onnxruntime on the fake device memory."""
    import onnxruntime as ort

    stats = SimpleNamespace(builds=[], deserialized=0)
    dtypes = {"tensor(float)": np.float32, "tensor(int64)": np.int64}

    class ILogger:
        Severity = enum.Enum("Severity", "INTERNAL_ERROR ERROR WARNING INFO VERBOSE")

        def __init__(self):
            pass

    class Context:
        def __init__(self, engine):
            self.e, self.shapes, self.addrs, self.dirty = engine, {}, {}, True

        def set_input_shape(self, name, shape):
            lo, _, hi = self.e.plan["profile"][name]
            if not all(a <= s <= b for a, s, b in zip(lo, shape, hi)):
                return False
            self.dirty |= self.shapes.get(name) != tuple(shape)
            self.shapes[name] = tuple(shape)
            return True

        def _shape(self, info):
            sym = {d: self.shapes[i.name][k] for i in self.e.inputs for k, d in enumerate(i.shape) if isinstance(d, str) and i.name in self.shapes}
            return tuple(sym[d] if isinstance(d, str) else d for d in info.shape)

        def get_tensor_shape(self, name):
            return self._shape(next(o for o in self.e.inputs + self.e.outputs if o.name == name))

        def set_tensor_address(self, name, ptr):
            assert ptr % 256 == 0, f"{name} at {ptr:#x} is not 256-byte aligned"
            self.addrs[name] = ptr
            return True

        def execute_async_v3(self, stream):
            if cuda.capture is not None and self.dirty:
                return False  # like TensorRT: the first enqueue after a shape change cannot be captured
            io = [(i, self._shape(i), self.addrs[i.name]) for i in self.e.inputs + self.e.outputs]
            op = lambda: self._run(io)  # noqa: E731 - addresses and shapes as at enqueue time
            if cuda.capture is not None:
                cuda.capture.append(op)
            else:
                self.dirty = False
                op()
            return True

        def _run(self, io):
            n_in = len(self.e.inputs)
            feeds = {}
            for info, shape, ptr in io[:n_in]:
                dt = np.dtype(dtypes[info.type])
                feeds[info.name] = cuda.view(ptr, int(np.prod(shape)) * dt.itemsize).view(dt).reshape(shape).copy()
            outs = self.e.session.run([o.name for o in self.e.outputs], feeds)
            for (info, shape, ptr), out in zip(io[n_in:], outs):
                if overflow_vae_fp16 and self.e.plan["graph"] == "vae_decoder" and "FP16" in self.e.plan["flags"]:
                    out = np.full_like(out, np.inf)
                assert out.shape == shape
                cuda.view(ptr, out.nbytes)[:] = np.ascontiguousarray(out).view(np.uint8).reshape(-1)

    class Engine:
        def __init__(self, plan):
            self.plan = plan
            self.session = ort.InferenceSession(plan["onnx"], providers=["CPUExecutionProvider"])
            self.inputs, self.outputs = self.session.get_inputs(), self.session.get_outputs()
            self.num_io_tensors = len(self.inputs) + len(self.outputs)
            self._by_name = {t.name: t for t in self.inputs + self.outputs}

        def get_tensor_name(self, i):
            return (self.inputs + self.outputs)[i].name

        def get_tensor_mode(self, name):
            return trt.TensorIOMode.INPUT if any(i.name == name for i in self.inputs) else trt.TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name):
            return dtypes[self._by_name[name].type]

        def create_execution_context(self):
            return Context(self)

    class Runtime:
        def __init__(self, logger):
            assert isinstance(logger, ILogger)

        def deserialize_cuda_engine(self, data):
            stats.deserialized += 1
            try:
                return Engine(json.loads(bytes(data)))
            except ValueError:
                return None  # like TensorRT for a foreign plan

    class Cache:
        def __init__(self, data):
            self.data = bytes(data)

        def serialize(self):
            return self.data + b"+"

    class Config:
        def __init__(self):
            self.flags, self.profiles, self.cache, self.builder_optimization_level = {"TF32"}, [], None, None

        set_flag = lambda self, f: self.flags.add(f)  # noqa: E731
        clear_flag = lambda self, f: self.flags.discard(f)  # noqa: E731

        def set_memory_pool_limit(self, pool, size):
            self.workspace = size

        def add_optimization_profile(self, p):
            self.profiles.append(p)
            return 0

        create_timing_cache = lambda self, data: Cache(data)  # noqa: E731

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache
            return True

        get_timing_cache = lambda self: self.cache  # noqa: E731

    class Network:
        onnx = None

    class OnnxParser:
        def __init__(self, network, logger):
            self.network, self.num_errors = network, 0

        def parse_from_file(self, path):
            self.network.onnx = path
            return True

    class Profile(dict):
        def set_shape(self, name, lo, opt, hi):
            self[name] = [list(lo), list(opt), list(hi)]

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            assert flags == 0
            return Network()

        create_builder_config = lambda self: Config()  # noqa: E731
        create_optimization_profile = lambda self: Profile()  # noqa: E731

        def build_serialized_network(self, network, config):
            graph = Path(network.onnx).stem
            plan = {"graph": graph, "onnx": network.onnx, "profile": config.profiles[0], "flags": sorted(config.flags),
                    "opt_level": config.builder_optimization_level, "timing_cache_in": config.cache.data.decode()}
            stats.builds.append(plan)
            return json.dumps(plan).encode()

    trt = SimpleNamespace(
        __version__=ENV.tensorrt, ILogger=ILogger, Runtime=Runtime, Builder=Builder, OnnxParser=OnnxParser,
        TensorIOMode=enum.Enum("TensorIOMode", "INPUT OUTPUT"), nptype=lambda dt: dt,
        BuilderFlag=SimpleNamespace(FP16="FP16", BF16="BF16", TF32="TF32"), MemoryPoolType=SimpleNamespace(WORKSPACE="WORKSPACE"),
    )
    return trt, stats


@pytest.fixture(scope="module")
def tiny_bundle_dir(tmp_path_factory) -> Path:
    pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    import torch

    from export.onnx_export import export_bundle
    from training import FAR, VAE_CONFIGS, AutoencoderKL, get_config
    from training.graph_modules import randomize_for_export

    torch.manual_seed(0)
    far = randomize_for_export(FAR(get_config("far_tiny")), seed=0).eval()
    vae = randomize_for_export(AutoencoderKL(VAE_CONFIGS["kl16-tiny"]), seed=1).eval()
    return export_bundle(far, vae, tmp_path_factory.mktemp("trt") / "tiny", name="tiny", validate=False)


@pytest.fixture
def sim(tiny_bundle_dir, tmp_path, monkeypatch):
    """A fresh copy of the tiny bundle and a simulated tensorrt/cuda-python patched in."""
    import export.trt_build as tb
    import far_sdk.backends.tensorrt as tb_rt

    def install(**opts):
        cuda = FakeCuda(fail_capture=opts.pop("fail_capture", False))
        trt, stats = make_fake_trt(cuda, **opts)
        monkeypatch.setattr(tb_rt, "import_runtime", lambda: (trt, cuda))
        monkeypatch.setattr(tb, "import_runtime", lambda: (trt, cuda))
        monkeypatch.setattr(tb_rt, "_TRT_LOGGER", None)
        return SimpleNamespace(cuda=cuda, trt=trt, stats=stats)

    bundle = tmp_path / "tiny"
    shutil.copytree(tiny_bundle_dir, bundle)
    s = install()
    s.bundle, s.install = bundle, install
    return s


FAST = dict(num_steps=4, inner_steps=[3, 4, 5, 6])


def _table(out: str) -> list[list[str]]:
    """The rows of run_trt's summary table (after its header line)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("graph "))
    return [line.split() for line in lines[start + 1:]]


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
        threads = [threading.Thread(target=lambda: out.append(build_engines(sim.bundle, progress=lambda m: None))) for _ in range(2)]
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

    def _ort(self, sim):
        return far_sdk.Generator(sim.bundle, backend="onnxruntime", threads=2)

    def test_generator_matches_onnxruntime_with_cuda_graphs(self, sim):
        from export.trt_build import build_engines
        from far_sdk.backends.tensorrt import TensorRTBackend

        build_engines(sim.bundle, batch=(1, 2, 2), progress=lambda m: None)
        be = TensorRTBackend(Bundle.load(sim.bundle))
        gen = far_sdk.Generator(sim.bundle, backend=be)
        out = gen.generate([1, 7, 3], seed=3, output_type="np", cfg=2.5, **FAST)  # 3 images: split 2 + 1
        ref = self._ort(sim).generate([1, 7, 3], seed=3, output_type="np", cfg=2.5, **FAST)
        assert rel_err(out.latents, ref.latents) < 1e-6
        assert np.abs(out.images.astype(int) - ref.images.astype(int)).max() <= 1
        d = be.describe()
        assert d["cuda_graphs"] and d["gpu"] == ENV.gpu and d["engines"]["vae_decoder"]["precision"] == "fp32" and be.max_batch == 2
        # 2 batch sizes x 4 distinct step counts: 8 captures, one launch each
        assert sim.cuda.captures == 8 and sim.cuda.launches == 8
        gen.close()
        assert sim.cuda.mem == {}  # every buffer freed

    def test_one_host_sync_per_denoise_and_plain_fallback(self, sim):
        from export.trt_build import build_engines
        from far_sdk.backends.tensorrt import TensorRTBackend

        build_engines(sim.bundle, batch=(1, 2, 2), progress=lambda m: None)
        outs = {}
        for fail in (False, True):
            cuda = sim.install(fail_capture=fail).cuda
            be = TensorRTBackend(Bundle.load(sim.bundle))
            rng = np.random.default_rng(0)
            x, noises = rng.standard_normal((2, 256, 16), dtype=np.float32), rng.standard_normal((5, 2, 256, 16), dtype=np.float32)
            from far_sdk.diffusion import denoise_step_table

            steps = denoise_step_table(5, 3.0, 1.0)
            tokens = rng.standard_normal((4, 256, 16), dtype=np.float32)
            cond = be.transformer(tokens, np.array([1, 2, 10, 10]), 3)
            be.denoise(x, noises, cond, steps)  # first call: capture (or fail and fall back)
            syncs, launches = cuda.syncs, cuda.launches
            outs[fail] = be.denoise(x, noises, cond, steps)
            assert cuda.syncs == syncs + 1 and cuda.launches == launches + (not fail)  # the graph is replayed
            assert be.describe()["cuda_graphs"] is (not fail)
            host = be.run("transformer", {"tokens": tokens, "class_ids": np.array([1, 2, 10, 10]), "level": np.array([3.0], np.float32)})["cond"]
            ref = x
            for i in range(5):  # the same steps one graph call at a time, with cond from the host
                ref = be.run("denoiser", {"x": ref, "noise": noises[i], "cond": host.reshape(2, 2, 256, -1), "step": steps[i]})["x_prev"]
            np.testing.assert_array_equal(outs[fail], ref)
            be.close()
        np.testing.assert_array_equal(outs[False], outs[True])

    def test_profile_stale_cond_and_closed_errors(self, sim):
        from export.trt_build import build_engines
        from far_sdk.backends.tensorrt import TensorRTBackend

        build_engines(sim.bundle, batch=(1, 2, 2), progress=lambda m: None)
        be = TensorRTBackend(Bundle.load(sim.bundle))
        tok = np.zeros((6, 256, 16), np.float32)
        with pytest.raises(EngineProfileError, match=r"3 images per call.*take 1\.\.2.*far-export trt --bundle .* --batch 1:2:3"):
            be.transformer(tok, np.zeros(6, np.int64), 0)
        with pytest.raises(EngineProfileError, match="max_batch=5 exceeds"):
            far_sdk.Generator(sim.bundle, backend=be).generate([1], max_batch=5)
        c1 = be.transformer(tok[:2], np.array([1, 10]), 0)
        be.transformer(tok[:2], np.array([2, 10]), 0)
        with pytest.raises(InvalidArgumentError, match="cond is stale"):
            be.denoise(tok[:1], np.zeros((1, 1, 256, 16), np.float32), c1, np.zeros((1, 10), np.float32))
        be.close()
        be.close()  # idempotent
        with pytest.raises(BackendUnavailableError, match="closed"):
            be.decode(np.zeros((1, 16, 16, 16), np.float32))

    def test_sidecars_are_checked_before_any_plan_is_deserialized(self, sim):
        from export.trt_build import build_engines
        from far_sdk.backends.tensorrt import TensorRTBackend

        build_engines(sim.bundle, progress=lambda m: None, validate=False)
        loads = sim.stats.deserialized
        bundle = Bundle.load(sim.bundle)
        vae = next((sim.bundle / "trt").glob("vae_decoder-*.plan.json"))
        side = json.loads(vae.read_text())
        side["key"]["gpu"], side["key"]["compute_capability"] = OTHER_GPU.gpu, OTHER_GPU.compute_capability
        vae.write_text(json.dumps(side))  # the VAE plan now claims another GPU
        with pytest.raises(tc.EngineNotBuiltError, match=r"vae_decoder.*A100-SXM4-80GB \(8\.0\), this is TensorRT .* H100 80GB HBM3 \(9\.0\)"):
            TensorRTBackend(bundle)
        assert sim.stats.deserialized == loads  # no plan reached TensorRT
        with pytest.raises(tc.EngineNotBuiltError):
            TensorRTBackend(bundle, precision="bf16")
        assert sim.cuda.mem == {}

    def test_a_plan_tensorrt_refuses_is_reported(self, sim):
        from far_sdk.backends.tensorrt import TensorRTBackend

        bundle = Bundle.load(sim.bundle)
        for g in GRAPH_NAMES:  # sidecars that match, plans TensorRT cannot read
            tc.record_plan(bundle, tc.key_for(bundle, g, precision="fp32", profile=(1, 1, 2), opt_level=3, env=ENV), b"\x00garbage",
                           build_seconds=0, validation=None)
        with pytest.raises(IncompatibleBundleError, match="could not deserialize the transformer engine"):
            TensorRTBackend(bundle)
        assert sim.cuda.mem == {}


# ---- the real thing ---------------------------------------------------------------------------------------


def _gpu_ready() -> str | None:
    try:
        from far_sdk.backends.tensorrt import import_runtime, select_device

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
        gen = far_sdk.Generator(gpu_built, backend="tensorrt", precision=precision)
        ref_gen = far_sdk.Generator(gpu_built, backend="onnxruntime", device="cpu", threads=4)
        out = gen.generate([1, 7, 3], seed=3, output_type="np", **FAST)
        ref = ref_gen.generate([1, 7, 3], seed=3, output_type="np", **FAST)
        err = float(np.abs(out.latents - ref.latents).max())
        scale = max(1.0, float(np.abs(ref.latents).max()))
        assert np.isfinite(out.latents).all() and err <= bound * scale, f"{precision}: max abs {err} (scale {scale})"
        assert gen.backend.describe()["tensorrt"]
        gen.close()
