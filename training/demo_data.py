"""The demo dataset: scikit-learn's bundled handwritten digits (no download).

``sklearn.datasets.load_digits`` ships inside the scikit-learn package: 1,797 grey-scale 8 x 8
images of the digits 0-9 (the test set of the UCI "Optical Recognition of Handwritten Digits"
data, E. Alpaydin and C. Kaynak, 1998; UCI lists it under CC BY 4.0; scikit-learn is BSD-3).
We scale the 0..16 intensities to [-1, 1], upsample bicubically to ``size`` x ``size`` and repeat
the grey channel to RGB, so a VAE with downsampling factor ``size / 16`` gives a 16 x 16 latent
grid and every FAR frequency level is exercised.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from far_sdk.errors import ConfigError

DIGIT_LABELS = {i: str(i) for i in range(10)}


def load_digits_images(size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as float32 [N, 3, size, size] in [-1, 1] and int64 labels [N]."""
    try:
        from sklearn.datasets import load_digits  # noqa: PLC0415 - the demo's optional dependency
    except ImportError as e:
        raise ConfigError(
            "the demo dataset needs scikit-learn (pip install scikit-learn); it ships the digits inside the package"
        ) from e
    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0 * 2.0 - 1.0)[:, None]  # (N, 1, 8, 8)
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp_(-1, 1)
    return x.repeat(1, 3, 1, 1).contiguous(), torch.from_numpy(d.target.astype(np.int64))


def split_indices(labels: torch.Tensor, held_out: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A stratified train / held-out split, fixed by ``seed`` (the same in training and evaluation)."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    y = labels.numpy()
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = int(round(len(idx) * held_out))
        test.extend(idx[:k])
        train.extend(idx[k:])
    return np.sort(np.array(train)), np.sort(np.array(test))
