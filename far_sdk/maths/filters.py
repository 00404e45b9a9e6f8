"""Frequency filters on the 16 x 16 latent grid (NumPy only).

Level k of F = 16 is a linear operator on each channel's H x W grid. Both filter types are
separable, so level k is one H x H matrix M_k and  filter(X) = M_k X M_k^T  per channel
(the grid is square). Matrices are built in float64 and cached.

- ``"spatial"`` (the official code): area-downsample to k x k, then bicubic-upsample back,
  exactly as ``torch.nn.functional.interpolate(mode="area")`` followed by
  ``interpolate(mode="bicubic", align_corners=False)``. Level 0 is all zeros, level H the identity.
- ``"fourier"`` (the paper): keep the k lowest DFT frequencies per axis (band-limited
  resampling to k samples and back); for even k the two bins at +-k/2 get half weight so the
  operator stays real. Level 0 is zeros, level 1 the mean, level H the identity.

The token layout is written here once too: a G x G grid of C-channel latents is L = G * G tokens
[B, L, C] in row-major order (token = row * G + column), and an image-layout array is [B, C, G, G]
(:func:`tokens_to_grid`, :func:`grid_to_tokens`). ``training/filters.py`` is the torch twin of this
module (same matrices, same layout), for training, the torch backends and the reference sampler.
"""

from __future__ import annotations

import math
from functools import cache
from typing import Literal, get_args

import numpy as np

from far_sdk.errors import InvalidArgumentError, check_choice

#: "spatial": the official area-down / bicubic-up pair; "fourier": the paper's ideal low-pass.
FilterType = Literal["spatial", "fourier"]
FILTER_TYPES: tuple[FilterType, ...] = get_args(FilterType)
GRID = 16
CUBIC_A = -0.75  # PyTorch's (and ONNX Resize's default-compatible) Keys coefficient


def area_matrix(k: int, n: int = GRID) -> np.ndarray:
    """[k, n]: adaptive average pooling; row i averages inputs floor(n i / k) .. ceil(n (i + 1) / k) - 1."""
    a = np.zeros((k, n), dtype=np.float64)
    for i in range(k):
        lo, hi = (n * i) // k, -((-n * (i + 1)) // k)
        a[i, lo:hi] = 1.0 / (hi - lo)
    return a


def _cubic(x: float, a: float = CUBIC_A) -> float:
    """Keys cubic convolution kernel."""
    x = abs(x)
    if x <= 1:
        return (a + 2) * x**3 - (a + 3) * x**2 + 1
    if x < 2:
        return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a
    return 0.0


def bicubic_matrix(k: int, n: int = GRID) -> np.ndarray:
    """[n, k]: 1-D cubic upsampling k -> n, half-pixel centres (align_corners=False), edge taps clamped.

    src = (j + 0.5) k / n - 0.5 (not clamped); taps floor(src) - 1 .. floor(src) + 2, clamped to [0, k-1].
    """
    u = np.zeros((n, k), dtype=np.float64)
    for j in range(n):
        src = (j + 0.5) * k / n - 0.5
        i0 = math.floor(src)
        t = src - i0
        for tap, dist in zip(range(i0 - 1, i0 + 3), (1 + t, t, 1 - t, 2 - t)):
            u[j, min(max(tap, 0), k - 1)] += _cubic(dist)
    return u


def fourier_matrix(k: int, n: int = GRID) -> np.ndarray:
    """[n, n]: Re(F^-1 diag(m_k) F) with m_k keeping the k lowest frequencies (half weight at +-k/2, k even)."""
    gain = np.zeros(n, dtype=np.float64)
    if k > 0:
        if k % 2:
            freqs = [(f, 1.0) for f in range(-(k // 2), k // 2 + 1)]
        else:
            freqs = [(f, 1.0) for f in range(-(k // 2) + 1, k // 2)] + [(-(k // 2), 0.5), (k // 2, 0.5)]
        for f, w in freqs:
            gain[f % n] += w
    dft = np.fft.fft(np.eye(n), axis=0)
    return np.real(np.fft.ifft(gain[:, None] * dft, axis=0))


def check_level(level: int, n: int = GRID) -> int:
    if isinstance(level, bool) or not isinstance(level, (int, np.integer)) or not 0 <= level <= n:
        raise InvalidArgumentError(f"frequency level must be an integer in 0..{n}, got {level!r}")
    return int(level)


def check_filter_type(kind: str) -> str:
    return check_choice("filter", kind, FILTER_TYPES)


@cache
def _filter_matrix(kind: str, level: int, n: int) -> np.ndarray:
    if level == 0:
        m = np.zeros((n, n))
    elif kind == "spatial":
        m = bicubic_matrix(level, n) @ area_matrix(level, n)
    else:
        m = fourier_matrix(level, n)
    m.setflags(write=False)
    return m


def filter_matrix(level: int, kind: FilterType = "spatial", n: int = GRID) -> np.ndarray:
    """The read-only float64 [n, n] matrix M_k of ``level`` (0..n) for filter ``kind``."""
    return _filter_matrix(check_filter_type(kind), check_level(level, n), n)


def low_pass(latents: np.ndarray, level: int, kind: FilterType = "spatial") -> np.ndarray:
    """Apply level ``level`` to latents [..., H, W] (image layout): M X M^T per channel, in the input dtype."""
    n = latents.shape[-1]
    if latents.shape[-2] != n:
        raise InvalidArgumentError(f"latent grid must be square, got {latents.shape[-2:]}")
    m = filter_matrix(level, kind, n).astype(latents.dtype)
    return m @ latents @ m.T


def tokens_to_grid(tokens: np.ndarray, grid: int) -> np.ndarray:
    """[B, L, C] tokens (row-major, L = grid^2) -> [B, C, grid, grid] (a view where NumPy can)."""
    B, L, C = tokens.shape
    return tokens.reshape(B, grid, grid, C).transpose(0, 3, 1, 2)


def grid_to_tokens(x: np.ndarray) -> np.ndarray:
    """[B, C, H, W] -> [B, H * W, C] tokens (row-major), contiguous."""
    B, C, H, W = x.shape
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1)).reshape(B, H * W, C)


def low_pass_tokens(x: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Tokens x [B, L, C] on an n x n grid low-passed by filter matrix m [n, n]: M X M^T per image and channel."""
    return grid_to_tokens(m @ tokens_to_grid(x, m.shape[0]) @ m.T)
