"""Text bundles in ``far generate-dataset`` (``--captions``) and ``far bench`` (``--prompt``, default prompts), on
``engines/far-t2i-demo``: every image of the dataset equals ``Generator.generate(prompt=[its caption], seed=seed + i)``,
the captions are recorded with the images, and captions or prompts given to the wrong kind of bundle (or a text
bundle without them) are one line naming the flag."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import ROOT
from hostile import DEMO, one_line_error, run_cli

import far_sdk
from far_sdk.bench.conditions import DEFAULT_PROMPTS, bench_condition
from far_sdk.bundle.bundle import Bundle
from far_sdk.cli.main import main
from far_sdk.errors import EXIT_INPUT, EXIT_OK, EXIT_USAGE, InvalidArgumentError

T2I = ROOT / "engines" / "far-t2i-demo"
CAPTIONS = ["please draw a 5", "the digit three, drawn by hand"]
QUICK = ["--levels", "0,4,8", "--inner-steps", "2"]  # 3 outer steps of 2 inner steps: the plumbing, quickly


def _ds(out, *extra, n=4, bundle=T2I):
    argv = ["generate-dataset", "--bundle", str(bundle), "-n", str(n), "--out", str(out), "--no-progress", *extra]
    return run_cli(main, argv)


def test_a_text_dataset_holds_generate_s_images_and_records_its_captions(tmp_path):
    lines = tmp_path / "captions.txt"
    lines.write_text("\ufeff" + "\r\n".join(CAPTIONS) + "\r\n", encoding="utf-8")  # a BOM and CRLF line ends
    rc, stdout, err = _ds(tmp_path / "a", "--captions", str(lines), "--seed", "3", "--shard-size", "3", *QUICK)
    assert rc == EXIT_OK and "4 images in 2 shard(s)" in stdout, err
    with np.load(tmp_path / "a" / "samples_4x32x32x3.npz") as z:
        images, index, captions = z["arr_0"], z["arr_1"], z["captions"]
    assert index.tolist() == [0, 0, 1, 1] and captions.tolist() == [CAPTIONS[0]] * 2 + [CAPTIONS[1]] * 2
    with np.load(tmp_path / "a" / "shard-00001-of-00002.npz") as z:
        assert z["captions"].tolist() == [CAPTIONS[1]] and z["arr_1"].tolist() == [1]
    job = json.loads((tmp_path / "a" / "dataset.json").read_text())
    assert job["captions"] == CAPTIONS and "classes" not in job
    with far_sdk.Generator(T2I, backend="onnxruntime", threads=1) as gen:
        want = gen.generate(
            prompt=captions.tolist(), seed=3, levels=[0, 4, 8], inner_steps=2, output_type="np"
        ).images  # image i: its caption, seed 3 + i
    np.testing.assert_array_equal(images, want)
    assert float(images.std()) > 1.0
    # the same captions as a JSON list: the same job, the same bytes
    (tmp_path / "captions.json").write_text(json.dumps(CAPTIONS))
    rc, _, err = _ds(
        tmp_path / "b", "--captions", str(tmp_path / "captions.json"), "--seed", "3", "--batch", "1", *QUICK
    )
    assert rc == EXIT_OK, err
    assert (tmp_path / "b" / "samples_4x32x32x3.npz").read_bytes() == (
        tmp_path / "a" / "samples_4x32x32x3.npz"
    ).read_bytes()


@pytest.mark.parametrize(
    "name,content,why",
    [
        ("c.txt", b"a five\n\xff\xfe seven\n", "is not UTF-8 text (line 2"),
        ("c.txt", b"a five\n\nseven\n", "line 2 is empty"),
        ("c.txt", b"a five\n   \n", "line 2 is empty"),
        ("c.txt", b"", "holds no captions"),
        ("c.txt", b"a five\x00\n", "line 1 holds a NUL character"),
        ("c.txt", b"x" * 2001, "line 1 has 2001 characters; at most 2000"),
        ("c.json", b'{"captions": ["a five"]}', "holds a JSON dict; give a list of strings"),
        ("c.json", b'["a five", 5]', "entry 1 is a int, not a string"),
        ("c.json", b'["a five", "\\ud800"]', "entry 1 holds an invalid Unicode character"),
        ("c.json", b'["a five",', "is not valid JSON"),
        ("c.json", b"[" * 100_000, "is not valid JSON"),
        ("c.json", b"[]", "holds no captions"),
    ],
)
def test_a_bad_captions_file_is_a_one_line_input_error_naming_it(tmp_path, name, content, why):
    path = tmp_path / name
    path.write_bytes(content)
    rc, _, err = _ds(tmp_path / "out", "--captions", str(path))
    assert rc == EXIT_INPUT and one_line_error(err) and str(path) in err and why in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "bundle,extra,why",
    [
        (T2I, [], "--bundle 'far-t2i-demo' is text-conditioned (FAR-T2I): pass --captions FILE"),
        (T2I, ["--captions", "CAPS", "--class", "3"], "--class is for class-conditional bundles"),
        (T2I, ["--captions", "CAPS", "--mode", "nomask"], "mask mode only"),
        (DEMO, ["--captions", "CAPS"], "--captions is for text-conditioned (FAR-T2I) bundles"),
        (T2I, ["--captions", "MANY"], "holds 5 captions but -n is 4"),
    ],
)
def test_captions_for_the_wrong_bundle_or_none_for_a_text_bundle_name_the_flag(tmp_path, bundle, extra, why):
    (tmp_path / "caps.txt").write_text("\n".join(CAPTIONS))
    (tmp_path / "many.txt").write_text("\n".join(f"digit {i}" for i in range(5)))
    files = {"CAPS": str(tmp_path / "caps.txt"), "MANY": str(tmp_path / "many.txt")}
    rc, _, err = _ds(tmp_path / "out", *[files.get(x, x) for x in extra], bundle=bundle)
    assert rc == EXIT_USAGE and one_line_error(err) and why in err, err
    assert not (tmp_path / "out" / "dataset.json").exists()


def test_a_missing_captions_file_is_a_one_line_input_error(tmp_path):
    rc, _, err = _ds(tmp_path / "out", "--captions", str(tmp_path / "nowhere.txt"))
    assert rc == EXIT_INPUT and one_line_error(err) and "cannot read the captions file" in err, err


def test_bench_conditions_cycle_prompts_for_a_text_bundle_and_class_ids_otherwise():
    text, cls = Bundle.load(T2I, verify=False), Bundle.load(DEMO, verify=False)
    assert bench_condition(text, 3, ["a 4", "a 9"]) == {"prompt": ["a 4", "a 9", "a 4"]}
    assert bench_condition(text, 5) == {"prompt": [*DEFAULT_PROMPTS, DEFAULT_PROMPTS[0]]}
    assert bench_condition(cls, 12) == {"class_labels": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]}
    with pytest.raises(InvalidArgumentError, match="class-conditional: prompts need"):
        bench_condition(cls, 1, ["a 4"])
    for bad in ("", "  ", "a \udcff 5", 5):  # "\udcff": a non-UTF-8 argv byte, as Python decodes it
        with pytest.raises(InvalidArgumentError, match="prompt 2 .* must be non-empty text of valid Unicode"):
            bench_condition(text, 1, ["a 4", bad])


def test_far_bench_runs_a_text_bundle_with_default_or_given_prompts(tmp_path):
    out = tmp_path / "bench.json"
    common = ["bench", "--bundle", str(T2I), "--iters", "1", "--warmup", "0", *QUICK, "--json", str(out)]
    rc, stdout, err = run_cli(main, common)
    assert rc == EXIT_OK and "onnxruntime/cpu" in stdout, err
    rows = json.loads(out.read_text())["rows"]
    assert [(r["name"], r["batch"]) for r in rows] == [("onnxruntime/cpu", 1)]
    assert rows[0]["images_per_s"] > 0 and json.loads(out.read_text())["plan"]["levels"] == [0, 4, 8]
    rc, stdout, err = run_cli(main, [*common, "--prompt", "a 4", "--prompt", "a 9", "--batch", "2"])
    assert rc == EXIT_OK and [r["batch"] for r in json.loads(out.read_text())["rows"]] == [2], err


@pytest.mark.parametrize(
    "bundle,extra,why",
    [
        (DEMO, ["--prompt", "a 4"], "--prompt is for text-conditioned (FAR-T2I) bundles"),
        (T2I, ["--baseline", "eager-torch"], "the eager-torch baseline run class bundles only"),
        (T2I, ["--backend", "torch-eager"], "the torch-eager backend"),
    ],
)
def test_far_bench_refuses_prompts_for_a_class_bundle_and_eager_rows_for_a_text_bundle(bundle, extra, why):
    rc, _, err = run_cli(main, ["bench", "--bundle", str(bundle), "--iters", "1", *extra])
    assert rc == EXIT_USAGE and one_line_error(err) and why in err, err
