"""Sampling schedules of FAR (NumPy only): outer levels, CFG, temperature, inner steps and sampler.

All are pure functions of plain arguments. :func:`make_plan` resolves a user's choices once,
at the boundary, into a :class:`SamplingPlan` that the reference sampler and every backend
follow step by step (users set them through :class:`far_sdk.options.SamplingOptions`). The
*training* schedules (mask ratio, loss weight per level, learning rate) are
``training/schedules.py``'s; nothing there is used when sampling.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal, Union

import numpy as np

from .diffusion import INNER_SAMPLERS, InnerSampler, check_eta, denoise_step_table
from .errors import InvalidArgumentError
from .filters import FILTER_TYPES, GRID

#: The official no-mask sampler's levels (10 outer steps; level 1 skipped).
OFFICIAL_LEVELS: tuple[int, ...] = (0, 2, 3, 4, 5, 6, 7, 8, 9, 10)
#: The official mask-mode sampler's levels (11 outer steps, as published, including the 12, 12 jump).
OFFICIAL_MASK_LEVELS: tuple[int, ...] = (0, 12, 12, 4, 5, 6, 7, 8, 9, 10, 11)
#: Inner DDPM steps of the official release at every outer step.
OFFICIAL_INNER_STEPS = 100
#: The paper's frequency-aware inner-step range: linear from the first to the last outer step.
FREQUENCY_AWARE_RANGE = (40, 100)

Mode = Literal["nomask", "mask"]
CfgSchedule = Literal["linear", "constant"]
TemperatureSchedule = Literal["official", "constant"]
InnerSteps = Union[int, str, Sequence[int]]
MAX_OUTER_STEPS = GRID

def outer_levels(num_steps: int = len(OFFICIAL_LEVELS)) -> tuple[int, ...]:
    """Input frequency level of each outer step (the level the transformer sees), for 1..16 steps.

    - 10: the official list (0, 2, 3, ..., 10).
    - 2..9: 0, then num_steps - 1 levels from 2 to 10 evenly spaced (rounded half to even);
      2 steps give (0, 10).
    - 1: (0,) — one step from empty latents.
    - 11..16: 0, 1, ..., num_steps - 1 (every level the model was trained on, in order).
    Each step's output is low-passed to the next step's level; the last is not filtered.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= MAX_OUTER_STEPS:
        raise InvalidArgumentError(f"num_steps must be an integer in 1..{MAX_OUTER_STEPS}, got {num_steps!r}")
    s = int(num_steps)
    if s == 1:
        return (0,)
    if s == 2:
        return (0, 10)
    if s <= 10:
        return (0,) + tuple(int(round(v)) for v in np.linspace(2, 10, s - 1))
    return tuple(range(s))


def cfg_schedule(cfg: float, num_steps: int, kind: CfgSchedule = "linear") -> np.ndarray:
    """Guidance scale per outer step, float64 [S].

    "linear" (official): cfg_s = 1 + (cfg - 1) s / S  (1 at s = 0, never reaching cfg);
    "constant": cfg_s = cfg.
    """
    _check_finite("cfg", cfg)
    if kind == "linear":
        return np.array([1 + (cfg - 1) * i / num_steps for i in range(num_steps)], dtype=np.float64)
    if kind == "constant":
        return np.full(num_steps, float(cfg), dtype=np.float64)
    raise InvalidArgumentError(f"cfg_schedule must be 'linear' or 'constant', got {kind!r}")


def temperature_schedule(temperature: float, num_steps: int, kind: TemperatureSchedule = "official", mode: Mode = "nomask") -> np.ndarray:
    """Noise temperature per outer step, float64 [S].

    "official", no-mask mode: tau_s = temperature * (0.8 + 0.2 (1 - cos(pi/2 (s + 1) / S)));
      with temperature = 1 this is the official ramp 0.80246 .. 1.0 (the official code ignores
      its temperature argument; we scale the ramp by it).
    "official", mask mode: tau_s = 0.85 + (temperature - 0.85) s / S (the official formula).
    "constant": tau_s = temperature.
    """
    _check_finite("temperature", temperature)
    if temperature < 0:
        raise InvalidArgumentError(f"temperature must be >= 0, got {temperature}")
    S = num_steps
    if kind == "constant":
        return np.full(S, float(temperature))
    if kind != "official":
        raise InvalidArgumentError(f"temperature_schedule must be 'official' or 'constant', got {kind!r}")
    if mode == "mask":
        return np.array([0.85 + (temperature - 0.85) * s / S for s in range(S)])
    ramp = np.array([0.8 + 0.2 * (1 - math.cos(math.pi / 2 * (s + 1) / S)) for s in range(S)])
    return ramp if temperature == 1.0 else temperature * ramp


def inner_step_schedule(inner_steps: InnerSteps, num_steps: int) -> tuple[int, ...]:
    """Inner (DDPM or DDIM) steps at each outer step.

    "frequency-aware" (the paper): n_s = round(40 + 60 s / (S - 1)), 40 at the lowest level to 100
    at the highest (S = 1: 100); "official": 100 everywhere; an int: that count everywhere;
    a sequence: one count per outer step.
    """
    if isinstance(inner_steps, str):
        if inner_steps == "frequency-aware":
            lo, hi = FREQUENCY_AWARE_RANGE
            if num_steps == 1:
                return (hi,)
            return tuple(int(round(lo + (hi - lo) * s / (num_steps - 1))) for s in range(num_steps))
        if inner_steps == "official":
            return (OFFICIAL_INNER_STEPS,) * num_steps
        raise InvalidArgumentError(f"inner_steps must be 'frequency-aware', 'official', an int or a list, got {inner_steps!r}")
    if isinstance(inner_steps, (int, np.integer)) and not isinstance(inner_steps, bool):
        counts = (int(inner_steps),) * num_steps
    else:
        if not isinstance(inner_steps, (list, tuple, np.ndarray)):
            raise InvalidArgumentError(f"inner_steps must be 'frequency-aware', 'official', an int or a list of ints, got {inner_steps!r}")
        counts = tuple(inner_steps)
        if len(counts) != num_steps:
            raise InvalidArgumentError(f"inner_steps list has {len(counts)} entries, need one per outer step ({num_steps})")
    for n in counts:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= 1000:
            raise InvalidArgumentError(f"each inner step count must be an integer in 1..1000, got {n!r}")
    return tuple(int(n) for n in counts)


def mask_keep_counts(num_steps: int, num_tokens: int = GRID * GRID) -> tuple[int, ...]:
    """Mask mode: tokens left masked after step s: floor(L cos(pi/2 (s + 1) / S))."""
    return tuple(int(math.floor(num_tokens * math.cos(math.pi / 2 * (s + 1) / num_steps))) for s in range(num_steps))


@dataclass(frozen=True)
class SamplingPlan:
    """Everything a sampler needs per outer step, resolved and validated once.

    ``filter_after[s]`` is the level the output of step s is low-passed to before step s + 1
    (None: not filtered — the last step, and step 0 in mask mode).
    """

    mode: str
    levels: tuple[int, ...]
    cfg: tuple[float, ...]
    temperature: tuple[float, ...]
    inner_steps: tuple[int, ...]
    filter: str
    filter_after: tuple[int | None, ...]
    x0_clip: float | None = None     # clamp x0_hat to [-x0_clip, x0_clip] (None: the official sampler, no clip)
    inner_sampler: str = "ddpm"      # "ddpm" (official) | "ddim" (far_sdk.diffusion.DDIMTables)
    eta: float = 0.0                 # DDIM's noise level in [0, 1]; always 0.0 (unused) for "ddpm"

    @property
    def num_steps(self) -> int:
        return len(self.levels)

    def step_table(self, s: int) -> np.ndarray:
        """float32 [n_s, 10]: the denoiser's ``step`` rows of outer step ``s`` in execution order, for
        this plan's inner sampler (:func:`far_sdk.diffusion.denoise_step_table`)."""
        return denoise_step_table(self.inner_steps[s], self.cfg[s], self.temperature[s], self.x0_clip,
                                  inner_sampler=self.inner_sampler, eta=self.eta)

    def to_dict(self) -> dict:
        return asdict(self)


def make_plan(
    num_steps: int | None = None,
    *,
    levels: Sequence[int] | None = None,
    cfg: float = 3.0,
    cfg_schedule_kind: CfgSchedule = "linear",
    temperature: float = 1.0,
    temperature_schedule_kind: TemperatureSchedule = "official",
    inner_steps: InnerSteps = "frequency-aware",
    filter: str = "spatial",
    mode: Mode = "nomask",
    x0_clip: float | None = None,
    inner_sampler: InnerSampler = "ddpm",
    eta: float | None = None,
) -> SamplingPlan:
    """Resolve user-facing sampling options into a :class:`SamplingPlan`.

    With ``inner_steps=100`` (or "official") and the defaults otherwise, the plan equals the
    official evaluated sampler (``sample_tokens_nomask``; ``mode="mask"``: ``sample_tokens_mask``).
    ``inner_sampler="ddim"`` runs each outer step's inner loop as DDIM with ``inner_steps`` steps
    and noise level ``eta`` in [0, 1] (None: 0, deterministic); ``eta`` is refused with "ddpm".
    """
    if mode not in ("nomask", "mask"):
        raise InvalidArgumentError(f"mode must be 'nomask' or 'mask', got {mode!r}")
    if inner_sampler not in INNER_SAMPLERS:
        raise InvalidArgumentError(f"inner_sampler must be one of {INNER_SAMPLERS}, got {inner_sampler!r}")
    if inner_sampler == "ddpm":
        if eta is not None:
            raise InvalidArgumentError(f"eta={eta!r} applies only to inner_sampler='ddim' (DDPM's noise is the model's "
                                       "learned variance); drop eta or pass inner_sampler='ddim'")
        eta = 0.0
    else:
        eta = 0.0 if eta is None else eta
        check_eta(eta)
        eta = float(eta)
    if filter not in FILTER_TYPES:
        raise InvalidArgumentError(f"filter must be one of {FILTER_TYPES}, got {filter!r}")
    if x0_clip is not None:
        _check_finite("x0_clip", x0_clip)
        if x0_clip <= 0:
            raise InvalidArgumentError(f"x0_clip must be > 0 (or None for no clipping), got {x0_clip}")
        x0_clip = float(x0_clip)
    if levels is not None:
        levels = tuple(levels)
        for lv in levels:
            if isinstance(lv, bool) or not isinstance(lv, (int, np.integer)) or not 0 <= lv < GRID:
                raise InvalidArgumentError(f"levels must be integers in 0..{GRID - 1}, got {lv!r}")
        if not 1 <= len(levels) <= MAX_OUTER_STEPS + 1:
            raise InvalidArgumentError(f"levels must have 1..{MAX_OUTER_STEPS + 1} entries, got {len(levels)}")
        if num_steps is not None and num_steps != len(levels):
            raise InvalidArgumentError(f"num_steps={num_steps} disagrees with len(levels)={len(levels)}")
        levels = tuple(int(v) for v in levels)
    elif mode == "mask":
        if num_steps not in (None, len(OFFICIAL_MASK_LEVELS)):
            raise InvalidArgumentError(
                f"mask mode has the official {len(OFFICIAL_MASK_LEVELS)}-step level list; pass levels= for another count"
            )
        levels = OFFICIAL_MASK_LEVELS
    else:
        levels = outer_levels(len(OFFICIAL_LEVELS) if num_steps is None else num_steps)
    S = len(levels)
    if mode == "mask":
        after = tuple(levels[s + 1] if 0 < s < S - 1 else None for s in range(S))
    else:
        after = tuple(levels[s + 1] if s < S - 1 else None for s in range(S))
    return SamplingPlan(
        mode=mode,
        levels=levels,
        cfg=tuple(float(c) for c in cfg_schedule(cfg, S, cfg_schedule_kind)),
        temperature=tuple(float(t) for t in temperature_schedule(temperature, S, temperature_schedule_kind, mode)),
        inner_steps=inner_step_schedule(inner_steps, S),
        filter=filter,
        filter_after=after,
        x0_clip=x0_clip,
        inner_sampler=inner_sampler,
        eta=eta,
    )


def _check_finite(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) or not math.isfinite(value):
        raise InvalidArgumentError(f"{name} must be a finite number, got {value!r}")
