"""diffusers' names on ``Generator.generate``: a user coming from diffusers types ``guidance_scale=``,
``num_images_per_prompt=``, ``callback_on_step_end=``; these work as documented aliases, and the names with no
one-to-one counterpart (``num_inference_steps``, ``generator``, ...) get an error saying what to pass instead.
(``negative_prompt`` is a text bundle's own keyword: far_sdk.conditioning.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from far_sdk.errors import InvalidArgumentError

#: diffusers' names that mean exactly a far-sdk option here (``generate(guidance_scale=4.0)`` = ``cfg=4.0``).
DIFFUSERS_ALIASES = {"guidance_scale": "cfg"}
#: diffusers' names with no one-to-one counterpart: what to pass instead (the unknown keyword's error says it).
DIFFUSERS_HINTS = {
    "num_inference_steps": "FAR has two step counts: num_steps (outer steps) and inner_steps (per outer step)",
    "generator": "pass seed= (an int; image i uses seed + i) or noise= (a noise source)",
    "latents": "pass noise= (a noise source) to replay draws",
    "height": "the image size is the bundle's (far info)",
    "width": "the image size is the bundle's (far info)",
    "return_dict": "generate() always returns a GenerationOutput",
    "callback": "pass on_step= or callback_on_step_end=",
}


def repeat_each(condition: Any, n: int) -> Any:
    """Each image's conditioning ``n`` times in a row (``num_images_per_prompt``). ``condition`` is a dataclass
    (far_sdk.conditioning) whose per-image fields are tuples or arrays of length B; its other fields are kept."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InvalidArgumentError(f"num_images_per_prompt must be a positive integer, got {n!r}")
    B = len(condition)

    def rep(v: Any) -> Any:
        if isinstance(v, tuple) and len(v) == B:
            return tuple(x for x in v for _ in range(n))
        return np.repeat(v, n, axis=0) if isinstance(v, np.ndarray) and v.shape[:1] == (B,) else v

    return condition if n == 1 else dataclasses.replace(condition, **{k: rep(v) for k, v in vars(condition).items()})


def diffusers_callback(gen: Any, callback: Callable[..., Any], on_step: Any) -> Callable[[Any], None]:
    """diffusers' ``callback_on_step_end(pipe, step, timestep, callback_kwargs) -> dict`` as an ``on_step`` (it gets
    a far_sdk.StepInfo): called with the Generator, the outer step, its level and ``{"latents": ...}``."""
    if on_step is not None:
        raise InvalidArgumentError("give on_step or callback_on_step_end (diffusers' name), not both")

    def step(info: Any) -> None:
        out = callback(gen, info.step, info.level, {"latents": info.latents})
        if isinstance(out, dict) and out.get("latents", info.latents) is not info.latents:
            raise InvalidArgumentError(
                "callback_on_step_end returned new latents; far-sdk does not feed latents back into the loop "
                "(return callback_kwargs unchanged)"
            )

    return step
