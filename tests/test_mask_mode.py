"""Mask mode (the official ``sample_tokens_mask``) through the exported graphs.

- The static-shape masking of the transformer graph (a kept-key attention mask, a select refill) is the
  same function as the official gathers of ``training/far.py`` (float64, any kept count per row), and the
  ONNX graph computes it.
- ONNX Runtime and the torch backend replay the official code's own mask-mode trace
  (tests/fixtures/official-tiny) through ``noise=ReplayNoise(draws, orders)``, and equal the reference
  sampler for seeded noise (orders from each image's stream 1); TensorRT is checked on the simulator.
- Which modes a bundle runs follows the official code (mask=True: mask only; mask=False: both, the
  mask ignored), is recorded in the manifest, and another mode is a typed error.
"""

import dataclasses
import json
import re
import shutil

import numpy as np
import pytest
from conftest import OFFICIAL_TINY, rel_err

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

import far_sdk  # noqa: E402
from far_sdk.bundle.manifest import dump_manifest  # noqa: E402
from far_sdk.errors import BundleError, InvalidArgumentError  # noqa: E402
from far_sdk.maths.masking import check_orders, step_masks  # noqa: E402
from far_sdk.maths.noise import ReplayNoise, SeededNoise  # noqa: E402
from training import FAR, VAE_CONFIGS, AutoencoderKL, get_config, load_official_checkpoint  # noqa: E402
from training.graph_modules import randomize_for_export  # noqa: E402
from training.sampler import iter_reference, sample_reference  # noqa: E402

TOL = 1e-4
#: Unmasked tokens entering steps 1..10 of the official 11-step sampler (shared/spec/official-far.md §7, measured).
OFFICIAL_UNMASKED = (3, 11, 24, 41, 63, 89, 118, 150, 184, 220)
FAST = dict(inner_steps=3)


def _export(far, tmp_path_factory, name, validate=True):
    from export.onnx_export import export_bundle

    torch.manual_seed(0)
    vae = AutoencoderKL(VAE_CONFIGS["kl16-tiny"]).eval()
    return export_bundle(far, vae, tmp_path_factory.mktemp("mask") / name, name=name, validate=validate)


@pytest.fixture(scope="module")
def masked_far():
    torch.manual_seed(0)
    far = FAR(dataclasses.replace(get_config("far_tiny"), mask=True)).eval()
    return randomize_for_export(far, seed=0)  # mask_token, biases, adaLN: all non-zero


@pytest.fixture(scope="module")
def masked_bundle(masked_far, tmp_path_factory):
    return _export(masked_far, tmp_path_factory, "tiny-mask")


@pytest.fixture(scope="module")
def official_mask_bundle(tmp_path_factory):
    """The official fixture's checkpoint as a mask=True model (the same weights: the trace was sampled that way)."""
    m = load_official_checkpoint(OFFICIAL_TINY / "checkpoint-last.pth", config="far_parity_tiny")
    far = FAR(dataclasses.replace(m.config, mask=True)).eval()
    far.load_state_dict(m.state_dict())
    return _export(far, tmp_path_factory, "official-tiny-mask", validate=False)


def _random_mask(rng, B, L, counts):
    mask = np.zeros((B, L), np.float32)
    for b, m in enumerate(counts):
        mask[b, rng.permutation(L)[:m]] = 1
    return mask


# ---- the static-shape graph == the official gathers ----------------------------------------------------


def test_static_masking_equals_the_official_gather_in_float64(masked_far):
    m64 = FAR(masked_far.config).double().eval()
    m64.load_state_dict(masked_far.state_dict())
    rng = np.random.default_rng(0)
    L = m64.config.seq_len
    counts = (L, 0, 1, 100, 253, L - 1)  # all dropped (step 0), none, and uneven counts per row
    tokens = torch.from_numpy(rng.standard_normal((len(counts), L, 16)))
    emb = torch.from_numpy(rng.standard_normal((len(counts), 64)))
    mask = torch.from_numpy(_random_mask(rng, len(counts), L, counts)).double()
    with torch.no_grad():
        static = m64.condition_static(tokens, emb, mask)  # all rows at once
        for i in range(len(counts)):  # the gather needs one kept count per call: one row at a time
            gathered = m64.condition(tokens[i : i + 1], emb[i : i + 1], mask[i : i + 1])
            assert rel_err(static[i : i + 1].numpy(), gathered.numpy()) < 1e-12, f"row {i} ({counts[i]} dropped)"
        # and the mask matters: dropping nothing differs from dropping 100 tokens
        assert rel_err(m64.condition(tokens[3:4], emb[3:4]).numpy(), static[3:4].numpy()) > 1e-3


def test_onnx_transformer_graph_equals_the_gathering_model(masked_far, masked_bundle):
    import onnxruntime as ort

    m64 = FAR(masked_far.config).double().eval()
    m64.load_state_dict(masked_far.state_dict())
    rng = np.random.default_rng(1)
    L = m64.config.seq_len
    counts = (L, 37, 180, 0)
    tokens = rng.standard_normal((4, L, 16)).astype(np.float32)
    ids = np.array([3, 7, 10, 10])  # the last two: the null class
    mask = _random_mask(rng, 4, L, counts)
    sess = ort.InferenceSession(str(masked_bundle / "transformer.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(["cond"], {"tokens": tokens, "class_ids": ids, "level": np.array([5.0], np.float32), "mask": mask})[
        0
    ]
    table = torch.cat([m64.class_emb.weight, m64.fake_latent])
    with torch.no_grad():
        for i in range(4):
            z = m64.condition(
                torch.from_numpy(tokens[i : i + 1]).double(),
                table[ids[i : i + 1]],
                torch.from_numpy(mask[i : i + 1]).double(),
            )
            want = m64.diffloss.net.condition(z, torch.full((1, 1, 1), 5.0, dtype=torch.float64)).numpy()
            assert rel_err(got[i : i + 1], want) < 1e-5, f"row {i}"


# ---- the per-step masks ---------------------------------------------------------------------------------


def test_step_masks_unmask_the_official_counts_in_each_images_order():
    rng = np.random.default_rng(2)
    orders = np.stack([rng.permutation(256) for _ in range(3)])
    masks = list(step_masks(check_orders(orders, 3, 256), 11))
    assert len(masks) == 11 and (masks[0] == 1).all()
    assert [int(256 - m[0].sum()) for m in masks[1:]] == list(OFFICIAL_UNMASKED)
    for s, m in enumerate(masks[1:], 1):
        k = 256 - OFFICIAL_UNMASKED[s - 1]
        for b in range(3):  # masked = the first k entries of the image's order, exactly
            assert set(np.nonzero(m[b])[0]) == set(orders[b, :k].tolist())


@pytest.mark.parametrize(
    "orders, match",
    [
        (np.zeros((1, 256), np.int64), "not a permutation"),
        (np.arange(255)[None], r"shape \(1, 256\)"),
        (np.arange(256, dtype=np.float32)[None], "integers"),
    ],
)
def test_bad_token_orders_are_refused(orders, match):
    with pytest.raises(InvalidArgumentError, match=match):
        check_orders(orders, 1, 256)


# ---- backends vs the official trace and the reference sampler ------------------------------------------


def _official_draws(ref):
    out = []
    for s in range(11):
        out.append(ref["mask_noise_x_T"][s][None])
        out.extend(ref["mask_noise_steps"][s, k][None] for k in range(ref["mask_noise_steps"].shape[1]))
    return out


def _backend_opts(backend):
    return {"threads": 2} if backend == "onnxruntime" else {"device": "cpu"}


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_backend_replays_the_official_mask_trace(official_mask_bundle, official_ref, backend):
    ref = official_ref
    with far_sdk.Generator(official_mask_bundle, backend=backend, **_backend_opts(backend)) as gen:
        steps = []
        out = gen.generate(
            ref["labels"].tolist(),
            noise=ReplayNoise(_official_draws(ref), ref["mask_orders"]),
            mode="mask",
            inner_steps=int(ref["num_sampling_steps"]),
            cfg=float(ref["cfg"]),
            output_type="latent",
            on_step=steps.append,
        )
        assert out.plan.levels == tuple(ref["mask_levels"].astype(int))
        np.testing.assert_allclose(out.plan.cfg, ref["mask_cfgs"], rtol=1e-12)
        np.testing.assert_allclose(out.plan.temperature, ref["mask_temperatures"], rtol=1e-12)
        for s in range(10):  # what each step hands on (filtered, masked tokens zeroed) = the official next input
            handed = steps[s].handed_on[0].transpose(1, 2, 0).reshape(256, 16)
            assert rel_err(handed, ref["mask_tok_in"][s + 1][0]) < TOL, f"tokens entering step {s + 1}"
        assert rel_err(out.latents, ref["mask_final"]) < TOL
        gen.close()


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_backend_equals_reference_sampler_for_seeded_mask_mode(masked_far, masked_bundle, backend):
    with far_sdk.Generator(masked_bundle, backend=backend, **_backend_opts(backend)) as gen:
        out = gen.generate([1, 7, 3], seed=5, output_type="latent", cfg=2.5, **FAST)  # the bundle's default mode: mask
        assert out.plan.mode == "mask" and out.plan.num_steps == 11
        ref = sample_reference(masked_far, [1, 7, 3], noise=SeededNoise.from_seed(5, 3), plan=out.plan).numpy()
        assert rel_err(out.latents, ref) < TOL
        gen.close()


def test_mask_mode_on_a_mask_false_bundle_ignores_the_mask_like_the_official_code(tmp_path_factory):
    torch.manual_seed(0)
    far = randomize_for_export(FAR(get_config("far_tiny")).eval(), seed=0)
    bundle = _export(far, tmp_path_factory, "tiny-nomask", validate=False)
    with far_sdk.Generator(bundle, backend="onnxruntime", threads=2) as gen:
        assert gen.bundle.sampling_modes == ("nomask", "mask") and not gen.backend.takes_mask
        out = gen.generate([2, 9], seed=1, mode="mask", output_type="latent", **FAST)
        ref = sample_reference(far, [2, 9], noise=SeededNoise.from_seed(1, 2), plan=out.plan).numpy()
        assert rel_err(out.latents, ref) < TOL
        # the masks still shape the run: zeroed tokens differ from the no-mask sampler's low-passed ones
        nomask = gen.generate([2, 9], seed=1, levels=out.plan.levels, output_type="latent", **FAST)
        assert rel_err(nomask.latents, out.latents) > 1e-3


def test_mask_mode_batch_split_and_seed_orders(masked_bundle):
    with far_sdk.Generator(masked_bundle, backend="onnxruntime", threads=2) as gen:
        whole = gen.generate([0, 1, 2, 3, 4], seed=7, output_type="latent", **FAST)
        split = gen.generate([0, 1, 2, 3, 4], seed=7, output_type="latent", max_batch=2, **FAST)
        np.testing.assert_array_equal(whole.latents, split.latents)
        # the orders are each image's own: image 2 of seed 7 is image 0 of seed 9
        alone = gen.generate([2], seed=9, output_type="latent", **FAST)
        assert rel_err(alone.latents, whole.latents[2:3]) < 1e-6


def test_tensorrt_backend_mask_mode_on_the_simulator(masked_bundle, tmp_path, monkeypatch):
    import trt_sim

    from export.trt_build import build_engines
    from far_sdk.backends.tensorrt.backend import TensorRTBackend
    from far_sdk.bundle.bundle import Bundle

    bundle = tmp_path / "b"
    shutil.copytree(masked_bundle, bundle)
    trt_sim.install(monkeypatch)
    build_engines(bundle, precision="fp32", batch=(1, 2, 2), progress=lambda m: None)  # validates the mask input
    with far_sdk.Generator(bundle, backend=TensorRTBackend(Bundle.load(bundle))) as gen:
        out = gen.generate([1, 7, 3], seed=3, output_type="latent", **FAST)  # 3 images: split 2 + 1
        with far_sdk.Generator(bundle, backend="onnxruntime", threads=2) as ort_gen:
            ref = ort_gen.generate([1, 7, 3], seed=3, output_type="latent", **FAST)
        assert out.plan.mode == "mask" and rel_err(out.latents, ref.latents) < 1e-6
        gen.close()


# ---- modes, manifest, errors ---------------------------------------------------------------------------


def test_manifest_of_a_mask_model_lists_mask_mode_only_and_the_mask_input(masked_bundle):
    m = json.loads((masked_bundle / "manifest.json").read_text())
    assert m["sampling_modes"] == ["mask"] and m["defaults"]["mode"] == "mask" and m["format_version"] == 3
    assert [t["name"] for t in m["graphs"]["transformer"]["inputs"]] == ["tokens", "class_ids", "level", "mask"]
    assert m["graphs"]["transformer"]["inputs"][-1] == {"name": "mask", "dtype": "float32", "shape": ["N", 256]}


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m: m.update(sampling_modes=["nomask", "mask"]), "field sampling_modes"),
        (lambda m: m["defaults"].update(mode="nomask"), "field defaults.mode"),
        (lambda m: m["graphs"]["transformer"]["inputs"].pop(), "field graphs.transformer.inputs"),
    ],
)
def test_a_manifest_whose_modes_contradict_its_model_is_refused(masked_bundle, tmp_path, edit, match):
    bundle = tmp_path / "b"
    shutil.copytree(masked_bundle, bundle)
    m = json.loads((bundle / "manifest.json").read_text())
    edit(m)
    (bundle / "manifest.json").write_bytes(dump_manifest(m))  # re-sealed: only the relation check can catch it
    with pytest.raises(BundleError, match=match):
        far_sdk.Generator(bundle, backend="onnxruntime")


def test_a_bundle_of_format_2_is_refused_with_how_to_re_export(masked_bundle, tmp_path):
    from far_sdk.errors import IncompatibleBundleError

    bundle = tmp_path / "b"
    shutil.copytree(masked_bundle, bundle)
    m = json.loads((bundle / "manifest.json").read_text())
    m["format_version"] = 2
    del m["sampling_modes"]
    (bundle / "manifest.json").write_bytes(dump_manifest(m))
    with pytest.raises(
        IncompatibleBundleError, match=r"format version 2; this far-sdk reads version 3.*reexport_bundle.py"
    ):
        far_sdk.Generator(bundle, backend="onnxruntime")


def test_asking_for_an_unsupported_mode_is_a_typed_error_naming_the_supported_ones(masked_bundle, masked_far):
    with far_sdk.Generator(masked_bundle, backend="onnxruntime", threads=2) as gen:
        with pytest.raises(
            InvalidArgumentError, match=r"mode\(s\) \['mask'\] only, not 'nomask'.*mask=True.*pass mode='mask'"
        ):
            gen.generate([1], mode="nomask")
        with pytest.raises(InvalidArgumentError, match="mode must be"):
            gen.generate([1], mode="masked")
        with pytest.raises(InvalidArgumentError, match="token order"):
            gen.generate([1], noise=lambda shape: np.ones(shape, np.float32), **FAST)  # a source without orders
        bad = np.zeros((1, 256), np.int64)
        with pytest.raises(InvalidArgumentError, match="not a permutation"):
            gen.generate([1], noise=ReplayNoise([], orders=bad), **FAST)
        with pytest.raises(InvalidArgumentError, match="mask mode only"):  # the reference sampler: the same rule
            next(iter_reference(masked_far, [1], mode="nomask", **FAST))
        with pytest.raises(InvalidArgumentError, match="needs a mask"):  # the backend, called directly
            gen.backend.transformer(np.zeros((2, 256, 16), np.float32), {"class_ids": np.array([1, 10])}, 0)


def test_far_cli_generate_in_mask_mode(masked_bundle, tmp_path, capsys):
    from far_sdk.cli.main import main

    out = tmp_path / "grid.png"
    assert (
        main(
            [
                "generate",
                "--bundle",
                str(masked_bundle),
                "--class",
                "1",
                "--mode",
                "mask",
                "--inner-steps",
                "2",
                "--out",
                str(out),
                "--backend",
                "onnxruntime",
                "--no-progress",
            ]
        )
        == 0
    )
    assert "mask mode, 11 outer steps" in capsys.readouterr().out and out.is_file()
    assert (
        main(
            [
                "generate",
                "--bundle",
                str(masked_bundle),
                "--class",
                "1",
                "--mode",
                "nomask",
                "--out",
                str(out),
                "--backend",
                "onnxruntime",
                "--no-progress",
            ]
        )
        == 2
    )
    assert "pass --mode mask" in capsys.readouterr().err
    assert main(["info", "--bundle", str(masked_bundle)]) == 0
    assert re.search(r"sampling modes +mask \(model built with mask=True", capsys.readouterr().out)
