"""What one training process holds and does per optimiser step, shared by the class-conditional and the FAR-T2I
trainers: the run's configuration (:class:`TrainConfig`), the process group (:class:`DistInfo`), and
:class:`Trainer` (model, EMA, AdamW, step counter, checkpoints). :class:`Trainer` implements the class-conditional
step (official ``engine_far.py``); ``training.train_t2i.T2ITrainer`` overrides it with FAR-T2I's. The loop that
feeds them is ``training.train.train``.

Step s draws from a seed of (seed, rank, s) (:func:`step_seed`), so a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from far_sdk.errors import CheckpointError, ConfigError, InvalidArgumentError
from far_sdk.maths.filters import FILTER_TYPES, FilterType

from .checkpoint import save_official_checkpoint
from .config import FARConfig, config_from_official_args, get_config
from .config_t2i import T2I_CONFIGS, T2IConfig, get_t2i_config, t2i_config_from_checkpoint
from .far import FAR
from .far_t2i import FART2I
from .filters import grid_to_tokens, low_pass
from .safe_load import check_state_dict, safe_torch_load
from .train_schedules import LR_SCHEDULES, LrSchedule, loss_weight, lr_at, sample_mask

log = logging.getLogger(__name__)

Precision = Literal["auto", "bf16", "fp32"]
PRECISIONS: tuple[str, ...] = ("auto", "bf16", "fp32")
#: FARConfig fields that do not change the weights' layout or meaning: may differ on resume.
_TRAINING_ONLY_FIELDS = {
    "mask",
    "label_drop_prob",
    "attn_dropout",
    "proj_dropout",
    "diffusion_batch_mul",
    "num_sampling_steps",
    "mask_ratio_min",
}


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs. Defaults follow the official ``train.sh`` except
    where the issue asks for the paper (loss weight on; mask off unless requested)."""

    model: str | FARConfig | T2IConfig = "far_tiny"  # preset name or an explicit config (T2I: training.train_t2i)
    batch_size: int = 64  # per process; global batch = batch_size * world size
    steps: int | None = None  # exactly one of steps / epochs
    epochs: int | None = None
    lr: float | None = None  # absolute lr; None -> blr * global batch / 256
    blr: float = 1e-4
    min_lr: float = 0.0
    lr_schedule: LrSchedule = "constant"
    warmup_steps: int = 0
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.02
    grad_clip: float = 3.0
    ema_rate: float = 0.9999
    label_drop: float | None = None  # None: the model config's label_drop_prob (0.1)
    diffusion_batch_mul: int | None = None  # None: the model config's (4)
    use_mask: bool = False  # frequency-aware masking; needs a model built with mask=True
    use_loss_weight: bool = True  # the paper's w_r
    high_t_fraction: float = 0.0  # share of diffusion rows with t in [950, 1000) (0 = official uniform t)
    filter: FilterType = "spatial"  # training low-pass ("spatial" = official area + bicubic)
    precision: Precision = "auto"  # auto: bf16 autocast on CUDA when supported, else fp32
    device: str | None = None  # None: cuda (cuda:LOCAL_RANK under torchrun) if available, else cpu
    seed: int = 0
    out_dir: str | None = None
    save_every: int | None = None  # steps between checkpoints (and always at the end)
    log_every: int = 10
    num_workers: int = 0
    resume: str | None = None  # checkpoint file, or a directory holding checkpoint-last.pth
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.betas, list):
            object.__setattr__(self, "betas", tuple(self.betas))
        if (self.steps is None) == (self.epochs is None):
            raise ConfigError(f"set exactly one of steps or epochs (got steps={self.steps}, epochs={self.epochs})")
        for name in ("batch_size", "steps", "epochs", "save_every", "log_every"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ConfigError(f"TrainConfig.{name} must be a positive int, got {v!r}")
        if self.warmup_steps < 0 or self.num_workers < 0:
            raise ConfigError("TrainConfig.warmup_steps and num_workers must be >= 0")
        if not 0.0 <= self.ema_rate <= 1.0:
            raise ConfigError(f"TrainConfig.ema_rate must lie in [0, 1], got {self.ema_rate}")
        if not 0.0 <= self.high_t_fraction < 1.0:
            raise ConfigError(f"TrainConfig.high_t_fraction must lie in [0, 1), got {self.high_t_fraction}")
        for name, value, allowed in (
            ("lr_schedule", self.lr_schedule, LR_SCHEDULES),
            ("precision", self.precision, PRECISIONS),
            ("filter", self.filter, FILTER_TYPES),
        ):
            if value not in allowed:
                raise ConfigError(f"TrainConfig.{name} must be one of {allowed}, got {value!r}")
        self.model_config()  # validate the model choice now

    def model_config(self) -> FARConfig | T2IConfig:
        """The architecture to train, with this run's label drop and diffusion batch multiplier folded in."""
        cfg = (
            self.model
            if isinstance(self.model, (FARConfig, T2IConfig))
            else (get_t2i_config(self.model) if self.model in T2I_CONFIGS else get_config(self.model))
        )
        over: dict[str, Any] = {}
        if self.label_drop is not None:
            over["label_drop_prob"] = float(self.label_drop)
        if self.diffusion_batch_mul is not None:
            over["diffusion_batch_mul"] = int(self.diffusion_batch_mul)
        cfg = replace(cfg, **over) if over else cfg
        if self.use_mask and not cfg.mask:
            raise ConfigError(
                "use_mask needs a model built with mask=True (FARConfig(mask=True)); "
                "without it the encoder ignores the mask"
            )
        return cfg

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["model"] = self.model.to_dict() if isinstance(self.model, (FARConfig, T2IConfig)) else self.model
        d["betas"] = list(self.betas)
        return d


@dataclass
class TrainResult:
    model: FAR | FART2I  # the bare (unwrapped) model, in train mode
    ema: dict[str, torch.Tensor]  # EMA of every parameter, by bare name
    step: int  # optimiser steps taken in total (resumed ones included)
    optimizer: torch.optim.Optimizer | None = None
    history: list[tuple[int, float, float]] = field(default_factory=list)  # (step, mean loss since last log, lr)
    checkpoint: Path | None = None  # set on rank 0 when a checkpoint was written


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Official AdamW groups: [no decay: 1-D, *.bias, anything under diffloss; decay: the rest], model order."""
    no_decay, decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim == 1 or name.endswith(".bias") or "diffloss" in name else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


# ---- distributed ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we called init_process_group, so we tear it down

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or self.owns_group

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(use_cuda: bool) -> DistInfo:
    """Join the torchrun job described by RANK / WORLD_SIZE / LOCAL_RANK (nccl on CUDA, gloo on CPU)."""
    local = int(os.environ.get("LOCAL_RANK", 0))
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local, False)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo()
    if use_cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, True)


def step_seed(seed: int, rank: int, step: int) -> int:
    """A 63-bit seed for every random draw of one step of one process (SeedSequence of (seed, rank, step))."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, dtype=np.uint64)[0] >> 1)


# ---- the trainer ---------------------------------------------------------------------------------------


class Trainer:
    """Model, EMA, optimiser and step counter of one process; :meth:`step` is one optimiser step."""

    def __init__(self, config: TrainConfig, dist_info: DistInfo = DistInfo(), device: torch.device | str | None = None):
        self.config, self.dist = config, dist_info
        self.model_config = mc = config.model_config()
        if device is None:
            device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
            if device == "cuda" and dist_info.distributed:
                device = f"cuda:{dist_info.local_rank}"
        self.device = torch.device(device)
        self.amp = config.precision == "bf16" or (
            config.precision == "auto" and self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        )
        self.lr = config.lr if config.lr is not None else config.blr * config.batch_size * dist_info.world_size / 256
        torch.manual_seed(config.seed)  # same initialisation on every rank
        self.model = (FART2I if isinstance(mc, T2IConfig) else FAR)(mc).to(self.device).train()
        self.model.diffloss.high_t_fraction = float(config.high_t_fraction)
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, config.weight_decay), lr=self.lr, betas=config.betas
        )
        self._params = [p for _, p in self.model.named_parameters()]
        self.ema = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        self.global_step = 0
        self.total_steps = config.steps or 0
        self.net: torch.nn.Module = self.model

    def check_targets(self, y: torch.Tensor) -> None:
        n = self.model_config.num_classes
        if int(y.min()) < 0 or int(y.max()) >= n:  # CPU tensors: no device sync
            raise InvalidArgumentError(
                f"labels span {int(y.min())}..{int(y.max())} but the model has "
                f"{n} classes: pick a config with num_classes > {int(y.max())}"
            )

    def wrap_ddp(self) -> None:
        """Wrap for DDP (call after any resume). mask_token is unused unless masking, hence find_unused_parameters."""
        if self.dist.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = DistributedDataParallel(
                self.model, device_ids=ids, find_unused_parameters=not self.config.use_mask
            )

    def step(self, latents: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, float]:
        """One optimiser step on latents [B, C, H, W] (scaled) and labels [B]; returns (loss, lr)."""
        cfg, mc = self.config, self.model_config
        seed = step_seed(cfg.seed, self.dist.rank, self.global_step)
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)  # dropout, t and noise inside the model
        B, F = latents.shape[0], mc.grid_size
        level = int(torch.randint(0, F, (), generator=gen))
        drop = (torch.rand(B, generator=gen) < mc.label_drop_prob).to(self.device)
        mask = sample_mask(B, mc.seq_len, level, gen, num_levels=F, device=self.device) if cfg.use_mask else None
        lr = lr_at(self.global_step, self.total_steps, cfg.warmup_steps, self.lr, cfg.lr_schedule, cfg.min_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x = latents.to(self.device, torch.float32, non_blocking=True)  # (B, C, H, W)
        x_in = low_pass(x, level, cfg.filter)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            loss = self.net(
                grid_to_tokens(x_in), labels.to(self.device), grid_to_tokens(x), level, mask=mask, drop_labels=drop
            )
        if cfg.use_loss_weight:
            loss = loss * loss_weight(level, F)
        return self._apply(loss, lr)

    def _apply(self, loss: torch.Tensor, lr: float) -> tuple[torch.Tensor, float]:
        """Backward, clip, optimiser step and EMA (the class and T2I trainers' shared end of a step)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self._params, self.config.grad_clip)
        self.optimizer.step()
        self._update_ema()
        self.global_step += 1
        return loss.detach(), lr

    @torch.no_grad()
    def _update_ema(self) -> None:
        """ema = rate * ema + (1 - rate) * param, in the official order of operations."""
        ema = list(self.ema.values())
        torch._foreach_mul_(ema, self.config.ema_rate)
        torch._foreach_add_(ema, [p.detach() for p in self._params], alpha=1.0 - self.config.ema_rate)

    def ema_state(self) -> dict[str, torch.Tensor]:
        """The model's state dict with every parameter replaced by its EMA (official ``model_ema``)."""
        return {k: self.ema.get(k, v) for k, v in self.model.state_dict().items()}

    def checkpoint_args(self, epoch: int) -> argparse.Namespace:
        """Official flag names (so official tools read it) plus far_sdk_config / step for exact reloading."""
        mc, cfg = self.model_config, self.config
        return argparse.Namespace(
            model=cfg.model if isinstance(cfg.model, str) else "custom",
            img_size=mc.grid_size * 16,
            vae_stride=16,
            patch_size=1,
            vae_embed_dim=mc.token_channels,
            buffer_size=mc.buffer_size,
            class_num=mc.num_classes,
            diffloss_d=mc.diffloss_d,
            diffloss_w=mc.diffloss_w,
            mask=mc.mask,
            num_sampling_steps=str(mc.num_sampling_steps),
            diffusion_batch_mul=mc.diffusion_batch_mul,
            label_drop_prob=mc.label_drop_prob,
            attn_dropout=mc.attn_dropout,
            proj_dropout=mc.proj_dropout,
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
            loss_weight=cfg.use_loss_weight,
            far_sdk_config=mc.to_dict(),
            far_sdk_train_config=cfg.to_dict(),
            far_sdk_step=self.global_step,
        )

    def save(self, path: str | os.PathLike, epoch: int) -> Path:
        return save_official_checkpoint(
            path,
            self.model,
            ema_state=self.ema_state(),
            optimizer=self.optimizer,
            epoch=epoch,
            scaler_state={},
            args=self.checkpoint_args(epoch),
        )

    def load(self, path: str | os.PathLike, steps_per_epoch: int | None = None) -> None:
        """Restore model, EMA, optimiser and step from a checkpoint (ours, or official: step = (epoch + 1) *
        steps/epoch)."""
        path = Path(path)
        if path.is_dir():
            path = path / "checkpoint-last.pth"
        ckpt = safe_torch_load(path, allowed_globals=[argparse.Namespace])
        if not isinstance(ckpt, dict) or "model" not in ckpt:
            raise CheckpointError(f"{path} is not a training checkpoint (no 'model' entry)")
        args = vars(ckpt["args"]) if isinstance(ckpt.get("args"), argparse.Namespace) else dict(ckpt.get("args") or {})
        if args:
            mc = self.model_config
            saved = (
                t2i_config_from_checkpoint(ckpt["model"], args, source=str(path))
                if isinstance(mc, T2IConfig)
                else config_from_official_args(args)
            )
            diff = [
                f.name
                for f in fields(type(mc))
                if f.name not in _TRAINING_ONLY_FIELDS and getattr(saved, f.name) != getattr(self.model_config, f.name)
            ]
            if diff:
                raise ConfigError(
                    f"{path} was trained with another architecture (differs in {diff}); "
                    f"resume with the same --model / config"
                )
        expected = {k: v.shape for k, v in self.model.state_dict().items()}
        check_state_dict(ckpt["model"], expected, source=f"{path}['model']")
        self.model.load_state_dict(ckpt["model"])
        ema_src = ckpt.get("model_ema") or ckpt["model"]
        check_state_dict(ema_src, expected, source=f"{path}['model_ema']")
        with torch.no_grad():
            for k, v in self.ema.items():
                v.copy_(ema_src[k])
        if ckpt.get("optimizer"):
            self.optimizer.load_state_dict(ckpt["optimizer"])
        else:
            log.warning("%s has no optimizer state; AdamW restarts from zero moments", path)
        if "far_sdk_step" in args:
            self.global_step = int(args["far_sdk_step"])
        elif steps_per_epoch is not None:
            self.global_step = (int(ckpt.get("epoch", -1)) + 1) * steps_per_epoch
        log.info("resumed from %s at step %d", path, self.global_step)
