"""The reference FAR sampler in PyTorch: the ground truth every backend is tested against.

It follows the official ``sample_tokens_nomask`` / ``sample_tokens_mask`` step for step (both CFG
branches in one batch, the official float32 evaluation order, ``F.interpolate`` for the spatial
filter), driven by a :class:`far_sdk.schedules.SamplingPlan` and a noise source called in the order
documented in :mod:`far_sdk.noise`. With ``inner_steps=100`` and the official level, CFG and
temperature schedules it reproduces the official evaluated sampler given the same draws.

``plan.inner_sampler == "ddim"`` runs the inner loop as DDIM, written as the textbook update
(eps re-derived from the clipped x0, then sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps'
+ sigma z) rather than the folded (c1, c2) coefficients the runtime's denoiser graph uses, so the
parity tests check the folding too.

Written for clarity, not speed: it recomputes the MLP's condition projection at every inner step
exactly as the official code does (this is also the "eager" baseline of ``far bench``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from far_sdk.diffusion import ddim_tables, diffusion_tables
from far_sdk.errors import InvalidArgumentError
from far_sdk.filters import filter_matrix
from far_sdk.noise import NoiseFn, SeededNoise
from far_sdk.schedules import SamplingPlan, make_plan, mask_keep_counts

from .far import FAR


@dataclass(frozen=True)
class ReferenceStep:
    """What one outer step produced (image layout [B, C, H, W] tensors)."""

    step: int
    level: int
    raw: torch.Tensor        # the inner loop's output
    latents: torch.Tensor    # what is handed to the next step (filtered / masked), or the final output


def low_pass_torch(x: torch.Tensor, level: int, kind: str = "spatial") -> torch.Tensor:
    """Low-pass latents [B, C, H, W] to ``level``: spatial = F.interpolate area then bicubic (official)."""
    H = x.shape[-1]
    if level == 0:
        return torch.zeros_like(x)
    if kind == "spatial":
        if level == H:
            return x
        down = F.interpolate(x, size=(level, level), mode="area")
        return F.interpolate(down, size=(H, H), mode="bicubic", align_corners=False)
    m = torch.from_numpy(filter_matrix(level, kind, H)).to(x.dtype)
    return m @ x @ m.T


def tokens_to_image(tokens: torch.Tensor, grid: int) -> torch.Tensor:
    """[B, L, C] -> [B, C, H, W] (token index = row * W + column)."""
    B, L, C = tokens.shape
    return tokens.reshape(B, grid, grid, C).permute(0, 3, 1, 2)


def image_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, L, C]."""
    B, C, H, W = x.shape
    return x.permute(0, 2, 3, 1).reshape(B, H * W, C)


def _check_labels(labels: Sequence[int] | torch.Tensor, num_classes: int) -> torch.Tensor:
    t = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if t.numel() == 0:
        raise InvalidArgumentError("class_labels is empty")
    bad = t[(t < 0) | (t >= num_classes)]
    if bad.numel():
        raise InvalidArgumentError(f"class id {int(bad[0])} is outside 0..{num_classes - 1}")
    return t


@torch.no_grad()
def iter_reference(
    model: FAR,
    class_labels: Sequence[int] | torch.Tensor,
    *,
    plan: SamplingPlan | None = None,
    seed: int = 0,
    noise: NoiseFn | None = None,
    orders: np.ndarray | None = None,
    **plan_options,
) -> Iterator[ReferenceStep]:
    """Run the reference sampler, yielding each outer step's result.

    ``plan`` (or ``plan_options`` for :func:`far_sdk.schedules.make_plan`: num_steps, levels, cfg,
    cfg_schedule_kind, temperature, temperature_schedule_kind, inner_steps, filter, mode, x0_clip) fixes the
    schedules; the default inner steps are the paper's frequency-aware schedule. ``noise`` replays
    draws (see :mod:`far_sdk.noise` for the order); otherwise they come from ``seed``
    (image i uses seed + i). ``orders`` [B, L] sets mask mode's token orders (default: ``noise.orders``).
    As in the official code, a model built with mask=True samples in mask mode only, and one built
    with mask=False also runs mask mode, its transformer ignoring the mask (it sees zeros there).
    """
    if plan is None:
        plan = make_plan(**plan_options)
    elif plan_options:
        raise InvalidArgumentError(f"pass either plan or plan options, not both (got {sorted(plan_options)})")
    cfg = model.config
    labels = _check_labels(class_labels, cfg.num_classes)
    if plan.mode == "nomask" and cfg.mask:   # the official sample_tokens_nomask crashes on such a model
        raise InvalidArgumentError("a model built with mask=True samples in mask mode only (mode='mask')")
    # mode "mask" on a mask=False model: its transformer ignores the mask and sees the zeroed tokens (official)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    B, L, C, G = labels.shape[0], cfg.seq_len, cfg.token_channels, cfg.grid_size
    noise = noise if noise is not None else SeededNoise.from_seed(seed, B)
    net = model.diffloss.net

    def draw() -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(noise((B, L, C)))).to(device=device, dtype=dtype).reshape(B * L, C)

    labels = labels.to(device)
    emb = model.cfg_class_embedding(labels)                                   # (2B, D)
    tokens = torch.zeros(B, L, C, device=device, dtype=dtype)
    mask = None
    if plan.mode == "mask":
        if orders is None:
            orders = noise.orders(B, L)
        orders_t = torch.as_tensor(np.asarray(orders), dtype=torch.long, device=device).reshape(B, L)
        mask = torch.ones(B, L, device=device, dtype=dtype)
        still_masked = mask_keep_counts(plan.num_steps, L)

    for s in range(plan.num_steps):
        level, cfg_s, temp_s = plan.levels[s], plan.cfg[s], plan.temperature[s]
        m2 = torch.cat([mask, mask]) if mask is not None else None
        z = model.condition(torch.cat([tokens, tokens]), emb, m2)             # (2B, L, D)
        z = z.reshape(2 * B * L, -1)
        lvl = torch.full((2 * B * L, 1), float(level), device=device, dtype=dtype)
        n = plan.inner_steps[s]
        ddim = plan.inner_sampler == "ddim"
        tables = ddim_tables(n, plan.eta) if ddim else diffusion_tables(n)
        coefs = torch.from_numpy(tables.step_coefficients).to(device=device, dtype=dtype)  # (n, 6)
        if ddim:  # float32 per step: sqrt(abar_prev), sqrt(1 - abar_prev - sigma^2), sigma
            ac_prev, sig = tables.alphas_cumprod_prev, tables.sigmas
            dd = np.stack([np.sqrt(ac_prev), np.sqrt(np.maximum(1 - ac_prev - sig ** 2, 0)), sig], 1)
            dd = torch.from_numpy(dd.astype(np.float32)).to(device=device, dtype=dtype)  # (n, 3)
        x = draw()                                                            # (B*L, C): x_T, conditional half
        for k in reversed(range(tables.num_steps)):
            t = torch.full((2 * B * L,), int(tables.timesteps[k]), device=device, dtype=torch.long)
            out = net(torch.cat([x, x]), t, z, lvl)                           # (2BL, 2C)
            eps_c, eps_u = out[:, :C].chunk(2)
            eps = eps_u + cfg_s * (eps_c - eps_u)
            v = out[: B * L, C:]
            c = coefs[k]
            x0 = c[0] * x - c[1] * eps
            if plan.x0_clip is not None:
                x0 = x0.clamp(-plan.x0_clip, plan.x0_clip)
            nz = draw()
            if ddim:
                eps_x0 = (c[0] * x - x0) / c[1]                               # eps re-derived from the clipped x0
                x = dd[k, 0] * x0 + dd[k, 1] * eps_x0 + dd[k, 2] * nz * temp_s
            else:
                mean = c[2] * x0 + c[3] * x
                frac = (v + 1) / 2
                log_var = frac * c[5] + (1 - frac) * c[4]
                x = mean + float(k != 0) * torch.exp(0.5 * log_var) * nz * temp_s
        raw = tokens_to_image(x.reshape(B, L, C), G)                          # (B, C, H, W)
        nxt = raw
        after = plan.filter_after[s]
        if after is not None:
            nxt = low_pass_torch(raw, after, plan.filter)
        if mask is not None and s < plan.num_steps - 1:
            m = still_masked[s]
            mask = torch.zeros(B, L, device=device, dtype=dtype)
            mask.scatter_(1, orders_t[:, :m], 1.0)
            nxt_tok = image_to_tokens(nxt) * (1 - mask)[:, :, None]
            nxt = tokens_to_image(nxt_tok, G)
        tokens = image_to_tokens(nxt)
        yield ReferenceStep(step=s, level=level, raw=raw, latents=nxt)


def sample_reference(model: FAR, class_labels, **kwargs) -> torch.Tensor:
    """Drain :func:`iter_reference`; returns the final latents [B, C, H, W] (decode with ``vae.decode(x / scale)``)."""
    last = None
    for last in iter_reference(model, class_labels, **kwargs):
        pass
    return last.latents
