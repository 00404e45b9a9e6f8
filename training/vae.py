"""The KL-regularised autoencoder FAR uses as its tokenizer (LDM's "KL-f16", MAR's ``kl16.ckpt``).

Module and parameter names match the official state dict exactly (``encoder.*``,
``decoder.*``, ``quant_conv``, ``post_quant_conv``), so the released weights load
strictly. Sampling needs only :meth:`AutoencoderKL.decode`; the encoder is for training.

    decode(z) = decoder(post_quant_conv(z))        z [B, 16, 16, 16] -> image [B, 3, 256, 256] in about [-1, 1]

The image is neither clamped nor squashed. FAR's latent scale (0.2325) is applied by the
caller, not here.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from far_sdk.bundle.weights import load_torch_state
from far_sdk.errors import CheckpointError
from training.config_vae import VAE_CONFIGS, VAEConfig
from training.safe_load import check_finite_state, check_state_dict, safe_torch_load

logger = logging.getLogger(__name__)

# LDM checkpoints keep their training losses (discriminator, LPIPS) under this prefix;
# they are not part of the autoencoder and are the only entries a load may drop.
_LOSS_PREFIX = "loss."
# Clamp of the posterior's log-variance, as in the official tokenizer.
_LOGVAR_MIN, _LOGVAR_MAX = -30.0, 20.0


def swish(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(x), written out as the official code does (bitwise the same op order)."""
    return x * torch.sigmoid(x)


def _norm(channels: int, cfg: VAEConfig) -> nn.GroupNorm:
    return nn.GroupNorm(cfg.gn_groups, channels, eps=cfg.eps, affine=True)


class ResnetBlock(nn.Module):
    """norm1 -> swish -> conv1 -> norm2 -> swish -> dropout -> conv2, plus a 1x1 shortcut when channels change."""

    def __init__(self, in_channels: int, out_channels: int, cfg: VAEConfig):
        super().__init__()
        self.norm1 = _norm(in_channels, cfg)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, cfg)
        self.dropout = nn.Dropout(cfg.dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))  # (B, C_out, H, W)
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)  # (B, C_in, H, W) -> (B, C_out, H, W)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, channels as features, with a residual.

    out = x + proj_out(v softmax(q^T k / sqrt(C))^T), q, k, v = 1x1 convs of GroupNorm(x).
    Written with plain matmuls so that it exports to any ONNX opset.
    """

    def __init__(self, channels: int, cfg: VAEConfig):
        super().__init__()
        self.norm = _norm(channels, cfg)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        h = self.norm(x)
        q = self.q(h).flatten(2).transpose(1, 2)  # (B, HW, C)
        k = self.k(h).flatten(2)  # (B, C, HW)
        v = self.v(h).flatten(2)  # (B, C, HW)
        w = torch.softmax(torch.bmm(q, k) * (c**-0.5), dim=2)  # (B, HW_q, HW_k)
        h = torch.bmm(v, w.transpose(1, 2))  # (B, C, HW_q)
        h = h.reshape(b, c, height, width)  # (B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Halve H and W: zero-pad right and bottom by one, then a 3x3 stride-2 conv without padding."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (0, 1, 0, 1))  # (B, C, H + 1, W + 1)
        return self.conv(x)  # (B, C, H / 2, W / 2)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # (B, C, 2H, 2W)
        return self.conv(x)


class _Mid(nn.Module):
    """Res block, attention, res block at the lowest resolution."""

    def __init__(self, channels: int, cfg: VAEConfig):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, cfg)
        self.attn_1 = AttnBlock(channels, cfg)
        self.block_2 = ResnetBlock(channels, channels, cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class _Level(nn.Module):
    """One resolution level: ``block`` (res blocks), ``attn`` (one per block, or none), then a resampler."""

    def __init__(self, blocks: list[nn.Module], attns: list[nn.Module], resample_name: str, resample: nn.Module | None):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        if attns:
            self.attn = nn.ModuleList(attns)
        if resample is not None:
            self.add_module(resample_name, resample)


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> moments (B, 2 * z_channels, H / f, W / f)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in (1, *cfg.ch_mult)]  # input width of level i is widths[i]
        n = len(cfg.ch_mult)
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        levels = []
        for i in range(n):
            c_in, c_out = widths[i], widths[i + 1]
            blocks = [ResnetBlock(c_in if j == 0 else c_out, c_out, cfg) for j in range(cfg.num_res_blocks)]
            with_attn = cfg.level_resolutions[i] in cfg.attn_resolutions
            attns = [AttnBlock(c_out, cfg) for _ in range(cfg.num_res_blocks)] if with_attn else []
            down = Downsample(c_out) if i < n - 1 else None
            levels.append(_Level(blocks, attns, "downsample", down))
        self.down = nn.ModuleList(levels)
        self.mid = _Mid(widths[-1], cfg)
        self.norm_out = _norm(widths[-1], cfg)
        self.conv_out = nn.Conv2d(widths[-1], 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, ch, H, W)
        for level in self.down:
            attns = getattr(level, "attn", None)
            for j, block in enumerate(level.block):
                h = block(h)  # (B, ch * ch_mult[i], H_i, W_i)
                if attns is not None:
                    h = attns[j](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)  # (B, C, H_i / 2, W_i / 2)
        h = self.mid(h)
        return self.conv_out(swish(self.norm_out(h)))  # (B, 2 * z_channels, H / f, W / f)


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, out_ch, h * f, w * f). No attention outside ``mid``."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        n = len(cfg.ch_mult)
        c = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c, 3, padding=1)
        self.mid = _Mid(c, cfg)
        levels: list[_Level] = []
        for i in reversed(range(n)):  # built in data-flow order, stored by level index
            c_out = cfg.ch * cfg.ch_mult[i]
            blocks = [ResnetBlock(c if j == 0 else c_out, c_out, cfg) for j in range(cfg.num_res_blocks + 1)]
            up = Upsample(c_out) if i > 0 else None
            levels.append(_Level(blocks, [], "upsample", up))
            c = c_out
        self.up = nn.ModuleList(levels[::-1])
        self.norm_out = _norm(c, cfg)
        self.conv_out = nn.Conv2d(c, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)  # (B, ch * ch_mult[-1], h, w)
        h = self.mid(h)
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)  # (B, ch * ch_mult[i], H_i, W_i)
            if hasattr(level, "upsample"):
                h = level.upsample(h)  # (B, C, 2 H_i, 2 W_i)
        return self.conv_out(swish(self.norm_out(h)))  # (B, out_ch, H, W)


class DiagonalGaussian:
    """The posterior N(mean, diag(exp(logvar))) over latents, log-variance clamped to [-30, 20]."""

    def __init__(self, moments: torch.Tensor):
        mean, logvar = moments.chunk(2, dim=1)  # (B, 2E, h, w) -> 2 x (B, E, h, w)
        self.mean = mean
        self.logvar = logvar.clamp(_LOGVAR_MIN, _LOGVAR_MAX)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std * eps, eps ~ N(0, I) drawn from ``generator`` (the global RNG when None)."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample: 0.5 * sum(mean^2 + var - 1 - logvar) over (E, h, w) -> (B,)."""
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=(1, 2, 3))


class AutoencoderKL(nn.Module):
    """Encoder + Gaussian posterior + decoder, named as the official checkpoint."""

    def __init__(self, config: VAEConfig | None = None):
        super().__init__()
        self.config = config or VAE_CONFIGS["kl16"]
        cfg = self.config
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """Image (B, 3, H, W) in [-1, 1] -> posterior over latents (B, embed_dim, H / f, W / f)."""
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))  # moments (B, 2 * embed_dim, H / f, W / f)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents (B, embed_dim, h, w) -> image (B, 3, h * f, w * f), not clamped."""
        return self.decoder(self.post_quant_conv(z))  # (B, z_channels, h, w) inside

    def forward(
        self, x: torch.Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, DiagonalGaussian]:
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior


def vae_state_dict_shapes(config: VAEConfig | None = None) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every state-dict entry of ``AutoencoderKL(config)``, built without allocating weights."""
    with torch.device("meta"):
        model = AutoencoderKL(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def load_official_vae(path: str | os.PathLike, config: VAEConfig | None = None) -> AutoencoderKL:
    """Load a KL-16 tokenizer checkpoint (e.g. MAR's ``kl16.ckpt``) into an :class:`AutoencoderKL` in eval mode.

    Accepts a torch pickle holding ``{"model": state_dict, ...}`` (the official layout), a
    torch pickle that is a bare state dict, or a ``.safetensors`` file. Tensors go to CPU.
    Entries under ``loss.`` (LDM's discriminator and perceptual-loss weights) are dropped;
    any other missing, unexpected, misshapen or non-finite entry raises :class:`CheckpointError`.
    """
    path = Path(path)
    cfg = config or VAE_CONFIGS["kl16"]
    state = _read_state_dict(path)
    check_state_dict(
        state, vae_state_dict_shapes(cfg), source=f"VAE checkpoint {path}", ignore_unexpected=(_LOSS_PREFIX,)
    )
    dropped = [k for k in state if k.startswith(_LOSS_PREFIX)]
    if dropped:
        logger.info("%s: ignoring %d training-loss entries under %r", path, len(dropped), _LOSS_PREFIX)
    state = {k: v for k, v in state.items() if not k.startswith(_LOSS_PREFIX)}
    check_finite_state(state, source=f"VAE checkpoint {path}")

    with torch.device("meta"):
        model = AutoencoderKL(cfg)
    model = model.to_empty(device="cpu")  # uninitialised storage, filled entirely by the strict load below
    model.load_state_dict(state, strict=True)
    return model.eval()


def _read_state_dict(path: Path) -> dict[str, Any]:
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    obj = safe_torch_load(path)
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        return dict(obj["model"])
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj)
    found = sorted(map(str, obj))[:8] if isinstance(obj, Mapping) else type(obj).__name__
    raise CheckpointError(
        f"VAE checkpoint {path} holds neither a 'model' state dict nor a bare state dict (found {found}); "
        "expected MAR's kl16.ckpt layout {'model': state_dict}"
    )


def _read_safetensors(path: Path) -> dict[str, Any]:

    if not path.is_file():
        raise CheckpointError(f"VAE checkpoint {path} does not exist or is not a file")
    # header and layout checked by hand first (safetensors itself lets some malformed files through);
    # finite values are checked by load_official_vae once names and shapes are known good
    return load_torch_state(path, error=CheckpointError, finite=False)
