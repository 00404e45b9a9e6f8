"""The distilled few-step inner sampler's step table (NumPy only; docs/DISTILLATION.md).

A distilled student (``far-train distill``) has the teacher's architecture and runs through the same guided
step formula as DDPM and DDIM (:class:`far_sdk.maths.diffusion.Step`): x0 = a x - b eps (clipped);
x_prev = c1 x0 + c2 x + exp(log_var / 2) noise noise_scale, log_var = frac max_log_var + (1 - frac) min_log_var.
Only the table differs. The student was trained on the teacher's own DDPM trajectories on the
:data:`TEACHER_STEPS`-step respaced chain (the official 100 inner steps): with K steps it jumps between the
teacher's states at chain indices j_i = round(i n / K) - 1, i = K .. 1, and from the last one to the sample.
Each jump is a Gaussian whose mean and variance the student learned to match (the teacher's moments):

- a, b: the teacher's eps parametrisation at the source state's timestep, except the first jump (from x_T,
  where a = sqrt(1 / alpha_bar_999) ~ 2e4 would amplify any error): a = b = 1 there, x0 = x - eps;
- c1, c2: the DDPM posterior mean of the jump from alpha_bar_s to alpha_bar_p (the last jump: c1 = 1, c2 = 0);
- min/max log-variance: log(pv + c1^2 sigma^2) for sigma^2 = :data:`X0_VARIANCE_RANGE` (pv the jump's posterior
  variance), the student's v interpolating (and extrapolating) between them;
- noise scale: the temperature at every jump, the last included (one jump carries the sample's spread);
- timestep: the source state's timestep minus :data:`TIME_OFFSETS` [K], so the time embedding tells the
  student which K it is running (K = 2 and 4 share source states with different targets).
"""

from __future__ import annotations

from functools import cache

import numpy as np

from far_sdk.errors import InvalidArgumentError
from far_sdk.maths.diffusion import NUM_TRAIN_TIMESTEPS, Step, cosine_betas, respaced_timesteps

#: Inner-step counts a distilled student runs (per outer step).
DISTILLED_STEPS: tuple[int, ...] = (1, 2, 4)
#: The teacher chain the student was distilled from: the official 100 respaced DDPM steps.
TEACHER_STEPS = 100
#: Time-embedding offset per K: the student's timestep input is the source timestep minus this.
TIME_OFFSETS: dict[int, int] = {4: 0, 2: 1, 1: 2}
#: The x0 variance at the two ends of the learned range (sampler-scale latents have about unit variance).
X0_VARIANCE_RANGE = (1e-4, 1.0)


def check_distilled_steps(n: object) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or int(n) not in DISTILLED_STEPS:
        raise InvalidArgumentError(
            f"inner_sampler 'distilled' runs {', '.join(map(str, DISTILLED_STEPS))} inner steps per outer step "
            f"(the counts the student was trained for), got {n!r}: pass inner_steps=1, 2 or 4"
        )
    return int(n)


def teacher_boundaries(k: int, n: int = TEACHER_STEPS) -> tuple[int, ...]:
    """The teacher chain indices (n - 1 = x_T .. 0) a K-step student starts its jumps from, noisiest first."""
    return tuple(int(round(i * n / k)) - 1 for i in range(k, 0, -1))


@cache
def _coefficients(k: int) -> np.ndarray:
    """float64 [K, len(Step)] without the per-call columns (cfg, noise scale, clip)."""
    ts = respaced_timesteps(TEACHER_STEPS)
    abar = np.cumprod(1.0 - cosine_betas(NUM_TRAIN_TIMESTEPS))
    src = teacher_boundaries(k)
    out = np.zeros((k, len(Step)), dtype=np.float64)
    for i, j in enumerate(src):
        s = abar[ts[j]]
        p = abar[ts[src[i + 1]]] if i + 1 < k else 1.0
        if i == 0:
            a, b = 1.0, 1.0  # x0 = x_T - eps: well conditioned where 1 / sqrt(alpha_bar) ~ 2e4
        else:
            a, b = np.sqrt(1.0 / s), np.sqrt(1.0 / s - 1.0)
        beta = 1.0 - s / p
        c1 = beta * np.sqrt(p) / (1.0 - s)
        c2 = (1.0 - p) * np.sqrt(1.0 - beta) / (1.0 - s)
        pv = beta * (1.0 - p) / (1.0 - s)
        lo, hi = X0_VARIANCE_RANGE
        out[i, Step.timestep] = ts[j] - TIME_OFFSETS[k]
        out[i, Step.x0_coef_x], out[i, Step.x0_coef_eps] = a, b
        out[i, Step.mean_coef_x0], out[i, Step.mean_coef_xt] = c1, c2
        out[i, Step.min_log_var] = np.log(pv + c1 * c1 * lo)
        out[i, Step.max_log_var] = np.log(pv + c1 * c1 * hi)
    return out


def distilled_step_table(num_steps: int, cfg_scale: float, temperature: float, x0_clip: float | None) -> np.ndarray:
    """float32 [K, len(Step)]: the student's ``step`` rows for K = ``num_steps`` in {1, 2, 4}, noisiest first
    (each float64 value cast to float32 on its own, like :func:`far_sdk.maths.diffusion.denoise_step_table`)."""
    k = check_distilled_steps(num_steps)
    out = _coefficients(k).astype(np.float32)
    out[:, Step.cfg_scale] = np.float32(cfg_scale)
    out[:, Step.noise_scale] = np.float32(temperature)
    out[:, Step.x0_clip] = np.float32(np.inf if x0_clip is None else x0_clip)
    return out
