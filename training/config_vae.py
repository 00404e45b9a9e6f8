"""The VAE's architecture as a frozen config (:class:`VAEConfig`) and the named presets (:data:`VAE_CONFIGS`):
the official KL-16 tokenizer and the smaller ones tests and demos use. The modules are :mod:`training.vae`'s."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from far_sdk.errors import ConfigError


@dataclass(frozen=True)
class VAEConfig:
    """Shape of an :class:`AutoencoderKL`. Defaults are the official kl16 tokenizer."""

    embed_dim: int = 16  # latent channels (after quant_conv)
    z_channels: int = 16  # channels between encoder/decoder and (post_)quant_conv
    ch: int = 128  # base width; level i has ch * ch_mult[i] channels
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2  # per encoder level; decoder levels have one more
    in_channels: int = 3
    out_ch: int = 3
    resolution: int = 256  # image size the attention placement refers to
    attn_resolutions: tuple[int, ...] = (16,)  # encoder levels (by feature-map size) with attention
    dropout: float = 0.0
    gn_groups: int = 32
    eps: float = 1e-6

    def __post_init__(self) -> None:
        # Accept lists (from JSON) and keep the config hashable.
        for name in ("ch_mult", "attn_resolutions"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        self._validate()

    def _validate(self) -> None:
        positive = (
            "embed_dim",
            "z_channels",
            "ch",
            "num_res_blocks",
            "in_channels",
            "out_ch",
            "resolution",
            "gn_groups",
        )
        for name in positive:
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ConfigError(f"VAEConfig.{name} must be a positive int, got {value!r}")
        for name in ("ch_mult", "attn_resolutions"):
            value = getattr(self, name)
            if not isinstance(value, tuple) or not all(_is_int(v) and v >= 1 for v in value):
                raise ConfigError(f"VAEConfig.{name} must be a tuple of positive ints, got {value!r}")
        if not self.ch_mult:
            raise ConfigError("VAEConfig.ch_mult must name at least one level, got ()")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"VAEConfig.dropout must lie in [0, 1), got {self.dropout!r}")
        if not self.eps > 0:
            raise ConfigError(f"VAEConfig.eps must be positive, got {self.eps!r}")
        if self.resolution % self.downsample_factor:
            raise ConfigError(
                f"VAEConfig.resolution {self.resolution} is not divisible by the downsample factor "
                f"{self.downsample_factor} (2 ** (len(ch_mult) - 1)); pick a multiple of it"
            )
        bad = sorted({self.ch * m for m in (1, *self.ch_mult) if (self.ch * m) % self.gn_groups})
        if bad:
            raise ConfigError(
                f"VAEConfig.gn_groups {self.gn_groups} does not divide the channel counts {bad}; "
                "choose a divisor of every ch * ch_mult[i] and of ch"
            )
        levels = self.level_resolutions
        stray = [r for r in self.attn_resolutions if r not in levels]
        if stray:
            raise ConfigError(
                f"VAEConfig.attn_resolutions {stray} match no encoder level (feature-map sizes {list(levels)} "
                f"at resolution {self.resolution}); use sizes from that list or ()"
            )

    @property
    def downsample_factor(self) -> int:
        """Image side / latent side: 2 ** (number of levels - 1)."""
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def latent_channels(self) -> int:
        return self.embed_dim

    @property
    def level_resolutions(self) -> tuple[int, ...]:
        """Feature-map side at each encoder level for a ``resolution``-sized image."""
        return tuple(self.resolution // 2**i for i in range(len(self.ch_mult)))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (tuples become lists); inverse of :meth:`from_dict`."""
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> VAEConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown VAEConfig fields {unknown}; known fields are {sorted(known)}")
        return cls(**dict(d))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


VAE_CONFIGS: dict[str, VAEConfig] = {
    # The official MAR/FAR tokenizer: 256 px -> 16 x 16 x 16 latents, 66,456,019 params.
    "kl16": VAEConfig(),
    # Same 16x downsampling and 16 latent channels, quarter width, 1 res block per level: fast tests (3.2 M params).
    "kl16-tiny": VAEConfig(ch=32, num_res_blocks=1, gn_groups=8),
    # Same layout at half width, 1 res block per level: demos and smoke training (12.6 M params).
    "kl16-small": VAEConfig(ch=64, num_res_blocks=1),
    # The CPU demo's tokenizer: 32 x 32 digits -> 16 x 16 x 4 latents (downsampling 2), ~0.4 M params.
    "digits-f2": VAEConfig(
        embed_dim=4,
        z_channels=4,
        ch=32,
        ch_mult=(1, 2),
        num_res_blocks=1,
        resolution=32,
        attn_resolutions=(),
        gn_groups=8,
    ),
}
