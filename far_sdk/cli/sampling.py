"""The sampling flags of ``far generate``, ``far bench``, ``far serve`` and ``far generate-dataset``, derived from
:class:`far_sdk.SamplingOptions`: one flag per field (``--steps`` for ``num_steps``, ``--x0-clip X`` /
``--no-x0-clip`` for ``x0_clip``), its choices, type, range and help taken from the field's
:class:`~far_sdk.options.OptionSpec`. A bad value is a usage error naming the flag, in the words generate() uses
for the option; :data:`CLI_FLAGS` lets any other error of a ``far`` command name flags too."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable
from typing import Any, Literal

from far_sdk.errors import InvalidArgumentError, did_you_mean
from far_sdk.maths.schedules import INNER_STEP_NAMES
from far_sdk.options import PRESETS, SPECS, OptionSpec, SamplingOptions


def flag_of(name: str) -> str:
    """The CLI flag of option ``name`` (``num_steps`` -> ``--steps``)."""
    return SPECS[name].flag or "--" + name.replace("_", "-")


#: generate()'s parameters -> the flags of ``far generate``: how the errors of a ``far`` command name them
#: (far_sdk.errors.arg).
CLI_FLAGS: dict[str, str] = {
    **{name: flag_of(name) for name in SPECS},
    "class_labels": "--class",
    "prompt": "--prompt",
    "negative_prompt": "--negative-prompt",
    "seed": "--seed",
    "preset": "--preset",
    "num_images_per_prompt": "-n",
}


def _ints(text: str, flag: str) -> list[int]:
    try:
        return [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentError(None, f"{flag} must be integers separated by commas, got {text!r}") from None


def _parser(name: str, spec: OptionSpec) -> Callable[[str], Any]:
    """argparse ``type`` for one option: text -> value, checked by the option's own rules, whose error names the
    flag (``--steps must be an integer in 1..16, got 0``: the wording generate() uses for ``num_steps``)."""
    flag = flag_of(name)

    def parse(text: str) -> Any:
        value: Any = text
        with contextlib.suppress(ValueError):  # not a number: the option's check below says what it must be
            value = int(text) if spec.kind == "int" else float(text) if spec.kind in ("float", "clip") else text
        if spec.kind == "levels":
            value = _ints(text, flag)
        elif spec.kind == "inner_steps" and text not in INNER_STEP_NAMES:
            try:
                value = [int(p) for p in text.split(",") if p.strip()]
            except ValueError:
                raise argparse.ArgumentError(
                    None,
                    f"{flag} must be one of {', '.join(map(repr, INNER_STEP_NAMES))}, a count N or one count per "
                    f"outer step N1,N2,..., got {text!r}{did_you_mean(text, INNER_STEP_NAMES)}",
                ) from None
            value = value[0] if len(value) == 1 else value
        try:
            return spec.check(flag, value)
        except InvalidArgumentError as e:
            raise argparse.ArgumentError(None, str(e) if str(e).startswith(flag) else f"{flag}: {e}") from None

    parse.__name__ = name
    return parse


_METAVARS = {"levels": "L1,L2,...", "inner_steps": "N|N1,N2,...|NAME", "int": "N", "float": "X", "clip": "X"}


def add_sampling_args(p: argparse.ArgumentParser, *, presets: Literal["one", "list"] = "one") -> None:
    """One flag per :class:`SamplingOptions` field (default: not given, so the bundle's default applies), and
    ``--preset`` (one name; with ``presets="list"`` a comma list, run one after the other by ``far bench``)."""
    g = p.add_argument_group("sampling options (default: the bundle's, see `far info`)")
    for name, spec in SPECS.items():
        kw: dict[str, Any] = {"dest": name, "default": None, "help": spec.doc}
        if spec.kind == "choice":
            kw["choices"] = spec.choices
        else:
            kw.update(type=_parser(name, spec), metavar=_METAVARS.get(spec.kind, _METAVARS.get(name)))
        if spec.kind == "clip":
            clip = g.add_mutually_exclusive_group()
            clip.add_argument(flag_of(name), **kw)
            clip.add_argument(
                "--no-" + flag_of(name)[2:],
                dest=name,
                action="store_const",
                const=False,
                help="never clip x0 (the official sampler)",
            )
        else:
            g.add_argument(flag_of(name), **kw)
    names = ", ".join(sorted(PRESETS))
    if presets == "one":
        g.add_argument(
            "--preset",
            choices=sorted(PRESETS),
            default=None,
            help="a named setting put under the options above (fast: 4.7x fewer inner steps than paper)",
        )
    else:
        g.add_argument(
            "--preset",
            type=lambda v: [s.strip() for s in v.split(",") if s.strip()],
            default=[],
            metavar="NAME[,NAME...]",
            help=f"named settings ({names}); several run one after the other, with speed-ups against the "
            "first (e.g. paper,fast); the options above override them",
        )


def options_from_args(a: argparse.Namespace) -> SamplingOptions:
    """The :class:`SamplingOptions` the flags of :func:`add_sampling_args` give (unset flags stay None)."""
    return SamplingOptions(**{name: getattr(a, name) for name in SPECS})
