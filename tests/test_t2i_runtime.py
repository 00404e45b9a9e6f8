"""FAR-T2I bundles (issue 13, Deliver 4): export, the runtime's text path, parity with the PyTorch T2I reference
sampler.

References are independent of the runtime: training.sampler_t2i (PyTorch, gathering encoder) for the sampler,
training.text_encoder.SmallTextEncoder (transformers + its tokenizer) for prompt -> hidden states.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import far_sdk
from far_sdk.errors import InvalidArgumentError
from far_sdk.maths.noise import ReplayNoise, SeededNoise
from training.checkpoint import load_official_checkpoint, save_official_checkpoint
from training.config_t2i import T2I_CONFIGS
from training.config_vae import VAE_CONFIGS
from training.demo_t2i import held_out_captions, train_captions
from training.far_t2i import FART2I
from training.graph_modules import randomize_for_export
from training.sampler_t2i import sample_reference_t2i, t2i_plan
from training.text_encoder import SmallTextEncoder
from training.vae import AutoencoderKL

#: The official T2I sampler's input levels (shared/spec §11).
T2I_LEVELS = (0, 2, 3, 4, 5, 6, 7, 8, 10, 13)
TOL = 1e-4
FAST = dict(inner_steps=3)
#: far_t2i_tiny with the digits VAE's 4 latent channels (32 x 32 images: fast exports)
CFG = replace(T2I_CONFIGS["far_t2i_tiny"], token_channels=4)
VAE = "digits-f2"
ROOT = Path(__file__).resolve().parents[1]


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def t2i_far():
    torch.manual_seed(0)
    return randomize_for_export(FART2I(CFG).eval(), seed=1)


@pytest.fixture(scope="module")
def text_encoder():
    cfg = CFG
    return SmallTextEncoder.build(
        train_captions()[0], context_len=cfg.context_len, hidden_size=cfg.context_dim, layers=1, heads=2, vocab_size=300
    )


@pytest.fixture(scope="module")
def t2i_bundle(t2i_far, text_encoder, tmp_path_factory):
    from export.onnx_export import export_bundle

    torch.manual_seed(0)
    vae = AutoencoderKL(VAE_CONFIGS[VAE]).eval()
    return export_bundle(
        t2i_far, vae, tmp_path_factory.mktemp("t2i") / "t2i-tiny", name="t2i-tiny", text_encoder=text_encoder
    )


def _ctx(seed: int, B: int) -> np.ndarray:
    cfg = CFG
    return np.random.default_rng(seed).standard_normal((B, cfg.context_len, cfg.context_dim), dtype=np.float32)


def test_manifest_says_text_mask_mode_and_the_t2i_defaults(t2i_bundle):
    m = json.loads((t2i_bundle / "manifest.json").read_text())
    assert m["conditioning"] == "text" and m["sampling_modes"] == ["mask"] and "null_class_id" not in m
    assert m["text"]["hidden_size"] == 32 and m["text"]["max_length"] == 8
    assert {"text_encoder.onnx", "tokenizer.json"} <= set(m["files"])
    assert [t["name"] for t in m["graphs"]["transformer"]["inputs"]] == ["tokens", "context", "null", "level", "mask"]
    assert m["graphs"]["transformer"]["validation"]["max_rel"] < TOL
    with far_sdk.Generator(t2i_bundle, backend="onnxruntime") as gen:
        plan = gen.plan()
    # the official FAR-T2I sampler (shared/spec §11): these levels, constant CFG 3, 100 DDPM steps, a filter after
    # every step but the last, the no-mask temperature ramp 0.8 + 0.2 (1 - cos(pi/2 (s + 1) / 10))
    assert plan.mode == "mask" and plan.levels == T2I_LEVELS
    assert plan.cfg == (3.0,) * 10 and plan.inner_steps == (100,) * 10
    assert plan.filter_after == T2I_LEVELS[1:] + (None,)
    np.testing.assert_allclose(
        plan.temperature, [0.8 + 0.2 * (1 - np.cos(np.pi / 2 * (s + 1) / 10)) for s in range(10)], rtol=1e-12
    )


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_backends_equal_the_t2i_reference_sampler_for_replayed_noise(t2i_far, t2i_bundle, backend):
    B, L, C = 2, 256, CFG.token_channels
    plan = t2i_plan(cfg=2.5, **FAST)
    rng = np.random.default_rng(3)
    draws = [rng.standard_normal((B, L, C), dtype=np.float32) for _ in range(sum(n + 1 for n in plan.inner_steps))]
    orders = np.stack([rng.permutation(L) for _ in range(B)])
    ctx = _ctx(4, B)
    ref = sample_reference_t2i(
        t2i_far, torch.from_numpy(ctx), plan=plan, noise=ReplayNoise(draws, orders=orders)
    ).numpy()
    with far_sdk.Generator(
        t2i_bundle, backend=backend, **({"threads": 2} if backend == "onnxruntime" else {"device": "cpu"})
    ) as gen:
        out = gen.generate(
            prompt_embeds=ctx, noise=ReplayNoise(draws, orders=orders), output_type="latent", cfg=2.5, **FAST
        )
        assert out.plan.levels == T2I_LEVELS and out.class_labels == ()
        assert rel_err(out.latents, ref) <= TOL


def test_seeded_batch_split_splits_the_prompt_embeds(t2i_far, t2i_bundle):
    with far_sdk.Generator(t2i_bundle, backend="onnxruntime", threads=2) as gen:
        ctx = _ctx(5, 3)
        whole = gen.generate(prompt_embeds=ctx, seed=7, output_type="latent", **FAST)
        split = gen.generate(prompt_embeds=ctx, seed=7, output_type="latent", max_batch=2, **FAST)
        np.testing.assert_array_equal(whole.latents, split.latents)
        ref = sample_reference_t2i(
            t2i_far, torch.from_numpy(ctx), plan=whole.plan, noise=SeededNoise.from_seed(7, 3)
        ).numpy()
        assert rel_err(whole.latents, ref) <= TOL


def test_prompts_through_the_bundled_onnx_text_encoder_equal_the_pytorch_encoder(t2i_bundle, text_encoder):
    from far_sdk.text import TextEncoder

    prompts = held_out_captions()[0][:7] + ["", "seven " * 20]  # empty, and longer than the context (truncated)
    got = TextEncoder(far_sdk.Bundle.load(t2i_bundle)).encode(prompts)
    want = text_encoder.encode(prompts).detach().numpy()
    assert got.shape == want.shape == (9, 8, 32)
    assert rel_err(got, want) <= TOL
    # generate(prompt=...) is generate(prompt_embeds=<those states>)
    with far_sdk.Generator(t2i_bundle, backend="onnxruntime", threads=2) as gen:
        a = gen.generate(prompt=prompts[:2], seed=3, output_type="latent", **FAST).latents
        b = gen.generate(prompt_embeds=want[:2], seed=3, output_type="latent", **FAST).latents
        assert rel_err(a, b) <= TOL


def test_negative_prompt_embeds_replace_the_null_context(t2i_far, t2i_bundle):
    with far_sdk.Generator(t2i_bundle, backend="onnxruntime", threads=2) as gen:
        ctx, neg = _ctx(6, 2), _ctx(7, 2)
        out = gen.generate(prompt_embeds=ctx, negative_prompt_embeds=neg, seed=2, output_type="latent", **FAST)
        # reference: the CFG batch [context_embed(ctx); context_embed(neg)] through the shared loop
        from training.sampler import iter_conditioned

        emb = torch.cat(
            [t2i_far.context_embedding(torch.from_numpy(ctx)), t2i_far.context_embedding(torch.from_numpy(neg))]
        )
        with torch.no_grad():
            *_, last = iter_conditioned(t2i_far, emb, out.plan, noise=SeededNoise.from_seed(2, 2))
        assert rel_err(out.latents, last.latents.numpy()) <= TOL
        plain = gen.generate(prompt_embeds=ctx, seed=2, output_type="latent", **FAST)
        assert rel_err(plain.latents, out.latents) > 1e-3


def test_typed_errors_say_what_to_pass(t2i_bundle, tmp_path):
    with far_sdk.Generator(t2i_bundle, backend="onnxruntime") as gen:
        with pytest.raises(InvalidArgumentError, match="prompt"):
            gen.generate([1, 2])
        with pytest.raises(InvalidArgumentError, match="exactly one"):
            gen.generate(prompt=["a one"], prompt_embeds=_ctx(0, 1))
        with pytest.raises(InvalidArgumentError, match=r"\[B, 8, 32\]"):
            gen.generate(prompt_embeds=np.zeros((1, 7, 32), np.float32))
        with pytest.raises(InvalidArgumentError, match="mask mode only"):
            gen.generate(prompt_embeds=_ctx(0, 1), mode="nomask")
        with pytest.raises(InvalidArgumentError, match=r"\[1, 8, 32\]"):
            gen.generate(prompt_embeds=_ctx(0, 1), negative_prompt_embeds=_ctx(0, 2))


def test_class_bundle_refuses_prompts():
    with far_sdk.Generator(ROOT / "engines" / "far-demo", backend="onnxruntime") as gen:
        with pytest.raises(InvalidArgumentError, match="class_labels"):
            gen.generate(prompt=["a seven"])


def test_official_t2i_checkpoint_loads_and_exports_without_a_config(t2i_far, tmp_path):
    from export.cli import main

    ckpt = tmp_path / "checkpoint-last.pth"
    save_official_checkpoint(ckpt, t2i_far)
    far = load_official_checkpoint(ckpt)  # no config: every shape from the weights
    assert isinstance(far, FART2I) and far.config.context_dim == 32
    torch.manual_seed(0)
    vae = tmp_path / "vae.ckpt"
    torch.save({"model": AutoencoderKL(VAE_CONFIGS[VAE]).state_dict()}, vae)
    out = tmp_path / "bundle"
    assert (
        main(
            [
                "-q",
                "onnx",
                "--checkpoint",
                str(ckpt),
                "--vae",
                str(vae),
                "--vae-config",
                VAE,
                "--out",
                str(out),
                "--no-validate",
            ]
        )
        == 0
    )
    with far_sdk.Generator(out, backend="onnxruntime") as gen:
        assert gen.bundle.conditioning == "text"
        ctx = _ctx(8, 1)
        got = gen.generate(prompt_embeds=ctx, seed=1, output_type="latent", **FAST)
        ref = sample_reference_t2i(far, torch.from_numpy(ctx), plan=got.plan, seed=1).numpy()
        assert rel_err(got.latents, ref) <= TOL
        with pytest.raises(InvalidArgumentError, match="prompt_embeds"):
            gen.generate(prompt=["a seven"])


def test_far_cli_generate_with_prompts(t2i_bundle, tmp_path, capsys):
    from far_sdk.cli.main import main

    out = tmp_path / "grid.png"
    assert (
        main(
            [
                "generate",
                "--bundle",
                str(t2i_bundle),
                "--prompt",
                "a seven",
                "--prompt",
                "please draw a 2",
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
    assert "2 prompts" in capsys.readouterr().out and out.is_file()
    assert (
        main(
            [
                "generate",
                "--bundle",
                str(t2i_bundle),
                "--class",
                "1",
                "--out",
                str(out),
                "--backend",
                "onnxruntime",
                "--no-progress",
            ]
        )
        == 2
    )
    assert "prompt" in capsys.readouterr().err
    assert main(["info", "--bundle", str(t2i_bundle)]) == 0
    assert "text: [8 tokens x 32] with a bundled text encoder" in capsys.readouterr().out


def test_t2i_demo_bundle_is_small_intact_and_prompts_it_torch_free(tmp_path):
    """engines/far-t2i-demo: <= 15 MB, files verified, prompt -> latents in a process where torch cannot be imported,
    equal to the torch backend's (PyTorch modules from the bundle's weights) given the same text hidden states."""
    import subprocess
    import sys

    bundle = ROOT / "engines" / "far-t2i-demo"
    assert sum(f.stat().st_size for f in bundle.iterdir()) <= 15 * 2**20
    far_sdk.Bundle.load(bundle, verify=True)
    out = tmp_path / "latents.npy"
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np, far_sdk\n"
        f"gen = far_sdk.Generator({str(bundle)!r}, backend='onnxruntime', threads=2)\n"
        "lat = gen.generate(prompt=['please draw a 5', 'a seven'], seed=0, output_type='latent').latents\n"
        f"np.save({str(out)!r}, lat)\n"
        "assert sys.modules['torch'] is None and 'training' not in sys.modules and 'export' not in sys.modules\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    from far_sdk.text import TextEncoder

    embeds = TextEncoder(far_sdk.Bundle.load(bundle)).encode(["please draw a 5", "a seven"])
    want = (
        far_sdk.Generator(bundle, backend="torch", device="cpu")
        .generate(prompt_embeds=embeds, seed=0, output_type="latent")
        .latents
    )  # the bundle's defaults (3 inner steps of a trained
    # model amplify float32 rounding 2e4-fold at t = 999: 5e-3 between backends there, 1e-6 at the default 15)
    assert rel_err(np.load(out), want) <= TOL


def test_tensorrt_backend_runs_a_text_bundle_on_the_simulator(t2i_bundle, tmp_path, monkeypatch):
    """Engines built for a T2I bundle (the transformer's context and null inputs validated against onnxruntime at
    build time) and the TensorRT backend's loop (simulated: tests/trt_sim.py) equal ONNX Runtime."""
    import shutil

    import trt_sim

    from export.trt_build import build_engines
    from far_sdk.backends.tensorrt.backend import TensorRTBackend

    bundle = tmp_path / "b"
    shutil.copytree(t2i_bundle, bundle)
    trt_sim.install(monkeypatch)
    build_engines(bundle, precision="fp32", batch=(1, 2, 2), progress=lambda m: None)
    embeds = np.random.default_rng(0).standard_normal((3, *_embeds_shape(bundle)), dtype=np.float32)
    with far_sdk.Generator(bundle, backend=TensorRTBackend(far_sdk.Bundle.load(bundle))) as gen:
        out = gen.generate(prompt_embeds=embeds, seed=3, output_type="latent")  # 3 images: split 2 + 1
        with far_sdk.Generator(bundle, backend="onnxruntime", threads=2) as ort_gen:
            ref = ort_gen.generate(prompt_embeds=embeds, seed=3, output_type="latent")
        assert rel_err(out.latents, ref.latents) < 1e-5
        gen.close()


def _embeds_shape(bundle) -> tuple[int, int]:
    text = far_sdk.Bundle.load(bundle).manifest["text"]
    return int(text["max_length"]), int(text["hidden_size"])
