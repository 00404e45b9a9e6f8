"""Parity report: every backend against the PyTorch reference sampler, and the reference sampler
against the official code's trace. Prints a markdown table (figures for docs/BENCHMARKS.md).

    .venv/bin/python scripts/parity_report.py [--bundle engines/NAME]

Without --bundle a random-initialised far_tiny + kl16-tiny bundle is exported to a temp dir.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import far_sdk  # noqa: E402
from far_sdk.noise import ReplayNoise, SeededNoise  # noqa: E402
from far_sdk.options import SamplingOptions, resolve_plan  # noqa: E402
from training import load_official_checkpoint  # noqa: E402
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", default=None)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    tmp = None
    if a.bundle is None:
        from export.random_bundle import random_bundle

        tmp = tempfile.TemporaryDirectory()
        a.bundle = random_bundle(Path(tmp.name) / "tiny", "far_tiny", "kl16-tiny", seed=0, name="tiny-random")
    from training.bundle_io import load_bundle_models

    b = far_sdk.Bundle.load(a.bundle)
    far, _ = load_bundle_models(b)
    labels = list(range(min(4, b.num_classes)))
    rows = list(official_rows())
    gens = {name: far_sdk.Generator(b, backend=name) for name in ("onnxruntime", "torch")}
    for plan_name, plan in (("paper defaults (10 steps, frequency-aware 40..100)", {}),
                            ("official (10 steps, 100 inner)", {"inner_steps": 100}),
                            ("DDIM eta 0 (10 steps, 15 inner)", {"inner_sampler": "ddim", "eta": 0.0, "inner_steps": 15}),
                            ("DDIM eta 1 (10 steps, 15 inner)", {"inner_sampler": "ddim", "eta": 1.0, "inner_steps": 15})):
        resolved = resolve_plan(b.defaults, SamplingOptions(**plan))  # the bundle's defaults (cfg, x0_clip, ...) + plan
        ref = sample_reference(far, labels, noise=SeededNoise.from_seed(a.seed, len(labels)), plan=resolved).numpy()
        for name, g in gens.items():
            out = g.generate(labels, seed=a.seed, output_type="latent", **plan)
            rows.append((f"{name} vs reference, {plan_name}, batch {len(labels)}", errs(out.latents, ref)))
    print(f"bundle: {b.path} ({b.name})\n")
    print("| comparison | max abs | max abs / max abs(ref) | max abs(ref) |\n|---|---:|---:|---:|")
    for name, (d, r, s) in rows:
        print(f"| {name} | {d:.3g} | {r:.3g} | {s:.3g} |")


if __name__ == "__main__":
    main()
