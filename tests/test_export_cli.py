"""far-export onnx from the command line: random-init and checkpoint exports, --reuse, refusals, custom shapes,
the random-bundle cache."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx", reason="onnx not installed (pip install far-sdk[export])")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install far-sdk[export])")

from export.cli import main  # noqa: E402
from export.random_bundle import random_models  # noqa: E402
from far_sdk.bundle.bundle import Bundle  # noqa: E402
from far_sdk.bundle.graphs import GRAPH_NAMES  # noqa: E402
from far_sdk.errors import EXIT_INPUT, EXIT_USAGE  # noqa: E402

SCALE = 0.2325


def _rel(got: np.ndarray, ref: np.ndarray) -> float:
    """max |got - ref| / max |ref|: the error relative to the output's scale."""
    ref = np.asarray(ref, dtype=np.float64)
    return float(np.abs(np.asarray(got, dtype=np.float64) - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def cli_bundle(tmp_path_factory) -> tuple[Path, int]:
    out = tmp_path_factory.mktemp("cli") / "engines" / "tiny-cli"
    rc = main(
        [
            "onnx",
            "--random-init",
            "--model",
            "far_tiny",
            "--vae-config",
            "kl16-tiny",
            "--seed",
            "3",
            "--cfg",
            "2.5",
            "--out",
            str(out),
        ]
    )
    return out, rc


def test_cli_random_init_writes_a_loadable_bundle(cli_bundle, capsys):
    out, rc = cli_bundle
    assert rc == 0
    b = Bundle.load(out)
    assert b.name == "tiny-cli" and b.null_class_id == 10 and b.defaults.cfg == 2.5
    assert b.manifest["source"] == {"kind": "random-init", "seed": 3}
    assert set(b.manifest["graphs"]) == {*GRAPH_NAMES, "vae_encoder"}  # the optional encoder: on by default
    assert not [p for p in out.parent.iterdir() if p != out]  # no temporary directories left


def test_cli_refuses_a_non_empty_out_without_overwrite_and_keeps_the_old_bundle(cli_bundle, capsys):
    out, _ = cli_bundle
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    rc = main(
        ["onnx", "--random-init", "--model", "far_tiny", "--vae-config", "kl16-tiny", "--seed", "4", "--out", str(out)]
    )
    assert rc == EXIT_USAGE
    err = capsys.readouterr().err
    assert "--overwrite" in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    Bundle.load(out)


def test_cli_reuse_keeps_a_matching_random_bundle_and_refuses_without_random_init(cli_bundle, capsys, tmp_path):
    out, _ = cli_bundle
    stamp = (out / "manifest.json").stat().st_mtime_ns
    rc = main(
        [
            "onnx",
            "--random-init",
            "--model",
            "far_tiny",
            "--vae-config",
            "kl16-tiny",
            "--seed",
            "3",
            "--cfg",
            "2.5",
            "--out",
            str(out),
            "--reuse",
        ]
    )
    assert rc == 0 and (out / "manifest.json").stat().st_mtime_ns == stamp  # same model, VAE, seed: not exported again
    rc = main(
        [
            "onnx",
            "--checkpoint",
            str(tmp_path / "x.pth"),
            "--vae",
            str(tmp_path / "v.ckpt"),
            "--model",
            "far_tiny",
            "--out",
            str(tmp_path / "o"),
            "--reuse",
        ]
    )
    assert rc == EXIT_USAGE and "--reuse applies to --random-init" in capsys.readouterr().err


def test_cli_reports_a_missing_checkpoint_as_an_error_message(tmp_path, capsys):
    rc = main(
        [
            "onnx",
            "--checkpoint",
            str(tmp_path / "nope.pth"),
            "--vae",
            str(tmp_path / "kl16.ckpt"),
            "--model",
            "far_tiny",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert rc == EXIT_INPUT
    err = capsys.readouterr().err
    assert "nope.pth" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


# ---- CLI: a checkpoint of custom shape (--config) ----------------------------------------------------------

#: A shape no preset has (3 and 6 heads, 7 classes, 4 buffer tokens); the training-only fields are left out.
CUSTOM = {
    "encoder_embed_dim": 48,
    "encoder_depth": 1,
    "encoder_num_heads": 3,
    "decoder_embed_dim": 48,
    "decoder_depth": 2,
    "decoder_num_heads": 6,
    "mlp_ratio": 2,
    "token_channels": 16,
    "grid_size": 16,
    "buffer_size": 4,
    "num_classes": 7,
    "diffloss_d": 1,
    "diffloss_w": 64,
    "mask": False,
}


@pytest.fixture(scope="module")
def custom_checkpoint(tmp_path_factory) -> dict[str, Path]:
    """A custom-shaped FAR saved the way the official training script saves it: its ``args`` name a model
    ("far_custom") that no preset table knows, so the weights alone cannot say the head counts."""
    import argparse

    from training.checkpoint import save_official_checkpoint
    from training.config import FARConfig

    d = tmp_path_factory.mktemp("custom")
    far, vae = random_models(FARConfig(**CUSTOM), "kl16-tiny", seed=5)
    args = argparse.Namespace(
        model="far_custom",
        img_size=256,
        vae_stride=16,
        patch_size=1,
        vae_embed_dim=16,
        buffer_size=4,
        class_num=7,
        diffloss_d=1,
        diffloss_w=64,
        mask=False,
        num_sampling_steps="100",
    )
    save_official_checkpoint(d / "checkpoint-last.pth", far, args=args)
    torch.save({"model": vae.state_dict()}, d / "kl16-tiny.ckpt")  # MAR's kl16.ckpt layout
    (d / "cfg.json").write_text(json.dumps(CUSTOM))
    return {"checkpoint": d / "checkpoint-last.pth", "vae": d / "kl16-tiny.ckpt", "config": d / "cfg.json", "dir": d}


def _export_custom(files: dict[str, Path], out: Path, *extra: str) -> int:
    return main(
        [
            "onnx",
            "--checkpoint",
            str(files["checkpoint"]),
            "--vae",
            str(files["vae"]),
            "--vae-config",
            "kl16-tiny",
            "--out",
            str(out),
            *extra,
        ]
    )


def test_cli_exports_a_custom_shaped_official_checkpoint_given_a_config_file(custom_checkpoint, tmp_path, capsys):
    from far_sdk import Generator
    from far_sdk.maths.noise import SeededNoise
    from training.checkpoint import load_official_checkpoint
    from training.config import FARConfig
    from training.sampler import sample_reference

    assert _export_custom(custom_checkpoint, tmp_path / "custom", "--config", str(custom_checkpoint["config"])) == 0
    b = Bundle.load(tmp_path / "custom")
    assert b.model_config == FARConfig(**CUSTOM).to_dict() and b.num_classes == 7
    with Generator(b.path, backend="onnxruntime", threads=1) as gen:
        got = gen.generate([0, 6], seed=1, output_type="latent", num_steps=2, inner_steps=3)
    far = load_official_checkpoint(custom_checkpoint["checkpoint"], config=FARConfig(**CUSTOM))
    ref = sample_reference(far, [0, 6], noise=SeededNoise.from_seed(1, 2), num_steps=2, inner_steps=3).numpy()
    assert got.latents.shape == (2, 16, 16, 16) and _rel(got.latents, ref) < 1e-4


def test_cli_without_the_config_file_says_how_to_give_it(custom_checkpoint, tmp_path, capsys):
    assert _export_custom(custom_checkpoint, tmp_path / "out") == EXIT_INPUT
    err = capsys.readouterr().err
    assert "'far_custom'" in err and "far-export onnx --config cfg.json" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "edit, match",
    [
        (dict(encoder_heads=3), r"unknown field\(s\) \['encoder_heads'\]"),
        (dict(decoder_num_heads=None), r"missing field\(s\) \['decoder_num_heads'\]"),
        (dict(encoder_depth="1"), r'encoder_depth must be a positive integer, got "1"'),
        (dict(num_classes=True), "num_classes must be a positive integer, got true"),
        (dict(mask=0), "mask must be true or false, got 0"),
        (dict(attn_dropout=1.5), r"attn_dropout must be a number in \[0, 1\), got 1.5"),
        (dict(encoder_num_heads=5), "encoder_embed_dim 48 is not divisible by encoder_num_heads 5"),
        ([1, 2], "must hold one JSON object of FARConfig fields, found list"),
        ("{oops", "is not a JSON file"),
    ],
)
def test_cli_rejects_a_bad_config_file_naming_the_field_before_loading(
    custom_checkpoint, tmp_path, capsys, edit, match
):
    cfg = tmp_path / "cfg.json"
    if isinstance(edit, dict):
        d = {**CUSTOM, **edit}
        cfg.write_text(json.dumps({k: v for k, v in d.items() if v is not None}))
    else:
        cfg.write_text(edit if isinstance(edit, str) else json.dumps(edit))
    assert _export_custom(custom_checkpoint, tmp_path / "out", "--config", str(cfg)) == EXIT_INPUT
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"config file {cfg}" in err, err
    assert re.search(match, err), err
    assert not (tmp_path / "out").exists()


def test_random_bundle_is_reused_only_when_it_matches(tmp_path):
    from export.random_bundle import random_bundle

    bundle = random_bundle(tmp_path / "tiny", "far_tiny", "kl16-tiny", validate=False)
    manifest = bundle / "manifest.json"
    before = manifest.stat().st_mtime_ns
    again = random_bundle(bundle, "far_tiny", "kl16-tiny", reuse=True, validate=False)
    assert again == bundle and manifest.stat().st_mtime_ns == before
    other = random_bundle(bundle.parent / "copy", "far_tiny", "kl16-tiny", seed=1, validate=False)
    assert random_bundle(other, "far_tiny", "kl16-tiny", seed=1, reuse=True, validate=False) == other
    t = (other / "manifest.json").stat().st_mtime_ns
    random_bundle(other, "far_tiny", "kl16-tiny", seed=2, reuse=True, validate=False)  # another seed: re-exported
    assert (other / "manifest.json").stat().st_mtime_ns != t
