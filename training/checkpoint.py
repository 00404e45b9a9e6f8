"""Reading and writing checkpoints in the official FAR layout.

The official ``checkpoint-last.pth`` is a torch pickle of a plain dict with ``model``,
``model_ema`` (same keys, EMA values), ``optimizer``, ``epoch``, ``scaler`` and ``args`` (an
``argparse.Namespace``). We read it with ``weights_only=True`` allowing exactly
``argparse.Namespace`` and check every name and shape before building anything.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

import torch

from far_sdk.errors import CheckpointError, ConfigError
from far_sdk.fileio import atomic_writer

from .config import FAR_CONFIGS, GIVE_THE_CONFIG, FARConfig, config_from_official_args
from .config_t2i import T2I_CONFIGS, T2I_KIND, T2IConfig, is_t2i_state, t2i_config_from_checkpoint
from .far import FAR
from .far_t2i import FART2I
from .safe_load import check_finite_state, check_state_dict, safe_torch_load

log = logging.getLogger(__name__)


def _resolve_config(
    config: FARConfig | T2IConfig | str | None, args: Any, path: Path, state: dict
) -> FARConfig | T2IConfig:
    if is_t2i_state(state):  # FAR-T2I: every shape is in the weights (official head width 64)
        if isinstance(config, FARConfig):
            raise ConfigError(
                f"{path} holds a FAR-T2I model (it has context_embed, no class_emb), but a class-conditional "
                "FARConfig was given: pass a T2IConfig, a T2I preset name, or no config"
            )
        if isinstance(config, str) and config not in T2I_CONFIGS:
            raise ConfigError(f"unknown FAR-T2I preset {config!r}; choose one of {sorted(T2I_CONFIGS)}")
        if config is None:
            return t2i_config_from_checkpoint(state, args, source=str(path))
        return T2I_CONFIGS[config] if isinstance(config, str) else config
    if isinstance(config, T2IConfig):
        raise ConfigError(f"{path} holds a class-conditional FAR model (no context_embed), but a T2IConfig was given")
    if isinstance(config, FARConfig):
        return config
    if isinstance(config, str):
        if config not in FAR_CONFIGS:
            raise ConfigError(f"unknown model preset {config!r}; choose one of {sorted(FAR_CONFIGS)}")
        return FAR_CONFIGS[config]
    if args is None:
        raise ConfigError(f"{path} has no saved 'args', so its architecture is unknown. {GIVE_THE_CONFIG}")
    return config_from_official_args(args)


def load_official_checkpoint(
    path: str | os.PathLike,
    use_ema: bool = True,
    config: FARConfig | T2IConfig | str | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> FAR | FART2I:
    """Load an official (or our) ``checkpoint-last.pth`` into :class:`FAR` (or :class:`FART2I` when the
    weights have ``context_embed``), strictly, in eval mode.

    The architecture comes from the file's saved ``args`` (official presets) or from ``config``
    (required for custom shapes: the head count is not in the weights). ``use_ema`` picks the
    ``model_ema`` entry (what the official evaluation samples with); it falls back to ``model``
    only if the file has no EMA entry, with a warning. Files may omit optimizer/scaler/args.
    """
    path = Path(path)
    ckpt = safe_torch_load(path, allowed_globals=[argparse.Namespace])
    if not isinstance(ckpt, dict):
        raise CheckpointError(
            f"{path} holds a {type(ckpt).__name__}, expected the official dict with 'model'/'model_ema'"
        )
    key = "model_ema" if use_ema else "model"
    if key not in ckpt:
        if use_ema and "model" in ckpt:
            log.warning("%s has no 'model_ema'; loading the live 'model' weights instead", path)
            key = "model"
        else:
            raise CheckpointError(f"{path} has no {key!r} entry (found keys: {sorted(ckpt)})")
    state = ckpt[key]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}[{key!r}] is not a state dict")
    cfg = _resolve_config(config, ckpt.get("args"), path, state)
    build = FART2I if isinstance(cfg, T2IConfig) else FAR
    with torch.device("meta"):
        expected = {k: v.shape for k, v in build(cfg).state_dict().items()}
    check_state_dict(state, expected, source=f"{path}[{key!r}]")
    check_finite_state(state, source=f"{path}[{key!r}]")
    model = build(cfg)
    model.load_state_dict(state, strict=True)
    return model.to(device=device, dtype=dtype).eval()


def save_official_checkpoint(
    path: str | os.PathLike,
    model: FAR | FART2I,
    *,
    ema_state: dict[str, torch.Tensor] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    epoch: int = 0,
    scaler_state: dict | None = None,
    args: argparse.Namespace | dict | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``path`` in the official layout, atomically (temp file in the same directory, fsync, rename).
    ``extra``: more top-level entries beside the official ones (e.g. ``far-train distill``'s ``student``).

    ``args`` defaults to a Namespace describing ``model.config`` with the official flag names,
    plus ``far_sdk_config`` (our full config) so our own loader needs no preset.
    """
    path = Path(path)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    ema = {k: v.detach().cpu() for k, v in (ema_state or state).items()}
    if args is None and isinstance(model, FART2I):
        args = t2i_checkpoint_args(model.config)
    elif args is None:
        cfg = model.config
        args = argparse.Namespace(
            model="custom",
            img_size=cfg.grid_size * 16,
            vae_stride=16,
            patch_size=1,
            vae_embed_dim=cfg.token_channels,
            buffer_size=cfg.buffer_size,
            class_num=cfg.num_classes,
            diffloss_d=cfg.diffloss_d,
            diffloss_w=cfg.diffloss_w,
            mask=cfg.mask,
            num_sampling_steps=str(cfg.num_sampling_steps),
            diffusion_batch_mul=cfg.diffusion_batch_mul,
            label_drop_prob=cfg.label_drop_prob,
            attn_dropout=cfg.attn_dropout,
            proj_dropout=cfg.proj_dropout,
            far_sdk_config=cfg.to_dict(),
        )
    elif isinstance(args, dict):
        args = argparse.Namespace(**args)
    obj = {
        "model": state,
        "model_ema": ema,
        "optimizer": optimizer.state_dict() if optimizer is not None else {},
        "epoch": int(epoch),
        "scaler": scaler_state or {},
        "args": args,
        **(extra or {}),
    }
    atomic_torch_save(obj, path)
    return path


def t2i_checkpoint_args(cfg: T2IConfig, **extra: Any) -> argparse.Namespace:
    """Official ``main_far_t2i.py`` flag names for ``cfg`` plus far-sdk's exact config (``far_sdk_config``)."""
    return argparse.Namespace(
        model="custom",
        img_size=cfg.grid_size * 16,
        vae_stride=16,
        patch_size=1,
        vae_embed_dim=cfg.token_channels,
        buffer_size=0,
        diffloss_d=cfg.diffloss_d,
        diffloss_w=cfg.diffloss_w,
        mask_ratio_min=cfg.mask_ratio_min,
        num_sampling_steps=str(cfg.num_sampling_steps),
        diffusion_batch_mul=cfg.diffusion_batch_mul,
        label_drop_prob=cfg.label_drop_prob,
        far_sdk_kind=T2I_KIND,
        far_sdk_config=cfg.to_dict(),
        **extra,
    )


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save into a temp file beside ``path``, fsync, then os.replace (never a half-written file)."""
    with atomic_writer(path) as f:
        torch.save(obj, f)
