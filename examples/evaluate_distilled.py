"""The distilled few-step denoiser on the demo bundle (issue 26): quality and ``far bench`` speed in one run.

Rows, same seeds for every row: the paper's 700-step schedule (the reference), the ``fast`` preset (150) and the
distilled student at 1, 2 and 4 inner steps per outer step (10, 20, 40 in all; ``preset="distilled"`` is 4).
Quality as examples/evaluate_demo.py measures it: the demo digits classifier's class accuracy on the samples and
the Fréchet distance between its penultimate features of the samples and of the held-out real images.

Criteria, stated before the run (``CRITERIA``): a distilled row passes when it runs <= 40 inner steps in all
(17x fewer than the paper's 700), its class accuracy is within 1 point of the reference's and its Fréchet
distance within 15 % of it. Then ``far bench`` (far_sdk.bench.protocol.run_benchmark: one warm-up, ``--iters``
timed runs, median) times every row at batch 1 and 8 in the same process and environment, and the speed-ups over
the paper schedule and over ``fast`` are printed.

    .venv/bin/python examples/evaluate_distilled.py [--bundle engines/far-demo] [--per-class 10] [--json out.json]
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
sys.path.insert(0, str(ROOT / "examples"))

from digit_classifier import cached_classifier, classify, default_cache_dir, frechet_distance, images_to_tensor  # noqa: E402, I001

import far_sdk  # noqa: E402
from far_sdk.options import SamplingOptions  # noqa: E402
from training.demo_data import load_digits_images, split_indices  # noqa: E402

ROWS: dict[str, tuple[str, dict]] = {
    "paper (DDPM 40..100, reference)": ("paper", {}),
    "fast preset (DDPM 15)": ("fast", {}),
    "distilled, 1 step": ("distilled", {"inner_steps": 1}),
    "distilled, 2 steps": ("distilled", {"inner_steps": 2}),
    "distilled, 4 steps (preset distilled)": ("distilled", {"inner_steps": 4}),
}
#: (most inner steps in all, accuracy points below the reference, Fréchet distance / reference)
CRITERIA = (40, 0.01, 1.15)


def check(row: dict, ref: dict) -> dict:
    steps, points, ratio = CRITERIA
    c = {
        "steps_ok": row["inner_steps_total"] <= steps,
        "accuracy_ok": row["accuracy"] >= ref["accuracy"] - points - 1e-12,
        "fd_ok": row["frechet_distance"] <= ratio * ref["frechet_distance"],
    }
    return {**c, "all_ok": all(c.values())}


def bench(bundle: str, batches: list[int], iters: int, rounds: int) -> dict[str, dict[int, float]]:
    """``far bench`` seconds per image of every row at every batch size (ONNX Runtime, one process): ``rounds``
    passes over all rows, each row's median of ``iters`` timed runs, then the median over rounds (a busy spell of a
    shared machine then hits one round of every row rather than every run of one row)."""
    from far_sdk.bench.protocol import run_benchmark

    per: dict[str, dict[int, list[float]]] = {name: {b: [] for b in batches} for name in ROWS}
    for _ in range(rounds):
        res = run_benchmark(
            bundle,
            backends=["onnxruntime"],
            batches=batches,
            warmup=1,
            iters=iters,
            settings=[(name, p, SamplingOptions(**kw) if kw else None) for name, (p, kw) in ROWS.items()],
            command="examples/evaluate_distilled.py",
        )
        for r in res.rows:
            per[r.setting][r.batch].append(r.per_image_s)
    return {name: {b: float(np.median(v)) for b, v in d.items()} for name, d in per.items()}


def quality_rows(a: argparse.Namespace) -> tuple[float, list[dict]]:
    """(the classifier's held-out accuracy, one row per setting: accuracy and Fréchet distance of the samples)."""
    x, y = load_digits_images(32)
    tr, te = split_indices(y)
    net, _cached = cached_classifier(x[tr], y[tr], Path(a.cache_dir) if a.cache_dir else None)
    pred, feat_real = classify(net, x[te])
    clf_acc = float((pred == y[te].numpy()).mean())
    print(f"classifier held-out accuracy {clf_acc:.4f}")
    labels = [c for c in range(10) for _ in range(a.per_class)]
    rows = []
    with far_sdk.Generator(a.bundle, backend="onnxruntime") as gen:
        for name, (preset, kw) in ROWS.items():
            t0 = time.time()
            out = gen.generate(labels, seed=a.seed, preset=preset, output_type="np", max_batch=a.max_batch, **kw)
            p, f = classify(net, images_to_tensor(out.images))
            row = {
                "setting": name,
                "preset": preset,
                "options": kw,
                "inner_sampler": out.plan.inner_sampler,
                "inner_steps_total": int(sum(out.plan.inner_steps)),
                "accuracy": float((p == np.array(labels)).mean()),
                "frechet_distance": frechet_distance(f, feat_real),
                "images": len(labels),
                "seconds": time.time() - t0,
            }
            rows.append(row)
            print(f"{name:40s} accuracy {row['accuracy']:.3f}  FD {row['frechet_distance']:7.3f}  "
                  f"({row['inner_steps_total']} inner steps, {row['seconds']:.0f} s)", flush=True)  # fmt: skip
    return clf_acc, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default=str(ROOT / "engines" / "far-demo"))
    ap.add_argument("--per-class", type=int, default=10, help="images per class (10 classes)")
    ap.add_argument("--seed", type=int, default=1000, help="first sample seed")
    ap.add_argument("--bench-batch", default="1,8", help="far bench batch sizes ('' = no bench)")
    ap.add_argument("--bench-iters", type=int, default=3)
    ap.add_argument("--bench-rounds", type=int, default=3, help="passes of far bench over all rows (median of them)")
    ap.add_argument(
        "--quality", action=argparse.BooleanOptionalAction, default=True, help="--no-quality: the far bench rows only"
    )
    ap.add_argument("--max-batch", type=int, default=25, help="images per backend call (does not change any image)")
    ap.add_argument("--cache-dir", default=str(default_cache_dir()), help="classifier cache ('' = no cache)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    steps, points, ratio = CRITERIA
    print(f"criteria: <= {steps} inner steps, accuracy within {points * 100:.0f} point of the reference, Fréchet "
          f"distance within {100 * (ratio - 1):.0f} %")  # fmt: skip
    if a.quality:
        clf_acc, rows = quality_rows(a)
    else:  # the quality rows of an earlier run of this script (its --json), re-timed
        if not a.json or not Path(a.json).is_file():
            raise SystemExit("--no-quality re-times the rows of an earlier run: give its --json file")
        old = json.loads(Path(a.json).read_text())
        clf_acc, rows = old["classifier_heldout_accuracy"], old["rows"]
    ref = rows[0]
    for r in rows[2:]:
        r["criteria"] = check(r, ref)
    batches = [int(b) for b in a.bench_batch.split(",") if b]
    timing = bench(a.bundle, batches, a.bench_iters, a.bench_rounds) if batches else {}
    for r in rows:
        r["bench_s_per_image"] = {str(b): s for b, s in timing.get(r["setting"], {}).items()}
    print("\n| setting | inner steps | class accuracy | Fréchet distance | FD / ref | criteria |"
          + "".join(f" batch {b}: s/image (vs paper, vs fast) |" for b in batches))  # fmt: skip
    print("|---|---:|---:|---:|---:|---|" + "---:|" * len(batches))
    for r in rows:
        crit = ("PASS" if r["criteria"]["all_ok"] else "fail") if "criteria" in r else "-"
        cells = [r["setting"], str(r["inner_steps_total"]), f"{r['accuracy']:.3f}", f"{r['frechet_distance']:.3f}",
                 f"{r['frechet_distance'] / ref['frechet_distance']:.2f}", crit]  # fmt: skip
        for b in batches:
            s = timing[r["setting"]][b]
            paper, fast = timing[rows[0]["setting"]][b], timing[rows[1]["setting"]][b]
            cells.append(f"{s:.3f} ({paper / s:.2f}x, {fast / s:.2f}x)")
        print("| " + " | ".join(cells) + " |")
    if a.json:
        Path(a.json).write_text(
            json.dumps(
                {
                    "bundle": a.bundle,
                    "backend": "onnxruntime",
                    "classifier_heldout_accuracy": clf_acc,
                    "per_class": a.per_class,
                    "seed": a.seed,
                    "criteria": dict(zip(("max_inner_steps", "accuracy_points", "fd_ratio"), CRITERIA)),
                    "bench": {"batches": batches, "warmup": 1, "iters": a.bench_iters, "rounds": a.bench_rounds},
                    "rows": rows,
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
