"""Outputs people keep (issue 20): ``far generate --out-dir`` writes one PNG per image, named by class and seed, with
the full settings as PNG text, and ``far generate --from-image`` makes the same image again, bitwise; ``--scale``
enlarges nearest-neighbour; ``far_sdk.make_image_grid`` is public."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from hostile import DEMO, run_cli
from PIL import Image

from far_sdk.errors import EXIT_OK, EXIT_USAGE

FAST = ["--steps", "3", "--inner-steps", "4", "--no-progress", "--backend", "onnxruntime"]


def _pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    from far_sdk.cli.main import main

    d = tmp_path_factory.mktemp("out") / "images"
    argv = ["generate", str(DEMO), "--class", "3", "--class", "7", "-n", "2", "--seed", "11", "--scale", "3"]
    rc, out, err = run_cli(main, [*argv, *FAST, "--out-dir", str(d), "--out", str(d.parent / "grid.png")])
    assert rc == EXIT_OK, err
    return d


def test_out_dir_holds_one_png_per_image_named_by_class_and_seed_equal_to_the_api_s_images(out_dir):
    import far_sdk

    names = sorted(p.name for p in out_dir.iterdir())
    assert names == ["class3_seed11.png", "class3_seed12.png", "class7_seed13.png", "class7_seed14.png"]
    with far_sdk.Generator(DEMO, backend="onnxruntime") as gen:
        ref = gen.generate(class_labels=[3, 3, 7, 7], seed=11, num_steps=3, inner_steps=4, output_type="np").images
    for i, name in enumerate(names):
        big = np.repeat(np.repeat(ref[i], 3, axis=0), 3, axis=1)  # nearest-neighbour x3, written independently
        assert np.array_equal(_pixels(out_dir / name), big), name
    grid = _pixels(out_dir.parent / "grid.png")  # 4 images in one row
    assert np.array_equal(grid, np.concatenate([np.repeat(np.repeat(r, 3, 0), 3, 1) for r in ref], axis=1))


def test_each_png_carries_its_settings(out_dir):
    with Image.open(out_dir / "class7_seed13.png") as im:
        s = json.loads(im.text["far-sdk"])
    assert s["conditioning"] == {"class_labels": ["3", "3", "7", "7"]} and s["seed"] == 11 and s["index"] == 2
    assert s["label"] == 7 and s["scale"] == 3 and s["backend"] == "onnxruntime"
    assert s["options"] == {"num_steps": 3, "inner_steps": 4}
    assert s["plan"]["inner_steps"] == [4, 4, 4] and s["plan"]["mode"] == "nomask"  # for people reading it
    assert s["bundle"] == str(DEMO.resolve())
    assert s["manifest_sha256"] == json.loads((DEMO / "manifest.json").read_text())["manifest_sha256"]


def test_from_image_regenerates_the_image_bitwise_from_anywhere(out_dir, tmp_path):
    from far_sdk.cli.main import main

    src = out_dir / "class7_seed13.png"
    cwd = os.getcwd()
    os.chdir(tmp_path)  # the settings find the bundle again from another directory
    try:
        rc, out, err = run_cli(main, ["generate", "--from-image", str(src), "--out-dir", "again", "--no-progress"])
    finally:
        os.chdir(cwd)
    assert rc == EXIT_OK, err
    again = tmp_path / "again" / "class7_seed13.png"
    assert sorted(p.name for p in again.parent.iterdir()) == ["class7_seed13.png"]
    assert np.array_equal(_pixels(again), _pixels(src))
    with Image.open(again) as a, Image.open(src) as b:
        assert a.text == b.text


def test_flags_given_with_from_image_override_its_settings(out_dir, tmp_path):
    from far_sdk.cli.main import main

    src = out_dir / "class3_seed12.png"
    argv = ["generate", "--from-image", str(src), "--inner-steps", "5", "--scale", "1"]
    rc, _, err = run_cli(main, [*argv, "--out", str(tmp_path / "x.png")])
    assert rc == EXIT_OK, err
    changed = _pixels(tmp_path / "x.png")
    assert changed.shape == (32, 32, 3) and not np.array_equal(changed, _pixels(src)[::3, ::3])


def test_from_image_refuses_images_without_settings_and_class_flags(out_dir, tmp_path):
    from far_sdk.cli.main import main

    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    rc, _, err = run_cli(main, ["generate", "--from-image", str(tmp_path / "plain.png")])
    assert rc == EXIT_USAGE and "holds no far-sdk settings" in err
    rc, _, err = run_cli(main, ["generate", "--from-image", str(out_dir / "class3_seed11.png"), "--class", "4"])
    assert rc == EXIT_USAGE and "takes its --class / --prompt from the image" in err


def test_make_image_grid_is_public_and_scales_nearest_neighbour():
    import far_sdk

    a = np.arange(2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 3)
    grid = far_sdk.make_image_grid([Image.fromarray(a), Image.fromarray(255 - a)], cols=1, scale=2)
    expected = np.concatenate(
        [np.kron(a, np.ones((2, 2, 1), np.uint8)), np.kron(255 - a, np.ones((2, 2, 1), np.uint8))]
    )
    assert np.array_equal(np.asarray(grid), expected)
