"""Hostile input, part 1 (issue 12): a bundle on disk that lies — flipped or edited manifest bytes, a
malformed manifest (one typed error naming the field), unlisted or unhashed external data, bad
safetensors weights. Every case ends in a typed far_sdk error or a one-line CLI exit with the
documented status (far_sdk.errors.EXIT_CODES). Part 2, the runtime's inputs (noise, checkpoints,
arguments, the CLIs, threads), is tests/test_hostile_runtime.py.

Run: ``python -m pytest -q tests/test_hostile_bundle.py tests/test_hostile_runtime.py``. Works on copies of
the committed demo bundle (engines/far-demo, 10 MB) in tmp_path.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from hostile import (
    DEMO,
    copy_demo,
    manifest,
    one_line_error,
    rehash,
    reseal,
    run_cli,
    safetensors_bytes,
    two_tensors,
)

import far_sdk
from far_sdk import Bundle
from far_sdk.bundle.manifest import canonical_json, manifest_digest
from far_sdk.bundle.schema import DIGEST_KEY, SCHEMA
from far_sdk.bundle.weights import check_safetensors
from far_sdk.errors import EXIT_INPUT, BundleError, CheckpointError, IncompatibleBundleError, IntegrityError

FLIP_OFFSETS = 200


@pytest.fixture
def bundle(tmp_path) -> Path:
    return copy_demo(tmp_path)


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


@pytest.mark.parametrize(
    "old, new",
    [
        ('"cfg": 3.0', '"cfg": 2.0'),  # defaults: every image changes
        ('"x0_clip": 4.0', '"x0_clip": 5.0'),
        ('"num_steps": 10', '"num_steps": 11'),
        ('"kind": "checkpoint"', '"kind": "random-init"'),  # source
        ('"use_ema": true', '"use_ema": false'),
        ('"mlp_ratio"', '"mlp_ratiO"'),  # a key name
        ('"max_abs": 3.337860107421875e-06', '"max_abs": 3.337860107421875e-07'),  # validation
        ('"latent_scale": 0.20562397571073734', '"latent_scale": 0.20562397571073735'),  # same double, other spelling
        ('"eps": 1e-06', '"eps": 1E-06'),  # same value, other spelling
        ('"9": "9"', '"9": "\\u0039"'),  # same string, escaped
        ('"size": 1361515', '"size": 1361516'),  # files
    ],
)
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


@pytest.mark.parametrize(
    "data, match",
    [
        (b"", "not valid JSON"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b"[1, 2]", "not an object"),
        (b'{"a": 1, "a": 2}', "duplicate key"),
        (b'{"a": NaN}', "not valid JSON"),
        (b'{"a": 1e999}', "out of range"),
        (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
        (b'{"format": "far-bundle"}', "no manifest digest"),
    ],
)
def test_malformed_manifest_bytes_are_typed_errors(bundle, data, match):
    (bundle / "manifest.json").write_bytes(data)
    with pytest.raises(BundleError, match=match):
        Bundle.load(bundle)


def test_far_info_shows_the_digest_and_rejects_a_flipped_manifest_in_one_line(bundle):
    from far_sdk.cli.main import main

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
    "grid_size 10**6": (
        _set(10**6, "model", "grid_size"),
        "field model.grid_size: 1000000 is greater than the maximum of 128",
    ),
    "token_channels 10**9": (_set(10**9, "model", "token_channels"), "field model.token_channels"),
    "num_classes 10**12": (_set(10**12, "model", "num_classes"), "field model.num_classes"),
    "file size 2**70": (_set(2**70, "files", "weights.safetensors", "size"), "field files.weights.safetensors.size"),
    "latent_scale 1e300": (_set(1e300, "latent_scale"), "field latent_scale"),
    "num_steps 10**6": (_set(10**6, "defaults", "num_steps"), "field defaults.num_steps"),
    "a shape dim 2**40": (
        _set(["B", 2**40, 4], "graphs", "denoiser", "inputs", 0, "shape"),
        "field graphs.denoiser.inputs\\[0\\].shape\\[1\\]",
    ),
    "grid_size 0": (_set(0, "model", "grid_size"), "field model.grid_size: 0 is less than the minimum of 1"),
    "latent_scale 0": (_set(0.0, "latent_scale"), "field latent_scale"),
    "cfg negative": (_set(-1.0, "defaults", "cfg"), "field defaults.cfg"),
    # misspelt or unknown keys
    "defaults misspelt": (lambda m: m["defaults"].update(nmu_steps=4), "field defaults: .*'nmu_steps' was unexpected"),
    "model unknown key": (_set(1, "model", "depth"), "field model: .*'depth' was unexpected"),
    "top-level unknown key": (_set({}, "grpahs"), "field \\(top level\\): .*'grpahs' was unexpected"),
    "an enum": (_set("cosine", "defaults", "cfg_schedule"), "field defaults.cfg_schedule"),
    # file references
    "path escape": (
        lambda m: m["files"].update({"../evil.onnx": m["files"].pop("denoiser.onnx")}),
        "field files: '../evil.onnx'",
    ),
    "absolute graph file": (_set("/etc/passwd", "graphs", "vae_decoder", "file"), "field graphs.vae_decoder.file"),
    "hidden graph file": (_set(".x.onnx", "graphs", "vae_decoder", "file"), "field graphs.vae_decoder.file"),
    "graph file not listed": (
        _set("other.onnx", "graphs", "transformer", "file"),
        "field graphs.transformer.file: 'other.onnx' is not listed in files",
    ),
    "weights file not listed": (_set("w.safetensors", "weights", "file"), "field weights.file"),
    "sha256 not hex": (_set("zz" * 32, "files", "denoiser.onnx", "sha256"), "field files.denoiser.onnx.sha256"),
    # relations
    "null_class_id not num_classes": (
        _set(3, "null_class_id"),
        "field null_class_id: 3 differs from model.num_classes 10",
    ),
    "mlp_width differs": (_set(64, "mlp_width"), "field mlp_width"),
    "label id beyond classes": (_set("x", "id2label", "12"), "field id2label.12: class id 12 is outside 0..9"),
    "graph shape differs": (
        _set(["B", 256, 5], "graphs", "denoiser", "inputs", 0, "shape"),
        "field graphs.denoiser.inputs: .* do not match",
    ),
    "heads do not divide": (_set(5, "model", "encoder_num_heads"), "field model.encoder_num_heads: 5 does not divide"),
    "inner_steps list too short": (
        _set([10, 20], "defaults", "inner_steps"),
        "field defaults: not a valid sampling plan",
    ),
    "image_size differs": (_set(64, "image_size"), "field image_size"),
}


@pytest.mark.parametrize("case", list(SCHEMA_CASES))
def test_a_malformed_manifest_is_one_bundle_error_naming_the_field(bundle, case):
    from far_sdk.cli.main import main

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
    onnx.save_model(
        model,
        str(bundle / "transformer.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data_name,
        size_threshold=1024,
    )


def test_a_graph_reading_an_unlisted_file_is_refused(bundle):
    _move_weights_out(bundle, "unlisted.bin")
    rehash(bundle, "transformer.onnx")  # the graph itself re-hashed: only its data file is unlisted
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

    from far_sdk.bundle.onnx_external_data import external_data_files

    model = onnx.load(str(DEMO / "denoiser.onnx"))
    onnx.save_model(
        model, str(tmp_path / "d.onnx"), save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0
    )
    ref = onnx.load(str(tmp_path / "d.onnx"), load_external_data=False)
    want = {
        e.value for t in _get_all_tensors(ref) if uses_external_data(t) for e in t.external_data if e.key == "location"
    }
    assert len(want) > 5 and external_data_files(tmp_path / "d.onnx") == want
    assert external_data_files(DEMO / "denoiser.onnx") == set()


def test_a_truncated_graph_protobuf_is_a_bundle_error(tmp_path):
    from far_sdk.bundle.onnx_external_data import external_data_files

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
        "duplicate keys": (
            safetensors_bytes(raw[:-1] + b',"a":' + json.dumps(h["a"]).encode() + b"}", data),
            "duplicate key 'a'",
        ),
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
    (tmp_path / "pad.safetensors").write_bytes(
        safetensors_bytes(json.dumps(h).encode() + b"    ", data)
    )  # trailing padding is allowed
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
    (bundle / "weights.safetensors").write_bytes(data + b"\0" * 8)  # trailing bytes
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
