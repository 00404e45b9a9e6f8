"""Train the committed demo bundle ``engines/far-demo`` from scratch on a CPU (reproducible).

Data: scikit-learn's bundled handwritten digits (training/demo_data.py), 80 % for training (the
held-out 20 % is only used by examples/evaluate_demo.py). Stages, each skipped when its output exists:

1. ``vae``: a digits-f2 KL autoencoder (32 x 32 x 3 -> 16 x 16 x 4) -> build/demo/vae.ckpt
2. ``latents``: ``--samples`` posterior samples per training image, times the latent scale -> build/demo/latents.npz
3. ``far``: FAR (far_demo preset) with far-train's loop -> build/demo/far/checkpoint-last.pth
4. ``export``: far-export's export_bundle -> engines/far-demo (EMA weights, id2label "0".."9")

    .venv/bin/python examples/train_demo.py            # all stages (times: engines/far-demo/README.md)
    .venv/bin/python examples/train_demo.py --stage far --far-steps 4000   # one stage (resumes from build/demo/far)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training import VAE_CONFIGS, load_official_checkpoint, load_official_vae  # noqa: E402
from training.data import LatentDataset, write_latents  # noqa: E402
from training.demo_data import DIGIT_LABELS, load_digits_images, split_indices  # noqa: E402
from training.train import TrainConfig, train  # noqa: E402
from training.vae_train import train_vae  # noqa: E402

VAE_CONFIG = "digits-f2"
MODEL = "far_demo"


def stage_vae(a, work: Path) -> None:
    x, y = load_digits_images(32)
    tr, _ = split_indices(y)
    t0 = time.time()
    scale = train_vae(
        VAE_CONFIG, x[tr], steps=a.vae_steps, lr=a.vae_lr, batch_size=32, out=work / "vae.ckpt", seed=a.seed
    )
    (work / "vae.json").write_text(
        json.dumps({"latent_scale": scale, "steps": a.vae_steps, "seconds": time.time() - t0})
    )
    print(f"vae: {a.vae_steps} steps in {time.time() - t0:.0f} s, latent scale {scale:.4f}")


@torch.no_grad()
def stage_latents(a, work: Path) -> None:
    vae = load_official_vae(work / "vae.ckpt", VAE_CONFIGS[VAE_CONFIG])
    scale = json.loads((work / "vae.json").read_text())["latent_scale"]
    x, y = load_digits_images(32)
    tr, _ = split_indices(y)
    gen = torch.Generator().manual_seed(a.seed)
    lat, lab = [], []
    post = vae.encode(x[tr])
    for _ in range(a.samples):
        lat.append((post.sample(generator=gen) * scale).numpy())
        lab.append(y[tr].numpy())
    lat, lab = np.concatenate(lat), np.concatenate(lab)
    rec = vae.decode(torch.from_numpy(lat[: len(tr)]) / scale)
    err = float((rec - x[tr]).abs().mean())
    write_latents(work / "latents.npz", lat, lab)
    print(f"latents: {lat.shape} (std {lat.std():.3f}), VAE reconstruction L1 on train images {err:.4f}")


def stage_far(a, work: Path) -> None:
    cfg = TrainConfig(
        model=MODEL,
        batch_size=a.batch,
        steps=a.far_steps,
        lr=a.far_lr,
        warmup_steps=100,
        ema_rate=a.ema,
        out_dir=str(work / "far"),
        save_every=500,
        log_every=50,
        seed=a.seed,
        diffusion_batch_mul=a.mul,
        high_t_fraction=a.high_t,
        resume=str(work / "far") if (work / "far" / "checkpoint-last.pth").exists() else None,
    )
    prev = json.loads((work / "far.json").read_text()) if cfg.resume and (work / "far.json").exists() else {}
    t0 = time.time()
    res = train(cfg, LatentDataset(work / "latents.npz"))
    hist = [tuple(h) for h in prev.get("history", [])] + [(s, round(loss, 4)) for s, loss, _ in res.history]
    seconds = prev.get("seconds", 0.0) + time.time() - t0  # a resumed run adds to the earlier time
    (work / "far.json").write_text(json.dumps({"steps": res.step, "seconds": seconds, "history": hist}))
    print(f"far: {res.step} steps in {seconds:.0f} s in all; loss {hist[0][1]} -> {hist[-1][1]}")


def stage_export(a, work: Path) -> None:
    from export.onnx_export import checkpoint_source, export_bundle

    far = load_official_checkpoint(work / "far" / "checkpoint-last.pth", use_ema=True)
    vae = load_official_vae(work / "vae.ckpt", VAE_CONFIGS[VAE_CONFIG])
    scale = json.loads((work / "vae.json").read_text())["latent_scale"]
    source = checkpoint_source(work / "far" / "checkpoint-last.pth", use_ema=True, vae=work / "vae.ckpt")
    export_bundle(
        far,
        vae,
        a.out,
        name="far-demo",
        latent_scale=scale,
        id2label=DIGIT_LABELS,
        overwrite=True,
        source=source,
        defaults={
            "num_steps": 10,
            "cfg": a.cfg,
            "cfg_schedule": "linear",
            "temperature": 1.0,
            "inner_steps": "frequency-aware",
            "filter": "spatial",
            "x0_clip": a.x0_clip,
        },
    )
    write_bundle_readme(a, work)
    print(f"export: {a.out}")


def write_bundle_readme(a, work: Path) -> None:
    """engines/far-demo/README.md from the recorded stage statistics (not part of the hashed manifest)."""
    vae, far = json.loads((work / "vae.json").read_text()), json.loads((work / "far.json").read_text())
    hist = far["history"]
    size = sum(f.stat().st_size for f in a.out.iterdir() if f.is_file())
    text = f"""# far-demo: FAR trained from scratch on scikit-learn's handwritten digits

A tiny class-conditional FAR (`far_demo` preset: D 96, 2 + 2 blocks, 4 heads, 8 buffer tokens, diffusion MLP
3 x 128; {far_params(work)} parameters) over 16 x 16 x 4 latents of a small KL autoencoder
(`digits-f2`: 32 x 32 RGB -> 16 x 16 x 4), so every FAR frequency level 0..15 is exercised. Classes: the digits
0-9 (`id2label` "0".."9"). Bundle size {size / 2**20:.1f} MiB.

## Data and license
`sklearn.datasets.load_digits` — 1,797 8 x 8 grey images bundled inside the scikit-learn package (no download):
the test set of the UCI "Optical Recognition of Handwritten Digits" data set (E. Alpaydin, C. Kaynak, 1998;
UCI: CC BY 4.0; scikit-learn: BSD-3-Clause). Scaled to [-1, 1], bicubically upsampled to 32 x 32, grey
repeated to RGB (`training/demo_data.py`). A fixed stratified 80/20 split (seed 0): 1,438 images train the
VAE and FAR, 359 are held out for `examples/evaluate_demo.py`.

## How it was trained (reproducible)
```
OMP_WAIT_POLICY=PASSIVE .venv/bin/python examples/train_demo.py     # the defaults are this run's settings
```
(equivalently: `--vae-steps {vae["steps"]} --far-steps {far["steps"]} --batch {a.batch} --far-lr {a.far_lr} --mul
{a.mul} --ema {a.ema} --high-t {a.high_t} --samples {a.samples} --seed {a.seed}`;
the VAE ran with 1 thread, FAR with 2; thread counts change results only at float32 rounding level)
stages (`examples/train_demo.py`, each skipped when its output exists; run on a 2-core x86-64 CPU, no GPU):
1. VAE: {vae["steps"]} steps, batch 32, AdamW lr {a.vae_lr} ({vae["seconds"] / 60:.1f} min); latent scale
   1/std = {vae["latent_scale"]:.4f}.
2. Latents: {a.samples} posterior samples per training image x the scale.
3. FAR: {far["steps"]} steps, batch {a.batch}, lr {a.far_lr} (100 warm-up steps, then constant), diffusion
   batch multiplier {a.mul}, EMA {a.ema}, {a.high_t:.0%} of diffusion rows with t in [950, 1000) (sharper eps at the
   noisiest steps), random level per batch, the paper's loss weight, label drop 0.1
   ({far["seconds"] / 60:.1f} min). Loss (mean of the last logging window): {hist[0][1]} at step {hist[0][0]} ->
   {hist[-1][1]} at step {hist[-1][0]}.
4. Export: EMA weights -> ONNX graphs validated against PyTorch, `weights.safetensors`, `manifest.json`.
   Sampling default `x0_clip` {a.x0_clip}: each step's x0 estimate is clamped to [-{a.x0_clip}, {a.x0_clip}] (the
   training latents reach |3.6|). A small model's eps error at t = 999 (~1e-2) becomes an x0 error of ~2e2
   (x 1/sqrt(alpha_bar_999) ~ 2e4) that unclipped sampling never recovers from; the official sampler does not
   clip (`x0_clip=False` reproduces it).

Generate: `far generate --bundle engines/far-demo --class 3 --class 7 -n 4 --out digits.png` or `make demo`.
Quality: `examples/evaluate_demo.py` (figures in docs/BENCHMARKS.md).
"""
    (a.out / "README.md").write_text(text)


def far_params(work: Path) -> str:
    m = load_official_checkpoint(work / "far" / "checkpoint-last.pth")
    return f"{sum(p.numel() for p in m.parameters()):,}"


STAGES = {"vae": stage_vae, "latents": stage_latents, "far": stage_far, "export": stage_export}
OUTPUTS = {"vae": "vae.ckpt", "latents": "latents.npz", "far": "far.json", "export": None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", choices=list(STAGES) + ["all"], default="all")
    ap.add_argument("--work", type=Path, default=ROOT / "build" / "demo")
    ap.add_argument("--out", type=Path, default=ROOT / "engines" / "far-demo")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vae-steps", type=int, default=1500)
    ap.add_argument("--vae-lr", type=float, default=1e-3)
    ap.add_argument("--samples", type=int, default=4, help="posterior samples per training image")
    ap.add_argument("--far-steps", type=int, default=2500)
    ap.add_argument("--far-lr", type=float, default=1.5e-3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--mul", type=int, default=2, help="diffusion batch multiplier")
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--high-t", type=float, default=0.15, help="TrainConfig.high_t_fraction (see far-train --help)")
    ap.add_argument("--cfg", type=float, default=3.0, help="default guidance scale recorded in the bundle")
    ap.add_argument(
        "--x0-clip",
        type=float,
        default=4.0,
        help="default x0 clip recorded in the bundle (training latents reach |3.6|; see README)",
    )
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if a.threads:
        torch.set_num_threads(a.threads)
    a.work.mkdir(parents=True, exist_ok=True)
    for name, fn in STAGES.items():
        if a.stage not in ("all", name):
            continue
        if a.stage == "all" and OUTPUTS[name] and (a.work / OUTPUTS[name]).exists():
            print(f"{name}: {a.work / OUTPUTS[name]} exists, skipped")
            continue
        fn(a, a.work)


if __name__ == "__main__":
    main()
