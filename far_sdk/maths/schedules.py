"""Sampling schedules of FAR (NumPy only): outer levels, CFG, temperature, inner steps and sampler.

All are pure functions of plain arguments. :func:`make_plan` turns resolved options into a
:class:`SamplingPlan` that the reference sampler and every backend follow step by step (users set
them through :class:`far_sdk.options.SamplingOptions`, which resolves them). Each choice is a
``Literal`` type here, and its tuple of values comes from it (``typing.get_args``): the manifest
schema, the CLI flags and the error messages are derived from those. The *training* schedules
(mask ratio, loss weight per level, learning rate) are ``training/train_schedules.py``'s.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal, Union, get_args

import numpy as np

from far_sdk.errors import InvalidArgumentError, arg, check_choice, check_range
from far_sdk.maths.diffusion import INNER_SAMPLERS, InnerSampler, check_eta, denoise_step_table
from far_sdk.maths.distilled import check_distilled_steps, distilled_step_table
from far_sdk.maths.filters import FILTER_TYPES, GRID, FilterType

#: The official no-mask sampler's levels (10 outer steps; level 1 skipped).
OFFICIAL_LEVELS: tuple[int, ...] = (0, 2, 3, 4, 5, 6, 7, 8, 9, 10)
#: The official mask-mode sampler's levels (11 outer steps, as published, including the 12, 12 jump).
OFFICIAL_MASK_LEVELS: tuple[int, ...] = (0, 12, 12, 4, 5, 6, 7, 8, 9, 10, 11)
#: Inner DDPM steps of the official release at every outer step.
OFFICIAL_INNER_STEPS = 100
#: The paper's frequency-aware inner-step range: linear from the first to the last outer step.
FREQUENCY_AWARE_RANGE = (40, 100)

#: "nomask": the official evaluated sampler (``sample_tokens_nomask``); "mask": ``sample_tokens_mask``.
Mode = Literal["nomask", "mask"]
MODES: tuple[Mode, ...] = get_args(Mode)
#: "linear": the official ramp 1 -> cfg; "constant": cfg at every outer step.
CfgSchedule = Literal["linear", "constant"]
CFG_SCHEDULES: tuple[CfgSchedule, ...] = get_args(CfgSchedule)
#: "official": the official code's ramp (scaled by the temperature); "constant": the temperature everywhere.
TemperatureSchedule = Literal["official", "constant"]
TEMPERATURE_SCHEDULES: tuple[TemperatureSchedule, ...] = get_args(TemperatureSchedule)
#: Named inner-step schedules: the paper's 40..100 ramp, or the official release's 100 everywhere.
InnerStepsName = Literal["frequency-aware", "official"]
INNER_STEP_NAMES: tuple[InnerStepsName, ...] = get_args(InnerStepsName)
InnerSteps = Union[InnerStepsName, int, Sequence[int]]
MAX_OUTER_STEPS = GRID
#: The most inner steps per outer step (the training chain's length).
MAX_INNER_STEPS = 1000


def outer_levels(num_steps: int = len(OFFICIAL_LEVELS)) -> tuple[int, ...]:
    """Input frequency level of each outer step (the level the transformer sees), for 1..16 steps.

    - 10: the official list (0, 2, 3, ..., 10).
    - 2..9: 0, then num_steps - 1 levels from 2 to 10 evenly spaced (rounded half to even);
      2 steps give (0, 10).
    - 1: (0,) — one step from empty latents.
    - 11..16: 0, 1, ..., num_steps - 1 (every level the model was trained on, in order).
    Each step's output is low-passed to the next step's level; the last is not filtered.
    """
    s = int(check_range("num_steps", num_steps, 1, MAX_OUTER_STEPS, integer=True))
    if s == 1:
        return (0,)
    if s == 2:
        return (0, 10)
    if s <= 10:
        return (0,) + tuple(int(round(v)) for v in np.linspace(2, 10, s - 1))
    return tuple(range(s))


def cfg_schedule_values(cfg: float, num_steps: int, kind: CfgSchedule = "linear") -> np.ndarray:
    """Guidance scale per outer step, float64 [S].

    "linear" (official): cfg_s = 1 + (cfg - 1) s / S  (1 at s = 0, never reaching cfg);
    "constant": cfg_s = cfg.
    """
    check_range("cfg", cfg, None, None)
    if kind == "linear":
        return np.array([1 + (cfg - 1) * i / num_steps for i in range(num_steps)], dtype=np.float64)
    if kind == "constant":
        return np.full(num_steps, float(cfg), dtype=np.float64)
    raise InvalidArgumentError(f"cfg_schedule must be one of {CFG_SCHEDULES}, got {kind!r}")


def temperature_schedule_values(
    temperature: float, num_steps: int, kind: TemperatureSchedule = "official", mode: Mode = "nomask"
) -> np.ndarray:
    """Noise temperature per outer step, float64 [S].

    "official", no-mask mode: tau_s = temperature * (0.8 + 0.2 (1 - cos(pi/2 (s + 1) / S)));
      with temperature = 1 this is the official ramp 0.80246 .. 1.0 (the official code ignores
      its temperature argument; we scale the ramp by it).
    "official", mask mode: tau_s = 0.85 + (temperature - 0.85) s / S (the official formula).
    "constant": tau_s = temperature.
    """
    check_range("temperature", temperature, 0.0, None)
    S = num_steps
    if kind == "constant":
        return np.full(S, float(temperature))
    if kind != "official":
        raise InvalidArgumentError(f"temperature_schedule must be one of {TEMPERATURE_SCHEDULES}, got {kind!r}")
    if mode == "mask":
        return np.array([0.85 + (temperature - 0.85) * s / S for s in range(S)])
    ramp = np.array([0.8 + 0.2 * (1 - math.cos(math.pi / 2 * (s + 1) / S)) for s in range(S)])
    return ramp if temperature == 1.0 else temperature * ramp


def inner_step_schedule(inner_steps: InnerSteps, num_steps: int) -> tuple[int, ...]:
    """Inner (DDPM or DDIM) steps at each outer step.

    "frequency-aware" (the paper): n_s = round(40 + 60 s / (S - 1)), 40 at the lowest level to 100
    at the highest (S = 1: 100); "official": 100 everywhere; an int: that count everywhere;
    a sequence: one count per outer step. Every count is in 1..:data:`MAX_INNER_STEPS`.
    """
    if isinstance(inner_steps, str):
        if inner_steps == "frequency-aware":
            lo, hi = FREQUENCY_AWARE_RANGE
            if num_steps == 1:
                return (hi,)
            return tuple(int(round(lo + (hi - lo) * s / (num_steps - 1))) for s in range(num_steps))
        if inner_steps == "official":
            return (OFFICIAL_INNER_STEPS,) * num_steps
        raise InvalidArgumentError(
            f"inner_steps must be one of {INNER_STEP_NAMES}, an integer or a list of integers, got {inner_steps!r}"
        )
    if isinstance(inner_steps, (int, np.integer)) and not isinstance(inner_steps, bool):
        counts = (inner_steps,) * num_steps
    else:
        if not isinstance(inner_steps, (list, tuple, np.ndarray)):
            raise InvalidArgumentError(
                f"inner_steps must be one of {INNER_STEP_NAMES}, an integer or a list of integers, got {inner_steps!r}"
            )
        counts = tuple(inner_steps)
        if len(counts) != num_steps:
            raise InvalidArgumentError(
                f"inner_steps list has {len(counts)} entries, need one per outer step ({num_steps})"
            )
    return tuple(int(check_range("each inner step count", n, 1, MAX_INNER_STEPS, integer=True)) for n in counts)


def mask_keep_counts(num_steps: int, num_tokens: int = GRID * GRID) -> tuple[int, ...]:
    """Mask mode: tokens left masked after step s: floor(L cos(pi/2 (s + 1) / S))."""
    return tuple(int(math.floor(num_tokens * math.cos(math.pi / 2 * (s + 1) / num_steps))) for s in range(num_steps))


@dataclass(frozen=True)
class SamplingPlan:
    """Everything a sampler needs per outer step, resolved and validated once.

    ``filter_after[s]`` is the level the output of step s is low-passed to before step s + 1
    (None: not filtered — the last step, and step 0 in mask mode).
    """

    mode: Mode
    levels: tuple[int, ...]
    cfg: tuple[float, ...]
    temperature: tuple[float, ...]
    inner_steps: tuple[int, ...]
    filter: FilterType
    filter_after: tuple[int | None, ...]
    x0_clip: float | None = None  # clamp x0_hat to [-x0_clip, x0_clip] (None: the official sampler, no clip)
    # "ddpm" (official) | "ddim" (far_sdk.maths.diffusion.DDIMTables) | "distilled" (far_sdk.maths.distilled)
    inner_sampler: InnerSampler = "ddpm"
    eta: float = 0.0  # DDIM's noise level in [0, 1]; always 0.0 (unused) for "ddpm"

    @property
    def num_steps(self) -> int:
        return len(self.levels)

    def step_table(self, s: int) -> np.ndarray:
        """float32 [n_s, 10]: the denoiser's ``step`` rows of outer step ``s`` in execution order, for
        this plan's inner sampler (:func:`far_sdk.maths.diffusion.denoise_step_table`; "distilled":
        :func:`far_sdk.maths.distilled.distilled_step_table`)."""
        if self.inner_sampler == "distilled":
            return distilled_step_table(self.inner_steps[s], self.cfg[s], self.temperature[s], self.x0_clip)
        return denoise_step_table(
            self.inner_steps[s],
            self.cfg[s],
            self.temperature[s],
            self.x0_clip,
            inner_sampler=self.inner_sampler,
            eta=self.eta,
        )

    def to_dict(self) -> dict:
        return asdict(self)


def make_plan(
    *,
    mode: Mode,
    num_steps: int | None,
    levels: Sequence[int] | None,
    cfg: float,
    cfg_schedule: CfgSchedule,
    temperature: float,
    temperature_schedule: TemperatureSchedule,
    inner_steps: InnerSteps,
    inner_sampler: InnerSampler,
    eta: float | None,
    filter: FilterType,
    x0_clip: float | Literal[False] | None,
) -> SamplingPlan:
    """The :class:`SamplingPlan` of fully resolved sampling options (the fields of
    :class:`far_sdk.options.SamplingOptions`, by name; :func:`far_sdk.options.resolve_plan` resolves them).

    Outer levels: ``levels`` when given, else :func:`outer_levels` of ``num_steps`` (mask mode: the official
    :data:`OFFICIAL_MASK_LEVELS` unless ``levels`` are given). With ``inner_steps=100`` (or "official") and
    the built-in defaults otherwise, the plan equals the official evaluated sampler (``sample_tokens_nomask``;
    ``mode="mask"``: ``sample_tokens_mask``). ``inner_sampler="ddim"`` runs each outer step's inner loop as
    DDIM with noise level ``eta`` (None: 0, deterministic); ``"distilled"`` runs a bundle's few-step student
    (1, 2 or 4 inner steps, :mod:`far_sdk.maths.distilled`). ``x0_clip`` False or None: no clipping.
    """
    check_choice("mode", mode, MODES)
    check_choice("inner_sampler", inner_sampler, INNER_SAMPLERS)
    check_choice("filter", filter, FILTER_TYPES)
    if inner_sampler in ("ddpm", "distilled"):
        if eta is not None:
            raise InvalidArgumentError(
                f"{arg('eta', eta)} applies only to {arg('inner_sampler', 'ddim')} (DDPM's noise is the model's "
                f"learned variance): leave it out, or add {arg('inner_sampler', 'ddim')}"
            )
        eta = 0.0
    else:
        eta = 0.0 if eta is None else eta
        check_eta(eta)
        eta = float(eta)
    clip = (
        None if x0_clip is None or x0_clip is False else float(check_range("x0_clip", x0_clip, 0.0, None, lo_open=True))
    )
    if levels is not None:
        levels = check_levels(levels)
        if num_steps is not None and num_steps != len(levels):
            raise InvalidArgumentError(
                f"{arg('num_steps', num_steps)} disagrees with the {len(levels)} levels given; give one of them"
            )
    elif mode == "mask":
        if num_steps not in (None, len(OFFICIAL_MASK_LEVELS)):
            raise InvalidArgumentError(
                f"{arg('mode', 'mask')} runs the official {len(OFFICIAL_MASK_LEVELS)} outer steps at fixed levels; "
                f"for {arg('num_steps', num_steps)} give the levels themselves, e.g. {arg('levels', (0, 4, 8, 12))}"
            )
        levels = OFFICIAL_MASK_LEVELS
    else:
        levels = outer_levels(len(OFFICIAL_LEVELS) if num_steps is None else num_steps)
    S = len(levels)
    counts = inner_step_schedule(inner_steps, S)
    if inner_sampler == "distilled":
        for n in counts:
            check_distilled_steps(n)
    return SamplingPlan(
        mode=mode,
        levels=levels,
        cfg=tuple(float(c) for c in cfg_schedule_values(cfg, S, cfg_schedule)),
        temperature=tuple(float(t) for t in temperature_schedule_values(temperature, S, temperature_schedule, mode)),
        inner_steps=counts,
        filter=filter,
        filter_after=filter_after(levels, mode),
        x0_clip=clip,
        inner_sampler=inner_sampler,
        eta=eta,
    )


def filter_after(levels: Sequence[int], mode: Mode) -> tuple[int | None, ...]:
    """The level each outer step's output is low-passed to (None: not filtered): the next step's level; never
    after the last step, and in mask mode not after step 0 either (the official ``sample_tokens_mask``)."""
    S = len(levels)
    first = 1 if mode == "mask" else 0
    return tuple(levels[s + 1] if first <= s < S - 1 else None for s in range(S))


def check_levels(levels: object) -> tuple[int, ...]:
    """Explicit outer levels: 1..MAX_OUTER_STEPS + 1 integers in 0..GRID - 1."""
    if isinstance(levels, (str, bytes)) or not isinstance(levels, (Sequence, np.ndarray)):
        raise InvalidArgumentError(
            f"levels must be a list of integer frequency levels in 0..{GRID - 1}, got {levels!r}"
        )
    out = tuple(int(check_range("each level", v, 0, GRID - 1, integer=True)) for v in levels)
    if not 1 <= len(out) <= MAX_OUTER_STEPS + 1:
        raise InvalidArgumentError(f"levels must have 1..{MAX_OUTER_STEPS + 1} entries, got {len(out)}")
    return out
