"""Sampling options as one typed value: :class:`SamplingOptions`, each field described once.

Every option is a field of :class:`SamplingOptions` with an :class:`OptionSpec` (its meaning, its kind
and range; a ``Literal`` option's choices come from its type in :mod:`far_sdk.maths`). Everything else is
derived from those fields, so adding an option is a field here plus its effect on the plan
(:func:`far_sdk.maths.schedules.make_plan`):

- the manifest schema's ``defaults`` (:func:`options_json_schema`; checked at export and at load);
- the CLI flags of ``far generate`` / ``bench`` / ``serve`` / ``generate-dataset`` (:mod:`far_sdk.cli.sampling`);
- ``Generator.generate``'s sampling keywords and their documentation (:func:`options_from_keywords`,
  :func:`options_doc`);
- :func:`resolve_plan`: built-in :data:`DEFAULTS` < bundle defaults < :data:`PRESETS` entry < given, into the
  validated :class:`~far_sdk.maths.schedules.SamplingPlan` the samplers follow.

A field left at ``None`` is "not given". ``x0_clip=False`` means "no clipping" (the official sampler),
so that ``None`` can keep meaning "not given" everywhere. Values are checked when a value is built:
``SamplingOptions(levels=5)`` is an :class:`~far_sdk.errors.InvalidArgumentError` naming the field.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from far_sdk.compat import DIFFUSERS_ALIASES, DIFFUSERS_HINTS
from far_sdk.errors import InvalidArgumentError, arg, check_choice, check_range, did_you_mean
from far_sdk.maths.diffusion import INNER_SAMPLERS, InnerSampler
from far_sdk.maths.filters import FILTER_TYPES, GRID, FilterType
from far_sdk.maths.schedules import (
    CFG_SCHEDULES,
    INNER_STEP_NAMES,
    MAX_INNER_STEPS,
    MAX_OUTER_STEPS,
    MODES,
    TEMPERATURE_SCHEDULES,
    CfgSchedule,
    InnerSteps,
    Mode,
    SamplingPlan,
    TemperatureSchedule,
    check_levels,
    make_plan,
)

OptionKind = Literal["choice", "int", "float", "levels", "inner_steps", "clip"]


@dataclass(frozen=True)
class OptionSpec:
    """What one option means and what it accepts."""

    doc: str  # one or two sentences: the CLI help, the API docs, generate's docstring
    kind: OptionKind
    choices: tuple[str, ...] = ()  # kind "choice" (from the option's Literal type)
    lo: float | None = None  # kinds "int" / "float": the range [lo, hi] ((lo, hi] with lo_open)
    hi: float | None = None
    lo_open: bool = False
    flag: str | None = None  # the CLI flag, when not --the-field-name

    def check(self, name: str, value: Any) -> Any:
        """``value`` normalised (lists -> tuples, ints -> floats where a float is meant); else InvalidArgumentError."""
        if self.kind == "choice":
            return check_choice(name, value, self.choices)
        if self.kind == "int":
            return int(check_range(name, value, self.lo, self.hi, integer=True))
        if self.kind == "float":
            return float(check_range(name, value, self.lo, self.hi, lo_open=self.lo_open))
        if self.kind == "levels":
            return check_levels(value)
        if self.kind == "inner_steps":
            if isinstance(value, str):
                return check_choice(name, value, INNER_STEP_NAMES)
            if isinstance(value, (list, tuple)):
                if not 1 <= len(value) <= MAX_OUTER_STEPS + 1:
                    raise InvalidArgumentError(
                        f"{name} list must have one count per outer step (1..{MAX_OUTER_STEPS + 1}), got {len(value)}"
                    )
                return tuple(int(check_range(f"each {name} count", n, 1, MAX_INNER_STEPS, integer=True)) for n in value)
            return int(check_range(name, value, 1, MAX_INNER_STEPS, integer=True))
        if value is False:  # kind "clip"
            return False
        return float(check_range(name, value, self.lo, self.hi, lo_open=self.lo_open))

    def json_schema(self) -> dict[str, Any]:
        """This option's JSON Schema (2020-12): the manifest's ``defaults`` and the HTTP API's request fields."""

        def num(integer: bool = False) -> dict[str, Any]:
            s: dict[str, Any] = {"type": "integer" if integer else "number"}
            if self.lo is not None:
                s["exclusiveMinimum" if self.lo_open else "minimum"] = self.lo
            if self.hi is not None:
                s["maximum"] = self.hi
            return s

        steps = {"type": "integer", "minimum": 1, "maximum": MAX_INNER_STEPS}
        return {
            "choice": lambda: {"enum": list(self.choices)},
            "int": lambda: num(integer=True),
            "float": num,
            "levels": lambda: {
                "type": "array",
                "items": {"type": "integer", "minimum": 0, "maximum": GRID - 1},
                "minItems": 1,
                "maxItems": MAX_OUTER_STEPS + 1,
            },
            "inner_steps": lambda: {
                "oneOf": [
                    {"enum": list(INNER_STEP_NAMES)},
                    steps,
                    {"type": "array", "items": steps, "minItems": 1, "maxItems": MAX_OUTER_STEPS + 1},
                ]
            },
            "clip": lambda: {"oneOf": [{"type": "null"}, num()]},
        }[self.kind]()


def _option(doc: str, kind: OptionKind, **spec: Any) -> Any:
    return field(default=None, metadata={"spec": OptionSpec(doc, kind, **spec)})


@dataclass(frozen=True)
class SamplingOptions:
    """Sampling settings; ``None`` = not given (a lower layer decides: see :func:`resolve_plan`)."""

    mode: Mode | None = _option(
        "'nomask': the official evaluated sampler; 'mask': the official sample_tokens_mask (11 outer steps, tokens "
        "unmasked in each image's seeded random order). A model built with mask=True samples in mask mode only.",
        "choice",
        choices=MODES,
    )
    num_steps: int | None = _option(
        "outer steps (levels low -> high): 10 is the official list 0, 2, 3, ..., 10 (mask mode: its own 11 levels).",
        "int",
        lo=1,
        hi=MAX_OUTER_STEPS,
        flag="--steps",
    )
    levels: tuple[int, ...] | None = _option(
        "explicit input frequency level of each outer step (instead of num_steps' schedule), e.g. 0,4,8,12.", "levels"
    )
    cfg: float | None = _option(
        "classifier-free guidance scale (diffusers' guidance_scale); 1 = no guidance.", "float", lo=0.0, hi=1000.0
    )
    cfg_schedule: CfgSchedule | None = _option(
        "'linear': the official ramp from 1 to cfg over the outer steps; 'constant': cfg at every step.",
        "choice",
        choices=CFG_SCHEDULES,
    )
    temperature: float | None = _option(
        "noise temperature; with the official schedule it scales the per-step ramp 0.80 -> 1.0.",
        "float",
        lo=0.0,
        hi=100.0,
    )
    temperature_schedule: TemperatureSchedule | None = _option(
        "'official': the official code's per-step ramp (scaled by temperature); 'constant': temperature everywhere.",
        "choice",
        choices=TEMPERATURE_SCHEDULES,
    )
    inner_steps: InnerSteps | None = _option(
        "denoising steps per outer step: 'frequency-aware' (the paper's 40..100, 700 in all), 'official' (100), "
        "N, or one count per outer step (N1,N2,...).",
        "inner_steps",
    )
    inner_sampler: InnerSampler | None = _option(
        "'ddpm': the official sampler (learned variance); 'ddim': deterministic or eta-noised DDIM; 'distilled': the "
        "bundle's few-step student (inner_steps 1, 2 or 4; far-export fewstep adds it).",
        "choice",
        choices=INNER_SAMPLERS,
    )
    eta: float | None = _option(
        "DDIM's noise level (0: deterministic; 1: DDPM-like); only with inner_sampler ddim.", "float", lo=0.0, hi=1.0
    )
    filter: FilterType | None = _option(
        "the low-pass filter between outer steps: 'spatial' (the official area + bicubic) or 'fourier' (the paper's).",
        "choice",
        choices=FILTER_TYPES,
    )
    x0_clip: float | Literal[False] | None = _option(
        "clamp each step's x0 estimate to [-X, X]; False (CLI --no-x0-clip, JSON null): never (the official sampler).",
        "clip",
        lo=0.0,
        hi=1e6,
        lo_open=True,
    )

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if v is not None:  # checked once, here: a bad value never gets further
                object.__setattr__(self, f.name, f.metadata["spec"].check(f.name, v))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, what: str = "sampling options") -> SamplingOptions:
        """From a dict (a manifest's ``defaults``, a JSON config); unknown keys are an error. JSON null
        for ``x0_clip`` is "no clipping", as the manifest writes it."""
        if not isinstance(d, Mapping):
            raise InvalidArgumentError(f"{what} must be an object of option names, got {type(d).__name__}")
        _check_names(d, FIELDS, f"{what}: unknown option(s)")
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

    def over(self, base: SamplingOptions) -> SamplingOptions:
        """``base`` with this value's given fields put over it. ``levels`` and ``num_steps`` both say how many
        outer steps there are: the one given here replaces both of ``base``'s (unless both are given here)."""
        if self.levels is not None and self.num_steps is None:
            base = dataclasses.replace(base, num_steps=None)
        if self.num_steps is not None and self.levels is None:
            base = dataclasses.replace(base, levels=None)
        return dataclasses.replace(base, **self.given())


#: Field names, in order.
FIELDS: tuple[str, ...] = tuple(f.name for f in fields(SamplingOptions))
#: Each field's :class:`OptionSpec`.
SPECS: dict[str, OptionSpec] = {f.name: f.metadata["spec"] for f in fields(SamplingOptions)}

#: The built-in defaults: the paper's sampler (10 outer steps, frequency-aware 40..100 DDPM inner steps,
#: the official linear CFG ramp and temperature schedule, the spatial filter, no x0 clipping).
DEFAULTS = SamplingOptions(
    mode="nomask",
    num_steps=10,
    cfg=3.0,
    cfg_schedule="linear",
    temperature=1.0,
    temperature_schedule="official",
    inner_steps="frequency-aware",
    inner_sampler="ddpm",
    filter="spatial",
    x0_clip=False,
)

#: Named inner-loop settings (``generate(preset=...)``, ``far generate/bench --preset``). A preset sets only
#: the fields it gives, over the bundle's defaults; options passed explicitly override it. "fast" is the
#: measured fast setting (docs/BENCHMARKS.md, "Fewer inner steps"): 4.7x fewer inner steps than the paper's
#: schedule at its class accuracy and Fréchet distance on the demo bundle: the official DDPM step respaced
#: to 15 (with the learned variance it beat DDIM, eta 0 or 1, at every step count measured there).
PRESETS: dict[str, SamplingOptions] = {
    "paper": SamplingOptions(inner_sampler="ddpm", inner_steps="frequency-aware"),  # 700 DDPM steps (10 outer)
    "official": SamplingOptions(inner_sampler="ddpm", inner_steps="official"),  # 1000 DDPM steps (10 outer)
    "fast": SamplingOptions(inner_sampler="ddpm", inner_steps=15),  # 150 DDPM steps (10 outer)
    # 40 steps of the bundle's distilled student (docs/DISTILLATION.md): needs its denoiser_fewstep graph
    "distilled": SamplingOptions(inner_sampler="distilled", inner_steps=4),
}

#: The official FAR-T2I sampler's settings (shared/spec §11): 10 outer steps at these levels, constant CFG 3,
#: 100 inner steps; the no-mask temperature ramp and filtering, with mask mode's token masking.
T2I_DEFAULTS = SamplingOptions(
    mode="mask", levels=(0, 2, 3, 4, 5, 6, 7, 8, 10, 13), cfg=3.0, cfg_schedule="constant", inner_steps="official"
)


def preset(name: object) -> SamplingOptions:
    if not isinstance(name, str):
        raise InvalidArgumentError(
            f"preset must be one preset name (a string), got {type(name).__name__} {name!r}; choose one of "
            f"{sorted(PRESETS)}"
        )
    if name not in PRESETS:
        raise InvalidArgumentError(
            f"unknown preset {name!r}; choose one of {sorted(PRESETS)}{did_you_mean(name, PRESETS)}"
        )
    return PRESETS[name]


def resolve_plan(
    defaults: SamplingOptions | Mapping[str, Any] = DEFAULTS,
    given: SamplingOptions | None = None,
    *,
    preset_name: str | None = None,
) -> SamplingPlan:
    """The plan for built-in :data:`DEFAULTS` < ``defaults`` (a bundle's) < preset ``preset_name`` < ``given``.

    ``levels`` given at any layer replaces the ``num_steps`` of the layers below it, and the other way round
    (within ``given`` itself both may be given when they agree). A default or preset ``eta`` applies only when
    the resolved sampler is "ddim"; an ``eta`` given with "ddpm" is an error. The default step count is a
    no-mask setting: mask mode takes its official 11 levels unless ``num_steps`` / ``levels`` are given
    explicitly (``given``).
    """
    if not isinstance(defaults, SamplingOptions):
        defaults = SamplingOptions.from_dict(defaults, what="bundle defaults")
    layers = (
        [DEFAULTS, defaults] + ([preset(preset_name)] if preset_name is not None else []) + ([given] if given else [])
    )
    o = SamplingOptions()
    for layer in layers:
        o = layer.over(o)
    if o.mode == "mask" and (given is None or (given.num_steps is None and given.levels is None)):
        o = dataclasses.replace(o, num_steps=None, levels=None)
    if o.inner_sampler != "ddim" and not (given is not None and given.eta is not None):
        o = dataclasses.replace(o, eta=None)  # a default / preset eta is DDIM's only
    return make_plan(**{name: getattr(o, name) for name in FIELDS})


def resolve_text_plan(
    defaults: SamplingOptions | Mapping[str, Any],
    given: SamplingOptions | None = None,
    *,
    preset_name: str | None = None,
) -> SamplingPlan:
    """The plan of a text-conditioned (FAR-T2I) bundle: the official T2I sampler is the no-mask schedule (levels,
    temperature ramp, a filter after every step but the last) run with mask mode's token masking, so the
    layers resolve as no-mask options (their levels kept) and the plan is then switched to mask mode.
    Mode "nomask" is refused: FAR-T2I samples in mask mode only."""
    if not isinstance(defaults, SamplingOptions):
        defaults = SamplingOptions.from_dict(defaults, what="bundle defaults")
    if given is not None and given.mode not in (None, "mask"):
        raise InvalidArgumentError(
            f"a text-conditioned (FAR-T2I) bundle samples in mask mode only; got {arg('mode', given.mode)} "
            f"(choose {arg('mode', 'mask')} or leave it out)"
        )
    plan = resolve_plan(
        dataclasses.replace(defaults.over(T2I_DEFAULTS), mode="nomask"),
        None if given is None else dataclasses.replace(given, mode=None),
        preset_name=preset_name,
    )
    return dataclasses.replace(plan, mode="mask")


def plan_options(plan: SamplingPlan) -> SamplingOptions:
    """Options that resolve to ``plan``'s levels, inner steps and sampler over the same defaults (for benchmarks
    that re-run a plan: cfg, temperature and clipping still come from the bundle's defaults)."""
    return SamplingOptions(
        levels=plan.levels,
        inner_steps=plan.inner_steps,
        inner_sampler=plan.inner_sampler,
        eta=plan.eta if plan.inner_sampler == "ddim" else None,
    )


def options_from_keywords(
    keywords: Mapping[str, Any],
    *,
    base: SamplingOptions | None = None,
    where: str = "generate()",
    other_names: Iterable[str] = (),
) -> SamplingOptions:
    """The :class:`SamplingOptions` of keyword arguments (None = not given) put over ``base``; a keyword that is
    no option is an :class:`InvalidArgumentError` naming the closest option or ``other_names`` entry."""
    keywords = dict(keywords)
    for alias, name in DIFFUSERS_ALIASES.items():
        if keywords.get(alias) is not None:
            if keywords.get(name) is not None:
                raise InvalidArgumentError(f"{where}: give {name} or its diffusers name {alias}, not both")
            keywords[name] = keywords.pop(alias)
        keywords.pop(alias, None)
    _check_names(keywords, (*FIELDS, *DIFFUSERS_ALIASES, *other_names), f"{where}: unknown keyword")
    given = SamplingOptions(**{k: v for k, v in keywords.items() if v is not None})
    return given if base is None else given.over(base)


def options_doc(indent: str = "    ") -> str:
    """One line per option (its meaning and built-in default): generate's docstring and the README's table."""
    lines = []
    for name, spec in SPECS.items():
        default = getattr(DEFAULTS, name)
        shown = "" if default is None else f" Built-in default: {'no clipping' if default is False else repr(default)}."
        lines.append(f"{indent}{name}: {spec.doc}{shown}")
    return "\n".join(lines)


def options_json_schema() -> dict[str, Any]:
    """JSON Schema of a ``SamplingOptions`` object (every field optional, no other keys)."""
    return {
        "type": "object",
        "properties": {name: spec.json_schema() for name, spec in SPECS.items()},
        "additionalProperties": False,
    }


def _check_names(names: Iterable[str], valid: Iterable[str], what: str) -> None:
    """InvalidArgumentError for names outside ``valid``: diffusers' counterpart, the closest valid name, or all."""
    valid = tuple(valid)
    unknown = [k for k in names if k not in valid]
    if unknown:
        first = unknown[0]
        hint = f" ({DIFFUSERS_HINTS[first]})" if first in DIFFUSERS_HINTS else did_you_mean(first, valid)
        raise InvalidArgumentError(f"{what} {', '.join(map(repr, unknown))}{hint or '; valid: ' + ', '.join(valid)}")
