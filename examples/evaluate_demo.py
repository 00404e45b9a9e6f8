"""Quality check of the demo bundle: a digits classifier labels generated samples.

1. Train a small CNN on the demo's training split (the same split FAR was trained on) and report its
   held-out accuracy (the check only means something if this is >= 97 %).
2. For each sampling setting, generate ``--per-class`` images of every class with far_sdk, classify
   them, and report the class accuracy and the Fréchet distance between the classifier's penultimate
   features of the samples and of the held-out real images (lower is better; real-vs-real split halves
   give the noise floor, printed too).

    .venv/bin/python examples/evaluate_demo.py [--bundle engines/far-demo] [--per-class 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import far_sdk  # noqa: E402
from training.demo_data import load_digits_images, split_indices  # noqa: E402

SETTINGS = {
    "paper defaults (10 steps, frequency-aware 40..100, linear CFG 3)": {},
    "official inner steps (10 steps, 100 each)": {"inner_steps": "official"},
    "no CFG (cfg 1, constant)": {"cfg": 1.0, "cfg_schedule": "constant"},
    "4 outer steps": {"num_steps": 4},
    "6 outer steps": {"num_steps": 6},
    "16 outer steps": {"num_steps": 16},
}


class DigitNet(nn.Module):
    """A small CNN on 32 x 32 grey digits; ``features`` is the 128-d penultimate layer."""

    def __init__(self):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())

        self.body = nn.Sequential(
            block(1, 32), block(32, 32), nn.MaxPool2d(2),
            block(32, 64), block(64, 64), nn.MaxPool2d(2),
            block(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(128, 10))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _grey(x: torch.Tensor) -> torch.Tensor:
    return x.mean(1, keepdim=True) if x.shape[1] == 3 else x


def train_classifier(x: torch.Tensor, y: torch.Tensor, epochs: int = 30, seed: int = 0) -> DigitNet:
    """AdamW + cosine decay, per-image random shifts of up to 2 pixels (8 % of the side)."""
    torch.manual_seed(seed)
    net = DigitNet().train()
    steps = epochs * ((len(x) + 63) // 64)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    x = _grey(x)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            xb = F.pad(x[idx], (2, 2, 2, 2), value=-1.0)
            dx, dy = torch.randint(0, 5, (2, len(idx)), generator=gen)
            xb = torch.stack([im[:, a:a + 32, b:b + 32] for im, a, b in zip(xb, dy.tolist(), dx.tolist())])
            loss = F.cross_entropy(net(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return net.eval()


@torch.no_grad()
def classify(net: DigitNet, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    f = net.features(_grey(x))
    return net.head(f).argmax(1).numpy(), f.double().numpy()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2) (matrix square root via eigen-decomposition)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # (S_a S_b)^1/2 has the same trace as (S_a^1/2 S_b S_a^1/2)^1/2, which is symmetric PSD
    w, v = np.linalg.eigh(sa)
    ra = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = ra @ sb @ ra
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * tr_sqrt)


def images_to_tensor(u8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(u8.astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default=str(ROOT / "engines" / "far-demo"))
    ap.add_argument("--backend", default="onnxruntime")
    ap.add_argument("--per-class", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1000, help="first sample seed (the classifier uses 0)")
    ap.add_argument("--settings", default=None, help="comma-separated subset of setting indices (0-based)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    x, y = load_digits_images(32)
    tr, te = split_indices(y)
    t0 = time.time()
    net = train_classifier(x[tr], y[tr])
    pred, feat_real = classify(net, x[te])
    clf_acc = float((pred == y[te].numpy()).mean())
    half = len(te) // 2
    floor = frechet_distance(feat_real[:half], feat_real[half:])
    print(f"classifier: held-out accuracy {clf_acc:.4f} on {len(te)} images (trained in {time.time() - t0:.0f} s); "
          f"real-vs-real FD floor (two halves of held-out) {floor:.3f}")

    gen = far_sdk.Generator(a.bundle, backend=a.backend)
    labels = [c for c in range(10) for _ in range(a.per_class)]
    names = list(SETTINGS)
    chosen = [names[int(i)] for i in a.settings.split(",")] if a.settings else names
    rows = []
    for name in chosen:
        t0 = time.time()
        out = gen.generate(labels, seed=a.seed, output_type="np", **SETTINGS[name])
        dt = time.time() - t0
        p, f = classify(net, images_to_tensor(out.images))
        acc = float((p == np.array(labels)).mean())
        fd = frechet_distance(f, feat_real)
        rows.append({"setting": name, "accuracy": acc, "frechet_distance": fd, "images": len(labels),
                     "inner_steps_total": int(sum(out.plan.inner_steps)), "seconds": dt})
        print(f"{name:62s} accuracy {acc:.3f}  FD {fd:8.3f}  ({len(labels)} images, {sum(out.plan.inner_steps)} inner steps, {dt:.0f} s)")
    result = {"bundle": str(a.bundle), "backend": a.backend, "classifier_heldout_accuracy": clf_acc, "fd_floor": floor,
              "per_class": a.per_class, "seed": a.seed, "rows": rows}
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))
    print("\n| setting | class accuracy | Fréchet distance (classifier features) | inner steps | seconds |\n|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['setting']} | {r['accuracy']:.3f} | {r['frechet_distance']:.3f} | {r['inner_steps_total']} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
