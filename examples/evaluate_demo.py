"""Quality check of the demo bundle: a digits classifier labels generated samples.

1. Train a small CNN on the demo's training split (the same split FAR was trained on) and report its
   held-out accuracy (the check only means something if this is >= 97 %). The trained classifier is
   cached (``--cache-dir``, keyed by its data, recipe and torch version), so a rerun skips the training.
2. For each sampling setting of the chosen ``--table``, generate ``--per-class`` images of every class
   with far_sdk (same seeds for every setting), classify them, and report the class accuracy and the
   Fréchet distance between the classifier's penultimate features of the samples and of the held-out
   real images (lower is better; real-vs-real split halves give the noise floor, printed too).
3. ``--bench`` (default on for the inner-samplers table): time every setting with ``far bench``'s
   protocol in the same run (far_sdk.bench.protocol.run_benchmark: ``--bench-batch`` images, 1 warm-up,
   ``--bench-iters`` timed runs, median; ``--bench-rounds`` passes over all settings, median of those)
   and report seconds per image and the speed-up over the table's first (reference) row.

Tables: "settings" (outer steps, CFG, inner-step schedules), "modes" (no-mask vs mask mode, paper and
fast inner steps; ``--mode`` instead sets the mode of every row of another table) and "inner-samplers" (DDPM at
the paper schedule vs DDIM at eta 0 and 1 with 5, 10, 20 and 50 steps per outer step, and the fast preset;
the fast-setting criteria, >= 4x fewer inner steps than the reference with class accuracy within
1 point and Fréchet distance within 15 %, are checked and printed).

    .venv/bin/python examples/evaluate_demo.py [--bundle engines/far-demo] [--per-class 20] [--json out.json]
    .venv/bin/python examples/evaluate_demo.py --table inner-samplers --per-class 20 --markdown
    .venv/bin/python examples/evaluate_demo.py --table modes --per-class 20 --markdown
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
from far_sdk.options import PRESETS, SamplingOptions  # noqa: E402
from training.demo_data import load_digits_images, split_indices  # noqa: E402

sys.path.insert(0, str(ROOT / "examples"))
from digit_classifier import cached_classifier, classify, default_cache_dir, frechet_distance, images_to_tensor  # noqa: E402

SETTINGS = {
    "paper defaults (10 steps, frequency-aware 40..100, linear CFG 3)": {},
    "official inner steps (10 steps, 100 each)": {"inner_steps": "official"},
    "no CFG (cfg 1, constant)": {"cfg": 1.0, "cfg_schedule": "constant"},
    "4 outer steps": {"num_steps": 4},
    "6 outer steps": {"num_steps": 6},
    "16 outer steps": {"num_steps": 16},
}

_FAST = PRESETS["fast"]
INNER_SAMPLER_SETTINGS = {
    "DDPM, paper schedule 40..100 (reference)": {"preset": "paper"},
    f"fast preset ({_FAST.inner_sampler.upper()}, {_FAST.inner_steps} per outer step)": {"preset": "fast"},
    "DDPM, 10 per outer step": {"inner_sampler": "ddpm", "inner_steps": 10},
    **{
        f"DDIM eta {eta:g}, {n} per outer step": {"inner_sampler": "ddim", "eta": eta, "inner_steps": n}
        for eta, counts in ((0.0, (5, 10, 15, 20, 50)), (1.0, (5, 10, 20, 50)))
        for n in counts
    },
}
#: No-mask vs mask mode (the official sample_tokens_mask: 11 outer steps, tokens unmasked in a seeded random
#: order; on the demo, built with mask=False, its transformer sees the masked tokens as zeros, as the official one
#: does).
MODE_SETTINGS = {
    "no-mask, paper defaults (10 steps, 40..100)": {"mode": "nomask"},
    "mask mode, paper defaults (11 steps, 40..100)": {"mode": "mask"},
    f"no-mask, fast preset ({_FAST.inner_steps} per outer step)": {"mode": "nomask", "preset": "fast"},
    f"mask mode, fast preset ({_FAST.inner_steps} per outer step)": {"mode": "mask", "preset": "fast"},
}
TABLES = {"settings": SETTINGS, "inner-samplers": INNER_SAMPLER_SETTINGS, "modes": MODE_SETTINGS}
#: The fast-setting criteria of the inner-samplers table, against its first (reference) row.
FAST_STEP_RATIO, FAST_ACC_POINTS, FAST_FD_RATIO = 4.0, 0.01, 1.15


def bench_seconds_per_image(
    bundle: str, backend: str, settings: dict[str, dict], batch: int, iters: int, rounds: int
) -> dict[str, float]:
    """``far bench`` (far_sdk.bench.protocol.run_benchmark) over every setting, ``rounds`` times in turn: the median
    over rounds of each setting's median seconds per image (a shared machine's busy spell then hits one
    round of every setting, not every iteration of one setting)."""
    from far_sdk.bench.protocol import run_benchmark

    per: dict[str, list[float]] = {name: [] for name in settings}
    for _ in range(rounds):
        res = run_benchmark(
            bundle,
            backends=[backend],
            batches=[batch],
            warmup=1,
            iters=iters,
            settings=[
                (name, opts.get("preset"), SamplingOptions(**{k: v for k, v in opts.items() if k != "preset"}))
                for name, opts in settings.items()
            ],
        )
        for r in res.rows:
            per[r.setting].append(r.per_image_s)
    return {name: float(np.median(v)) for name, v in per.items()}


def fast_setting_checks(rows: list[dict]) -> list[dict]:
    """Per row: does it meet the fast-setting criteria against rows[0] (the reference)?"""
    ref = rows[0]
    out = []
    for r in rows[1:]:
        steps_ok = FAST_STEP_RATIO * r["inner_steps_total"] <= ref["inner_steps_total"]
        acc_ok = r["accuracy"] >= ref["accuracy"] - FAST_ACC_POINTS - 1e-12
        fd_ok = r["frechet_distance"] <= FAST_FD_RATIO * ref["frechet_distance"]
        out.append(
            {
                "setting": r["setting"],
                "steps_ok": steps_ok,
                "accuracy_ok": acc_ok,
                "fd_ok": fd_ok,
                "all_ok": steps_ok and acc_ok and fd_ok,
            }
        )
    return out


def markdown_table(rows: list[dict]) -> str:
    ref = rows[0]
    timed = all(r.get("bench_s_per_image") is not None for r in rows)
    head = (
        "| setting | inner sampler | inner steps (per outer step) | total inner steps | class accuracy | Fréchet "
        "distance "
        "| FD / reference |" + (" `far bench` s/image | speed-up |" if timed else " generation seconds |")
    )
    lines = [head, "|" + "---|" * 3 + "---:|" * (6 if timed else 5)]
    for r in rows:
        sampler = r["inner_sampler"] + (f" eta {r['eta']:g}" if r["inner_sampler"] == "ddim" else "")
        per = r["inner_steps"]
        per_s = str(per[0]) if len(set(per)) == 1 else f"{per[0]}..{per[-1]}"
        cells = [
            r["setting"],
            sampler,
            per_s,
            str(r["inner_steps_total"]),
            f"{r['accuracy']:.3f}",
            f"{r['frechet_distance']:.3f}",
            f"{r['frechet_distance'] / ref['frechet_distance']:.2f}",
        ]
        if timed:
            cells += [f"{r['bench_s_per_image']:.3f}", f"{ref['bench_s_per_image'] / r['bench_s_per_image']:.2f}x"]
        else:
            cells.append(f"{r['seconds']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default=str(ROOT / "engines" / "far-demo"))
    ap.add_argument("--backend", default="onnxruntime")
    ap.add_argument(
        "--precision", choices=["fp32", "bf16", "fp16"], default=None, help="torch backend: network precision"
    )
    ap.add_argument("--compile", action="store_true", help="torch backend: compile the denoiser step (torch.compile)")
    ap.add_argument("--table", choices=sorted(TABLES), default="settings")
    ap.add_argument("--per-class", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1000, help="first sample seed (the classifier uses 0)")
    ap.add_argument(
        "--mode",
        choices=["nomask", "mask"],
        default=None,
        help="sampling mode for every setting of the table (default: each setting's own, else the bundle's)",
    )
    ap.add_argument(
        "--settings", default=None, help="comma-separated subset of setting indices (0-based; keep 0, the reference)"
    )
    ap.add_argument(
        "--bench",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="time each setting with far bench in the same run (default: on for --table inner-samplers)",
    )
    ap.add_argument("--bench-batch", type=int, default=1)
    ap.add_argument("--bench-iters", type=int, default=3)
    ap.add_argument(
        "--bench-rounds", type=int, default=3, help="far bench passes over all settings (median of the rounds)"
    )
    ap.add_argument(
        "--max-batch", type=int, default=25, help="images per backend call while sampling (does not change any image)"
    )
    ap.add_argument("--cache-dir", default=str(default_cache_dir()), help="classifier cache ('' = no cache)")
    ap.add_argument("--markdown", action="store_true", help="print the table as Markdown (docs/BENCHMARKS.md)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    table = TABLES[a.table]
    if a.mode is not None:
        table = {
            (f"{k} [{a.mode}]" if v.get("mode", a.mode) == a.mode else k): {**v, "mode": a.mode}
            for k, v in table.items()
        }
    bench = a.bench if a.bench is not None else a.table == "inner-samplers"

    x, y = load_digits_images(32)
    tr, te = split_indices(y)
    t0 = time.time()
    net, cached = cached_classifier(x[tr], y[tr], Path(a.cache_dir) if a.cache_dir else None)
    pred, feat_real = classify(net, x[te])
    clf_acc = float((pred == y[te].numpy()).mean())
    half = len(te) // 2
    floor = frechet_distance(feat_real[:half], feat_real[half:])
    print(
        f"classifier: held-out accuracy {clf_acc:.4f} on {len(te)} images ({'cached' if cached else 'trained'} in "
        f"{time.time() - t0:.1f} s); "
        f"real-vs-real FD floor (two halves of held-out) {floor:.3f}"
    )

    opts = {k: v for k, v in (("precision", a.precision), ("compile", True if a.compile else None)) if v is not None}
    gen = far_sdk.Generator(a.bundle, backend=a.backend, **opts)
    labels = [c for c in range(10) for _ in range(a.per_class)]
    names = list(table)
    chosen = [names[int(i)] for i in a.settings.split(",")] if a.settings else names
    rows = []
    for name in chosen:
        t0 = time.time()
        out = gen.generate(labels, seed=a.seed, output_type="np", max_batch=a.max_batch, **table[name])
        dt = time.time() - t0
        p, f = classify(net, images_to_tensor(out.images))
        acc = float((p == np.array(labels)).mean())
        fd = frechet_distance(f, feat_real)
        plan = out.plan
        rows.append(
            {
                "setting": name,
                "options": table[name],
                "mode": plan.mode,
                "levels": list(plan.levels),
                "inner_sampler": plan.inner_sampler,
                "eta": plan.eta,
                "inner_steps": list(plan.inner_steps),
                "accuracy": acc,
                "frechet_distance": fd,
                "images": len(labels),
                "inner_steps_total": int(sum(plan.inner_steps)),
                "seconds": dt,
            }
        )
        print(
            f"{name:62s} accuracy {acc:.3f}  FD {fd:8.3f}  ({len(labels)} images, {sum(plan.inner_steps)} inner "
            f"steps, {dt:.0f} s)",
            flush=True,
        )
    gen.close()
    if bench:
        print(
            f"far bench: {a.backend}, batch {a.bench_batch}, {a.bench_rounds} rounds of 1 warm-up + {a.bench_iters} "
            "timed runs "
            "per setting ...",
            flush=True,
        )
        per_image = bench_seconds_per_image(
            a.bundle, a.backend, {n: table[n] for n in chosen}, a.bench_batch, a.bench_iters, a.bench_rounds
        )
        for r in rows:
            r["bench_s_per_image"] = per_image[r["setting"]]
    result = {
        "bundle": str(a.bundle),
        "backend": a.backend,
        "backend_options": opts,
        "table": a.table,
        "classifier_heldout_accuracy": clf_acc,
        "fd_floor": floor,
        "per_class": a.per_class,
        "seed": a.seed,
        "bench": {"batch": a.bench_batch, "iters": a.bench_iters, "warmup": 1, "rounds": a.bench_rounds}
        if bench
        else None,
        "rows": rows,
    }
    if a.table == "inner-samplers":
        result["fast_setting_checks"] = fast_setting_checks(rows)
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2) + "\n")
    print()
    if a.markdown:
        print(markdown_table(rows))
    else:
        for r in rows:
            t = f"  {r['bench_s_per_image']:.3f} s/image" if bench else ""
            print(
                f"{r['setting']:62s} {r['accuracy']:.3f}  FD {r['frechet_distance']:7.3f}  "
                f"{r['inner_steps_total']:5d} inner steps{t}"
            )
    if a.table == "inner-samplers":
        ref = rows[0]
        print(
            f"\nfast-setting criteria vs '{ref['setting']}': <= {ref['inner_steps_total'] / FAST_STEP_RATIO:.0f} "
            "inner steps, "
            f"accuracy >= {ref['accuracy'] - FAST_ACC_POINTS:.3f}, FD <= {FAST_FD_RATIO * ref['frechet_distance']:.3f}"
        )
        for c in result["fast_setting_checks"]:
            print(
                f"  {'PASS' if c['all_ok'] else 'fail'}  {c['setting']}  (steps {'ok' if c['steps_ok'] else 'no'}, "
                f"accuracy {'ok' if c['accuracy_ok'] else 'no'}, FD {'ok' if c['fd_ok'] else 'no'})"
            )


if __name__ == "__main__":
    main()
