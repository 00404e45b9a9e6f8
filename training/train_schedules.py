"""Training schedules of FAR: frequency-aware mask ratio, loss weight per level, learning rate.

Training time only (uses torch). The *sampling* schedules — outer levels, CFG, temperature, inner
steps, the plan every backend follows at generation time — are :mod:`far_sdk.maths.schedules` (NumPy, no
torch); nothing here is used when sampling.

Pure functions of plain arguments, each with its formula. These follow the **paper** where it
and the official code disagree (spec §12, items 2 and 3):

- mask ratio: the paper masks a share drawn from [r_i, 1] with r_i falling from 0.7 at the
  lowest level to 0 at the highest; the code's bound 0.7 * i / 16 rises with the level instead.
- loss weight: the paper's w_i = 1 + sin(pi/2 * i / F); the code's list uses (i + 1) / 16 and
  its flag crashes, so the released models were trained unweighted.

Levels are the transformer's *input* levels 0..F-1 (F = 16 for a 16 x 16 latent grid; level F,
the clean latent, is only ever a target).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from far_sdk.errors import InvalidArgumentError

LrSchedule = Literal["constant", "cosine"]
LR_SCHEDULES: tuple[str, ...] = ("constant", "cosine")
#: The paper's mask-ratio lower bound at the lowest level.
MAX_MASK_RATIO_BOUND = 0.7


def _check_level(level: int, num_levels: int) -> int:
    if isinstance(num_levels, bool) or not isinstance(num_levels, int) or num_levels < 1:
        raise InvalidArgumentError(f"num_levels must be a positive int, got {num_levels!r}")
    if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level < num_levels:
        raise InvalidArgumentError(f"level must be an int in 0..{num_levels - 1}, got {level!r}")
    return level


def mask_ratio_bounds(level: int, num_levels: int = 16) -> float:
    """Lower bound r_i of the masked share at input level i (the upper bound is 1).

    r_i = 0.7 * (F - 1 - i) / (F - 1): 0.7 at level 0, falling linearly to 0 at level F - 1
    (r = 0.7 for every level when F = 1).
    """
    _check_level(level, num_levels)
    if num_levels == 1:
        return MAX_MASK_RATIO_BOUND
    return MAX_MASK_RATIO_BOUND * (num_levels - 1 - level) / (num_levels - 1)


def sample_mask(
    batch: int,
    seq_len: int,
    level: int,
    generator: torch.Generator | None = None,
    *,
    ratio: float | None = None,
    num_levels: int = 16,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Frequency-aware random mask, float [B, L] with 1 = masked.

    One ratio m ~ U[r_i, 1) per call (drawn from ``generator`` unless ``ratio`` is given), so every
    row masks the same number n = ceil(L * m) of tokens — the encoder drops masked tokens and
    needs equal lengths per row; each row masks the first n entries of its own random permutation.
    """
    r = mask_ratio_bounds(level, num_levels)
    if ratio is None:
        ratio = r + (1.0 - r) * float(torch.rand((), generator=generator))
    elif not 0.0 <= ratio <= 1.0:
        raise InvalidArgumentError(f"mask ratio must lie in [0, 1], got {ratio!r}")
    n = math.ceil(seq_len * ratio)
    order = torch.rand(batch, seq_len, generator=generator).argsort(dim=1)  # (B, L): a permutation per row
    mask = torch.zeros(batch, seq_len)
    mask.scatter_(1, order[:, :n], 1.0)
    return mask.to(device)


def sample_t2i_mask(
    batch: int,
    seq_len: int,
    generator: torch.Generator | None = None,
    *,
    ratio_min: float = 0.7,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, float]:
    """FAR-T2I's training mask (official ``FAR_T2I.random_masking``): (float [B, L] with 1 = masked, share m).

    One share per call, m ~ normal(1, 0.25) truncated to [ratio_min, 1], drawn by inverting the CDF:
    m = 1 + 0.25 Phi^-1(Phi(a) + u (Phi(0) - Phi(a))), a = (ratio_min - 1) / 0.25, u ~ U[0, 1) (float64).
    Every row masks ceil(L m) tokens: the first entries of its own random permutation.
    """
    if not 0.0 <= ratio_min <= 1.0:
        raise InvalidArgumentError(f"ratio_min must lie in [0, 1], got {ratio_min!r}")
    lo = torch.special.ndtr(torch.tensor((ratio_min - 1.0) / 0.25, dtype=torch.float64))
    u = torch.rand((), generator=generator, dtype=torch.float64)
    ratio = float(1.0 + 0.25 * torch.special.ndtri(lo + u * (0.5 - lo)))
    ratio = min(max(ratio, ratio_min), 1.0)  # guard the float64 rounding at the ends
    mask = sample_mask(batch, seq_len, 0, generator, ratio=ratio, num_levels=1, device=device)
    return mask, ratio


def loss_weight(level: int, num_levels: int = 16) -> float:
    """The paper's loss weight at input level i: w_i = 1 + sin(pi/2 * i / F) (1 at i = 0, < 2 at F - 1)."""
    _check_level(level, num_levels)
    return 1.0 + math.sin(math.pi / 2 * level / num_levels)


def lr_at(
    step: int,
    total_steps: int,
    warmup_steps: int,
    base_lr: float,
    schedule: LrSchedule = "constant",
    min_lr: float = 0.0,
) -> float:
    """Learning rate at optimiser step ``step`` (0-based), the official per-iteration schedule in steps.

    Warm-up (step < W): lr = base_lr * step / W (0 at step 0).
    After: "constant": lr = base_lr;
    "cosine": lr = min_lr + (base_lr - min_lr) * (1 + cos(pi * (step - W) / (T - W))) / 2, clamped at T.
    """
    if schedule not in LR_SCHEDULES:
        raise InvalidArgumentError(f"lr schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
    if warmup_steps < 0 or total_steps < 0:
        raise InvalidArgumentError(f"warmup_steps and total_steps must be >= 0, got {warmup_steps} and {total_steps}")
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    if schedule == "constant":
        return base_lr
    span = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / span, 1.0)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
