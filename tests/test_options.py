"""far_sdk.options.SamplingOptions: one typed value for the bundle defaults, presets, generate() and the CLIs,
with the precedence built-in < bundle < preset < given, and misspelt keys refused wherever they enter."""

from pathlib import Path

import numpy as np
import pytest

import far_sdk
from far_sdk.errors import EXIT_USAGE, InvalidArgumentError
from far_sdk.options import FIELDS, PRESETS, SamplingOptions, options_from_keywords, options_json_schema, resolve_plan

DEMO = Path(__file__).resolve().parents[1] / "engines" / "far-demo"


def test_built_in_defaults_are_the_papers_sampler():
    """The paper's sampler, from its published numbers: levels 0, 2..10, CFG 3 on the linear ramp 1 + 2 s / 10, the
    official temperature ramp, 40..100 DDPM steps (700 in all), the spatial filter, no clipping."""
    plan = resolve_plan({})
    assert plan.mode == "nomask" and plan.levels == (0, 2, 3, 4, 5, 6, 7, 8, 9, 10)
    np.testing.assert_allclose(plan.cfg, [1 + 0.2 * s for s in range(10)], rtol=1e-15)
    np.testing.assert_allclose(
        plan.temperature, [0.8 + 0.2 * (1 - np.cos(np.pi / 2 * (s + 1) / 10)) for s in range(10)], rtol=1e-15
    )
    assert plan.inner_steps == (40, 47, 53, 60, 67, 73, 80, 87, 93, 100) and sum(plan.inner_steps) == 700
    assert (plan.filter, plan.x0_clip, plan.inner_sampler, plan.eta) == ("spatial", None, "ddpm", 0.0)


def test_a_misspelt_key_is_an_error_naming_the_closest_option():
    with pytest.raises(
        InvalidArgumentError, match=r"unknown option\(s\) 'cfg_scale' \(did you mean 'cfg_schedule'\?\)"
    ):
        SamplingOptions.from_dict({"cfg_scale": 2.0})
    with pytest.raises(InvalidArgumentError, match=r"unknown option\(s\) 'zzz'; valid: mode, num_steps"):
        SamplingOptions.from_dict({"zzz": 2.0})
    with pytest.raises(
        InvalidArgumentError, match=r"generate\(\): unknown keyword 'inner_step' \(did you mean 'inner_steps'"
    ):
        options_from_keywords({"inner_step": 4}, other_names=("seed",))


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("levels", 5, "levels must be a list"),
        ("levels", [0, 16], r"each level must be an integer in 0\.\.15"),
        ("levels", [], "levels must have 1..17 entries"),
        ("num_steps", 0, r"num_steps must be an integer in 1\.\.16"),
        ("num_steps", 2.0, "num_steps must be an integer"),
        ("cfg", float("nan"), r"cfg must be a number in \[0, 1000\]"),
        ("cfg", -1, "cfg must be"),
        ("temperature", "1", "temperature must be"),
        ("eta", 1.5, r"eta must be a number in \[0, 1\]"),
        ("inner_steps", "fast", "inner_steps must be one of 'frequency-aware', 'official'"),
        ("inner_steps", [0, 4], r"each inner_steps count must be an integer in 1\.\.1000"),
        ("inner_steps", True, "inner_steps must be an integer"),
        ("x0_clip", 0, r"x0_clip must be a number in \(0, 1e\+06\]"),
        ("mode", "masked", "mode must be one of 'nomask', 'mask'"),
        ("filter", ["spatial"], "filter must be one of"),
    ],
)
def test_a_bad_value_is_refused_when_the_options_are_built(field, value, match):
    with pytest.raises(InvalidArgumentError, match=match):
        SamplingOptions(**{field: value})


def _schema_accepts(field, value) -> bool:
    import jsonschema

    try:
        jsonschema.validate({field: value}, options_json_schema())
        return True
    except jsonschema.ValidationError:
        return False


@pytest.mark.parametrize(
    "field,value",
    [
        ("levels", [0, 4, 8]),
        ("levels", [0, 16]),
        ("levels", list(range(18))),
        ("num_steps", 16),
        ("num_steps", 17),
        ("cfg", 0.0),
        ("cfg", 1000.5),
        ("temperature", 0.0),
        ("temperature", 100.5),
        ("eta", 1.0),
        ("eta", -0.01),
        ("inner_steps", "official"),
        ("inner_steps", "fast"),
        ("inner_steps", 1000),
        ("inner_steps", 1001),
        ("inner_steps", [1, 2]),
        ("inner_steps", [0]),
        ("x0_clip", None),
        ("x0_clip", 0.5),
        ("x0_clip", 0),
        ("mode", "mask"),
        ("mode", "Mask"),
        ("inner_sampler", "ddim"),
        ("filter", "wavelet"),
    ],
)
def test_the_manifest_schema_and_the_options_accept_the_same_values(field, value):
    """The manifest's ``defaults`` schema and SamplingOptions are both derived from the fields' specs: a bundle can
    never carry a default the runtime refuses, nor the other way round (JSON null for x0_clip = no clipping)."""
    try:
        SamplingOptions.from_dict({field: value})
        built = True
    except InvalidArgumentError:
        built = False
    assert _schema_accepts(field, value) == built


def test_dict_round_trip_and_x0_clip_off_is_json_null():
    o = SamplingOptions(num_steps=4, inner_steps=[3, 4, 5, 6], x0_clip=False, cfg=2.5)
    d = o.to_dict()
    assert d == {"num_steps": 4, "cfg": 2.5, "inner_steps": [3, 4, 5, 6], "x0_clip": None}
    assert SamplingOptions.from_dict(d) == o and o.inner_steps == (3, 4, 5, 6)


def test_levels_and_num_steps_from_a_higher_layer_replace_the_lower_ones():
    assert resolve_plan({"num_steps": 6}, SamplingOptions(levels=(0, 4, 8))).levels == (0, 4, 8)
    assert resolve_plan({"levels": [0, 4, 8]}, SamplingOptions(num_steps=4)).levels == (0, 2, 6, 10)
    assert resolve_plan({"levels": [0, 4, 8]}).levels == (0, 4, 8)
    # a keyword over options=: the keyword given wins whole (documented precedence), in both directions
    assert options_from_keywords({"num_steps": 3}, base=SamplingOptions(levels=(0, 5))) == SamplingOptions(num_steps=3)
    assert options_from_keywords({"levels": (0, 5)}, base=SamplingOptions(num_steps=3)) == SamplingOptions(
        levels=(0, 5)
    )
    with pytest.raises(InvalidArgumentError, match="num_steps=3 disagrees with the 2 levels given"):
        resolve_plan({}, SamplingOptions(levels=(0, 5), num_steps=3))


def test_presets_set_only_their_fields():
    for name, p in PRESETS.items():
        assert set(p.given()) <= {"inner_sampler", "inner_steps", "eta"}, name
    plan = resolve_plan({"cfg": 1.5, "x0_clip": 2.0}, preset_name="fast")
    assert plan.x0_clip == 2.0 and plan.cfg[-1] == pytest.approx(1 + 0.9 * 0.5) and plan.inner_steps == (15,) * 10


@pytest.fixture(scope="module")
def gen():
    pytest.importorskip("onnxruntime")
    with far_sdk.Generator(DEMO, backend="onnxruntime", threads=1) as g:
        yield g


def test_generate_options_equal_the_same_keywords_and_keywords_override(gen):
    kw = dict(num_steps=3, inner_steps=[2, 3, 4], cfg=2.0)
    a = gen.generate([1, 2], seed=4, output_type="latent", **kw)
    b = gen.generate([1, 2], seed=4, output_type="latent", options=SamplingOptions(**kw))
    assert a.plan == b.plan and np.array_equal(a.latents, b.latents)
    c = gen.generate([1], seed=4, output_type="latent", options=SamplingOptions(**kw), cfg=1.0)
    assert c.plan.cfg == (1.0,) * 3
    with pytest.raises(InvalidArgumentError, match="SamplingOptions"):
        gen.generate([1], options={"cfg": 2.0})


def test_bundle_defaults_are_typed_and_x0_clip_false_turns_the_bundles_clip_off(gen):
    d = gen.bundle.defaults
    assert isinstance(d, SamplingOptions) and d.x0_clip == 4.0  # the demo was trained to be sampled with a clip
    assert gen.plan().x0_clip == 4.0 and gen.plan(x0_clip=False).x0_clip is None


def test_export_refuses_a_misspelt_default(tmp_path):
    pytest.importorskip("torch")
    from export.random_bundle import random_bundle

    with pytest.raises(InvalidArgumentError, match="unknown option.*'steps'"):
        random_bundle(tmp_path / "b", validate=False, defaults={"steps": 4})
    assert not (tmp_path / "b").exists()


def test_far_generate_flags_build_the_same_options(tmp_path, capsys):
    from far_sdk.cli.main import main

    out = tmp_path / "g.png"
    rc = main(
        [
            "generate",
            "--bundle",
            str(DEMO),
            "--class",
            "3",
            "--backend",
            "onnxruntime",
            "--steps",
            "2",
            "--inner-steps",
            "2,3",
            "--no-x0-clip",
            "--cfg",
            "2",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0 and out.exists() and "2 outer steps, 5 ddpm inner steps" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:  # argparse: the two clip flags exclude each other
        main(["generate", "--bundle", str(DEMO), "--class", "3", "--x0-clip", "2", "--no-x0-clip", "--out", str(out)])
    assert e.value.code == EXIT_USAGE


def test_every_option_has_a_cli_flag_and_the_flags_parse_to_the_same_options():
    """far generate's sampling flags, derived from the fields: one per option (two for x0_clip), and a command line
    gives the SamplingOptions a dict of the same values gives; a bad value is a usage error naming the flag."""
    from far_sdk.cli.main import build_parser

    p = build_parser()
    sub = p._subparsers._group_actions[0].choices["generate"]
    dests = {a.dest for a in sub._actions}
    assert set(FIELDS) <= dests
    from far_sdk.cli.sampling import options_from_args

    a = sub.parse_args(
        [
            "--bundle",
            "b",
            "--class",
            "1",
            "--mode",
            "mask",
            "--levels",
            "0,4,8",
            "--cfg",
            "2.5",
            "--temperature-schedule",
            "constant",
            "--inner-steps",
            "3,4,5",
            "--inner-sampler",
            "ddim",
            "--eta",
            "0.5",
            "--filter",
            "fourier",
            "--no-x0-clip",
        ]
    )
    assert options_from_args(a) == SamplingOptions.from_dict(
        {
            "mode": "mask",
            "levels": [0, 4, 8],
            "cfg": 2.5,
            "temperature_schedule": "constant",
            "inner_steps": [3, 4, 5],
            "inner_sampler": "ddim",
            "eta": 0.5,
            "filter": "fourier",
            "x0_clip": None,
        }
    )
    assert (
        options_from_args(sub.parse_args(["--bundle", "b", "--class", "1", "--inner-steps", "official"])).inner_steps
        == "official"
    )
    assert options_from_args(sub.parse_args(["--bundle", "b", "--class", "1", "--inner-steps", "7"])).inner_steps == 7


@pytest.mark.parametrize(
    "argv,match",
    [
        # the wording generate() uses for the option, naming the flag (one wording per rule)
        (["--steps", "17"], r"error: --steps must be an integer in 1\.\.16, got 17"),
        (["--steps", "0"], r"error: --steps must be an integer in 1\.\.16, got 0"),
        (["--levels", "0,99"], r"error: --levels: each level must be an integer in 0\.\.15"),
        (["--eta", "x"], r"error: --eta must be a number in \[0, 1\], got 'x'"),
        (
            ["--inner-steps", "fast"],
            "error: --inner-steps must be one of .frequency-aware., .official., a count N or one count",
        ),
        (["--cfg", "inf"], r"error: --cfg must be a number in \[0, 1000\]"),
        (["--mode", "msk"], r"error: --mode must be one of 'nomask', 'mask', got 'msk' \(did you mean 'mask'\?\)"),
    ],
)
def test_a_bad_flag_value_is_a_usage_error_naming_the_flag(argv, match, capsys):
    from far_sdk.cli.main import main

    with pytest.raises(SystemExit) as e:
        main(["generate", "--bundle", str(DEMO), "--class", "3", *argv])
    assert e.value.code == EXIT_USAGE
    assert __import__("re").search(match, capsys.readouterr().err)


def test_a_new_option_is_a_field_plus_its_effect_on_the_plan():
    """Adding an option touches far_sdk/options.py (the field and its OptionSpec), far_sdk/maths/schedules.py (what it
    does to the plan: make_plan takes every field by name) and a test: the manifest schema, the CLI flags and generate's
    keywords are derived from the fields. This holds the derivations to the field list."""
    import inspect

    from far_sdk.cli.sampling import flag_of
    from far_sdk.maths.schedules import make_plan

    assert tuple(inspect.signature(make_plan).parameters) == FIELDS
    assert tuple(options_json_schema()["properties"]) == FIELDS
    assert len({flag_of(name) for name in FIELDS}) == len(FIELDS)
