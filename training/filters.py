"""The frequency filters and the token layout in torch: the twin of :mod:`far_sdk.maths.filters` (NumPy), built on
its matrices, used by training, the torch backends, the eager baseline and the reference sampler.

A G x G grid of C-channel latents is L = G * G tokens [B, L, C] in row-major order (token = row * G + column);
image layout is [B, C, G, G]. Level k of a filter is M_k X M_k^T per channel (M_k: far_sdk.maths.filters).
:func:`official_low_pass` is the official code's own spelling of the spatial filter (``F.interpolate`` area, then
bicubic), kept for the reference sampler, which reproduces the official operations one for one; the tests hold
the two spellings equal.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import torch
import torch.nn.functional as F

from far_sdk.maths.filters import FilterType, filter_matrix


def tokens_to_grid(tokens: torch.Tensor, grid: int) -> torch.Tensor:
    """[B, L, C] -> [B, C, grid, grid] (a view)."""
    B, L, C = tokens.shape
    return tokens.reshape(B, grid, grid, C).permute(0, 3, 1, 2)


def grid_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H * W, C] (token = row * W + column)."""
    B, C, H, W = x.shape
    return x.permute(0, 2, 3, 1).reshape(B, H * W, C)


@cache
def _matrix_cpu(level: int, kind: str, n: int) -> torch.Tensor:
    return torch.from_numpy(np.array(filter_matrix(level, kind, n)))  # float64, read-only source copied


def low_pass(latents: torch.Tensor, level: int, kind: FilterType = "spatial") -> torch.Tensor:
    """Level ``level`` of latents [B, C, H, W]: M X M^T per channel (all zeros at level 0), in the input's dtype."""
    m = _matrix_cpu(level, kind, latents.shape[-1]).to(latents)  # (H, H)
    return m @ latents @ m.T  # (B, C, H, W)


def low_pass_tokens(tokens: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Tokens [B, L, C] on an n x n grid low-passed by a filter matrix m [n, n] (already on the tokens' device)."""
    return grid_to_tokens(m @ tokens_to_grid(tokens, m.shape[0]) @ m.T)


def low_pass_per_sample(latents: torch.Tensor, levels: torch.Tensor, kind: FilterType = "spatial") -> torch.Tensor:
    """Row b of latents [B, C, H, W] low-passed to its own level levels[b] (CPU int tensor; zeros at level 0)."""
    out = torch.empty_like(latents)
    for lv in torch.unique(levels).tolist():  # CPU levels: no device sync
        rows = (levels == lv).nonzero().flatten().to(latents.device)
        out[rows] = low_pass(latents[rows], int(lv), kind)
    return out


def official_low_pass(x: torch.Tensor, level: int, kind: FilterType = "spatial") -> torch.Tensor:
    """The official spelling of the low-pass of latents [B, C, H, W]: spatial = ``F.interpolate`` area down to
    level x level, then bicubic back (align_corners=False); "fourier" (not in the official code) by matrix."""
    H = x.shape[-1]
    if level == 0:
        return torch.zeros_like(x)
    if kind != "spatial":
        return low_pass(x, level, kind)
    if level == H:
        return x
    down = F.interpolate(x, size=(level, level), mode="area")
    return F.interpolate(down, size=(H, H), mode="bicubic", align_corners=False)
