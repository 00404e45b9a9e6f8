"""The TensorRT engine cache (far_sdk.backends.tensorrt.cache) and the builder's pure helpers: batch profiles, cache
keys, sidecars and their error messages, atomic writes and locking, build-time validation helpers. Pure
Python: no tensorrt, no GPU (the flow against a simulated TensorRT is in tests/test_trt.py)."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from trt_sim import ENV, write_fake_bundle

from far_sdk import fileio
from far_sdk.backends.tensorrt import cache as tc
from far_sdk.backends.tensorrt import cache_store as cs
from far_sdk.bundle.bundle import Bundle
from far_sdk.errors import BackendUnavailableError, ExportError, IncompatibleBundleError, InvalidArgumentError
from far_sdk.fileio import atomic_write_bytes, atomic_writer

OTHER_TRT = tc.BuildEnv("10.3.0.26", "NVIDIA H100 80GB HBM3", "9.0")
OTHER_GPU = tc.BuildEnv("10.8.0.43", "NVIDIA A100-SXM4-80GB", "8.0")


@pytest.fixture
def fake_bundle(tmp_path) -> Bundle:
    return write_fake_bundle(tmp_path / "fake")


def _key(bundle, graph="denoiser", env=ENV, **kw) -> tc.EngineKey:
    args = dict(precision="fp16", profile=(1, 2, 4), opt_level=3, env=env) | kw
    return tc.key_for(bundle, graph, **args)


def _record(bundle, key, data=b"plan bytes") -> Path:
    return cs.record_plan(bundle, key, data, build_seconds=1.5, validation=None)


# ---- profiles --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, want",
    [
        ("1:4:8", (1, 4, 8)),
        ("4", (4, 4, 4)),
        (" 2 : 2 : 3 ", (2, 2, 3)),
        ((1, 1, 8), (1, 1, 8)),
        ([3, 3, 3], (3, 3, 3)),
        (5, (5, 5, 5)),
    ],
)
def test_parse_batch_profile_valid(text, want):
    assert tc.parse_batch_profile(text) == want


@pytest.mark.parametrize(
    "text",
    [
        "",
        "0:1:2",
        "4:2:8",
        "1:8:4",
        "a:b:c",
        "1:2",
        "1:2:3:4",
        "-1:1:1",
        "1.5:2:3",
        "1::3",
        0,
        True,
        (1, 2),
        (1, 2.0, 3),
    ],
)
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
    d = {
        "graph": "denoiser",
        "onnx_sha256": fake_bundle.manifest["files"]["denoiser.onnx"]["sha256"],
        "precision": "fp16",
        "profile": [1, 2, 4],
        "opt_level": 3,
        "tensorrt": ENV.tensorrt,
        "gpu": ENV.gpu,
        "compute_capability": "9.0",
        "external_data_sha256": None,
        "key_version": tc.KEY_VERSION,
    }
    want = hashlib.sha256(json.dumps(d, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert key.digest() == want
    assert key.plan_name == f"denoiser-fp16-{want[:12]}.plan"
    assert tc.EngineKey.from_dict(json.loads(json.dumps(key.to_dict()))) == key
    assert _key(fake_bundle, profile=[1, 2, 4]).digest() == want  # a list profile is the same key


@pytest.mark.parametrize(
    "field, value",
    [
        ("graph", "transformer"),
        ("onnx_sha256", "0" * 64),
        ("precision", "fp32"),
        ("profile", (1, 2, 8)),
        ("opt_level", 5),
        ("tensorrt", "10.9.0.34"),
        ("gpu", "NVIDIA L40S"),
        ("compute_capability", "8.9"),
        ("external_data_sha256", "1" * 64),
        ("key_version", tc.KEY_VERSION + 1),
    ],
)
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
    with pytest.raises(
        tc.EngineNotBuiltError,
        match=r"no TensorRT engine for graph 'denoiser'.*far-export trt --bundle .* --precision fp16 --batch 1:2:4",
    ) as e:
        tc.check_plan(fake_bundle, _key(fake_bundle))
    assert isinstance(e.value, IncompatibleBundleError) and isinstance(e.value, BackendUnavailableError)


def test_check_plan_for_another_tensorrt_version(fake_bundle):
    _record(fake_bundle, _key(fake_bundle, env=OTHER_TRT))
    with pytest.raises(tc.EngineNotBuiltError) as e:
        tc.check_plan(fake_bundle, _key(fake_bundle))
    msg = str(e.value)
    assert (
        "built for TensorRT 10.3.0.26 on NVIDIA H100 80GB HBM3 (9.0), this is TensorRT 10.8.0.43 on NVIDIA H100 80GB "
        "HBM3 (9.0)" in msg
    )
    assert "far-export trt --bundle" in msg and "precision" not in msg.split("Rebuild")[0]


def test_check_plan_for_another_gpu(fake_bundle):
    _record(fake_bundle, _key(fake_bundle, env=OTHER_GPU))
    with pytest.raises(
        tc.EngineNotBuiltError,
        match=r"on NVIDIA A100-SXM4-80GB \(8\.0\), this is TensorRT 10\.8\.0\.43 on NVIDIA H100 80GB HBM3 \(9\.0\)",
    ):
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
    with pytest.raises(
        tc.EngineNotBuiltError,
        match=r"built for TensorRT 10\.8\.0\.43 on NVIDIA H100.*this is TensorRT 10\.8\.0\.43 on NVIDIA L4",
    ):
        tc.find_plan(fake_bundle, "denoiser", env=tc.BuildEnv("10.8.0.43", "NVIDIA L4", "8.9"))


def test_index_lists_engines_and_manifest_is_untouched(fake_bundle):
    before = (fake_bundle.path / "manifest.json").read_bytes()
    _record(fake_bundle, _key(fake_bundle))
    _record(fake_bundle, _key(fake_bundle, "vae_decoder", precision="fp32"))
    index = json.loads((fake_bundle.path / "trt" / tc.INDEX_NAME).read_text())
    assert sorted((e["graph"], e["precision"], e["profile"]) for e in index["engines"]) == [
        ("denoiser", "fp16", "1:2:4"),
        ("vae_decoder", "fp32", "1:2:4"),
    ]
    assert "manifest.json" in index["note"]
    assert (fake_bundle.path / "manifest.json").read_bytes() == before
    Bundle.load(fake_bundle.path)  # still verifies


# ---- atomic writes and the lock ------------------------------------------------------------------------


def test_atomic_writer_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "trt" / "x.plan"
    atomic_write_bytes(target, b"old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_writer(target) as f:
            f.write(b"half of the new")
            raise RuntimeError("disk full")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["x.plan"]


def test_record_plan_failure_leaves_no_temp_files(fake_bundle, monkeypatch):
    key = _key(fake_bundle)
    monkeypatch.setattr(fileio.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(OSError, match="No space"):
        _record(fake_bundle, key)
    assert [p.name for p in (fake_bundle.path / "trt").iterdir()] == []


def test_build_lock_excludes_a_second_holder(fake_bundle):
    order = []
    first_in = threading.Event()

    def second():
        first_in.wait()
        with cs.build_lock(fake_bundle):
            order.append("second")

    t = threading.Thread(target=second)
    t.start()
    with cs.build_lock(fake_bundle):
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

    err = SimpleNamespace(
        desc=lambda: "Unsupported operator Foo",
        node=lambda: 12,
        node_name=lambda: "/blocks.0/Foo",
        node_operator=lambda: "Foo",
    )
    assert format_parser_error(err) == "Unsupported operator Foo (node 12 '/blocks.0/Foo', Foo)"
    assert format_parser_error(SimpleNamespace(desc=lambda: "bad graph", node=lambda: -1)) == "bad graph"


def test_build_options_validation():
    from export.trt_build import BuildOptions

    assert BuildOptions(graphs=("vae_decoder", "transformer")).graphs == ("transformer", "vae_decoder")
    for bad in (
        dict(precision="int8"),
        dict(vae_precision="fp8"),
        dict(opt_level=6),
        dict(workspace_gb=0),
        dict(graphs=("unet",)),
        dict(graphs=()),
        dict(profile="8:1:1"),
    ):
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
