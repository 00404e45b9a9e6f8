"""Parity report: every backend against the PyTorch reference sampler, and the reference sampler
against the official code's trace. Prints a markdown table (figures for docs/BENCHMARKS.md).

    .venv/bin/python scripts/parity_report.py [--bundle engines/NAME] [--mask-only]

Without --bundle a random-initialised far_tiny + kl16-tiny bundle is exported to a temp dir. Mask mode:
the official fixture's checkpoint is exported as a mask=True bundle and the official ``sample_tokens_mask``
trace is replayed through each backend (``--mask-only``: just these rows).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import far_sdk  # noqa: E402
from far_sdk.maths.noise import ReplayNoise, SeededNoise  # noqa: E402
from far_sdk.options import SamplingOptions, resolve_plan  # noqa: E402
from training import FAR, load_official_checkpoint  # noqa: E402
from training.sampler import sample_reference  # noqa: E402


def errs(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    d = np.abs(a - b).max()
    return d, d / np.abs(b).max(), np.abs(b).max()


def official_rows():
    fx = ROOT / "tests" / "fixtures" / "official-tiny"
    ref = dict(np.load(fx / "reference.npz"))
    m = load_official_checkpoint(fx / "checkpoint-last.pth", config="far_parity_tiny")
    draws = []
    for s in range(10):
        draws.append(ref["noise_x_T"][s][None])
        draws += [ref["noise_steps"][s, k][None] for k in range(10)]
    out = sample_reference(m, [3], noise=ReplayNoise(draws), inner_steps=10, cfg=3.0).numpy()
    yield "reference sampler vs official `sample_tokens_nomask` (replayed draws)", errs(out, ref["final"])


def _mask_draws(ref):
    draws = []
    for s in range(11):
        draws.append(ref["mask_noise_x_T"][s][None])
        draws += [ref["mask_noise_steps"][s, k][None] for k in range(10)]
    return draws


def official_mask_rows(tmp: Path):
    """Mask mode: the reference sampler and each backend (replaying the official draws and orders) vs the official
    trace."""
    import dataclasses

    from export.onnx_export import export_bundle
    from training import VAE_CONFIGS, AutoencoderKL

    fx = ROOT / "tests" / "fixtures" / "official-tiny"
    ref = dict(np.load(fx / "reference.npz"))
    m = load_official_checkpoint(fx / "checkpoint-last.pth", config="far_parity_tiny")
    far = FAR(dataclasses.replace(m.config, mask=True)).eval()  # the same weights, built for masking
    far.load_state_dict(m.state_dict())
    opts = dict(inner_steps=10, cfg=3.0, mode="mask")
    out = sample_reference(far, [3], noise=ReplayNoise(_mask_draws(ref), ref["mask_orders"]), **opts).numpy()
    yield "reference sampler vs official `sample_tokens_mask` (replayed draws and orders)", errs(out, ref["mask_final"])
    torch.manual_seed(0)
    bundle = export_bundle(
        far, AutoencoderKL(VAE_CONFIGS["kl16-tiny"]).eval(), tmp / "official-mask", name="official-tiny-mask"
    )
    for name in ("onnxruntime", "torch"):
        g = far_sdk.Generator(bundle, backend=name)
        got = g.generate(
            [3], noise=ReplayNoise(_mask_draws(ref), ref["mask_orders"]), output_type="latent", **opts
        ).latents
        yield (
            f"{name} vs official `sample_tokens_mask` (replayed draws and orders, mask=True bundle)",
            errs(got, ref["mask_final"]),
        )
        yield f"{name} vs reference sampler, mask mode (same replay)", errs(got, out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mask-only", action="store_true", help="only the mask-mode rows against the official trace")
    a = ap.parse_args()
    if a.mask_only:
        with tempfile.TemporaryDirectory() as d:
            _print_rows(list(official_mask_rows(Path(d))))
        return
    tmp = None
    if a.bundle is None:
        from export.random_bundle import random_bundle

        tmp = tempfile.TemporaryDirectory()
        a.bundle = random_bundle(Path(tmp.name) / "tiny", "far_tiny", "kl16-tiny", seed=0, name="tiny-random")
    from training.from_bundle import load_bundle_models

    b = far_sdk.Bundle.load(a.bundle)
    far, _ = load_bundle_models(b)
    labels = list(range(min(4, b.num_classes)))
    mask_dir = tempfile.TemporaryDirectory()
    rows = list(official_rows()) + list(official_mask_rows(Path(mask_dir.name)))
    gens = {name: far_sdk.Generator(b, backend=name) for name in ("onnxruntime", "torch")}
    for plan_name, plan in (
        ("paper defaults (10 steps, frequency-aware 40..100)", {}),
        ("official (10 steps, 100 inner)", {"inner_steps": 100}),
        ("DDIM eta 0 (10 steps, 15 inner)", {"inner_sampler": "ddim", "eta": 0.0, "inner_steps": 15}),
        ("DDIM eta 1 (10 steps, 15 inner)", {"inner_sampler": "ddim", "eta": 1.0, "inner_steps": 15}),
    ):
        resolved = resolve_plan(b.defaults, SamplingOptions(**plan))  # the bundle's defaults (cfg, x0_clip, ...) + plan
        ref = sample_reference(far, labels, noise=SeededNoise.from_seed(a.seed, len(labels)), plan=resolved).numpy()
        for name, g in gens.items():
            out = g.generate(labels, seed=a.seed, output_type="latent", **plan)
            rows.append((f"{name} vs reference, {plan_name}, batch {len(labels)}", errs(out.latents, ref)))
    print(f"bundle: {b.path} ({b.name})\n")
    _print_rows(rows)


def _print_rows(rows) -> None:
    print("| comparison | max abs | max abs / max abs(ref) | max abs(ref) |\n|---|---:|---:|---:|")
    for name, (d, r, s) in rows:
        print(f"| {name} | {d:.3g} | {r:.3g} | {s:.3g} |")


if __name__ == "__main__":
    main()
