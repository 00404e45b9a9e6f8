"""Held-out prompt accuracy of a FAR-T2I bundle through the torch-free runtime (issue 13's T2I demo figure).

Every held-out paraphrase of training/demo_t2i.py (5 per digit, never seen in training) -> ``--per-prompt`` images
by ``far_sdk.Generator(bundle).generate(prompt=[caption] * n)`` (the bundle's ONNX text encoder and defaults) ->
the demo's digit classifier (examples/evaluate_demo.py, cached); per-prompt, per-digit and overall accuracy.

    .venv/bin/python examples/evaluate_t2i_bundle.py --bundle engines/far-t2i-demo --per-prompt 20
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

import far_sdk  # noqa: E402
from training.demo_data import load_digits_images, split_indices  # noqa: E402
from training.demo_t2i import held_out_captions  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=ROOT / "engines" / "far-t2i-demo")
    ap.add_argument("--backend", default="onnxruntime")
    ap.add_argument("--per-prompt", type=int, default=20)
    ap.add_argument("--prompts", type=int, default=None, help="only this many held-out prompts, spread evenly")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    a = ap.parse_args()
    from digit_classifier import cached_classifier, classify, default_cache_dir

    torch.set_num_threads(a.threads)
    x, y = load_digits_images(32)
    tr, _ = split_indices(y)
    net, _ = cached_classifier(x[tr], y[tr], default_cache_dir())
    caps, labels = held_out_captions()
    if a.prompts:
        keep = np.arange(len(caps))[:: max(1, len(caps) // a.prompts)][: a.prompts]
        caps, labels = [caps[i] for i in keep], labels[keep]
    gen = far_sdk.Generator(a.bundle, backend=a.backend, threads=a.threads)
    rows, t0 = [], time.time()
    for i, (cap, digit) in enumerate(zip(caps, labels)):
        out = gen.generate(prompt=[cap] * a.per_prompt, seed=a.seed + 1000 * i, output_type="np")
        img = torch.from_numpy(out.images.astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2)
        pred, _ = classify(net, img)
        rows.append(
            {
                "prompt": cap,
                "digit": int(digit),
                "accuracy": float((pred == digit).mean()),
                "predicted": np.bincount(pred, minlength=10).tolist(),
            }
        )
        print(f"  {cap!r}: {rows[-1]['accuracy']:.2f}", flush=True)
    per_digit = {
        str(d): float(np.mean([r["accuracy"] for r in rows if r["digit"] == d]))
        for d in sorted({r["digit"] for r in rows})
    }
    acc = float(np.mean([r["accuracy"] for r in rows]))
    res = {
        "bundle": a.bundle.name,
        "backend": a.backend,
        "accuracy": acc,
        "per_digit": per_digit,
        "prompts": len(rows),
        "per_prompt": a.per_prompt,
        "plan": {"levels": list(out.plan.levels), "inner_steps": list(out.plan.inner_steps)},
        "seconds": time.time() - t0,
        "rows": rows,
    }
    if a.out:
        a.out.write_text(json.dumps(res, indent=1))
    print("per digit: " + "  ".join(f"{d}: {v:.2f}" for d, v in per_digit.items()))
    print(
        f"held-out paraphrase accuracy {acc:.3f} over {len(rows)} prompts x {a.per_prompt} images "
        f"({time.time() - t0:.0f} s)"
    )


if __name__ == "__main__":
    main()
