"""Configuration of the text-to-image FAR (official ``models/far_t2i.py``): a frozen dataclass, presets,
and the architecture read back from an official checkpoint.

Unlike the class-conditional model, every shape of an official T2I checkpoint is in its weights:
the official blocks fix the attention head width at 64 (diffusers ``attention_head_dim``), so the
head count is ``attn1.to_q`` rows / 64. Training-only settings come from the saved ``args``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from far_sdk.errors import CheckpointError, ConfigError

from .config import strict_from_dict

#: Marker in a far-sdk checkpoint's ``args.far_sdk_kind`` (class-conditional checkpoints have none).
T2I_KIND = "t2i"
#: The official blocks' attention head width (diffusers BasicTransformerBlock(dim, heads, 64, ...)).
OFFICIAL_HEAD_DIM = 64


@dataclass(frozen=True)
class T2IConfig:
    """Architecture of a text-to-image FAR model (official ``FAR_T2I`` naming in comments)."""

    encoder_embed_dim: int = 1024
    encoder_depth: int = 16
    encoder_num_heads: int = 16
    decoder_embed_dim: int = 1024
    decoder_depth: int = 16
    decoder_num_heads: int = 16
    attention_head_dim: int = OFFICIAL_HEAD_DIM  # inner attention width = heads * this (64 in the official code)
    mlp_ratio: float = 4.0
    token_channels: int = 16  # vae_embed_dim
    grid_size: int = 16  # img_size // vae_stride // patch_size
    context_dim: int = 1536  # text-encoder hidden size (Qwen2-VL-1.5B: 1536) -> context_embed input
    context_len: int = 300  # text tokens per prompt: rows of the null context fake_latent
    diffloss_d: int = 3  # diffusion-MLP depth (res blocks)
    diffloss_w: int = 1024  # diffusion-MLP width
    label_drop_prob: float = 0.1  # share of training rows whose context is replaced by fake_latent
    mask_ratio_min: float = 0.7  # masked share in training ~ truncated normal(1, 0.25) on [this, 1]
    diffusion_batch_mul: int = 1  # main_far_t2i.py's default
    num_sampling_steps: int = 100

    def __post_init__(self) -> None:
        for name in (
            "encoder_embed_dim",
            "encoder_depth",
            "encoder_num_heads",
            "decoder_embed_dim",
            "decoder_depth",
            "decoder_num_heads",
            "attention_head_dim",
            "token_channels",
            "grid_size",
            "context_dim",
            "context_len",
            "diffloss_d",
            "diffloss_w",
            "diffusion_batch_mul",
            "num_sampling_steps",
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"T2IConfig.{name} must be a positive int, got {v!r}")
        if not 0.0 <= self.mask_ratio_min <= 1.0:
            raise ConfigError(f"T2IConfig.mask_ratio_min must lie in [0, 1], got {self.mask_ratio_min}")
        if not 0.0 <= self.label_drop_prob < 1.0:
            raise ConfigError(f"T2IConfig.label_drop_prob must lie in [0, 1), got {self.label_drop_prob}")

    # The sampler and trainer read these from any FAR config.
    @property
    def mask(self) -> bool:
        """Always True: FAR-T2I is built for (and sampled in) mask mode."""
        return True

    @property
    def buffer_size(self) -> int:
        """0: the official T2I run prepends no buffer rows (the text reaches the blocks by cross-attention)."""
        return 0

    @property
    def seq_len(self) -> int:
        return self.grid_size * self.grid_size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> T2IConfig:
        return strict_from_dict(cls, d)


def _preset(d: int, depth: int, heads: int, head_dim: int, mlp_d: int, mlp_w: int, **kw: Any) -> T2IConfig:
    return T2IConfig(
        encoder_embed_dim=d,
        encoder_depth=depth,
        encoder_num_heads=heads,
        decoder_embed_dim=d,
        decoder_depth=depth,
        decoder_num_heads=heads,
        attention_head_dim=head_dim,
        diffloss_d=mlp_d,
        diffloss_w=mlp_w,
        **kw,
    )


#: Size presets. far_t2i is the official model as run (561,302,560 parameters with the 3 x 1024 MLP).
T2I_CONFIGS: dict[str, T2IConfig] = {
    "far_t2i": _preset(1024, 16, 16, 64, 3, 1024),
    # Tests and CPU training: small text (context_dim, context_len) from a small encoder.
    "far_t2i_tiny": _preset(64, 2, 4, 16, 2, 64, context_dim=32, context_len=8),
    # The CPU demo: the far_demo sizes over the demo VAE's 4-channel latents, text from a small Qwen2Model.
    "far_t2i_demo": _preset(96, 2, 4, 24, 3, 128, token_channels=4, context_dim=64, context_len=16),
}


def is_t2i_config(cfg: Any) -> bool:
    return isinstance(cfg, T2IConfig)


def is_t2i_state(state: Mapping[str, Any]) -> bool:
    """A T2I state dict has the text projection ``context_embed`` and no ``class_emb``."""
    return "context_embed.weight" in state and "class_emb.weight" not in state


def _shape(state: Mapping[str, Any], key: str, source: str) -> tuple[int, ...]:
    v = state.get(key)
    if v is None or not hasattr(v, "shape"):
        raise CheckpointError(
            f"{source} has no tensor {key!r}, which every FAR-T2I checkpoint holds: "
            "the file is not a complete FAR-T2I state dict"
        )
    return tuple(v.shape)


def _depth(state: Mapping[str, Any], prefix: str) -> int:
    idx = {int(k[len(prefix) :].split(".", 1)[0]) for k in state if k.startswith(prefix)}
    return max(idx) + 1 if idx else 0


def t2i_config_from_checkpoint(state: Mapping[str, Any], args: Any = None, *, source: str = "checkpoint") -> T2IConfig:
    """The architecture of a T2I state dict: far-sdk's saved config when present, else read from the shapes
    (heads = inner attention width / 64, the official head width) plus training-only ``args`` fields."""
    a = vars(args) if args is not None and not isinstance(args, Mapping) else dict(args or {})
    if isinstance(a.get("far_sdk_config"), Mapping) and a.get("far_sdk_kind") == T2I_KIND:
        return T2IConfig.from_dict(a["far_sdk_config"])
    patch = int(a.get("patch_size", 1) or 1)
    if patch != 1:
        raise ConfigError(f"{source}: patch_size {patch} is not supported (FAR uses 1)")
    De, C = _shape(state, "z_proj.weight", source)
    _, T, _ = _shape(state, "fake_latent", source)
    _, Dtxt = _shape(state, "context_embed.weight", source)
    _, L, Dd = _shape(state, "decoder_pos_embed_learned", source)
    grid = int(round(L**0.5))
    if grid * grid != L:
        raise CheckpointError(f"{source}: decoder_pos_embed_learned has {L} positions, not a square grid")
    inner_e = _shape(state, "encoder_blocks.0.attn1.to_q.weight", source)[0]
    inner_d = _shape(state, "decoder_blocks.0.attn1.to_q.weight", source)[0]
    hd = OFFICIAL_HEAD_DIM
    if inner_e % hd or inner_d % hd:
        raise ConfigError(
            f"{source}: attention widths {inner_e}/{inner_d} are not multiples of the official head width "
            f"{hd}, so the head count is unknown. Pass config=T2IConfig(...) (or a preset name)."
        )
    W, _ = _shape(state, "diffloss.net.input_proj.weight", source)
    cfg = T2IConfig(
        encoder_embed_dim=De,
        encoder_depth=_depth(state, "encoder_blocks."),
        encoder_num_heads=inner_e // hd,
        decoder_embed_dim=Dd,
        decoder_depth=_depth(state, "decoder_blocks."),
        decoder_num_heads=inner_d // hd,
        attention_head_dim=hd,
        mlp_ratio=_shape(state, "encoder_blocks.0.ff.net.2.weight", source)[1] / De,
        token_channels=C,
        grid_size=grid,
        context_dim=Dtxt,
        context_len=T,
        diffloss_d=_depth(state, "diffloss.net.res_blocks."),
        diffloss_w=W,
    )
    over: dict[str, Any] = {}
    for src, dst, conv in (
        ("label_drop_prob", "label_drop_prob", float),
        ("mask_ratio_min", "mask_ratio_min", float),
        ("diffusion_batch_mul", "diffusion_batch_mul", int),
        ("num_sampling_steps", "num_sampling_steps", int),
    ):
        if a.get(src) is not None:
            over[dst] = conv(a[src])
    return replace(cfg, **over) if over else cfg


def get_t2i_config(name: str, **overrides: Any) -> T2IConfig:
    if name not in T2I_CONFIGS:
        raise ConfigError(f"unknown FAR-T2I model {name!r}; choose one of {sorted(T2I_CONFIGS)} or pass a T2IConfig")
    return replace(T2I_CONFIGS[name], **overrides) if overrides else T2I_CONFIGS[name]
