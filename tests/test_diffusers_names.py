"""diffusers' names on ``Generator.generate`` (issue 20): ``guidance_scale`` is ``cfg``, ``num_images_per_prompt``
repeats each label, ``callback_on_step_end`` follows diffusers' contract; the names with no counterpart get a typed
error saying what to pass; ``repr(Generator)``; warnings where a user would be surprised (mask mode on a model
trained without masking, a class-balanced dataset that cannot be balanced)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hostile import DEMO

import far_sdk
from far_sdk.errors import InvalidArgumentError

T2I = DEMO.parent / "far-t2i-demo"
FAST = dict(num_steps=3, inner_steps=3, output_type="latent")


@pytest.fixture(scope="module")
def gen():
    with far_sdk.Generator(DEMO, backend="onnxruntime") as g:
        yield g


def test_guidance_scale_is_cfg(gen):
    a = gen.generate(class_labels=[3], seed=1, guidance_scale=2.0, **FAST)
    b = gen.generate(class_labels=[3], seed=1, cfg=2.0, **FAST)
    c = gen.generate(class_labels=[3], seed=1, cfg=3.0, **FAST)
    assert np.array_equal(a.latents, b.latents) and not np.array_equal(a.latents, c.latents)
    assert a.plan.cfg == b.plan.cfg
    with pytest.raises(InvalidArgumentError, match="give cfg or its diffusers name guidance_scale, not both"):
        gen.generate(class_labels=[3], cfg=2.0, guidance_scale=2.0, **FAST)


def test_num_images_per_prompt_repeats_each_label_with_consecutive_seeds(gen):
    a = gen.generate(class_labels=[3, 7], seed=5, num_images_per_prompt=2, **FAST)
    b = gen.generate(class_labels=[3, 3, 7, 7], seed=5, **FAST)
    assert a.class_labels == (3, 3, 7, 7) and a.seeds == (5, 6, 7, 8)
    assert np.array_equal(a.latents, b.latents)
    with pytest.raises(InvalidArgumentError, match="num_images_per_prompt must be a positive integer, got 0"):
        gen.generate(class_labels=[3], num_images_per_prompt=0, **FAST)


def test_callback_on_step_end_gets_the_generator_step_level_and_latents_like_on_step(gen):
    seen, infos = [], []

    def callback(pipe, step, timestep, callback_kwargs):
        seen.append((pipe, step, timestep, callback_kwargs["latents"].copy()))
        return callback_kwargs

    gen.generate(class_labels=[3], seed=2, callback_on_step_end=callback, **FAST)
    out = gen.generate(class_labels=[3], seed=2, on_step=infos.append, **FAST)
    assert [s[:3] for s in seen] == [(gen, i.step, i.level) for i in infos]
    assert [s[2] for s in seen] == list(out.plan.levels)
    assert all(np.array_equal(s[3], i.latents) for s, i in zip(seen, infos))

    with pytest.raises(InvalidArgumentError, match="does not feed latents back"):
        gen.generate(class_labels=[3], callback_on_step_end=lambda p, s, t, kw: {"latents": kw["latents"] + 1}, **FAST)
    with pytest.raises(InvalidArgumentError, match="give on_step or callback_on_step_end"):
        gen.generate(class_labels=[3], on_step=print, callback_on_step_end=callback, **FAST)


@pytest.mark.parametrize(
    "keyword, message",
    [
        ("num_inference_steps", "FAR has two step counts: num_steps (outer steps) and inner_steps"),
        ("generator", "pass seed= (an int; image i uses seed + i)"),
        ("height", "the image size is the bundle's"),
        ("guidence_scale", "did you mean 'guidance_scale'?"),
        ("inner_step", "did you mean 'inner_steps'?"),
    ],
)
def test_unknown_keywords_name_what_to_pass(gen, keyword, message):
    with pytest.raises(InvalidArgumentError, match=f"unknown keyword '{keyword}'") as e:
        gen.generate(class_labels=[3], **{keyword: 10})
    assert message in str(e.value)


def test_repr_shows_bundle_backend_device_and_precision(gen):
    assert repr(gen) == (
        f"far_sdk.Generator(bundle={str(DEMO)!r}, backend='onnxruntime', device='cpu', precision='fp32')"
    )


def test_mask_mode_on_a_model_trained_without_masking_warns(gen):
    assert gen.bundle.model_config["mask"] is False
    with pytest.warns(UserWarning, match="trained without token masking.*expect worse images"):
        gen.plan(mode="mask")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gen.plan(mode="nomask")
        with far_sdk.Generator(T2I, backend="onnxruntime") as t2i:  # FAR-T2I is trained with masking
            assert t2i.plan().mode == "mask"


def test_a_class_balanced_dataset_that_cannot_be_balanced_warns_with_the_counts(tmp_path):
    from far_sdk.bundle.bundle import Bundle
    from far_sdk.scale.dataset import DatasetJob, check_bundle

    bundle = Bundle.load(DEMO, verify=False)
    with pytest.warns(
        UserWarning, match="15 images over 10 classes is not class-balanced: some classes get 1 images, "
    ):
        layout = check_bundle(DatasetJob(bundle=str(DEMO), num_images=15, shard_size=15), bundle)
    assert sorted(set(np.bincount(layout.arr_1(0, 15), minlength=10))) == [1, 2]  # what the warning says
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layout = check_bundle(DatasetJob(bundle=str(DEMO), num_images=20, shard_size=20), bundle)
    assert set(np.bincount(layout.arr_1(0, 20), minlength=10)) == {2}
