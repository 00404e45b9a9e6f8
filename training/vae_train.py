"""Training a small KL autoencoder (the FAR tokenizer family) from scratch, for datasets without kl16."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from far_sdk.errors import ConfigError, InvalidArgumentError

from .checkpoint import atomic_torch_save
from .config_vae import VAE_CONFIGS, VAEConfig
from .vae import AutoencoderKL

log = logging.getLogger(__name__)


def train_vae(
    vae_config: VAEConfig | str,
    images: torch.Tensor | Dataset,
    steps: int,
    lr: float = 1e-4,
    kl_weight: float = 1e-6,
    *,
    batch_size: int = 8,
    out: str | os.PathLike | None = None,
    seed: int = 0,
    device: str | None = None,
    betas: tuple[float, float] = (0.5, 0.9),
    log_every: int = 50,
    progress: bool = True,
    scale_samples: int = 256,
) -> float:
    """Train an :class:`AutoencoderKL` from scratch; return the latent scale estimate 1 / std(posterior samples).

    loss = mean|x - x^| + mean (x - x^)^2 + kl_weight * KL(q || N(0, I)) / (3 H W)
    (LDM's per-sample sums, divided by the pixel count; no perceptual or adversarial terms). AdamW with
    LDM's betas (0.5, 0.9), no weight decay. ``images``: a tensor [N, 3, R, R] in [-1, 1] (R = the
    config's resolution) or a Dataset of images or (image, label). The model is initialised right after
    ``torch.manual_seed(seed)``. ``out`` gets ``{"model": state_dict, "latent_scale": s}`` atomically,
    which :func:`training.vae.load_official_vae` reads. The official kl16 tokenizer uses 0.2325.
    """
    from tqdm import tqdm  # noqa: PLC0415 - loaded on first use: `import far_sdk` stays light

    cfg = VAE_CONFIGS[vae_config] if isinstance(vae_config, str) and vae_config in VAE_CONFIGS else vae_config
    if not isinstance(cfg, VAEConfig):
        raise ConfigError(f"unknown VAE config {vae_config!r}; choose one of {sorted(VAE_CONFIGS)} or pass a VAEConfig")
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != cfg.in_channels or images.shape[2:] != (cfg.resolution,) * 2:
            raise InvalidArgumentError(
                f"images must be [N, {cfg.in_channels}, {cfg.resolution}, {cfg.resolution}] "
                f"in [-1, 1], got {list(images.shape)}"
            )
        images = TensorDataset(images.float())
    if len(images) < 1 or steps < 1:
        raise InvalidArgumentError(f"need at least one image and one step (got {len(images)} images, {steps} steps)")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    vae = AutoencoderKL(cfg).to(dev).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, betas=betas, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(images, batch_size=min(batch_size, len(images)), shuffle=True, generator=gen, drop_last=True)
    it, pending = iter(loader), []
    for step in tqdm(range(1, steps + 1), desc="train-vae", disable=not progress):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        x = _first(batch).to(dev)  # (B, 3, R, R)
        rec, posterior = vae(x)
        diff = x - rec
        rec_loss = diff.abs().mean() + diff.pow(2).mean()
        loss = rec_loss + kl_weight * posterior.kl().mean() / x[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        pending.append(rec_loss.detach())
        if step % log_every == 0 or step == steps:
            log.info("vae step %d/%d reconstruction %.4f", step, steps, float(torch.stack(pending).mean()))  # host sync
            pending.clear()
    scale = _latent_scale(vae.eval(), images, scale_samples, dev, seed)
    if out is not None:
        atomic_torch_save(
            {"model": {k: v.detach().cpu() for k, v in vae.state_dict().items()}, "latent_scale": scale}, Path(out)
        )
        log.info("saved VAE to %s (latent scale %.4f)", out, scale)
    return scale


def _first(batch: Any) -> torch.Tensor:
    return batch[0] if isinstance(batch, (list, tuple)) else batch


@torch.no_grad()
def _latent_scale(vae: AutoencoderKL, images: Dataset, n: int, device: torch.device, seed: int) -> float:
    """1 / std of posterior samples over up to ``n`` images (the factor that makes latents unit-variance)."""
    gen = torch.Generator(device).manual_seed(seed)
    loader = DataLoader(images, batch_size=16, shuffle=False)
    zs, seen = [], 0
    for batch in loader:
        zs.append(vae.encode(_first(batch).to(device)).sample(gen).flatten().double())
        seen += len(_first(batch))
        if seen >= n:
            break
    return float(1.0 / torch.cat(zs).std())  # host sync
