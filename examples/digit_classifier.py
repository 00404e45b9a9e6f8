"""The demo's quality yardstick: a small CNN that labels 32 x 32 digits (:class:`DigitNet`), trained once on the
demo's training split and cached (:func:`cached_classifier`), plus the classifier-feature Fréchet distance. Used by
``evaluate_demo.py``, ``evaluate_t2i_bundle.py`` and ``train_t2i_demo.py``."""

from __future__ import annotations

import hashlib
import io
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from far_sdk.fileio import atomic_write_bytes  # noqa: E402

#: Bump when DigitNet or train_classifier changes: part of the classifier cache key.
CLASSIFIER_RECIPE = "digitnet-v1-adamw-onecycle-30ep-shift2"


class DigitNet(nn.Module):
    """A small CNN on 32 x 32 grey digits; ``features`` is the 128-d penultimate layer."""

    def __init__(self):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())

        self.body = nn.Sequential(
            block(1, 32),
            block(32, 32),
            nn.MaxPool2d(2),
            block(32, 64),
            block(64, 64),
            nn.MaxPool2d(2),
            block(64, 128),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
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
            idx = perm[i : i + 64]
            xb = F.pad(x[idx], (2, 2, 2, 2), value=-1.0)
            dx, dy = torch.randint(0, 5, (2, len(idx)), generator=gen)
            xb = torch.stack([im[:, a : a + 32, b : b + 32] for im, a, b in zip(xb, dy.tolist(), dx.tolist())])
            loss = F.cross_entropy(net(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return net.eval()


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "far-sdk" / "evaluate_demo"


def cached_classifier(
    x: torch.Tensor, y: torch.Tensor, cache_dir: Path | None, epochs: int = 30, seed: int = 0
) -> tuple[DigitNet, bool]:
    """train_classifier(x, y), or its cached weights when the same data, recipe and torch version were
    trained before (``cache_dir`` None: always train). Returns (net in eval mode, whether it was cached)."""
    h = hashlib.sha256()
    for part in (
        x.numpy().tobytes(),
        y.numpy().tobytes(),
        f"{CLASSIFIER_RECIPE}|{epochs}|{seed}|{torch.__version__}".encode(),
    ):
        h.update(part)
    path = cache_dir / f"digitnet-{h.hexdigest()[:16]}.pt" if cache_dir is not None else None
    if path is not None and path.is_file():
        net = DigitNet()
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return net.eval(), True
    net = train_classifier(x, y, epochs=epochs, seed=seed)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        torch.save(net.state_dict(), buf)
        atomic_write_bytes(path, buf.getvalue())
    return net, False


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
