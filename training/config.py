"""Model configurations: frozen dataclasses, size presets, the official ``args`` mapping and config files."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
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
    token_channels: int = 16  # vae_embed_dim
    grid_size: int = 16  # img_size // vae_stride // patch_size
    buffer_size: int = 64  # class "buffer" tokens prepended to the sequence
    num_classes: int = 1000  # rows of class_emb (the official model always has 1000)
    diffloss_d: int = 3  # diffusion-MLP depth (res blocks)
    diffloss_w: int = 1024  # diffusion-MLP width
    mask: bool = False  # built for the mask-mode sampler / masked training
    label_drop_prob: float = 0.1
    attn_dropout: float = 0.1
    proj_dropout: float = 0.1
    diffusion_batch_mul: int = 4
    num_sampling_steps: int = 100  # the official fixed inner-step count (training-time default)

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
    def from_dict(cls, d: dict[str, Any]) -> FARConfig:
        return strict_from_dict(cls, d)


def strict_from_dict(cls, d: Mapping[str, Any]):
    """``cls(**d)`` for a config dataclass, refusing unknown fields with a :class:`ConfigError` naming the known
    ones."""
    known = {f.name for f in fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} fields {sorted(unknown)}; known: {sorted(known)}")
    return cls(**d)


def _preset(d: int, depth: int, heads: int, mlp_d: int, mlp_w: int, **kw: Any) -> FARConfig:
    return FARConfig(
        encoder_embed_dim=d,
        encoder_depth=depth,
        encoder_num_heads=heads,
        decoder_embed_dim=d,
        decoder_depth=depth,
        decoder_num_heads=heads,
        diffloss_d=mlp_d,
        diffloss_w=mlp_w,
        **kw,
    )


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


#: How to name an architecture the checkpoint cannot tell: in Python and on the command line.
GIVE_THE_CONFIG = (
    "Pass config=FARConfig(...) (or a preset name) to load_official_checkpoint; on the command line, "
    "`far-export onnx --config cfg.json` (a JSON object of FARConfig fields) or `--model PRESET`."
)

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
            f"{GIVE_THE_CONFIG}"
        )
    patch = int(a.get("patch_size", 1))
    if patch != 1:
        raise ConfigError(f"patch_size {patch} is not supported (FAR uses 1)")
    over: dict[str, Any] = {}
    if "img_size" in a and "vae_stride" in a:
        over["grid_size"] = int(a["img_size"]) // int(a["vae_stride"]) // patch
    for src, dst, conv in (
        ("vae_embed_dim", "token_channels", int),
        ("buffer_size", "buffer_size", int),
        ("diffloss_d", "diffloss_d", int),
        ("diffloss_w", "diffloss_w", int),
        ("mask", "mask", bool),
        ("label_drop_prob", "label_drop_prob", float),
        ("attn_dropout", "attn_dropout", float),
        ("proj_dropout", "proj_dropout", float),
        ("diffusion_batch_mul", "diffusion_batch_mul", int),
        ("num_sampling_steps", "num_sampling_steps", int),
    ):
        if src in a and a[src] is not None:
            over[dst] = conv(a[src])
    return replace(FAR_CONFIGS[name], **over)


# ---- config files ------------------------------------------------------------------------------------

#: FARConfig fields a config file may leave out: used only in training, they change no exported graph.
OPTIONAL_FILE_FIELDS = ("label_drop_prob", "attn_dropout", "proj_dropout", "diffusion_batch_mul", "num_sampling_steps")
_RATES = ("label_drop_prob", "attn_dropout", "proj_dropout")


def _field_problem(name: str, kind: str, value: Any) -> str | None:
    """Why ``value`` (from JSON) cannot be field ``name`` of type ``kind``, or None when it can."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind == "bool":
        ok, want = isinstance(value, bool), "true or false"
    elif kind == "int":
        ok, want = isinstance(value, int) and not isinstance(value, bool) and value >= 1, "a positive integer"
    elif name in _RATES:
        ok, want = number and 0 <= value < 1, "a number in [0, 1)"
    else:
        ok, want = number and value > 0, "a number > 0"
    return None if ok else f"{name} must be {want}, got {json.dumps(value)}"


def config_from_fields(d: dict[str, Any], where: str = "config") -> FARConfig:
    """A FARConfig from plain values (e.g. parsed JSON), every field checked: one :class:`ConfigError`
    naming each unknown, missing (all but :data:`OPTIONAL_FILE_FIELDS` are required) or ill-typed field."""
    kinds = {f.name: str(f.type) for f in fields(FARConfig)}
    problems = []
    unknown = sorted(set(d) - set(kinds))
    if unknown:
        problems.append(f"unknown field(s) {unknown}")
    missing = [k for k in kinds if k not in d and k not in OPTIONAL_FILE_FIELDS]
    if missing:
        problems.append(f"missing field(s) {missing}")
    problems += [p for k, v in d.items() if k in kinds and (p := _field_problem(k, kinds[k], v))]
    if problems:
        raise ConfigError(
            f"{where}: {'; '.join(problems)}. FARConfig fields: {', '.join(kinds)} "
            f"(optional: {', '.join(OPTIONAL_FILE_FIELDS)})"
        )
    try:
        return FARConfig(**{k: float(v) if kinds[k] == "float" else v for k, v in d.items()})
    except ConfigError as e:  # a rule across fields (heads dividing the width)
        raise ConfigError(f"{where}: {e}") from None


def read_config_file(path: str | os.PathLike) -> FARConfig:
    """A FARConfig from a JSON file holding one object of its fields (``far-export onnx --config``), e.g.
    ``{"encoder_embed_dim": 96, "encoder_depth": 2, "encoder_num_heads": 3, ...}``; see :func:`config_from_fields`."""
    path = Path(path)
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"config file {path}: cannot read it ({e.strerror or e})") from None
    except ValueError as e:  # bad JSON or bad UTF-8
        raise ConfigError(f"config file {path} is not a JSON file ({e})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"config file {path} must hold one JSON object of FARConfig fields, found {type(d).__name__}")
    return config_from_fields(d, where=f"config file {path}")
