"""Image-to-image (issue 25): the vae_encoder graph against PyTorch, Generator.encode on every backend, the start
state against the reference sampler's low-passed latents, image-conditioned runs against the reference sampler
(which gains the same ``start=``), start_level=0 bit for bit today's output, batches, mask mode and typed errors."""

import json
import shutil

import numpy as np
import pytest
from conftest import plan_of, rel_err

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

import far_sdk  # noqa: E402
from far_sdk.bundle.manifest import dump_manifest  # noqa: E402
from far_sdk.errors import InvalidArgumentError, MissingEncoderError  # noqa: E402
from far_sdk.maths.filters import low_pass  # noqa: E402
from far_sdk.maths.noise import ENCODE_STREAM, SeededNoise, philox_normals  # noqa: E402

FAST = dict(num_steps=4, inner_steps=[3, 4, 5, 6])


@pytest.fixture(scope="module")
def ort_gen(tiny_bundle):
    with far_sdk.Generator(tiny_bundle, backend="onnxruntime", threads=2) as gen:
        yield gen


@pytest.fixture(scope="module")
def torch_gen(tiny_bundle):
    with far_sdk.Generator(tiny_bundle, backend="torch", threads=2) as gen:
        yield gen


@pytest.fixture(scope="module")
def pictures(tiny_bundle):
    """Three smooth uint8 RGB pictures of the bundle's size (256 px), different from one another."""
    size = json.loads((tiny_bundle / "manifest.json").read_text())["image_size"]
    g = torch.Generator().manual_seed(5)
    coarse = torch.rand(3, 3, 6, 6, generator=g)
    up = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    return (up.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _torch_posterior(vae, u8, scale):
    """The posterior (mean, std) at the sampler scale from training.vae directly (the float conversion written out)."""
    x = torch.from_numpy(u8.astype(np.float32)).permute(0, 3, 1, 2) / 127.5 - 1
    with torch.no_grad():
        post = vae.encode(x)
    return (post.mean * scale).numpy(), (post.std * scale).numpy()


def _reference(far, labels, seed, start=None, **plan):
    from training.sampler import iter_reference

    steps = list(iter_reference(far, labels, noise=SeededNoise.from_seed(seed, len(labels)), start=start, **plan))
    return steps


# ---- the encoder ----------------------------------------------------------------------------------------------


def test_encoder_graph_is_validated_and_encode_equals_pytorch(tiny_models, tiny_bundle, ort_gen, pictures):
    _, vae = tiny_models
    m = json.loads((tiny_bundle / "manifest.json").read_text())
    assert m["graphs"]["vae_encoder"]["outputs"][0]["name"] == "mean" and "vae_encoder.safetensors" in m["files"]
    mean, std = _torch_posterior(vae, pictures, m["latent_scale"])
    z = ort_gen.encode(list(pictures))  # a list of uint8 arrays
    assert z.shape == (3, 16, 16, 16) and rel_err(z, mean) < 1e-4
    zs = ort_gen.encode(pictures, sample=True, seed=11)  # mean + std * eps, eps from stream 2 of seeds 11, 12, 13
    eps = philox_normals([11, 12, 13], 0, 16 * 16 * 16, stream=ENCODE_STREAM).reshape(mean.shape)
    assert rel_err(zs, mean + std * eps) < 1e-4 and np.abs(zs - z).max() > 1e-3
    assert np.array_equal(ort_gen.encode(pictures[1:2], sample=True, seed=12), zs[1:2])  # per-image seeds


def test_encode_takes_pil_and_resizes_documented(ort_gen, pictures):
    from PIL import Image

    big = Image.fromarray(pictures[0]).resize((300, 256), Image.Resampling.NEAREST)  # 300 x 256: cropped, resized
    side = 256
    left = (300 - side) // 2
    want = np.asarray(big.crop((left, 0, left + side, side)).resize((256, 256), Image.Resampling.BICUBIC))
    assert np.array_equal(ort_gen.encode(big), ort_gen.encode(want))
    grey = Image.fromarray(pictures[0][:, :, 0])  # mode L -> RGB
    assert np.array_equal(ort_gen.encode(grey), ort_gen.encode(np.repeat(pictures[0][:, :, :1], 3, axis=2)))


def test_encode_on_torch_and_simulated_tensorrt_equals_onnxruntime(
    tiny_bundle, ort_gen, torch_gen, pictures, tmp_path, monkeypatch
):
    import trt_sim

    z = ort_gen.encode(pictures)
    assert "vae_encoder" in torch_gen.backend.extra_graphs  # the torch backend runs its own encoder module
    assert rel_err(torch_gen.encode(pictures), z) < 1e-5
    from export.trt_build import build_engines

    bundle = tmp_path / "tiny"
    shutil.copytree(tiny_bundle, bundle)
    trt_sim.install(monkeypatch)
    from far_sdk.backends.tensorrt.backend import TensorRTBackend

    build_engines(bundle, precision="fp32", batch=(1, 2, 2), progress=lambda m: None)
    be = TensorRTBackend(far_sdk.Bundle.load(bundle))
    with far_sdk.Generator(bundle, backend=be) as gen:  # the encoder: ONNX Runtime on the CPU beside it
        assert rel_err(gen.encode(pictures), z) < 1e-6
        out = gen.generate([1, 2], seed=3, image=pictures[:2], start_level=2, output_type="latent", **FAST)
    ref = ort_gen.generate([1, 2], seed=3, image=pictures[:2], start_level=2, output_type="latent", **FAST)
    assert rel_err(out.latents, ref.latents) < 1e-6


# ---- the start state and runs against the reference sampler -----------------------------------------------------


@pytest.mark.parametrize("k", [1, 3])
def test_start_state_is_the_inputs_latents_low_passed_as_the_reference_does(tiny_models, ort_gen, pictures, k):
    far, _ = tiny_models
    seen = []
    ort_gen.generate([4], seed=0, image=pictures[0], start_level=k, output_type="latent", on_step=seen.append, **FAST)
    first = seen[0]
    z = ort_gen.encode(pictures[0])
    plan = plan_of(**FAST)
    assert first.step == k - 1 and np.array_equal(first.latents, z)
    ref = _reference(far, [4], 0, start=(torch.from_numpy(z), k), **FAST)[0]
    assert ref.step == k - 1
    assert np.abs(first.handed_on - ref.latents.numpy()).max() < 1e-5  # matrices vs F.interpolate
    assert np.abs(first.handed_on - low_pass(z.astype(np.float64), plan.filter_after[k - 1])).max() < 1e-5
    assert [s.step for s in seen] == list(range(k - 1, 4))


@pytest.mark.parametrize(("backend", "k"), [("ort", 1), ("ort", 3), ("ort", 4), ("torch", 2), ("torch", 4)])
def test_image_conditioned_runs_equal_the_reference_sampler(tiny_models, ort_gen, torch_gen, pictures, backend, k):
    far, _ = tiny_models
    gen = ort_gen if backend == "ort" else torch_gen
    out = gen.generate([1, 7], seed=3, cfg=2.5, image=pictures[:2], start_level=k, output_type="latent", **FAST)
    z = ort_gen.encode(pictures[:2])
    ref = _reference(far, [1, 7], 3, start=(torch.from_numpy(z), k), cfg=2.5, **FAST)[-1].latents.numpy()
    assert rel_err(out.latents, ref) <= 1e-4
    if k == 4:  # no step left: the input's latents come back
        assert np.array_equal(out.latents, z) if backend == "ort" else rel_err(out.latents, z) < 1e-5


def test_mask_mode_starts_mid_way_as_the_reference_does(tiny_models, ort_gen, pictures):
    far, _ = tiny_models
    plan = dict(mode="mask", levels=[0, 4, 8, 12], inner_steps=[3, 4, 5, 6])
    with pytest.warns(UserWarning, match="trained without token masking"):
        out = ort_gen.generate([2], seed=1, image=pictures[2], start_level=2, output_type="latent", **plan)
    z = ort_gen.encode(pictures[2])
    ref = _reference(far, [2], 1, start=(torch.from_numpy(z), 2), **plan)[-1].latents.numpy()
    assert rel_err(out.latents, ref) <= 1e-4


def test_start_level_0_and_strength_1_are_bitwise_todays_generation(ort_gen, pictures):
    plain = ort_gen.generate([3, 5], seed=2, output_type="latent", **FAST).latents
    for kw in (dict(start_level=0), dict(strength=1.0)):
        out = ort_gen.generate([3, 5], seed=2, image=pictures[:2], output_type="latent", **FAST, **kw).latents
        assert np.array_equal(out, plain)
    zero = ort_gen.generate([3], seed=2, image=pictures[0], strength=0.0, output_type="latent", **FAST).latents
    assert np.array_equal(zero, ort_gen.encode(pictures[0]))  # strength 0: the input back


def test_strength_maps_to_round_one_minus_s_times_steps(ort_gen, pictures):
    for s, k in ((0.75, 1), (0.5, 2), (0.3, 3), (0.1, 4)):
        a = ort_gen.generate([3], seed=2, image=pictures[0], strength=s, output_type="latent", **FAST).latents
        b = ort_gen.generate([3], seed=2, image=pictures[0], start_level=k, output_type="latent", **FAST).latents
        assert np.array_equal(a, b), (s, k)


def test_batches_one_image_for_all_one_per_label_and_splits(ort_gen, pictures):
    each = ort_gen.generate([1, 2, 3], seed=4, image=pictures, start_level=2, output_type="latent", **FAST).latents
    split = ort_gen.generate(
        [1, 2, 3], seed=4, image=pictures, start_level=2, output_type="latent", max_batch=2, **FAST
    ).latents
    assert np.array_equal(each, split)
    one = ort_gen.generate([1, 1], seed=4, image=pictures[0], start_level=2, output_type="latent", **FAST).latents
    alone = ort_gen.generate([1], seed=4, image=pictures[0], start_level=2, output_type="latent", **FAST).latents
    assert np.array_equal(one[:1], alone) and np.array_equal(one[:1], each[:1])
    per = ort_gen.generate(
        [1, 2], seed=4, image=pictures[:2], start_level=2, num_images_per_prompt=2, output_type="latent", **FAST
    ).latents  # 4 outputs (seeds 4..7): the images repeated per label like the labels
    third = ort_gen.generate([2], seed=6, image=pictures[1], start_level=2, output_type="latent", **FAST).latents
    assert np.array_equal(per[0], each[0]) and np.array_equal(per[2:3], third)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(start_level=5), "start_level must be an outer step in 0..4"),
        (dict(start_level=1, strength=0.5), "not both"),
        (dict(strength=1.5), r"strength must be a number in \[0, 1\]"),
        (dict(), "image= needs start_level="),
    ],
)
def test_bad_levels_raise_typed_errors(ort_gen, pictures, kwargs, match):
    with pytest.raises(InvalidArgumentError, match=match):
        ort_gen.generate([1], image=pictures[0], **FAST, **kwargs)


def test_bad_images_raise_typed_errors(ort_gen, pictures):
    from PIL import Image

    with pytest.raises(InvalidArgumentError, match="start_level and strength go with image="):
        ort_gen.generate([1], start_level=2, **FAST)
    with pytest.raises(InvalidArgumentError, match="uint8"):
        ort_gen.encode(pictures[0].astype(np.float32))
    with pytest.raises(InvalidArgumentError, match=r"\[H, W, 3\]"):
        ort_gen.encode(np.zeros((8, 8, 4), np.uint8))
    with pytest.raises(InvalidArgumentError, match="at most 4096"):
        ort_gen.encode(Image.new("RGB", (5000, 10)))
    with pytest.raises(InvalidArgumentError, match="got 2 images for 3 outputs"):
        ort_gen.generate([1, 2, 3], image=pictures[:2], start_level=1, **FAST)


def test_bundle_without_encoder_loads_and_asks_for_a_re_export(tiny_bundle, tmp_path, pictures):
    b = tmp_path / "old"
    shutil.copytree(tiny_bundle, b)
    m = json.loads((b / "manifest.json").read_text())
    del m["graphs"]["vae_encoder"]
    for f in ("vae_encoder.onnx", "vae_encoder.safetensors"):
        del m["files"][f]
        (b / f).unlink()
    (b / "manifest.json").write_bytes(dump_manifest(m))
    for backend in ("onnxruntime", "torch"):
        with far_sdk.Generator(b, backend=backend) as gen:
            assert gen.generate([1], seed=0, output_type="latent", **FAST).latents.shape == (1, 16, 16, 16)
            with pytest.raises(MissingEncoderError, match="re-export"):
                gen.generate([1], image=pictures[0], start_level=2, **FAST)
            with pytest.raises(MissingEncoderError, match="scripts/add_vae_encoder.py"):
                gen.encode(pictures[0])


def test_a_vae_encoder_entry_that_disagrees_with_the_model_is_refused(tiny_bundle, tmp_path):
    from far_sdk.errors import BundleError

    b = tmp_path / "bad"
    shutil.copytree(tiny_bundle, b)
    m = json.loads((b / "manifest.json").read_text())
    m["graphs"]["vae_encoder"]["outputs"][0]["shape"] = ["B", 16, 8, 8]
    (b / "manifest.json").write_bytes(dump_manifest(m))
    with pytest.raises(BundleError, match=r"graphs.vae_encoder.outputs"):
        far_sdk.Bundle.load(b)
    m["graphs"]["vae_encoderx"] = m["graphs"].pop("vae_encoder")
    (b / "manifest.json").write_bytes(dump_manifest(m))
    with pytest.raises(BundleError, match="vae_encoderx"):
        far_sdk.Bundle.load(b)
