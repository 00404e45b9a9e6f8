"""The reference FAR-T2I sampler: the official ``FAR_T2I.sample_tokens`` made runnable (spec §11-§12).

It is the mask-mode loop of :mod:`training.sampler` (one code path: :func:`training.sampler.iter_conditioned`)
with T2I's schedule and conditioning:

- 10 outer steps at levels (0, 2, 3, 4, 5, 6, 7, 8, 10, 13);
- constant CFG (the official code computes the linear ramp, then overwrites it with ``cfg``);
- temperature tau_s = 0.8 + 0.2 (1 - cos(pi/2 (s + 1) / 10)) (the no-mask ramp; ``temperature`` scales it);
- the output of every step but the last is low-passed to the next level (step 0 included);
- tokens left masked after step s: floor(256 cos(pi/2 (s + 1) / 10)), the first entries of each image's order;
- conditional rows cross-attend to ``context_embed(context)``, unconditional rows to ``fake_latent``.

What the published code cannot do and this does: call the inner DDPM loop without the stray ``device``
argument and feed the level as a float. Noise and orders come from a far_sdk noise source in the order
documented in :mod:`far_sdk.maths.noise` (SeededNoise: image i uses seed + i; ReplayNoise replays draws).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from far_sdk.errors import InvalidArgumentError
from far_sdk.maths.noise import NoiseFn
from far_sdk.maths.schedules import SamplingPlan
from far_sdk.options import T2I_DEFAULTS, SamplingOptions, resolve_text_plan

from .far_t2i import FART2I
from .sampler import ReferenceStep, iter_conditioned


def t2i_plan(**options) -> SamplingPlan:
    """The official T2I schedule (:data:`far_sdk.options.T2I_DEFAULTS`; mask mode, constant CFG) with ``options``
    (:class:`far_sdk.SamplingOptions` fields: cfg, temperature, inner_steps, ...) put over it."""
    return resolve_text_plan(T2I_DEFAULTS, SamplingOptions(**options))


def _check_context(model: FART2I, context: torch.Tensor | np.ndarray) -> torch.Tensor:
    cfg = model.config
    c = torch.as_tensor(context)
    want = (cfg.context_len, cfg.context_dim)
    if c.ndim != 3 or tuple(c.shape[1:]) != want or c.shape[0] == 0:
        raise InvalidArgumentError(
            f"context must be text hidden states [B, {want[0]}, {want[1]}] (B >= 1) for this model, "
            f"got shape {list(c.shape)}; encode prompts with the model's text encoder "
            "(training.text_encoder) padded/truncated to its context length"
        )
    if not c.is_floating_point() or not bool(torch.isfinite(c).all()):
        raise InvalidArgumentError("context must hold finite floating-point values")
    return c


@torch.no_grad()
def iter_reference_t2i(
    model: FART2I,
    context: torch.Tensor | np.ndarray,
    *,
    plan: SamplingPlan | None = None,
    seed: int = 0,
    noise: NoiseFn | None = None,
    orders: np.ndarray | None = None,
    **plan_options,
) -> Iterator[ReferenceStep]:
    """Run the T2I reference sampler on text hidden states ``context`` [B, T, Dtxt], yielding each outer step.

    ``plan`` (or ``plan_options`` for :func:`t2i_plan`: cfg, temperature, inner_steps, ...) fixes the
    schedules; ``noise`` replays draws, otherwise image i uses seed + i; ``orders`` [B, L] sets the token orders
    (default: from the noise source, ``noise.orders``).
    """
    if not isinstance(model, FART2I):
        raise InvalidArgumentError(
            f"iter_reference_t2i needs a FART2I model, got {type(model).__name__}; "
            "class-conditional models use training.sampler.iter_reference"
        )
    if plan is None:
        plan = t2i_plan(**plan_options)
    elif plan_options:
        raise InvalidArgumentError(f"pass either plan or plan options, not both (got {sorted(plan_options)})")
    p = next(model.parameters())
    ctx = _check_context(model, context).to(device=p.device, dtype=p.dtype)
    yield from iter_conditioned(model, model.cfg_context(ctx), plan, seed=seed, noise=noise, orders=orders)


def sample_reference_t2i(model: FART2I, context, **kwargs) -> torch.Tensor:
    """Drain :func:`iter_reference_t2i`; the final latents [B, C, H, W] (decode with ``vae.decode(x / scale)``)."""
    last = None
    for last in iter_reference_t2i(model, context, **kwargs):  # noqa: B007 - drained: the last step is the result
        pass
    return last.latents
