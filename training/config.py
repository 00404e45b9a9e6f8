"""Model configurations: frozen dataclasses, size presets and the official ``args`` mapping."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from far_sdk.errors import ConfigError


@dataclass(frozen=True)
class FARConfig:
    """Architecture of a class-conditional FAR model (official ``models/far.py`` naming in comments)."""

    encoder_embed_dim: int = 1024
    encoder_depth: int = 16
    encoder_num_heads: int = 16
    decoder_embed_dim: int = 1024
    decoder_depth: int = 16
    decoder_num_heads: int = 16
    mlp_ratio: float = 4.0
    token_channels: int = 16          # vae_embed_dim
    grid_size: int = 16               # img_size // vae_stride // patch_size
    buffer_size: int = 64             # class "buffer" tokens prepended to the sequence
    num_classes: int = 1000           # rows of class_emb (the official model always has 1000)
    diffloss_d: int = 3               # diffusion-MLP depth (res blocks)
    diffloss_w: int = 1024            # diffusion-MLP width
    mask: bool = False                # built for the mask-mode sampler / masked training
    label_drop_prob: float = 0.1
    attn_dropout: float = 0.1
    proj_dropout: float = 0.1
    diffusion_batch_mul: int = 4
    num_sampling_steps: int = 100     # the official fixed inner-step count (training-time default)

    def __post_init__(self) -> None:
        for name in ("encoder", "decoder"):
            d, h = getattr(self, f"{name}_embed_dim"), getattr(self, f"{name}_num_heads")
            if d % h:
                raise ConfigError(f"{name}_embed_dim {d} is not divisible by {name}_num_heads {h}")

    @property
    def seq_len(self) -> int:
        return self.grid_size * self.grid_size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FARConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown FARConfig fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


def _preset(d: int, depth: int, heads: int, mlp_d: int, mlp_w: int, **kw: Any) -> FARConfig:
    return FARConfig(encoder_embed_dim=d, encoder_depth=depth, encoder_num_heads=heads,
                     decoder_embed_dim=d, decoder_depth=depth, decoder_num_heads=heads,
                     diffloss_d=mlp_d, diffloss_w=mlp_w, **kw)


#: Size presets. far_base/large/huge carry the released diffusion-MLP sizes (sample.sh/train.sh).
FAR_CONFIGS: dict[str, FARConfig] = {
    "far_base": _preset(768, 12, 12, 6, 1024),
    "far_large": _preset(1024, 16, 16, 3, 1024),
    "far_huge": _preset(1280, 20, 16, 3, 1024),
    # Small configs for tests, demos and CPU training. far_parity_tiny is the shape of the
    # official-code fixture (tests/fixtures/official-tiny).
    "far_parity_tiny": _preset(64, 2, 4, 2, 128),
    "far_tiny": _preset(64, 2, 4, 2, 128, num_classes=10),
    "far_small": _preset(256, 4, 4, 3, 256, num_classes=10),
    # The committed CPU demo (engines/far-demo): sklearn digits, 4-channel 16 x 16 latents of the
    # digits-f2 VAE, 8 buffer tokens. Small enough to train (and sample in seconds) on a 2-core CPU.
    "far_demo": _preset(96, 2, 4, 3, 128, num_classes=10, token_channels=4, buffer_size=8),
}


def get_config(name: str, **overrides: Any) -> FARConfig:
    if name not in FAR_CONFIGS:
        raise ConfigError(f"unknown model {name!r}; choose one of {sorted(FAR_CONFIGS)} or pass a FARConfig")
    return replace(FAR_CONFIGS[name], **overrides) if overrides else FAR_CONFIGS[name]


# Presets the official code knows by name (the heads come from the name alone).
OFFICIAL_MODEL_NAMES = ("far_base", "far_large", "far_huge")


def config_from_official_args(args: Any) -> FARConfig:
    """Rebuild the architecture from an official checkpoint's saved ``args`` (an argparse.Namespace).

    The number of heads cannot be read from the weights, so ``args.model`` must be one of the
    official presets; other names raise :class:`ConfigError` asking for an explicit config.
    """
    a = vars(args) if not isinstance(args, dict) else args
    if isinstance(a.get("far_sdk_config"), dict):  # written by far-sdk: the exact config
        return FARConfig.from_dict(a["far_sdk_config"])
    name = a.get("model")
    if name not in OFFICIAL_MODEL_NAMES:
        raise ConfigError(
            f"checkpoint was trained as model {name!r}, which is not an official preset {OFFICIAL_MODEL_NAMES}: "
            "the attention head count cannot be recovered from the weights. "
            "Pass config=FARConfig(...) (or a preset name) to load_official_checkpoint."
        )
    patch = int(a.get("patch_size", 1))
    if patch != 1:
        raise ConfigError(f"patch_size {patch} is not supported (FAR uses 1)")
    over: dict[str, Any] = {}
    if "img_size" in a and "vae_stride" in a:
        over["grid_size"] = int(a["img_size"]) // int(a["vae_stride"]) // patch
    for src, dst, conv in (
        ("vae_embed_dim", "token_channels", int), ("buffer_size", "buffer_size", int),
        ("diffloss_d", "diffloss_d", int), ("diffloss_w", "diffloss_w", int), ("mask", "mask", bool),
        ("label_drop_prob", "label_drop_prob", float), ("attn_dropout", "attn_dropout", float),
        ("proj_dropout", "proj_dropout", float), ("diffusion_batch_mul", "diffusion_batch_mul", int),
        ("num_sampling_steps", "num_sampling_steps", int),
    ):
        if src in a and a[src] is not None:
            over[dst] = conv(a[src])
    return replace(FAR_CONFIGS[name], **over)
