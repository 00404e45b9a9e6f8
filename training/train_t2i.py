"""Training FAR-T2I (official ``main_far_t2i.py`` / ``engine_far_t2i.py``) with :func:`training.train.train`.

One optimiser step differs from the class-conditional one in three ways (spec §11):

    r_b ~ U{0, .., F-1} per *sample* b;  x_in[b] = M_{r_b} X[b] M_{r_b}^T (zeros at r_b = 0)
    masking always on: m ~ truncated normal(1, 0.25) on [mask_ratio_min, 1] per batch, ceil(L m) tokens per row
    context drop (p = label_drop_prob) per sample -> fake_latent (encoder and decoder, see training.far_t2i)
    loss = mean over all B*L*mul rows of (mse + vb), unweighted; clip the grad norm (1.0); AdamW; EMA (0.999)

The data are (latents [C, H, W], text hidden states [T, Dtxt]) pairs: :class:`TextLatentDataset` reads them
from a file of latents, a table of encoded captions and the caption index of every latent.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from far_sdk.errors import DataError, InvalidArgumentError
from far_sdk.fileio import atomic_writer

from .checkpoint import t2i_checkpoint_args
from .filters import grid_to_tokens, low_pass_per_sample
from .train_schedules import lr_at, sample_t2i_mask
from .trainer import Trainer, step_seed

#: The keys of a T2I latents file.
TEXT_LATENT_KEYS = ("latents", "contexts", "context_index")


class T2ITrainer(Trainer):
    """:class:`training.trainer.Trainer` with the FAR-T2I step; targets are text hidden states [B, T, Dtxt]."""

    def check_targets(self, context: torch.Tensor) -> None:
        mc = self.model_config
        want = (mc.context_len, mc.context_dim)
        if context.ndim != 3 or tuple(context.shape[1:]) != want or not context.is_floating_point():
            raise InvalidArgumentError(
                f"FAR-T2I trains on text hidden states [B, {want[0]}, {want[1]}], got "
                f"{context.dtype} {list(context.shape)}: encode the captions with a text encoder "
                "of hidden size context_dim, padded to context_len (training.text_encoder)"
            )

    def step(self, latents: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, float]:
        """One optimiser step on latents [B, C, H, W] (scaled) and text hidden states [B, T, Dtxt]; (loss, lr)."""
        cfg, mc = self.config, self.model_config
        seed = step_seed(cfg.seed, self.dist.rank, self.global_step)
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)  # t and noise inside the model
        B, F = latents.shape[0], mc.grid_size
        levels = torch.randint(0, F, (B,), generator=gen)  # (B,) one per sample
        drop = (torch.rand(B, generator=gen) < mc.label_drop_prob).to(self.device)
        mask, _ = sample_t2i_mask(B, mc.seq_len, gen, ratio_min=mc.mask_ratio_min, device=self.device)
        lr = lr_at(self.global_step, self.total_steps, cfg.warmup_steps, self.lr, cfg.lr_schedule, cfg.min_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x = latents.to(self.device, torch.float32, non_blocking=True)  # (B, C, H, W)
        x_in = low_pass_per_sample(x, levels, cfg.filter)
        ctx = context.to(self.device, torch.float32, non_blocking=True)  # (B, T, Dtxt)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            loss = self.net(
                grid_to_tokens(x_in), ctx, grid_to_tokens(x), levels.to(self.device), mask=mask, drop_context=drop
            )
        return self._apply(loss, lr)

    def checkpoint_args(self, epoch: int) -> argparse.Namespace:
        cfg = self.config
        return t2i_checkpoint_args(
            self.model_config,
            batch_size=cfg.batch_size,
            blr=cfg.blr,
            lr=self.lr,
            min_lr=cfg.min_lr,
            lr_schedule=cfg.lr_schedule,
            weight_decay=cfg.weight_decay,
            grad_clip=cfg.grad_clip,
            ema_rate=cfg.ema_rate,
            seed=cfg.seed,
            epochs=cfg.epochs,
            output_dir=cfg.out_dir,
            world_size=self.dist.world_size,
            far_sdk_train_config=cfg.to_dict(),
            far_sdk_step=self.global_step,
        )


class TextLatentDataset(Dataset):
    """(latents [C, H, W], text hidden states [T, Dtxt]) pairs from an ``.npz`` with ``latents`` [N, C, H, W]
    float32 (already times the latent scale), ``contexts`` [M, T, Dtxt] float32 (encoded captions) and
    ``context_index`` [N] int: the caption of each latent (many latents share a caption)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file() or self.path.suffix != ".npz":
            raise DataError(
                f"T2I latents file {self.path} does not exist or is not an .npz; "
                "write one with training.train_t2i.write_text_latents"
            )
        try:
            with np.load(self.path) as f:
                missing = [k for k in TEXT_LATENT_KEYS if k not in f]
                if missing:
                    raise DataError(f"{self.path} lacks {missing}; a T2I latents file holds {list(TEXT_LATENT_KEYS)}")
                self.latents, self.contexts, self.index = (np.asarray(f[k]) for k in TEXT_LATENT_KEYS)
        except DataError:
            raise
        except Exception as e:  # zipfile.BadZipFile, OSError, ValueError
            raise DataError(f"T2I latents file {self.path} is unreadable ({type(e).__name__}: {e})") from e
        _check_text_latents(self.latents, self.contexts, self.index, str(self.path))

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(self.latents[i].copy()), torch.from_numpy(self.contexts[self.index[i]].copy())


def _check_text_latents(latents: np.ndarray, contexts: np.ndarray, index: np.ndarray, where: str) -> None:
    if latents.ndim != 4 or latents.dtype != np.float32 or len(latents) == 0:
        raise DataError(
            f"{where}: 'latents' must be float32 [N >= 1, C, H, W], found {latents.dtype} {list(latents.shape)}"
        )
    if contexts.ndim != 3 or contexts.dtype != np.float32 or len(contexts) == 0:
        raise DataError(
            f"{where}: 'contexts' must be float32 [M >= 1, T, Dtxt], found {contexts.dtype} {list(contexts.shape)}"
        )
    if (
        index.shape != (len(latents),)
        or not np.issubdtype(index.dtype, np.integer)
        or index.min() < 0
        or index.max() >= len(contexts)
    ):
        raise DataError(
            f"{where}: 'context_index' must be int [N={len(latents)}] in 0..{len(contexts) - 1}, "
            f"found {index.dtype} {list(index.shape)}"
        )
    if not (np.isfinite(latents).all() and np.isfinite(contexts).all()):
        raise DataError(f"{where}: latents or contexts hold NaN or inf")


def write_text_latents(
    path: str | os.PathLike, latents: np.ndarray, contexts: np.ndarray, context_index: np.ndarray
) -> Path:
    """Write a :class:`TextLatentDataset` file (``.npz``, atomically)."""
    path = Path(path)
    if path.suffix != ".npz":
        raise InvalidArgumentError(f"T2I latents file {path} must end in .npz")
    latents, contexts = np.asarray(latents, np.float32), np.asarray(contexts, np.float32)
    index = np.asarray(context_index, np.int64)
    _check_text_latents(latents, contexts, index, str(path))
    with atomic_writer(path) as f:
        np.savez(f, latents=latents, contexts=contexts, context_index=index)
    return path
