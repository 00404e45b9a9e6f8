"""Sampling options as one typed value: :class:`SamplingOptions`.

One value serves every layer, so the defaults and the precedence rule are written once:

- a bundle's manifest ``defaults`` is a ``SamplingOptions`` (validated at export and at load: an
  unknown key or a bad value is an error naming the valid ones);
- :data:`PRESETS` are ``SamplingOptions`` that set only the fields they name;
- ``Generator.generate(cfg=..., inner_steps=..., ...)`` keywords and ``far generate`` / ``far bench``
  flags (:func:`add_sampling_args`, :func:`options_from_args`) build one;
- :func:`resolve_plan` applies  built-in :data:`DEFAULTS` < bundle defaults < preset < given  and
  returns the validated :class:`~far_sdk.schedules.SamplingPlan` the samplers follow.

A field left at ``None`` is "not given". ``x0_clip=False`` means "no clipping" (the official sampler),
so that ``None`` can keep meaning "not given" everywhere.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

from .clirun import positive_int
from .diffusion import INNER_SAMPLERS
from .errors import InvalidArgumentError
from .filters import FILTER_TYPES
from .schedules import CfgSchedule, InnerSteps, Mode, SamplingPlan, TemperatureSchedule, make_plan


@dataclass(frozen=True)
class SamplingOptions:
    """Sampling settings; ``None`` = not given (a lower layer decides). See :func:`make_plan` for each meaning."""

    mode: Mode | None = None                         # "nomask" (official evaluated sampler) | "mask" (sample_tokens_mask)
    num_steps: int | None = None                     # outer steps 1..16
    levels: tuple[int, ...] | None = None            # explicit outer levels (instead of num_steps' schedule)
    cfg: float | None = None                         # guidance scale (diffusers' guidance_scale)
    cfg_schedule: CfgSchedule | None = None          # "linear" (official) | "constant"
    temperature: float | None = None
    temperature_schedule: TemperatureSchedule | None = None   # "official" | "constant"
    inner_steps: InnerSteps | None = None            # "frequency-aware" | "official" | N | (N1, N2, ...)
    inner_sampler: str | None = None                 # "ddpm" (official) | "ddim"
    eta: float | None = None                         # DDIM noise level in [0, 1]
    filter: str | None = None                        # "spatial" (official) | "fourier"
    x0_clip: float | Literal[False] | None = None    # clamp x0 estimates to [-x0_clip, x0_clip]; False: never

    def __post_init__(self) -> None:
        # lists become tuples: the value stays hashable and compares equal however it was spelt
        for name in ("levels", "inner_steps"):
            v = getattr(self, name)
            if isinstance(v, list):
                object.__setattr__(self, name, tuple(v))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, what: str = "sampling options") -> "SamplingOptions":
        """From a dict (a manifest's ``defaults``, a JSON config); unknown keys are an error. JSON null
        for ``x0_clip`` is "no clipping", as the manifest writes it."""
        if not isinstance(d, Mapping):
            raise InvalidArgumentError(f"{what} must be an object of option names, got {type(d).__name__}")
        unknown = sorted(set(d) - set(FIELDS))
        if unknown:
            raise InvalidArgumentError(f"{what}: unknown option(s) {unknown}; valid: {', '.join(FIELDS)}")
        kw = dict(d)
        if "x0_clip" in kw and kw["x0_clip"] is None:
            kw["x0_clip"] = False
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        """The given fields as JSON values (tuples as lists; ``x0_clip=False`` as null)."""
        out = {}
        for k, v in self.given().items():
            out[k] = None if (k == "x0_clip" and v is False) else (list(v) if isinstance(v, tuple) else v)
        return out

    def given(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def over(self, base: "SamplingOptions") -> "SamplingOptions":
        """``base`` with this value's given fields put over it."""
        return dataclasses.replace(base, **self.given())


#: Field names, in order.
FIELDS: tuple[str, ...] = tuple(f.name for f in fields(SamplingOptions))

#: The built-in defaults: the paper's sampler (10 outer steps, frequency-aware 40..100 DDPM inner steps,
#: the official linear CFG ramp and temperature schedule, the spatial filter, no x0 clipping).
DEFAULTS = SamplingOptions(mode="nomask", num_steps=10, cfg=3.0, cfg_schedule="linear", temperature=1.0, temperature_schedule="official",
                           inner_steps="frequency-aware", inner_sampler="ddpm", filter="spatial", x0_clip=False)

#: Named inner-loop settings (``generate(preset=...)``, ``far generate/bench --preset``). A preset sets only
#: the fields it gives, over the bundle's defaults; options passed explicitly override it. "fast" is the
#: measured fast setting (docs/BENCHMARKS.md, "Fewer inner steps"): 4.7x fewer inner steps than the paper's
#: schedule at its class accuracy and Fréchet distance on the demo bundle: the official DDPM step respaced
#: to 15 (with the learned variance it beat DDIM, eta 0 or 1, at every step count measured there).
PRESETS: dict[str, SamplingOptions] = {
    "paper": SamplingOptions(inner_sampler="ddpm", inner_steps="frequency-aware"),   # 700 DDPM steps (10 outer)
    "official": SamplingOptions(inner_sampler="ddpm", inner_steps="official"),       # 1000 DDPM steps (10 outer)
    "fast": SamplingOptions(inner_sampler="ddpm", inner_steps=15),                    # 150 DDPM steps (10 outer)
}


def preset(name: str) -> SamplingOptions:
    if name not in PRESETS:
        raise InvalidArgumentError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


def resolve_plan(defaults: SamplingOptions | Mapping[str, Any] = DEFAULTS, given: SamplingOptions | None = None, *,
                 preset_name: str | None = None) -> SamplingPlan:
    """The plan for built-in :data:`DEFAULTS` < ``defaults`` (a bundle's) < preset ``preset_name`` < ``given``.

    ``levels`` given at any layer replaces the ``num_steps`` of the layers below it. A default or preset
    ``eta`` applies only when the resolved sampler is "ddim"; an ``eta`` given with "ddpm" is an error.
    The default step count is a no-mask setting: mask mode takes its official 11 levels unless
    ``num_steps`` / ``levels`` are given explicitly (``given``).
    """
    if not isinstance(defaults, SamplingOptions):
        defaults = SamplingOptions.from_dict(defaults, what="bundle defaults")
    layers = [DEFAULTS, defaults] + ([preset(preset_name)] if preset_name is not None else []) + ([given] if given else [])
    o = SamplingOptions()
    for layer in layers:   # levels and num_steps both say how many outer steps: the higher layer's wins whole
        if layer.levels is not None and layer.num_steps is None:
            o = dataclasses.replace(o, num_steps=None)
        if layer.num_steps is not None and layer.levels is None:
            o = dataclasses.replace(o, levels=None)
        o = layer.over(o)
    if o.mode == "mask" and (given is None or (given.num_steps is None and given.levels is None)):
        o = dataclasses.replace(o, num_steps=None, levels=None)
    eta = o.eta
    if o.inner_sampler != "ddim" and not (given is not None and given.eta is not None):
        eta = None                                           # a default / preset eta is DDIM's only
    return make_plan(mode=o.mode, num_steps=o.num_steps, levels=o.levels, cfg=o.cfg, cfg_schedule_kind=o.cfg_schedule,
                     temperature=o.temperature, temperature_schedule_kind=o.temperature_schedule, inner_steps=o.inner_steps,
                     filter=o.filter, x0_clip=None if o.x0_clip is False else o.x0_clip, inner_sampler=o.inner_sampler, eta=eta)


#: The official FAR-T2I sampler's settings (training.sampler_t2i.t2i_plan): 10 outer steps at these levels, constant
#: CFG 3, 100 inner steps; the no-mask temperature ramp and filtering, with mask mode's token masking.
T2I_DEFAULTS = SamplingOptions(mode="mask", levels=(0, 2, 3, 4, 5, 6, 7, 8, 10, 13), cfg=3.0, cfg_schedule="constant",
                               inner_steps="official")


def resolve_text_plan(defaults: SamplingOptions | Mapping[str, Any], given: SamplingOptions | None = None, *,
                      preset_name: str | None = None) -> SamplingPlan:
    """The plan of a text-conditioned (FAR-T2I) bundle: the official T2I sampler is the no-mask schedule (levels,
    temperature ramp, a filter after every step but the last) run with mask mode's token masking, so the
    layers resolve as no-mask options (their levels kept) and the plan is then switched to mask mode.
    Mode "nomask" is refused: FAR-T2I samples in mask mode only."""
    if not isinstance(defaults, SamplingOptions):
        defaults = SamplingOptions.from_dict(defaults, what="bundle defaults")
    if given is not None and given.mode not in (None, "mask"):
        raise InvalidArgumentError(f"a text-conditioned (FAR-T2I) bundle samples in mask mode only; got mode={given.mode!r} "
                                   "(pass mode='mask' or leave it out)")
    plan = resolve_plan(dataclasses.replace(defaults.over(T2I_DEFAULTS), mode="nomask"),
                        None if given is None else dataclasses.replace(given, mode=None), preset_name=preset_name)
    return dataclasses.replace(plan, mode="mask")


def plan_options(plan: SamplingPlan) -> SamplingOptions:
    """Options that resolve to ``plan``'s levels, inner steps and sampler over the same defaults (for benchmarks
    that re-run a plan: cfg, temperature and clipping still come from the bundle's defaults)."""
    return SamplingOptions(levels=plan.levels, inner_steps=plan.inner_steps, inner_sampler=plan.inner_sampler,
                           eta=plan.eta if plan.inner_sampler == "ddim" else None)


# ---- command line (far generate, far bench) ------------------------------------------------------------


def parse_inner_steps(v: str) -> InnerSteps:
    if v in ("frequency-aware", "official"):
        return v
    try:
        parts = [int(p) for p in v.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'frequency-aware', 'official', N or N1,N2,..., got {v!r}") from None
    return parts[0] if len(parts) == 1 else tuple(parts)


def add_sampling_args(p: argparse.ArgumentParser, *, presets: Literal["one", "list"] = "one") -> None:
    """The sampling flags of ``far generate`` and ``far bench`` (``--preset`` takes a comma list with "list")."""
    p.add_argument("--mode", choices=["nomask", "mask"], default=None,
                   help="nomask (the official evaluated sampler) or mask (the official sample_tokens_mask: 11 steps, tokens "
                        "unmasked in a seeded random order); default: the bundle's (see `far info`)")
    p.add_argument("--steps", type=positive_int, default=None, help="outer steps 1..16 (default: the bundle's, 10; mask mode: 11)")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the bundle's, 3.0)")
    p.add_argument("--cfg-schedule", choices=["linear", "constant"], default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--inner-steps", type=parse_inner_steps, default=None,
                   help="'frequency-aware' (default), 'official' (100), N, or N1,N2,... per outer step")
    p.add_argument("--inner-sampler", choices=INNER_SAMPLERS, default=None,
                   help="ddpm (the official sampler, default) or ddim (fewer inner steps; see --eta)")
    p.add_argument("--eta", type=float, default=None, help="DDIM noise level in [0, 1] (default 0: deterministic)")
    p.add_argument("--filter", choices=list(FILTER_TYPES), default=None)
    clip = p.add_mutually_exclusive_group()
    clip.add_argument("--x0-clip", type=float, default=None, help="clamp x0 estimates to [-X, X] (default: the bundle's)")
    clip.add_argument("--no-x0-clip", action="store_true", help="never clip x0 (the official sampler)")
    names = ", ".join(sorted(PRESETS))
    if presets == "one":
        p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                       help="named inner-loop setting (fast: 4.7x fewer inner steps than paper); the options above override it")
    else:
        p.add_argument("--preset", type=lambda v: [s.strip() for s in v.split(",") if s.strip()], default=[], metavar="NAME[,NAME...]",
                       help=f"named settings ({names}), several = one after the other in this run with speed-ups against the "
                            "first (e.g. paper,fast); the options above override them")


def options_from_args(a: argparse.Namespace) -> SamplingOptions:
    """The :class:`SamplingOptions` the flags of :func:`add_sampling_args` give (unset flags stay None)."""
    return SamplingOptions(mode=a.mode, num_steps=a.steps, cfg=a.cfg, cfg_schedule=a.cfg_schedule, temperature=a.temperature,
                           inner_steps=a.inner_steps, inner_sampler=a.inner_sampler, eta=a.eta, filter=a.filter,
                           x0_clip=False if a.no_x0_clip else a.x0_clip)

