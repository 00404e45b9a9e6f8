"""The reference FAR sampler in PyTorch: the ground truth every backend is tested against.

It follows the official ``sample_tokens_nomask`` / ``sample_tokens_mask`` step for step (both CFG
branches in one batch, the official float32 evaluation order, ``F.interpolate`` for the spatial
filter), driven by a :class:`far_sdk.maths.schedules.SamplingPlan` and a noise source called in the order
documented in :mod:`far_sdk.maths.noise`. With ``inner_steps=100`` and the official level, CFG and
temperature schedules it reproduces the official evaluated sampler given the same draws.

Each DDPM inner step is ``training.graph_modules.ddpm_update`` on one row of the plan's step table
(``far_sdk.maths.diffusion.Step``): the one implementation of the step, tested against float64 maths and,
through this sampler, against the official code's traces. ``plan.inner_sampler == "ddim"`` runs the
inner loop as DDIM, written as the textbook update (eps re-derived from the clipped x0, then
sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps' + sigma z) rather than the folded (c1, c2)
coefficients the runtime's denoiser graph uses, so the parity tests check the folding too.

Written for clarity, not speed: it recomputes the MLP's condition projection at every inner step
exactly as the official code does (``far bench``'s eager baseline, :mod:`training.eager`, does the same work).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from far_sdk.errors import InvalidArgumentError
from far_sdk.maths.diffusion import DDIMTables, ddim_tables
from far_sdk.maths.diffusion import Step as S
from far_sdk.maths.noise import NoiseFn, SeededNoise
from far_sdk.maths.schedules import SamplingPlan, mask_keep_counts
from far_sdk.options import SamplingOptions, resolve_plan

from .far import FAR
from .filters import grid_to_tokens, official_low_pass, tokens_to_grid
from .graph_modules import ddpm_update


@dataclass(frozen=True)
class ReferenceStep:
    """What one outer step produced (image layout [B, C, H, W] tensors)."""

    step: int
    level: int
    raw: torch.Tensor  # the inner loop's output
    latents: torch.Tensor  # what is handed to the next step (filtered / masked), or the final output


def _check_labels(labels: Sequence[int] | torch.Tensor, num_classes: int) -> torch.Tensor:
    t = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if t.numel() == 0:
        raise InvalidArgumentError("class_labels is empty")
    bad = t[(t < 0) | (t >= num_classes)]
    if bad.numel():
        raise InvalidArgumentError(f"class id {int(bad[0])} is outside 0..{num_classes - 1}")
    return t


def official_mlp_call(net, x: torch.Tensor, z: torch.Tensor, lvl: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """The diffusion MLP as the official inner step calls it: on [x; x] (both CFG halves see the
    conditional x), with the condition projections of z [2BL, D] and level [2BL, 1] and the timestep
    embedding computed on every row. x [BL, C], row: one far_sdk.maths.diffusion.Step row -> (eps, v) [2BL, 2C]."""
    t = torch.full((z.shape[0],), int(row[S.timestep]), device=x.device, dtype=torch.long)
    return net(torch.cat([x, x]), t, z, lvl)


def _ddim_textbook(
    out: torch.Tensor,
    x: torch.Tensor,
    nz: torch.Tensor,
    tab: DDIMTables,
    k: int,
    cfg: float,
    temperature: float,
    x0_clip: float | None,
) -> torch.Tensor:
    """DDIM step k as the textbook update (Song et al. 2021, eq. 12) from the chain's own tables, not the
    folded (c1, c2) row the denoiser graph runs, so the parity tests check the folding:
    x0 = a x - b eps (clipped); eps' = (a x - x0) / b; x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2)
    eps' + sigma z."""
    C = x.shape[1]
    f32 = lambda v: float(np.float32(v))  # noqa: E731  each float64 value cast on its own
    eps_c, eps_u = out[:, :C].chunk(2)
    eps = eps_u + cfg * (eps_c - eps_u)
    a, b = f32(tab.sqrt_recip_alphas_cumprod[k]), f32(tab.sqrt_recipm1_alphas_cumprod[k])
    x0 = a * x - b * eps
    if x0_clip is not None:
        x0 = x0.clamp(-x0_clip, x0_clip)
    eps_x0 = (a * x - x0) / b  # eps re-derived from the clipped x0
    ac_prev, sig = tab.alphas_cumprod_prev[k], tab.sigmas[k]
    d = np.sqrt(max(1 - ac_prev - sig**2, 0.0))
    return f32(np.sqrt(ac_prev)) * x0 + f32(d) * eps_x0 + f32(sig) * nz * temperature


@torch.no_grad()
def iter_reference(
    model: FAR,
    class_labels: Sequence[int] | torch.Tensor,
    *,
    plan: SamplingPlan | None = None,
    seed: int = 0,
    noise: NoiseFn | None = None,
    orders: np.ndarray | None = None,
    start: tuple[torch.Tensor, int] | None = None,
    **plan_options,
) -> Iterator[ReferenceStep]:
    """Run the reference sampler, yielding each outer step's result.

    ``plan`` (or ``plan_options``: :class:`far_sdk.SamplingOptions` fields over the built-in defaults, e.g.
    num_steps, levels, cfg, inner_steps, mode, x0_clip) fixes the schedules; the default inner steps are the
    paper's frequency-aware schedule. ``noise`` replays
    draws (see :mod:`far_sdk.maths.noise` for the order); otherwise they come from ``seed``
    (image i uses seed + i). ``orders`` [B, L] sets mask mode's token orders (default: ``noise.orders``).
    As in the official code, a model built with mask=True samples in mask mode only, and one built
    with mask=False also runs mask mode, its transformer ignoring the mask (it sees zeros there).
    ``start`` = (latents [B, C, H, W] at the sampler scale, outer step k): image-to-image
    (far_sdk.pipeline.img2img): the latents stand in for step k - 1's sample (filtered and masked as that step's
    output is), steps before k draw nothing (a seeded source skips their draws), steps k.. run as usual.
    """
    if plan is None:
        plan = resolve_plan(given=SamplingOptions(**plan_options))
    elif plan_options:
        raise InvalidArgumentError(f"pass either plan or plan options, not both (got {sorted(plan_options)})")
    labels = _check_labels(class_labels, model.config.num_classes)
    emb = model.cfg_class_embedding(labels.to(next(model.parameters()).device))  # (2B, D)
    yield from iter_conditioned(model, emb, plan, seed=seed, noise=noise, orders=orders, start=start)


@torch.no_grad()
def iter_conditioned(
    model: torch.nn.Module,
    emb: torch.Tensor,
    plan: SamplingPlan,
    *,
    seed: int = 0,
    noise: NoiseFn | None = None,
    orders: np.ndarray | None = None,
    start: tuple[torch.Tensor, int] | None = None,
) -> Iterator[ReferenceStep]:
    """The sampling loop of :func:`iter_reference` for any FAR whose ``condition(tokens, emb, mask)`` takes
    the CFG batch's conditioning ``emb`` (2B rows, conditional half first): class embeddings [2B, D]
    (:class:`FAR`) or projected text contexts [2B, T, D] (:class:`training.far_t2i.FART2I`)."""
    cfg = model.config
    if plan.mode == "nomask" and cfg.mask:  # the official sample_tokens_nomask crashes on such a model
        raise InvalidArgumentError("a model built with mask=True samples in mask mode only (mode='mask')")
    # mode "mask" on a mask=False model: its transformer ignores the mask and sees the zeroed tokens (official)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    B, L, C, G = emb.shape[0] // 2, cfg.seq_len, cfg.token_channels, cfg.grid_size
    noise = noise if noise is not None else SeededNoise.from_seed(seed, B)
    net = model.diffloss.net

    def draw() -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(noise((B, L, C)))).to(device=device, dtype=dtype).reshape(B * L, C)

    tokens = torch.zeros(B, L, C, device=device, dtype=dtype)
    mask = orders_t = still_masked = None
    if plan.mode == "mask":
        if orders is None:
            orders = noise.orders(B, L)
        orders_t = torch.as_tensor(np.asarray(orders), dtype=torch.long, device=device).reshape(B, L)
        mask = torch.ones(B, L, device=device, dtype=dtype)
        still_masked = mask_keep_counts(plan.num_steps, L)

    first = 0 if start is None else int(start[1])
    if not 0 <= first <= plan.num_steps:
        raise InvalidArgumentError(f"start step must lie in 0..{plan.num_steps}, got {first}")
    if first and isinstance(noise, SeededNoise):  # the skipped steps' x_T and inner draws
        noise.skip(sum((plan.inner_steps[s] + 1) * L * C for s in range(first)))
    for s in range(max(first - 1, 0), plan.num_steps):
        level, cfg_s, temp_s = plan.levels[s], plan.cfg[s], plan.temperature[s]
        if s < first:  # step first - 1: its sample is the input image's latents
            raw = start[0].to(device=device, dtype=dtype).reshape(B, C, G, G)
            nxt, mask = _hand_on(raw, s, plan, mask, orders_t, still_masked)
            yield ReferenceStep(step=s, level=level, raw=raw, latents=nxt)
            tokens = grid_to_tokens(nxt)
            continue
        m2 = torch.cat([mask, mask]) if mask is not None else None
        z = model.condition(torch.cat([tokens, tokens]), emb, m2)  # (2B, L, D)
        z = z.reshape(2 * B * L, -1)
        lvl = torch.full((2 * B * L, 1), float(level), device=device, dtype=dtype)
        n = plan.inner_steps[s]
        rows = torch.from_numpy(plan.step_table(s)).to(device)  # (n, len(Step)) fp32, noisiest first
        ddim = ddim_tables(n, plan.eta) if plan.inner_sampler == "ddim" else None
        x = draw()  # (B*L, C): x_T, conditional half
        for i, row in enumerate(rows):
            out = official_mlp_call(net, x, z, lvl, row)  # (2BL, 2C)
            nz = draw()
            if ddim is not None:
                x = _ddim_textbook(out, x, nz, ddim, n - 1 - i, cfg_s, temp_s, plan.x0_clip)
            else:
                x = ddpm_update(out, x, nz, row).to(dtype)  # the one DDPM step (Step's formula)
        raw = tokens_to_grid(x.reshape(B, L, C), G)  # (B, C, H, W)
        nxt, mask = _hand_on(raw, s, plan, mask, orders_t, still_masked)
        tokens = grid_to_tokens(nxt)
        yield ReferenceStep(step=s, level=level, raw=raw, latents=nxt)


def _hand_on(raw: torch.Tensor, s: int, plan: SamplingPlan, mask, orders_t, still_masked):
    """What step s hands on from its sample raw [B, C, H, W]: low-passed to ``plan.filter_after[s]``; mask mode:
    zeroed where step s + 1's mask (the first ``still_masked[s]`` tokens of each order) drops tokens.
    Returns (latents [B, C, H, W], the next step's mask [B, L] or the unchanged ``mask``)."""
    nxt = raw
    after = plan.filter_after[s]
    if after is not None:
        nxt = official_low_pass(raw, after, plan.filter)
    if mask is not None and s < plan.num_steps - 1:
        B, L = mask.shape
        mask = torch.zeros(B, L, device=raw.device, dtype=raw.dtype)
        mask.scatter_(1, orders_t[:, : still_masked[s]], 1.0)
        nxt = tokens_to_grid(grid_to_tokens(nxt) * (1 - mask)[:, :, None], raw.shape[-1])
    return nxt, mask


def sample_reference(model: FAR, class_labels, **kwargs) -> torch.Tensor:
    """Drain :func:`iter_reference`; returns the final latents [B, C, H, W] (decode with ``vae.decode(x / scale)``)."""
    last = None
    for last in iter_reference(model, class_labels, **kwargs):  # noqa: B007 - drained: the last step is the result
        pass
    return last.latents
