"""far_sdk.options.SamplingOptions: one typed value for the bundle defaults, presets, generate() and the CLIs,
with the precedence built-in < bundle < preset < given, and misspelt keys refused wherever they enter."""

from pathlib import Path

import numpy as np
import pytest

import far_sdk
from far_sdk.errors import EXIT_USAGE, InvalidArgumentError
from far_sdk.options import DEFAULTS, FIELDS, PRESETS, SamplingOptions, resolve_plan
from far_sdk.schedules import make_plan

DEMO = Path(__file__).resolve().parents[1] / "engines" / "far-demo"


def test_built_in_defaults_are_the_papers_sampler():
    plan = resolve_plan({})
    want = make_plan(num_steps=10, cfg=3.0, cfg_schedule_kind="linear", temperature=1.0, temperature_schedule_kind="official",
                     inner_steps="frequency-aware", filter="spatial", x0_clip=None, inner_sampler="ddpm")
    assert plan == want and sum(plan.inner_steps) == 700 and plan.levels == (0, 2, 3, 4, 5, 6, 7, 8, 9, 10)


def test_a_misspelt_key_is_an_error_naming_the_valid_ones():
    with pytest.raises(InvalidArgumentError, match=r"unknown option\(s\) \['cfg_scale'\].*valid: mode, num_steps"):
        SamplingOptions.from_dict({"cfg_scale": 2.0})
    with pytest.raises(TypeError):
        SamplingOptions(cfg_scale=2.0)


def test_dict_round_trip_and_x0_clip_off_is_json_null():
    o = SamplingOptions(num_steps=4, inner_steps=[3, 4, 5, 6], x0_clip=False, cfg=2.5)
    d = o.to_dict()
    assert d == {"num_steps": 4, "cfg": 2.5, "inner_steps": [3, 4, 5, 6], "x0_clip": None}
    assert SamplingOptions.from_dict(d) == o and o.inner_steps == (3, 4, 5, 6)
    assert set(DEFAULTS.to_dict()) <= set(FIELDS)


def test_levels_and_num_steps_from_a_higher_layer_replace_the_lower_ones():
    assert resolve_plan({"num_steps": 6}, SamplingOptions(levels=(0, 4, 8))).levels == (0, 4, 8)
    assert resolve_plan({"levels": [0, 4, 8]}, SamplingOptions(num_steps=4)).num_steps == 4
    assert resolve_plan({"levels": [0, 4, 8]}).levels == (0, 4, 8)


def test_presets_set_only_their_fields():
    for name, p in PRESETS.items():
        assert set(p.given()) <= {"inner_sampler", "inner_steps", "eta"}, name
    plan = resolve_plan({"cfg": 1.5, "x0_clip": 2.0}, preset_name="fast")
    assert plan.x0_clip == 2.0 and plan.cfg[-1] == pytest.approx(1 + 0.9 * 0.5) and plan.inner_steps == (15,) * 10


@pytest.fixture(scope="module")
def gen():
    pytest.importorskip("onnxruntime")
    return far_sdk.Generator(DEMO, backend="onnxruntime", threads=1)


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
    assert isinstance(d, SamplingOptions) and d.x0_clip == 4.0      # the demo was trained to be sampled with a clip
    assert gen.plan().x0_clip == 4.0 and gen.plan(x0_clip=False).x0_clip is None


def test_export_refuses_a_misspelt_default(tmp_path):
    pytest.importorskip("torch")
    from export.random_bundle import random_bundle

    with pytest.raises(InvalidArgumentError, match="unknown option.*'steps'"):
        random_bundle(tmp_path / "b", validate=False, defaults={"steps": 4})
    assert not (tmp_path / "b").exists()


def test_far_generate_flags_build_the_same_options(tmp_path, capsys):
    from far_sdk.cli import main

    out = tmp_path / "g.png"
    rc = main(["generate", "--bundle", str(DEMO), "--class", "3", "--backend", "onnxruntime", "--steps", "2", "--inner-steps", "2,3",
               "--no-x0-clip", "--cfg", "2", "--out", str(out), "--no-progress"])
    assert rc == 0 and out.exists() and "2 outer steps, 5 ddpm inner steps" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:                        # argparse: the two clip flags exclude each other
        main(["generate", "--bundle", str(DEMO), "--class", "3", "--x0-clip", "2", "--no-x0-clip", "--out", str(out)])
    assert e.value.code == EXIT_USAGE
