"""Hostile input, end to end (issue 12): every case ends in a typed far_sdk error, or a one-line CLI exit
with the documented status (far_sdk.errors.EXIT_CODES), and leaves no file behind.

Run: ``python -m pytest -q tests/test_hostile.py``. Works on copies of the committed demo bundle
(engines/far-demo, 10 MB) in tmp_path; nothing here exports or trains.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import OFFICIAL_TINY, ROOT
from hostile import (
    DEMO, copy_demo, manifest, one_line_error, rehash, reseal, run_cli, safetensors_bytes, two_tensors,
)

import far_sdk
from far_sdk import Bundle
from far_sdk.bundle import clean_stale_partials, atomic_bundle_dir
from far_sdk.clirun import run_command
from far_sdk.errors import (
    EXIT_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_RUNTIME, EXIT_USAGE, BundleError, CheckpointError,
    GeneratorClosedError, IncompatibleBundleError, IntegrityError, InvalidArgumentError, NumericalError, check_finite,
)
from far_sdk.manifest import DIGEST_KEY, SCHEMA, canonical_json, manifest_digest
from far_sdk.weights import check_safetensors

FLIP_OFFSETS = 200


@pytest.fixture
def bundle(tmp_path) -> Path:
    return copy_demo(tmp_path)


def _files(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*")}


# ==== 1. the manifest cannot lie ===========================================================================


def test_every_single_bit_flip_of_the_manifest_is_detected_at_load(bundle):
    data = (bundle / "manifest.json").read_bytes()
    offsets = random.Random(12).sample(range(len(data)), FLIP_OFFSETS)
    kinds: dict[str, int] = {}
    for off in offsets:
        for bit in range(8):
            flipped = bytearray(data)
            flipped[off] ^= 1 << bit
            (bundle / "manifest.json").write_bytes(bytes(flipped))
            with pytest.raises(BundleError) as info:
                Bundle.load(bundle, verify=False)
            assert str(bundle) in str(info.value)
            kinds[type(info.value).__name__] = kinds.get(type(info.value).__name__, 0) + 1
    assert sum(kinds.values()) == FLIP_OFFSETS * 8
    assert kinds.get("IntegrityError", 0) > 100  # many flips still parse: the digest catches those


@pytest.mark.parametrize("old, new", [
    ('"cfg": 3.0', '"cfg": 2.0'),                         # defaults: every image changes
    ('"x0_clip": 4.0', '"x0_clip": 5.0'),
    ('"num_steps": 10', '"num_steps": 11'),
    ('"kind": "checkpoint"', '"kind": "random-init"'),    # source
    ('"use_ema": true', '"use_ema": false'),
    ('"mlp_ratio"', '"mlp_ratiO"'),                       # a key name
    ('"max_abs": 3.337860107421875e-06', '"max_abs": 3.337860107421875e-07'),  # validation
    ('"latent_scale": 0.20562397571073734', '"latent_scale": 0.20562397571073735'),  # same double, other spelling
    ('"eps": 1e-06', '"eps": 1E-06'),                     # same value, other spelling
    ('"9": "9"', '"9": "\\u0039"'),                        # same string, escaped
    ('"size": 1361304', '"size": 1361305'),               # files
])
def test_an_edited_manifest_fails_its_digest(bundle, old, new):
    text = (bundle / "manifest.json").read_text()
    assert text.count(old) >= 1
    (bundle / "manifest.json").write_text(text.replace(old, new, 1))
    with pytest.raises(IntegrityError, match="digest|laid out") as info:
        far_sdk.Generator(bundle, backend="onnxruntime")
    assert str(bundle) in str(info.value)


def test_the_digest_is_sha256_of_the_canonical_manifest_without_it(bundle):
    m = manifest(bundle)
    body = {k: v for k, v in m.items() if k != DIGEST_KEY}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    import hashlib

    assert canonical_json(m) == canonical
    assert m[DIGEST_KEY] == manifest_digest(m) == hashlib.sha256(canonical).hexdigest()


def test_a_manifest_without_digest_asks_for_a_re_export(bundle):
    m = manifest(bundle)
    del m[DIGEST_KEY]
    m["format_version"] = 1
    (bundle / "manifest.json").write_text(json.dumps(m, indent=2) + "\n")
    with pytest.raises(IncompatibleBundleError, match="no manifest digest.*version 1.*Re-export"):
        Bundle.load(bundle)


@pytest.mark.parametrize("data, match", [
    (b"", "not valid JSON"),
    (b"\xff\xfe{}", "not UTF-8"),
    (b"[1, 2]", "not an object"),
    (b'{"a": 1, "a": 2}', "duplicate key"),
    (b'{"a": NaN}', "not valid JSON"),
    (b'{"a": 1e999}', "out of range"),
    (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
    (b'{"format": "far-bundle"}', "no manifest digest"),
])
def test_malformed_manifest_bytes_are_typed_errors(bundle, data, match):
    (bundle / "manifest.json").write_bytes(data)
    with pytest.raises(BundleError, match=match):
        Bundle.load(bundle)


def test_far_info_shows_the_digest_and_rejects_a_flipped_manifest_in_one_line(bundle):
    from far_sdk.cli import main

    rc, out, err = run_cli(main, ["info", "--bundle", str(bundle)])
    assert rc == 0 and f"manifest sha256 {manifest(bundle)[DIGEST_KEY]}" in out
    data = bytearray((bundle / "manifest.json").read_bytes())
    data[len(data) // 3] ^= 0x04
    (bundle / "manifest.json").write_bytes(bytes(data))
    rc, out, err = run_cli(main, ["info", "--bundle", str(bundle)])
    assert rc == EXIT_INPUT and one_line_error(err) and err.startswith("far info: error:") and out == ""


# ==== 2. the schema: one typed error naming the field ===================================================


def _del(*path):
    def f(m):
        d = m
        for k in path[:-1]:
            d = d[k]
        del d[path[-1]]
    return f


def _set(value, *path):
    def f(m):
        d = m
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value
    return f


SCHEMA_CASES = {
    # missing
    "missing model.grid_size": (_del("model", "grid_size"), "field model: 'grid_size' is a required property"),
    "missing model.num_classes": (_del("model", "num_classes"), "'num_classes' is a required property"),
    "missing model.token_channels": (_del("model", "token_channels"), "'token_channels' is a required property"),
    "missing graphs.denoiser": (_del("graphs", "denoiser"), "field graphs: 'denoiser' is a required property"),
    "missing graphs.transformer.file": (_del("graphs", "transformer", "file"), "field graphs.transformer: 'file'"),
    "missing files[].sha256": (_del("files", "denoiser.onnx", "sha256"), "field files.denoiser.onnx: 'sha256'"),
    "missing files[].size": (_del("files", "denoiser.onnx", "size"), "field files.denoiser.onnx: 'size'"),
    "missing latent_scale": (_del("latent_scale"), "'latent_scale' is a required property"),
    "missing source": (_del("source"), "'source' is a required property"),
    # ill-typed
    "grid_size a string": (_set("16", "model", "grid_size"), "field model.grid_size: '16' is not of type 'integer'"),
    "grid_size a float": (_set(16.0, "model", "grid_size"), "field model.grid_size: 16.0 is not of type 'integer'"),
    "grid_size a bool": (_set(True, "model", "grid_size"), "field model.grid_size: True is not of type 'integer'"),
    "num_classes a list": (_set([10], "model", "num_classes"), "field model.num_classes"),
    "graphs a list": (_set([], "graphs"), "field graphs: \\[\\] is not of type 'object'"),
    "files a list": (_set([], "files"), "field files"),
    "defaults a list": (_set([], "defaults"), "field defaults"),
    "id2label a list": (_set(["0"], "id2label"), "field id2label"),
    "graph inputs a dict": (_set({}, "graphs", "denoiser", "inputs"), "field graphs.denoiser.inputs"),
    "mask a string": (_set("no", "model", "mask"), "field model.mask"),
    "latent_scale a string": (_set("x", "latent_scale"), "field latent_scale"),
    "inner_steps 3.5": (_set(3.5, "defaults", "inner_steps"), "field defaults.inner_steps"),
    "label not a string": (_set(7, "id2label", "7"), "field id2label.7"),
    # huge or out of range
    "null_class_id 2**70": (_set(2**70, "null_class_id"), "field null_class_id: .* is greater than the maximum"),
    "grid_size 10**6": (_set(10**6, "model", "grid_size"), "field model.grid_size: 1000000 is greater than the maximum of 128"),
    "token_channels 10**9": (_set(10**9, "model", "token_channels"), "field model.token_channels"),
    "num_classes 10**12": (_set(10**12, "model", "num_classes"), "field model.num_classes"),
    "file size 2**70": (_set(2**70, "files", "weights.safetensors", "size"), "field files.weights.safetensors.size"),
    "latent_scale 1e300": (_set(1e300, "latent_scale"), "field latent_scale"),
    "num_steps 10**6": (_set(10**6, "defaults", "num_steps"), "field defaults.num_steps"),
    "a shape dim 2**40": (_set(["B", 2**40, 4], "graphs", "denoiser", "inputs", 0, "shape"), "field graphs.denoiser.inputs\\[0\\].shape\\[1\\]"),
    "grid_size 0": (_set(0, "model", "grid_size"), "field model.grid_size: 0 is less than the minimum of 1"),
    "latent_scale 0": (_set(0.0, "latent_scale"), "field latent_scale"),
    "cfg negative": (_set(-1.0, "defaults", "cfg"), "field defaults.cfg"),
    # misspelt or unknown keys
    "defaults misspelt": (lambda m: m["defaults"].update(nmu_steps=4), "field defaults: .*'nmu_steps' was unexpected"),
    "model unknown key": (_set(1, "model", "depth"), "field model: .*'depth' was unexpected"),
    "top-level unknown key": (_set({}, "grpahs"), "field \\(top level\\): .*'grpahs' was unexpected"),
    "an enum": (_set("cosine", "defaults", "cfg_schedule"), "field defaults.cfg_schedule"),
    # file references
    "path escape": (lambda m: m["files"].update({"../evil.onnx": m["files"].pop("denoiser.onnx")}), "field files: '../evil.onnx'"),
    "absolute graph file": (_set("/etc/passwd", "graphs", "vae_decoder", "file"), "field graphs.vae_decoder.file"),
    "hidden graph file": (_set(".x.onnx", "graphs", "vae_decoder", "file"), "field graphs.vae_decoder.file"),
    "graph file not listed": (_set("other.onnx", "graphs", "transformer", "file"), "field graphs.transformer.file: 'other.onnx' is not listed in files"),
    "weights file not listed": (_set("w.safetensors", "weights", "file"), "field weights.file"),
    "sha256 not hex": (_set("zz" * 32, "files", "denoiser.onnx", "sha256"), "field files.denoiser.onnx.sha256"),
    # relations
    "null_class_id not num_classes": (_set(3, "null_class_id"), "field null_class_id: 3 differs from model.num_classes 10"),
    "mlp_width differs": (_set(64, "mlp_width"), "field mlp_width"),
    "label id beyond classes": (_set("x", "id2label", "12"), "field id2label.12: class id 12 is outside 0..9"),
    "graph shape differs": (_set(["B", 256, 5], "graphs", "denoiser", "inputs", 0, "shape"), "field graphs.denoiser.inputs: .* do not match"),
    "heads do not divide": (_set(5, "model", "encoder_num_heads"), "field model.encoder_num_heads: 5 does not divide"),
    "inner_steps list too short": (_set([10, 20], "defaults", "inner_steps"), "field defaults: not a valid sampling plan"),
    "image_size differs": (_set(64, "image_size"), "field image_size"),
}


@pytest.mark.parametrize("case", list(SCHEMA_CASES))
def test_a_malformed_manifest_is_one_bundle_error_naming_the_field(bundle, case):
    from far_sdk.cli import main

    mutate, match = SCHEMA_CASES[case]
    reseal(bundle, mutate)
    with pytest.raises(BundleError, match=match) as info:
        Bundle.load(bundle, verify=False)
    assert str(bundle) in str(info.value) and "\n" not in str(info.value)
    rc, out, err = run_cli(main, ["info", "--bundle", str(bundle)])
    assert rc == EXIT_INPUT and one_line_error(err) and "field " in err


def test_the_schema_is_a_valid_json_schema_and_the_demo_bundle_meets_it():
    from jsonschema import Draft202012Validator

    Draft202012Validator.check_schema(SCHEMA)
    Bundle.load(DEMO)


def test_a_defaults_key_that_is_misspelt_is_an_error_not_ignored(bundle):
    reseal(bundle, lambda m: m["defaults"].update(x0_clp=1.0))
    with pytest.raises(BundleError, match="x0_clp"):
        far_sdk.Generator(bundle, backend="onnxruntime")


# ==== 2b. external data must be listed and hashed ========================================================


def _move_weights_out(bundle: Path, data_name: str) -> None:
    onnx = pytest.importorskip("onnx")
    model = onnx.load(str(bundle / "transformer.onnx"))
    onnx.save_model(model, str(bundle / "transformer.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_name, size_threshold=1024)


def test_a_graph_reading_an_unlisted_file_is_refused(bundle):
    _move_weights_out(bundle, "unlisted.bin")
    rehash(bundle, "transformer.onnx")   # the graph itself re-hashed: only its data file is unlisted
    with pytest.raises(BundleError, match="unlisted.bin.*does not list"):
        far_sdk.Generator(bundle, backend="onnxruntime")


def test_listed_external_data_loads_and_is_hashed(bundle):
    _move_weights_out(bundle, "transformer.onnx.data")
    rehash(bundle, "transformer.onnx", "transformer.onnx.data")
    with far_sdk.Generator(bundle, backend="onnxruntime", threads=1) as gen:
        assert gen.generate([3], num_steps=1, inner_steps=1, output_type="latent").latents.shape == (1, 4, 16, 16)
    data = bytearray((bundle / "transformer.onnx.data").read_bytes())
    data[100] ^= 1
    (bundle / "transformer.onnx.data").write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="transformer.onnx.data"):
        Bundle.load(bundle)


def test_external_data_locations_are_read_without_onnx_as_onnx_reads_them(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    from far_sdk.onnx_refs import external_data_files

    model = onnx.load(str(DEMO / "denoiser.onnx"))
    onnx.save_model(model, str(tmp_path / "d.onnx"), save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)
    ref = onnx.load(str(tmp_path / "d.onnx"), load_external_data=False)
    want = {e.value for t in _get_all_tensors(ref) if uses_external_data(t) for e in t.external_data if e.key == "location"}
    assert len(want) > 5 and external_data_files(tmp_path / "d.onnx") == want
    assert external_data_files(DEMO / "denoiser.onnx") == set()


def test_a_truncated_graph_protobuf_is_a_bundle_error(tmp_path):
    from far_sdk.onnx_refs import external_data_files

    data = (DEMO / "vae_decoder.onnx").read_bytes()
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="not a well-formed ONNX model"):
        external_data_files(tmp_path / "cut.onnx")


def test_a_symlinked_graph_is_reported_as_a_link_not_as_missing(bundle):
    real = bundle / "real-denoiser.onnx"
    (bundle / "denoiser.onnx").rename(real)
    (bundle / "denoiser.onnx").symlink_to(real.name)
    with pytest.raises(BundleError, match="symbolic link") as info:
        Bundle.load(bundle)
    assert "missing" not in str(info.value)


# ==== 3. weights.safetensors ==============================================================================


def _bad_safetensors():
    h, data = two_tensors()
    overlap = json.loads(json.dumps(h))
    overlap["b"]["data_offsets"] = [12, 24]
    out_of_range = json.loads(json.dumps(h))
    out_of_range["b"]["data_offsets"] = [16, 40]
    out_of_range["b"]["shape"] = [6]
    gap = json.loads(json.dumps(h))
    gap["b"]["data_offsets"] = [20, 32]
    wrong_len = json.loads(json.dumps(h))
    wrong_len["b"]["shape"] = [4]
    bad_dtype = json.loads(json.dumps(h))
    bad_dtype["a"]["dtype"] = "F128"
    negative = json.loads(json.dumps(h))
    negative["a"]["shape"] = [-2, -2]
    extra_key = json.loads(json.dumps(h))
    extra_key["a"]["extra"] = 1
    raw = json.dumps(h, separators=(",", ":")).encode()
    import pickle

    return {
        "header claims 2**63 bytes": (safetensors_bytes(h, data, n=2**63), "claims 9223372036854775808 bytes"),
        "header longer than the file": (safetensors_bytes(h, data, n=10_000), "but the file has"),
        "overlapping offsets": (safetensors_bytes(overlap, data), "overlapping"),
        "out-of-range offsets": (safetensors_bytes(out_of_range, data), "ends at byte 40"),
        "a gap": (safetensors_bytes(gap, data + bytes(4)), "a gap"),
        "trailing bytes": (safetensors_bytes(h, data + b"garbage"), "7 trailing bytes"),
        "duplicate keys": (safetensors_bytes(raw[:-1] + b',"a":' + json.dumps(h["a"]).encode() + b"}", data), "duplicate key 'a'"),
        "a pickle in its place": (pickle.dumps({"far.x": np.zeros(3)}), "header claims|does not begin"),
        "leading spaces": (safetensors_bytes(b"  " + raw, data), "does not begin with '{'"),
        "span differs from shape": (safetensors_bytes(wrong_len, data), "spans 12 bytes, its dtype and shape need 16"),
        "unknown dtype": (safetensors_bytes(bad_dtype, data), "unknown dtype"),
        "negative shape": (safetensors_bytes(negative, data), "invalid shape"),
        "extra tensor key": (safetensors_bytes(extra_key, data), "exactly dtype, shape and data_offsets"),
        "not JSON": (safetensors_bytes(b"{not json}", data), "not valid JSON"),
        "not UTF-8": (safetensors_bytes(b'{"\xff": 1}', b""), "not valid JSON"),
        "NaN in the header": (safetensors_bytes(b'{"__metadata__": {"x": NaN}}', b""), "not valid JSON"),
        "metadata not strings": (safetensors_bytes({"__metadata__": {"x": 1}}, b""), "__metadata__"),
        "empty file": (b"", "shorter than the 8-byte header length"),
        "4 bytes": (b"\x01\x00\x00\x00", "shorter than the 8-byte header length"),
    }


BAD_SAFETENSORS = _bad_safetensors()


@pytest.mark.parametrize("case", list(BAD_SAFETENSORS))
def test_a_bad_safetensors_file_is_a_bundle_error(tmp_path, case):
    data, match = BAD_SAFETENSORS[case]
    (tmp_path / "w.safetensors").write_bytes(data)
    with pytest.raises(BundleError, match=match) as info:
        check_safetensors(tmp_path / "w.safetensors")
    assert "w.safetensors" in str(info.value)


def test_the_bundle_weights_and_a_minimal_file_pass_the_check(tmp_path):
    h, data = two_tensors()
    (tmp_path / "ok.safetensors").write_bytes(safetensors_bytes(h, data))
    assert set(check_safetensors(tmp_path / "ok.safetensors")) == {"a", "b"}
    (tmp_path / "pad.safetensors").write_bytes(safetensors_bytes(json.dumps(h).encode() + b"    ", data))  # trailing padding is allowed
    check_safetensors(tmp_path / "pad.safetensors")
    assert len(check_safetensors(DEMO / "weights.safetensors")) > 50


def test_a_bad_safetensors_vae_checkpoint_is_a_checkpoint_error(tmp_path):
    pytest.importorskip("torch")
    from training.vae import load_official_vae

    h, data = two_tensors()
    (tmp_path / "vae.safetensors").write_bytes(safetensors_bytes(b" " + json.dumps(h).encode(), data))
    with pytest.raises(CheckpointError, match="vae.safetensors.*does not begin with"):
        load_official_vae(tmp_path / "vae.safetensors")


def test_the_torch_backend_refuses_a_re_hashed_bad_weights_file(bundle):
    pytest.importorskip("torch")
    data = (bundle / "weights.safetensors").read_bytes()
    (bundle / "weights.safetensors").write_bytes(data + b"\0" * 8)   # trailing bytes
    rehash(bundle, "weights.safetensors")
    with pytest.raises(BundleError, match="trailing bytes"):
        far_sdk.Generator(bundle, backend="torch", device="cpu")


def test_nan_weights_are_refused_naming_the_tensor(bundle):
    pytest.importorskip("torch")
    from safetensors.numpy import load_file, save_file

    state = load_file(str(bundle / "weights.safetensors"))
    name = sorted(k for k in state if k.startswith("far.") and state[k].ndim == 2)[0]
    state[name] = state[name].copy()
    state[name][0, 0] = np.nan
    save_file(state, str(bundle / "weights.safetensors"))
    rehash(bundle, "weights.safetensors")
    with pytest.raises(BundleError, match=f"NaN or inf values in tensor '{name}'"):
        far_sdk.Generator(bundle, backend="torch", device="cpu")


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
    from far_sdk.cli import main

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
    (["--steps", "x"], "--steps: expected a positive integer"),
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
    import far_sdk.clirun

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(far_sdk.clirun.tempfile, "mkstemp", read_only)
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
        proc = subprocess.run([sys.executable, "-m", "far_sdk.cli", "info", "--bundle", str(DEMO)], stdout=w,
                              stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=_env(), timeout=120)
    finally:
        os.close(w)
    assert proc.returncode == 0 and proc.stderr == ""


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("FAR_TRACEBACK", None)
    return env


def test_ctrl_c_during_far_generate_exits_130_with_one_line(tmp_path):
    bundle = copy_demo(tmp_path)
    out = tmp_path / "grid.png"
    proc = subprocess.Popen([sys.executable, "-m", "far_sdk.cli", "generate", "--bundle", str(bundle), "--class", "1", "-n", "64",
                             "--backend", "onnxruntime", "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=tmp_path, env=_env())
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
    import far_sdk.clirun

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(far_sdk.clirun.tempfile, "mkstemp", read_only)
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
    from far_sdk.bundle import _HOST

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
