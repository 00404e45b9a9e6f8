"""Image-to-image on the demo bundle: the trade-off curve between keeping the input and following the class label.

Held-out real digits (the split FAR never trained on, ``--per-class`` of each class) are encoded by the bundle's
vae_encoder and sampled from each start level K (``generate(image=..., start_level=K)``; 0 = from scratch, the
plan's num_steps = the encoded input decoded back) twice, with the same seeds:

- **own class**: the requested class is the input's. ``kept`` = the share the demo classifier
  (examples/digit_classifier.py) still labels as the input's class; ``L1 own`` = mean |output - input| on the
  [0, 1] pixel scale. At K = 0 the outputs are unrelated samples of the input's class: their distance is the
  "unrelated samples" baseline.
- **other class**: the requested class is (input's + 5) mod 10. ``reached`` = the share labelled as the requested
  class; ``L1 other`` as above.

    .venv/bin/python examples/evaluate_img2img.py --per-class 5 --markdown [--json docs/demo_img2img.json]
    .venv/bin/python examples/evaluate_img2img.py --figure docs/images/img2img.png --per-class 0
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import far_sdk  # noqa: E402
from training.demo_data import load_digits_images, split_indices  # noqa: E402

sys.path.insert(0, str(ROOT / "examples"))
from digit_classifier import cached_classifier, classify, default_cache_dir, images_to_tensor  # noqa: E402

LEVELS = (0, 1, 2, 3, 5, 7, 9, 10)


def to_u8(x) -> np.ndarray:
    """[N, 3, H, W] in [-1, 1] -> uint8 [N, H, W, 3]."""
    return np.clip(np.round((x.numpy().transpose(0, 2, 3, 1) + 1) * 127.5), 0, 255).astype(np.uint8)


def held_out(per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``per_class`` held-out digits of each class: uint8 [N, 32, 32, 3], labels [N]."""
    x, y = load_digits_images(32)
    _, te = split_indices(y)
    pick = np.concatenate([te[y[te].numpy() == c][:per_class] for c in range(10)])
    return to_u8(x[pick]), y[pick].numpy()


def evaluate(gen, net, u8, y, levels, seed: int, preset: str, max_batch: int, which=("own", "other"), **opts):
    rows = []
    target = (y + 5) % 10
    for k in levels:
        row = {"start_level": k, **opts}
        t0 = time.time()
        for name, labels in (("own", y), ("other", target)):
            if name not in which:
                continue
            kw = {} if k == 0 else {"image": list(u8), "start_level": k}
            out = gen.generate(
                [int(c) for c in labels], seed=seed, preset=preset, output_type="np", max_batch=max_batch, **kw, **opts
            )
            pred, _ = classify(net, images_to_tensor(out.images))
            row["kept" if name == "own" else "reached"] = float((pred == labels).mean())
            row[f"l1_{name}"] = float(np.abs(out.images.astype(np.float64) - u8).mean() / 255)
        row["seconds"] = time.time() - t0
        row["plan_level"] = out.plan.levels[k] if k < out.plan.num_steps else 16
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def markdown(rows: list[dict], num_steps: int) -> str:
    lines = [
        "| start level K | strength | level seen | kept (own class) | L1 own | reached (other class) | L1 other |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        k = r["start_level"]
        if "kept" not in r or "reached" not in r:
            continue
        lines.append(
            f"| {k} | {1 - k / num_steps:.1f} | {r['plan_level'] if 0 < k < num_steps else ('-' if k == 0 else 'all')} "
            f"| {r['kept']:.3f} | {r['l1_own']:.4f} | {r['reached']:.3f} | {r['l1_other']:.4f} |"
        )
    return "\n".join(lines)


def figure(gen, path: str, seed: int, preset: str) -> None:
    """Rows: a held-out digit, then outputs from start levels 2, 5, 8 with its own class and two other classes."""
    from PIL import Image

    u8, y = held_out(1)
    rows = []
    for i in (0, 3, 7):  # digits 0, 3, 7
        cells = [Image.fromarray(u8[i])]
        for c in (int(y[i]), (int(y[i]) + 5) % 10, (int(y[i]) + 8) % 10):
            for k in (2, 5, 8):
                cells.append(gen.generate([c], seed=seed, image=u8[i], start_level=k, preset=preset).images[0])
        rows.append(cells)
    grid = far_sdk.make_image_grid([c for r in rows for c in r], cols=len(rows[0]), scale=3)
    grid.save(path)
    print(f"figure: {path} (columns: input; own class from K = 2, 5, 8; class +5 from K = 2, 5, 8; class +8 ...)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default=str(ROOT / "engines" / "far-demo"))
    ap.add_argument("--backend", default="onnxruntime")
    ap.add_argument("--per-class", type=int, default=5)
    ap.add_argument("--levels", default=",".join(map(str, LEVELS)))
    ap.add_argument("--seed", type=int, default=2000)
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--max-batch", type=int, default=25)
    ap.add_argument("--cache-dir", default=str(default_cache_dir()), help="classifier cache ('' = no cache)")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--figure", default=None, help="also write the picture grid here (PNG)")
    ap.add_argument("--which", default="own,other", help="which halves to run: own, other or both")
    ap.add_argument("--cfg", type=float, default=None, help="CFG scale for every run (default: the preset's)")
    a = ap.parse_args()
    gen = far_sdk.Generator(a.bundle, backend=a.backend)
    if a.figure:
        figure(gen, a.figure, a.seed, a.preset)
    if a.per_class <= 0:
        return
    x, y = load_digits_images(32)
    tr, _ = split_indices(y)
    net, _ = cached_classifier(x[tr], y[tr], Path(a.cache_dir) if a.cache_dir else None)
    u8, labels = held_out(a.per_class)
    own, _ = classify(net, images_to_tensor(u8))
    print(f"{len(u8)} held-out digits; the classifier labels {float((own == labels).mean()):.3f} of the inputs right")
    levels = [int(v) for v in a.levels.split(",")]
    opts = {} if a.cfg is None else {"cfg": a.cfg}
    rows = evaluate(gen, net, u8, labels, levels, a.seed, a.preset, a.max_batch, a.which.split(","), **opts)
    num_steps = gen.plan(preset=a.preset).num_steps
    if a.markdown:
        print(markdown(rows, num_steps))
    if a.json:
        Path(a.json).write_text(json.dumps({"per_class": a.per_class, "preset": a.preset, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
