"""Hostile sampling arguments to ``generate()`` and ``far generate`` (issue 23's options cases): each is a typed error
saying what to pass, or the documented precedence (keywords over ``options=``)."""

from __future__ import annotations

import pytest
from hostile import DEMO, one_line_error, run_cli

import far_sdk
from far_sdk import SamplingOptions
from far_sdk.cli.main import main
from far_sdk.errors import EXIT_OK, EXIT_USAGE, InvalidArgumentError

QUICK = dict(inner_steps=1, output_type="latent")


@pytest.fixture(scope="module")
def gen():
    with far_sdk.Generator(DEMO, backend="onnxruntime", threads=1) as g:
        yield g


@pytest.mark.parametrize(
    "kw,why",
    [
        (dict(preset=["fast"]), r"preset must be one preset name \(a string\), got list \['fast'\]"),
        (dict(preset={"inner_steps": 15}), r"preset must be one preset name \(a string\), got dict"),
        (dict(preset="quick"), r"unknown preset 'quick'; choose one of \['distilled', 'fast', 'official', 'paper'\]"),
        (dict(levels=5), "levels must be a list of integer frequency levels in 0..15, got 5"),
        (dict(class_labels=["³"]), "unknown class name '³'"),
        (dict(class_labels=["٣"]), "unknown class name '٣'"),  # an Arabic-Indic 3: a digit to str.isdigit()
        # past Python's 4,300-digit int() limit: still the range error, the id shortened
        (dict(class_labels=["9" * 5000]), r"class id 9{20}\.\.\. \(5000 characters\) is outside 0\.\.9"),
        (dict(class_labels=[True]), "each class label must be an integer class id or a class name, got bool True"),
        (dict(class_labels=[3.0]), "each class label must be an integer class id or a class name, got float 3.0"),
        (dict(class_labels=[[1]]), "got list"),
    ],
)
def test_a_bad_sampling_argument_is_a_typed_error_saying_what_to_pass(gen, kw, why):
    with pytest.raises(InvalidArgumentError, match=why):
        gen.generate(**{"class_labels": [1], **kw, **QUICK})


def test_a_keyword_overrides_options_and_its_other_step_count(gen):
    """Documented precedence: built-in < bundle < preset < options < keywords. num_steps given as a keyword replaces
    the options' levels (both say how many outer steps), instead of disagreeing with them."""
    out = gen.generate([1], options=SamplingOptions(levels=(0, 5), cfg=2.0), num_steps=3, **QUICK)
    want = gen.plan(cfg=2.0, num_steps=3, inner_steps=1)
    assert out.plan == want and len(out.plan.levels) == 3 and out.plan.levels != (0, 5)
    out = gen.generate([1], options=SamplingOptions(num_steps=3), levels=[0, 5], **QUICK)
    assert out.plan.levels == (0, 5)


def test_far_generate_mask_mode_with_another_step_count_says_the_cli_way(tmp_path):
    base = ["generate", "--bundle", str(DEMO), "--class", "1", "--mode", "mask", "--no-progress", "--inner-steps", "1"]
    rc, _, err = run_cli(main, [*base, "--steps", "4", "--out", str(tmp_path / "a.png")])
    assert rc == EXIT_USAGE and one_line_error(err) and "e.g. --levels 0,4,8,12" in err, err
    rc, out, err = run_cli(main, [*base, "--levels", "0,4,8,12", "--out", str(tmp_path / "b.png")])  # the advice works
    assert rc == EXIT_OK and "mask mode, 4 outer steps" in out, err
