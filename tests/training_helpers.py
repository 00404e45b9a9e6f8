"""What tests/test_training*.py share: tiny models and latents that a CPU trains on in seconds."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from training.config import get_config
from training.config_vae import VAEConfig
from training.safe_load import safe_torch_load
from training.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
MODEL = replace(get_config("far_tiny"), num_classes=4)
# A VAE small enough to train for a few steps on CPU: 16 px images -> 4 x 8 x 8 latents.
MICRO_VAE = VAEConfig(
    embed_dim=4, z_channels=4, ch=8, ch_mult=(1, 2), num_res_blocks=1, resolution=16, attn_resolutions=(), gn_groups=4
)


def smooth_field(g: torch.Generator, shape: tuple[int, ...], coarse: int, size: int = 16) -> torch.Tensor:
    """A smooth random field: N(0, 1) on a coarse grid, bicubic-upsampled to size x size."""
    return F.interpolate(
        torch.randn(*shape, coarse, coarse, generator=g), size=(size, size), mode="bicubic", align_corners=False
    )


def class_latents(per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """4 classes; each sample = its class's fixed smooth template + smaller smooth noise (templates fixed by seed 0)."""
    templates = smooth_field(torch.Generator().manual_seed(0), (4, 16), 4)  # (4, 16, 16, 16)
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(4).repeat_interleave(per_class)
    latents = templates[labels] + 0.3 * smooth_field(g, (len(labels), 16), 8)
    return latents.float(), labels


def read_checkpoint(path: Path) -> dict:
    return safe_torch_load(path, allowed_globals=[argparse.Namespace])


def train_config(**kw) -> TrainConfig:
    base = dict(
        model=MODEL, batch_size=8, lr=1e-3, warmup_steps=2, diffusion_batch_mul=1, seed=3, progress=False, log_every=1
    )
    return TrainConfig(**{**base, **kw})
