"""DDPM and DDIM maths shared by training, the reference sampler and every backend (NumPy only).

Everything here is a pure function of plain arguments. Tables are computed in float64
once (as the official code does) and cast to float32 where a step uses them.

Notation (guided-diffusion / the FAR paper): T = 1000 training steps, beta_i the
noise schedule, alpha_i = 1 - beta_i, alpha_bar_i = prod_{j<=i} alpha_j.

Both inner samplers run through the same guided denoiser step, whose per-step inputs are one row
of :class:`Step` columns (:func:`denoise_step_table`): x0 = a x - b eps, optionally clipped;
x_prev = c1 x0 + c2 x + exp(log_var / 2) noise noise_scale. DDPM (the official sampler) fills it with
the posterior of the respaced chain and a learned log-variance range; DDIM (:class:`DDIMTables`) with
its own coefficients and a fixed variance. The step itself is written once, in torch
(``training.graph_modules.ddpm_update``), and run by the exported graphs, the torch backend and the
reference sampler.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum
from functools import cache
from typing import Literal

import numpy as np

from far_sdk.errors import InvalidArgumentError

NUM_TRAIN_TIMESTEPS = 1000

InnerSampler = Literal["ddpm", "ddim", "distilled"]
#: The inner (per-token diffusion) samplers: "ddpm" is the official sampler, "ddim" Song et al. 2021,
#: "distilled" a few-step student (a bundle's optional ``denoiser_fewstep`` graph; far_sdk.maths.distilled).
INNER_SAMPLERS: tuple[str, ...] = ("ddpm", "ddim", "distilled")


def cosine_betas(num_timesteps: int = NUM_TRAIN_TIMESTEPS, max_beta: float = 0.999) -> np.ndarray:
    """Cosine schedule (Nichol & Dhariwal 2021), float64 [T].

    f(u) = cos((u + 0.008) / 1.008 * pi / 2)^2,
    beta_i = min(1 - f((i + 1) / T) / f(i / T), max_beta)   for i = 0 .. T-1.
    """

    def f(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array(
        [min(1 - f((i + 1) / num_timesteps) / f(i / num_timesteps), max_beta) for i in range(num_timesteps)],
        dtype=np.float64,
    )


def respaced_timesteps(num_steps: int, num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """The original timesteps kept when sampling with ``num_steps`` steps (official rule), ascending.

    stride = (T - 1) / (n - 1) (1 for n = 1); a running value starts at 0.0 and is increased by
    the stride n - 1 times; each value is rounded with Python's round (half to even).
    n = 100 keeps 0, 10, 20, 30, 40, 50, 61, ...; n = 10 keeps 0, 111, ..., 999.
    """
    if (
        not isinstance(num_steps, (int, np.integer))
        or isinstance(num_steps, bool)
        or not 1 <= num_steps <= num_timesteps
    ):
        raise InvalidArgumentError(f"inner step count must be an integer in 1..{num_timesteps}, got {num_steps!r}")
    n = int(num_steps)
    stride = (num_timesteps - 1) / (n - 1) if n > 1 else 1.0
    kept, cur = [], 0.0
    for _ in range(n):
        kept.append(round(cur))  # Python round: half to even, as the official code
        cur += stride
    return np.array(kept, dtype=np.int64)


@dataclass(frozen=True, eq=False)
class DiffusionTables:
    """Per-step coefficients of a (possibly respaced) DDPM, float64, indexed by step k = 0 .. n-1.

    ``timesteps[k]`` is the original timestep (0..999) the network receives at step k.
    Reverse sampling goes k = n-1 down to 0.
    """

    timesteps: np.ndarray  # int64 [n]
    betas: np.ndarray  # beta'_k = 1 - alpha_bar[t_k] / alpha_bar[t_{k-1}]
    alphas_cumprod: np.ndarray  # alpha_bar'_k
    alphas_cumprod_prev: np.ndarray  # [1, alpha_bar'_0, .., alpha_bar'_{n-2}]
    sqrt_recip_alphas_cumprod: np.ndarray  # sqrt(1 / alpha_bar')
    sqrt_recipm1_alphas_cumprod: np.ndarray  # sqrt(1 / alpha_bar' - 1)
    posterior_variance: np.ndarray  # beta' (1 - alpha_bar'_prev) / (1 - alpha_bar')
    posterior_log_variance_clipped: np.ndarray  # log posterior_variance, entry 0 replaced by entry 1
    posterior_mean_coef1: np.ndarray  # beta' sqrt(alpha_bar'_prev) / (1 - alpha_bar')
    posterior_mean_coef2: np.ndarray  # (1 - alpha_bar'_prev) sqrt(alpha') / (1 - alpha_bar')
    log_betas: np.ndarray  # log beta' (the "max" end of the learned variance range)

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    def columns(self) -> dict[Step, np.ndarray]:
        """float64 [n] per :class:`Step` coefficient column, indexed by step k (the DDPM posterior)."""
        return {
            Step.x0_coef_x: self.sqrt_recip_alphas_cumprod,
            Step.x0_coef_eps: self.sqrt_recipm1_alphas_cumprod,
            Step.mean_coef_x0: self.posterior_mean_coef1,
            Step.mean_coef_xt: self.posterior_mean_coef2,
            Step.min_log_var: self.posterior_log_variance_clipped,
            Step.max_log_var: self.log_betas,
        }


def tables_from_betas(betas: np.ndarray, timesteps: np.ndarray) -> DiffusionTables:
    """Derive every per-step table from betas (float64), as guided-diffusion does."""
    betas = np.asarray(betas, dtype=np.float64)
    alphas = 1.0 - betas
    ac = np.cumprod(alphas)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    # posterior_variance[0] is 0; the clipped log uses entry 1 in its place.
    post_log = np.log(np.append(post_var[1], post_var[1:])) if len(betas) > 1 else np.log(np.maximum(post_var, 1e-20))
    return DiffusionTables(
        timesteps=np.asarray(timesteps, dtype=np.int64),
        betas=betas,
        alphas_cumprod=ac,
        alphas_cumprod_prev=ac_prev,
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ac),
        sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ac - 1.0),
        posterior_variance=post_var,
        posterior_log_variance_clipped=post_log,
        posterior_mean_coef1=betas * np.sqrt(ac_prev) / (1.0 - ac),
        posterior_mean_coef2=(1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
        log_betas=np.log(betas),
    )


@cache
def _tables_cached(num_steps: int | None, num_timesteps: int) -> DiffusionTables:
    base = cosine_betas(num_timesteps)
    if num_steps is None:
        return tables_from_betas(base, np.arange(num_timesteps))
    kept = respaced_timesteps(num_steps, num_timesteps)
    ac = np.cumprod(1.0 - base)
    # beta'_k = 1 - alpha_bar[t_k] / alpha_bar[t_{k-1}], alpha_bar[t_{-1}] = 1
    prev = np.append(1.0, ac[kept[:-1]])
    return tables_from_betas(1.0 - ac[kept] / prev, kept)


def diffusion_tables(num_steps: int | None = None, num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> DiffusionTables:
    """Tables of the cosine DDPM respaced to ``num_steps`` (None: all T training steps).

    Cached: every caller asking for the same count shares one (read-only) instance.
    """
    if num_steps is not None:
        respaced_timesteps(num_steps, num_timesteps)  # validates
        num_steps = int(num_steps)
    return _tables_cached(num_steps, num_timesteps)


class Step(IntEnum):
    """The columns of the denoiser's per-step input ``step`` (float32 [len(Step)]; one row per inner
    step, built by :func:`denoise_step_table`). The one definition of that layout: the graph spec
    (:mod:`far_sdk.bundle.graphs`), the step (``training.graph_modules.ddpm_update``) and the reference sampler
    index it by these names. One guided step, from the network's (eps, v) on [x; x] with CFG rows
    [conditional; unconditional]:

        eps     = eps_u + cfg_scale (eps_c - eps_u)
        x0      = clamp(x0_coef_x x - x0_coef_eps eps, -x0_clip, x0_clip)
        log_var = frac max_log_var + (1 - frac) min_log_var,   frac = (v_c + 1) / 2
        x_prev  = mean_coef_x0 x0 + mean_coef_xt x + exp(log_var / 2) noise noise_scale
    """

    timestep = 0  # original timestep t (0..999) fed to the time embedding
    x0_coef_x = 1  # a = sqrt(1 / alpha_bar')
    x0_coef_eps = 2  # b = sqrt(1 / alpha_bar' - 1)
    mean_coef_x0 = 3  # c1 (DDPM: posterior_mean_coef1)
    mean_coef_xt = 4  # c2 (DDPM: posterior_mean_coef2)
    min_log_var = 5  # DDPM: posterior_log_variance_clipped (the learned range's min end); DDIM: log sigma^2
    max_log_var = 6  # DDPM: log beta' (max end); DDIM: log sigma^2
    cfg_scale = 7
    noise_scale = 8  # [k != 0] * temperature (DDIM: [sigma_k > 0] * temperature)
    x0_clip = 9  # +inf = no clipping (official)


#: Column names of the ``step`` vector, in order (:class:`Step`).
STEP_FIELDS: tuple[str, ...] = tuple(Step.__members__)


def denoise_step_table(
    num_steps: int,
    cfg_scale: float,
    temperature: float,
    x0_clip: float | None = None,
    *,
    inner_sampler: InnerSampler = "ddpm",
    eta: float = 0.0,
) -> np.ndarray:
    """float32 [n, len(Step)]: the denoiser's ``step`` input for each call, in execution order (row 0 is
    the noisiest step k = n-1), columns :class:`Step`: t, the chain's six coefficients (each float64
    value cast to float32 on its own, as the official code extracts them), cfg scale, noise scale,
    and the x0 clip bound (+inf when ``x0_clip`` is None: the official sampler does not clip).

    "ddpm" (official): the respaced DDPM's coefficients (:func:`diffusion_tables`); noise scale
    [k != 0] * temperature. "ddim": :func:`ddim_tables` (its own respacing, ``eta``); noise scale
    [sigma_k > 0] * temperature, so eta = 0 (and every last step) adds no noise.
    """
    if inner_sampler == "ddpm":
        tab = diffusion_tables(num_steps)
        noisy = np.arange(tab.num_steps) != 0
    elif inner_sampler == "ddim":
        tab = ddim_tables(num_steps, eta)
        noisy = tab.sigmas > 0
    else:
        raise InvalidArgumentError(
            f"inner_sampler must be 'ddpm' or 'ddim' here ('distilled': far_sdk.maths.distilled), got {inner_sampler!r}"
        )
    ks = np.arange(tab.num_steps)[::-1]
    out = np.empty((tab.num_steps, len(Step)), dtype=np.float32)
    out[:, Step.timestep] = tab.timesteps[ks]
    for col, values in tab.columns().items():
        out[:, col] = values[ks].astype(np.float32)
    out[:, Step.cfg_scale] = np.float32(cfg_scale)
    out[:, Step.noise_scale] = np.where(noisy[ks], np.float32(temperature), np.float32(0.0))
    out[:, Step.x0_clip] = np.float32(np.inf if x0_clip is None else x0_clip)
    return out


# ---- DDIM ------------------------------------------------------------------------------------------


def ddim_timesteps(num_steps: int, num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """DDIM's kept timesteps, ascending: t_k = round((k + 1) T / n) - 1 (half to even), k = 0 .. n-1.

    "Trailing" spacing (diffusers' ``timestep_spacing="trailing"``; Lin et al. 2024): the chain
    starts at T - 1 = 999 like the official DDPM respacing, but its last step goes from t_0 =
    T / n - 1 straight to x0 (alpha_bar_prev = 1) instead of ending on t = 0, where a step
    nearly only returns its input (alpha_bar_0 = 0.99996): every one of the n network calls
    denoises. n = 1000 keeps every timestep (the DDPM chain); n = 10 keeps 99, 199, ..., 999.
    """
    respaced_timesteps(num_steps, num_timesteps)  # the same validation as DDPM's respacing
    n = int(num_steps)
    return (np.round(np.arange(1, n + 1, dtype=np.float64) * num_timesteps / n) - 1).astype(np.int64)


@dataclass(frozen=True, eq=False)
class DDIMTables:
    """Per-step coefficients of a DDIM chain (Song et al. 2021, eq. 12), float64, indexed by k = 0 .. n-1.

    With abar = alpha_bar[t_k], abar_prev = alpha_bar[t_{k-1}] (1 for k = 0) and
    sigma = eta sqrt((1 - abar_prev) / (1 - abar)) sqrt(1 - abar / abar_prev), one step is

        x0 = a x - b eps   (a = sqrt(1 / abar), b = sqrt(1 / abar - 1); then optionally clipped)
        eps' = (a x - x0) / b                      (eps re-derived from the clipped x0)
        x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps' + sigma z.

    eps' is linear in x0 and x, so x_prev = c1 x0 + c2 x + sigma z with
    c1 = sqrt(abar_prev) - d / b, c2 = d a / b = d / sqrt(1 - abar), d = sqrt(1 - abar_prev - sigma^2):
    the DDPM step's form, so every backend runs DDIM through the same denoiser graph. The fixed
    variance goes into both ends of the learned range (min_log = max_log = log sigma^2, so the
    network's v has no effect); where sigma = 0 (eta = 0, and always at k = 0) the log-variance is 0
    (finite: the graph multiplies exp(log_var / 2) by a zero noise scale; -inf would give NaN).
    With eta = 1, sigma^2 is the DDPM posterior variance and (c1, c2) its posterior-mean
    coefficients on the same timesteps (DDPM with the fixed "small" variance).
    """

    eta: float
    timesteps: np.ndarray  # int64 [n], ascending (:func:`ddim_timesteps`)
    alphas_cumprod: np.ndarray  # abar_k
    alphas_cumprod_prev: np.ndarray  # abar at t_{k-1}; 1 for k = 0
    sigmas: np.ndarray  # sigma_k (0 for k = 0 and for eta = 0)
    sqrt_recip_alphas_cumprod: np.ndarray  # a
    sqrt_recipm1_alphas_cumprod: np.ndarray  # b
    coef_x0: np.ndarray  # c1
    coef_xt: np.ndarray  # c2
    log_variance: np.ndarray  # log sigma^2 where sigma > 0, else 0

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    def columns(self) -> dict[Step, np.ndarray]:
        """float64 [n] per :class:`Step` coefficient column: a, b, c1, c2 and the fixed log sigma^2 at both ends."""
        return {
            Step.x0_coef_x: self.sqrt_recip_alphas_cumprod,
            Step.x0_coef_eps: self.sqrt_recipm1_alphas_cumprod,
            Step.mean_coef_x0: self.coef_x0,
            Step.mean_coef_xt: self.coef_xt,
            Step.min_log_var: self.log_variance,
            Step.max_log_var: self.log_variance,
        }


@cache
def _ddim_cached(num_steps: int, eta: float, num_timesteps: int) -> DDIMTables:
    ac_full = np.cumprod(1.0 - cosine_betas(num_timesteps))
    kept = ddim_timesteps(num_steps, num_timesteps)
    ac = ac_full[kept]
    ac_prev = np.append(1.0, ac[:-1])
    sigmas = eta * np.sqrt((1.0 - ac_prev) / (1.0 - ac) * (1.0 - ac / ac_prev))
    # 1 - abar_prev - sigma^2 = (1 - abar_prev)(1 - eta^2 (1 - abar / abar_prev) / (1 - abar)) >= 0 for
    # eta <= 1 (abar_prev <= 1); the clamp only guards against a negative float64 rounding.
    d = np.sqrt(np.maximum(1.0 - ac_prev - sigmas**2, 0.0))
    a, b = np.sqrt(1.0 / ac), np.sqrt(1.0 / ac - 1.0)
    with np.errstate(divide="ignore"):
        log_var = np.where(sigmas > 0, np.log(sigmas**2), 0.0)
    return DDIMTables(
        eta=eta,
        timesteps=kept,
        alphas_cumprod=ac,
        alphas_cumprod_prev=ac_prev,
        sigmas=sigmas,
        sqrt_recip_alphas_cumprod=a,
        sqrt_recipm1_alphas_cumprod=b,
        coef_x0=np.sqrt(ac_prev) - d / b,
        coef_xt=d / np.sqrt(1.0 - ac),
        log_variance=log_var,
    )


def ddim_tables(num_steps: int, eta: float = 0.0, num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> DDIMTables:
    """The DDIM chain with ``num_steps`` steps (:func:`ddim_timesteps`) and noise level ``eta`` in [0, 1]
    (0: deterministic DDIM; 1: DDPM's posterior on these timesteps). Cached like :func:`diffusion_tables`."""
    ddim_timesteps(num_steps, num_timesteps)  # validates
    check_eta(eta)
    return _ddim_cached(int(num_steps), float(eta), num_timesteps)


def check_eta(eta: float) -> None:
    """eta must be a finite number in [0, 1] (above 1, 1 - abar_prev - sigma^2 turns negative)."""
    if (
        isinstance(eta, bool)
        or not isinstance(eta, (int, float, np.integer, np.floating))
        or not 0.0 <= float(eta) <= 1.0
    ):
        raise InvalidArgumentError(
            f"eta must be a number in [0, 1] (0: deterministic DDIM, 1: DDPM-like noise), got {eta!r}"
        )
