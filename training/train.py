"""Training FAR (class-conditional) on cached or on-the-fly VAE latents, on one device or under torchrun.

One optimiser step (official ``engine_far.py``, with the paper's mask ratio and loss weight):

    r ~ U{0, .., F-1}, one per batch (per process)          F = grid side (16)
    x_in = M_r X M_r^T (zeros at r = 0),  target = X        X: latents [B, C, H, W]
    optional frequency-aware mask (m ~ U[r_r, 1), schedules.sample_mask)
    label dropout (p = label_drop_prob) -> fake_latent
    loss = w_r * mean over all B*L*mul rows of (mse + vb)   w_r = 1 + sin(pi/2 r / F), or 1
    backward; clip the global grad norm (3.0); AdamW; EMA (0.9999) over all parameters

Every random draw of step s (level, mask, label drop, dropout, t, noise) comes from a seed derived
from (seed, rank, s), and the data order from (seed, epoch): a run resumed from a checkpoint takes
the same steps as one never interrupted. Under torchrun each process draws its own level; DDP
averages the gradients; only rank 0 logs, shows progress and writes checkpoints, whose ``model``
and ``model_ema`` hold the bare model's names (no ``module.`` prefix).
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import asdict, dataclass, field, fields, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

from far_sdk.diffusion import NUM_TRAIN_TIMESTEPS
from far_sdk.errors import CheckpointError, ConfigError, InvalidArgumentError
from far_sdk.filters import FILTER_TYPES, FilterType, filter_matrix

from ._io import check_state_dict, safe_torch_load
from .checkpoint import atomic_torch_save, save_official_checkpoint
from .config import FARConfig, config_from_official_args, get_config
from .far import FAR
from .schedules import LR_SCHEDULES, LrSchedule, loss_weight, lr_at, sample_mask
from .vae import VAE_CONFIGS, AutoencoderKL, VAEConfig

log = logging.getLogger(__name__)

Precision = Literal["auto", "bf16", "fp32"]
PRECISIONS: tuple[str, ...] = ("auto", "bf16", "fp32")
#: FARConfig fields that do not change the weights' layout or meaning: may differ on resume.
_TRAINING_ONLY_FIELDS = {"mask", "label_drop_prob", "attn_dropout", "proj_dropout", "diffusion_batch_mul", "num_sampling_steps"}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs. Defaults follow the official ``train.sh`` except
    where the issue asks for the paper (loss weight on; mask off unless requested)."""

    model: str | FARConfig = "far_tiny"     # preset name or an explicit FARConfig
    batch_size: int = 64                     # per process; global batch = batch_size * world size
    steps: int | None = None                 # exactly one of steps / epochs
    epochs: int | None = None
    lr: float | None = None                  # absolute lr; None -> blr * global batch / 256
    blr: float = 1e-4
    min_lr: float = 0.0
    lr_schedule: LrSchedule = "constant"
    warmup_steps: int = 0
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.02
    grad_clip: float = 3.0
    ema_rate: float = 0.9999
    label_drop: float | None = None          # None: the model config's label_drop_prob (0.1)
    diffusion_batch_mul: int | None = None   # None: the model config's (4)
    use_mask: bool = False                   # frequency-aware masking; needs a model built with mask=True
    use_loss_weight: bool = True             # the paper's w_r
    filter: FilterType = "spatial"           # training low-pass ("spatial" = official area + bicubic)
    precision: Precision = "auto"            # auto: bf16 autocast on CUDA when supported, else fp32
    device: str | None = None                # None: cuda (cuda:LOCAL_RANK under torchrun) if available, else cpu
    seed: int = 0
    out_dir: str | None = None
    save_every: int | None = None            # steps between checkpoints (and always at the end)
    log_every: int = 10
    num_workers: int = 0
    resume: str | None = None                # checkpoint file, or a directory holding checkpoint-last.pth
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
        for name, value, allowed in (("lr_schedule", self.lr_schedule, LR_SCHEDULES),
                                     ("precision", self.precision, PRECISIONS), ("filter", self.filter, FILTER_TYPES)):
            if value not in allowed:
                raise ConfigError(f"TrainConfig.{name} must be one of {allowed}, got {value!r}")
        self.model_config()  # validate the model choice now

    def model_config(self) -> FARConfig:
        """The architecture to train, with this run's label drop and diffusion batch multiplier folded in."""
        cfg = self.model if isinstance(self.model, FARConfig) else get_config(self.model)
        over: dict[str, Any] = {}
        if self.label_drop is not None:
            over["label_drop_prob"] = float(self.label_drop)
        if self.diffusion_batch_mul is not None:
            over["diffusion_batch_mul"] = int(self.diffusion_batch_mul)
        cfg = replace(cfg, **over) if over else cfg
        if self.use_mask and not cfg.mask:
            raise ConfigError("use_mask needs a model built with mask=True (FARConfig(mask=True)); "
                              "without it the encoder ignores the mask")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["model"] = self.model.to_dict() if isinstance(self.model, FARConfig) else self.model
        d["betas"] = list(self.betas)
        return d


@dataclass
class TrainResult:
    model: FAR                                   # the bare (unwrapped) model, in train mode
    ema: dict[str, torch.Tensor]                 # EMA of every parameter, by bare name
    step: int                                    # optimiser steps taken in total (resumed ones included)
    optimizer: torch.optim.Optimizer | None = None
    history: list[tuple[int, float, float]] = field(default_factory=list)  # (step, mean loss since last log, lr)
    checkpoint: Path | None = None              # set on rank 0 when a checkpoint was written


# ---- data ------------------------------------------------------------------------------------------


class LatentDataset(Dataset):
    """Cached latents: ``.npz`` or ``.safetensors`` with ``latents`` [N, C, H, W] (already times the latent
    scale) and ``labels`` [N] int. npz is read into memory; safetensors is read per item (large caches)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise InvalidArgumentError(f"latents file {self.path} does not exist; write one with `far-train cache-latents`")
        if self.path.suffix not in (".npz", ".safetensors"):
            raise InvalidArgumentError(f"latents file {self.path} must end in .npz or .safetensors")
        self._latents: np.ndarray | None = None
        self._handle: Any = None
        try:
            shape, dtype, labels = self._read_header()
        except InvalidArgumentError:
            raise
        except Exception as e:  # zipfile.BadZipFile, SafetensorError, OSError, ValueError
            raise InvalidArgumentError(f"latents file {self.path} is unreadable ({type(e).__name__}: {e}); "
                                       "re-write it with `far-train cache-latents`") from e
        if len(shape) != 4 or dtype != "float32":
            raise InvalidArgumentError(f"{self.path}: 'latents' must be float32 [N, C, H, W], found {dtype} {list(shape)}")
        if labels.ndim != 1 or labels.shape[0] != shape[0] or not np.issubdtype(labels.dtype, np.integer):
            raise InvalidArgumentError(f"{self.path}: 'labels' must be int [N={shape[0]}], found {labels.dtype} {list(labels.shape)}")
        if shape[0] == 0 or labels.min() < 0:
            raise InvalidArgumentError(f"{self.path}: needs at least one sample and labels >= 0")
        self.labels = labels.astype(np.int64)
        self.latent_shape = tuple(shape[1:])

    def _read_header(self) -> tuple[tuple[int, ...], str, np.ndarray]:
        """(latents shape, latents dtype name, labels); npz latents are kept in memory."""
        if self.path.suffix == ".npz":
            with np.load(self.path) as f:
                _check_keys(self.path, list(f.keys()))
                self._latents, labels = np.asarray(f["latents"]), np.asarray(f["labels"])
            return self._latents.shape, str(self._latents.dtype), labels
        from safetensors import safe_open

        with safe_open(self.path, "np") as f:
            _check_keys(self.path, list(f.keys()))
            sl = f.get_slice("latents")
            dtype = "float32" if sl.get_dtype() == "F32" else sl.get_dtype()
            return tuple(sl.get_shape()), dtype, f.get_tensor("labels")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._latents is not None:
            x = self._latents[i]
        else:
            if self._handle is None:  # opened lazily, once per (worker) process
                from safetensors import safe_open

                self._handle = safe_open(self.path, "np")
            x = self._handle.get_slice("latents")[i : i + 1][0]
        return torch.from_numpy(np.array(x, dtype=np.float32)), torch.tensor(self.labels[i])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handle": None}


def _check_keys(path: Path, keys: list[str]) -> None:
    missing = [k for k in ("latents", "labels") if k not in keys]
    if missing:
        raise InvalidArgumentError(f"latents file {path} lacks {missing} (found {sorted(keys)})")


def scan_image_folder(root: str | os.PathLike) -> tuple[list[str], list[tuple[Path, int]]]:
    """ImageFolder layout: root/<class>/**/<image>. Classes sorted by name -> index; samples sorted."""
    root = Path(root)
    if not root.is_dir():
        raise InvalidArgumentError(f"image root {root} is not a directory (expected root/<class>/<image files>)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    samples = [(p, i) for i, c in enumerate(classes) for p in sorted((root / c).rglob("*"))
               if p.suffix.lower() in IMAGE_EXTENSIONS]
    if not samples:
        raise InvalidArgumentError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under class folders of {root}")
    return classes, samples


def center_crop(image: Any, size: int) -> Any:
    """ADM centre crop: halve (BOX) while the short side >= 2 size, bicubic-resize the short side to size, crop the centre."""
    from PIL import Image

    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


class ImageFolderImages(Dataset):
    """(image [3, R, R] in [-1, 1], label) from an ImageFolder tree; centre crop, optional random h-flip."""

    def __init__(self, root: str | os.PathLike, resolution: int, flip: bool = True):
        self.classes, self.samples = scan_image_folder(root)
        self.resolution, self.flip = resolution, flip

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        from PIL import Image

        path, label = self.samples[i]
        with Image.open(path) as im:
            im = center_crop(im.convert("RGB"), self.resolution)
        x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)  # (3, R, R)
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x.contiguous(), torch.tensor(label, dtype=torch.int64)


class ImageFolderLatents(Dataset):
    """Latents encoded on the fly: posterior.sample() * scale of each (cropped, randomly flipped) image.

    :func:`train` loads images with workers and encodes whole batches on the training device;
    indexing encodes one image on the VAE's device.
    """

    def __init__(self, root: str | os.PathLike, vae: AutoencoderKL, scale: float, flip: bool = True):
        self.vae, self.scale = vae.eval(), float(scale)
        self.images = ImageFolderImages(root, vae.config.resolution, flip)

    @property
    def num_classes(self) -> int:
        return len(self.images.classes)

    def __len__(self) -> int:
        return len(self.images)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """images [B, 3, R, R] in [-1, 1] -> latents [B, E, R/f, R/f] = posterior sample * scale."""
        return self.vae.encode(images).sample(generator) * self.scale

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, label = self.images[i]
        device = next(self.vae.parameters()).device
        return self.encode(x[None].to(device))[0].cpu(), label


def write_latents(path: str | os.PathLike, latents: np.ndarray, labels: np.ndarray) -> Path:
    """Write ``latents`` float32 [N, C, H, W] and ``labels`` int64 [N] to .npz or .safetensors, atomically."""
    import tempfile

    path = Path(path)
    arrays = {"latents": np.ascontiguousarray(latents, dtype=np.float32),
              "labels": np.ascontiguousarray(labels, dtype=np.int64)}
    if path.suffix not in (".npz", ".safetensors"):
        raise InvalidArgumentError(f"latents output {path} must end in .npz or .safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if path.suffix == ".npz":
                np.savez(f, **arrays)
            else:
                from safetensors.numpy import save

                f.write(save(arrays))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def cache_latents(image_root: str | os.PathLike, vae: AutoencoderKL, out_path: str | os.PathLike, scale: float,
                  batch: int = 32, *, seed: int = 0, num_workers: int = 0, progress: bool = True) -> Path:
    """Encode every image of an ImageFolder tree (centre crop, no flip) and write ``posterior.sample() * scale``.

    One fixed sample per image (seeded), unlike the official cache, which stores the posterior moments of the
    image and its mirror and samples anew each epoch. The VAE runs on the device its parameters are on.
    """
    from tqdm import tqdm

    images = ImageFolderImages(image_root, vae.config.resolution, flip=False)
    device = next(vae.parameters()).device
    gen = torch.Generator(device).manual_seed(seed)
    vae.eval()
    lat, lab = [], []
    loader = DataLoader(images, batch_size=batch, shuffle=False, num_workers=num_workers)
    with torch.no_grad():
        for x, y in tqdm(loader, desc="encode", disable=not progress):
            z = vae.encode(x.to(device)).sample(gen) * scale          # (B, E, h, w)
            lat.append(z.float().cpu().numpy())                        # host sync
            lab.append(y.numpy())
    out = write_latents(out_path, np.concatenate(lat), np.concatenate(lab))
    log.info("wrote %d latents of %d classes to %s", len(images), len(images.classes), out)
    return out


# ---- model pieces ------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def _filter_cpu(level: int, kind: str, n: int) -> torch.Tensor:
    return torch.from_numpy(np.array(filter_matrix(level, kind, n)))


def low_pass_latents(latents: torch.Tensor, level: int, kind: FilterType = "spatial") -> torch.Tensor:
    """Level ``level`` of latents [B, C, H, W]: M X M^T per channel (all zeros at level 0)."""
    m = _filter_cpu(level, kind, latents.shape[-1]).to(latents)               # (H, H)
    return m @ latents @ m.T                                                    # (B, C, H, W)


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H*W, C], token = row * W + column."""
    return x.flatten(2).transpose(1, 2)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Official AdamW groups: [no decay: 1-D, *.bias, anything under diffloss; decay: the rest], model order."""
    no_decay, decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim == 1 or name.endswith(".bias") or "diffloss" in name else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


@torch.no_grad()
def validation_loss(model: FAR, latents: torch.Tensor, labels: torch.Tensor, level: int,
                    generator: torch.Generator, kind: FilterType = "spatial") -> float:
    """Deterministic loss of one batch at one level: mean of mse + vb with t and noise drawn from
    ``generator`` (CPU), eval mode (no dropout), no label drop, no mask, no weight."""
    was_training = model.training
    model.eval()
    B, C = latents.shape[:2]
    x_in = low_pass_latents(latents, level, kind)
    z = model.condition(to_tokens(x_in), model.class_emb(labels))               # (B, L, D)
    target = to_tokens(latents).reshape(-1, C)                                   # (B*L, C)
    n = target.shape[0]
    t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (n,), generator=generator).to(latents.device)
    noise = torch.randn(n, C, generator=generator).to(latents)
    lvl = torch.full((n, 1), float(level), device=latents.device)
    mse, vb = model.diffloss.loss_terms(target, t, noise, z.reshape(n, -1), lvl)
    model.train(was_training)
    return float((mse + vb).mean())                                              # host sync


# ---- distributed ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False   # we called init_process_group, so we tear it down

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


def _step_seed(seed: int, rank: int, step: int) -> int:
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
            config.precision == "auto" and self.device.type == "cuda" and torch.cuda.is_bf16_supported())
        self.lr = config.lr if config.lr is not None else config.blr * config.batch_size * dist_info.world_size / 256
        torch.manual_seed(config.seed)  # same initialisation on every rank
        self.model = FAR(mc).to(self.device).train()
        self.optimizer = torch.optim.AdamW(param_groups(self.model, config.weight_decay), lr=self.lr, betas=config.betas)
        self._params = [p for _, p in self.model.named_parameters()]
        self.ema = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        self.global_step = 0
        self.total_steps = config.steps or 0
        self.net: torch.nn.Module = self.model

    def wrap_ddp(self) -> None:
        """Wrap for DDP (call after any resume). mask_token is unused unless masking, hence find_unused_parameters."""
        if self.dist.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = DistributedDataParallel(self.model, device_ids=ids, find_unused_parameters=not self.config.use_mask)

    def step(self, latents: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, float]:
        """One optimiser step on latents [B, C, H, W] (scaled) and labels [B]; returns (loss, lr)."""
        cfg, mc = self.config, self.model_config
        seed = _step_seed(cfg.seed, self.dist.rank, self.global_step)
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)                                  # dropout, t and noise inside the model
        B, F = latents.shape[0], mc.grid_size
        level = int(torch.randint(0, F, (), generator=gen))
        drop = (torch.rand(B, generator=gen) < mc.label_drop_prob).to(self.device)
        mask = sample_mask(B, mc.seq_len, level, gen, num_levels=F, device=self.device) if cfg.use_mask else None
        lr = lr_at(self.global_step, self.total_steps, cfg.warmup_steps, self.lr, cfg.lr_schedule, cfg.min_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x = latents.to(self.device, torch.float32, non_blocking=True)                 # (B, C, H, W)
        x_in = low_pass_latents(x, level, cfg.filter)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            loss = self.net(to_tokens(x_in), labels.to(self.device), to_tokens(x), level, mask=mask, drop_labels=drop)
        if cfg.use_loss_weight:
            loss = loss * loss_weight(level, F)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self._params, cfg.grad_clip)
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
            model=cfg.model if isinstance(cfg.model, str) else "custom", img_size=mc.grid_size * 16, vae_stride=16,
            patch_size=1, vae_embed_dim=mc.token_channels, buffer_size=mc.buffer_size, class_num=mc.num_classes,
            diffloss_d=mc.diffloss_d, diffloss_w=mc.diffloss_w, mask=mc.mask,
            num_sampling_steps=str(mc.num_sampling_steps), diffusion_batch_mul=mc.diffusion_batch_mul,
            label_drop_prob=mc.label_drop_prob, attn_dropout=mc.attn_dropout, proj_dropout=mc.proj_dropout,
            batch_size=cfg.batch_size, blr=cfg.blr, lr=self.lr, min_lr=cfg.min_lr, lr_schedule=cfg.lr_schedule,
            weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip, ema_rate=cfg.ema_rate, seed=cfg.seed,
            epochs=cfg.epochs, output_dir=cfg.out_dir, world_size=self.dist.world_size, loss_weight=cfg.use_loss_weight,
            far_sdk_config=mc.to_dict(), far_sdk_train_config=cfg.to_dict(), far_sdk_step=self.global_step,
        )

    def save(self, path: str | os.PathLike, epoch: int) -> Path:
        return save_official_checkpoint(path, self.model, ema_state=self.ema_state(), optimizer=self.optimizer,
                                        epoch=epoch, scaler_state={}, args=self.checkpoint_args(epoch))

    def load(self, path: str | os.PathLike, steps_per_epoch: int | None = None) -> None:
        """Restore model, EMA, optimiser and step from a checkpoint (ours, or official: step = (epoch + 1) * steps/epoch)."""
        path = Path(path)
        if path.is_dir():
            path = path / "checkpoint-last.pth"
        ckpt = safe_torch_load(path, allowed_globals=[argparse.Namespace])
        if not isinstance(ckpt, dict) or "model" not in ckpt:
            raise CheckpointError(f"{path} is not a training checkpoint (no 'model' entry)")
        args = vars(ckpt["args"]) if isinstance(ckpt.get("args"), argparse.Namespace) else dict(ckpt.get("args") or {})
        if args:
            saved = config_from_official_args(args)
            diff = [f.name for f in fields(FARConfig) if f.name not in _TRAINING_ONLY_FIELDS
                    and getattr(saved, f.name) != getattr(self.model_config, f.name)]
            if diff:
                raise ConfigError(f"{path} was trained with another architecture (differs in {diff}); "
                                  f"resume with the same --model / config")
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


def _latent_source(dataset: Dataset, device: torch.device):
    """(dataset to load, batch -> latents on device): ImageFolderLatents loads images and encodes batches here."""
    if isinstance(dataset, ImageFolderLatents):
        dataset.vae.to(device)
        return dataset.images, lambda x: dataset.encode(x.to(device, non_blocking=True))
    return dataset, lambda x: x


def train(config: TrainConfig, dataset: Dataset) -> TrainResult:
    """Train on ``dataset`` (items (latents [C, H, W], label)); see the module docstring for one step."""
    from tqdm import tqdm

    use_cuda = (config.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    info = init_distributed(use_cuda)
    try:
        trainer = Trainer(config, info)
        source, to_latents = _latent_source(dataset, trainer.device)
        sampler = DistributedSampler(source, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                     seed=config.seed, drop_last=True)
        steps_per_epoch = len(sampler) // config.batch_size
        if steps_per_epoch == 0:
            raise InvalidArgumentError(f"dataset of {len(source)} samples gives no full batch of {config.batch_size} "
                                       f"per process ({info.world_size} processes): lower --batch-size")
        total = config.steps or config.epochs * steps_per_epoch
        trainer.total_steps = total
        if config.resume:
            trainer.load(config.resume, steps_per_epoch)
        trainer.wrap_ddp()
        out = Path(config.out_dir) if config.out_dir else None
        ckpt_path = out / "checkpoint-last.pth" if out else None
        result = TrainResult(trainer.model, trainer.ema, trainer.global_step, trainer.optimizer)
        bar = tqdm(total=total, initial=trainer.global_step, disable=not (config.progress and info.is_main), desc="train")
        log.info("training %d steps (%d per epoch), global batch %d, lr %.3g, device %s%s", total, steps_per_epoch,
                 config.batch_size * info.world_size, trainer.lr, trainer.device, ", bf16" if trainer.amp else "")
        pending: list[torch.Tensor] = []
        while trainer.global_step < total:
            epoch, skip = divmod(trainer.global_step, steps_per_epoch)
            sampler.set_epoch(epoch)
            order = list(sampler)[skip * config.batch_size: steps_per_epoch * config.batch_size]
            loader = DataLoader(source, batch_size=config.batch_size, sampler=order, drop_last=True,
                                num_workers=config.num_workers, pin_memory=trainer.device.type == "cuda")
            for x, y in loader:
                _check_labels(y, trainer.model_config)
                x = to_latents(x)
                _check_latents(x, trainer.model_config)
                loss, lr = trainer.step(x, y)
                pending.append(loss)
                bar.update(1)
                step = trainer.global_step
                if step % config.log_every == 0 or step == total:
                    mean = float(torch.stack(pending).float().mean())                 # host sync
                    pending.clear()
                    result.history.append((step, mean, lr))
                    bar.set_postfix(loss=f"{mean:.4f}", lr=f"{lr:.2e}")
                    if info.is_main:
                        log.info("step %d/%d epoch %d loss %.4f lr %.3e", step, total, epoch, mean, lr)
                if ckpt_path and (step == total or (config.save_every and step % config.save_every == 0)):
                    if info.is_main:
                        result.checkpoint = trainer.save(ckpt_path, epoch)
                        log.info("saved %s at step %d", ckpt_path, step)
                    if info.distributed:
                        dist.barrier()
                if step >= total:
                    break
        bar.close()
        result.step = trainer.global_step
        return result
    finally:
        if info.owns_group:
            dist.destroy_process_group()


def _check_latents(x: torch.Tensor, mc: FARConfig) -> None:
    if tuple(x.shape[1:]) != (mc.token_channels, mc.grid_size, mc.grid_size):
        raise ConfigError(f"latents have shape {list(x.shape[1:])} but the model expects "
                          f"[{mc.token_channels}, {mc.grid_size}, {mc.grid_size}]")


def _check_labels(y: torch.Tensor, mc: FARConfig) -> None:
    if int(y.min()) < 0 or int(y.max()) >= mc.num_classes:                      # CPU tensors: no device sync
        raise InvalidArgumentError(f"labels span {int(y.min())}..{int(y.max())} but the model has "
                                   f"{mc.num_classes} classes: pick a config with num_classes > {int(y.max())}")


# ---- VAE training ----------------------------------------------------------------------------------------


def train_vae(vae_config: VAEConfig | str, images: torch.Tensor | Dataset, steps: int, lr: float = 1e-4,
              kl_weight: float = 1e-6, *, batch_size: int = 8, out: str | os.PathLike | None = None, seed: int = 0,
              device: str | None = None, betas: tuple[float, float] = (0.5, 0.9), log_every: int = 50,
              progress: bool = True, scale_samples: int = 256) -> float:
    """Train an :class:`AutoencoderKL` from scratch; return the latent scale estimate 1 / std(posterior samples).

    loss = mean|x - x^| + mean (x - x^)^2 + kl_weight * KL(q || N(0, I)) / (3 H W)
    (LDM's per-sample sums, divided by the pixel count; no perceptual or adversarial terms). AdamW with
    LDM's betas (0.5, 0.9), no weight decay. ``images``: a tensor [N, 3, R, R] in [-1, 1] (R = the
    config's resolution) or a Dataset of images or (image, label). The model is initialised right after
    ``torch.manual_seed(seed)``. ``out`` gets ``{"model": state_dict, "latent_scale": s}`` atomically,
    which :func:`training.vae.load_official_vae` reads. The official kl16 tokenizer uses 0.2325.
    """
    from tqdm import tqdm

    cfg = VAE_CONFIGS[vae_config] if isinstance(vae_config, str) and vae_config in VAE_CONFIGS else vae_config
    if not isinstance(cfg, VAEConfig):
        raise ConfigError(f"unknown VAE config {vae_config!r}; choose one of {sorted(VAE_CONFIGS)} or pass a VAEConfig")
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != cfg.in_channels or images.shape[2:] != (cfg.resolution,) * 2:
            raise InvalidArgumentError(f"images must be [N, {cfg.in_channels}, {cfg.resolution}, {cfg.resolution}] "
                                       f"in [-1, 1], got {list(images.shape)}")
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
        x = _first(batch).to(dev)                                                     # (B, 3, R, R)
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
        atomic_torch_save({"model": {k: v.detach().cpu() for k, v in vae.state_dict().items()}, "latent_scale": scale},
                          Path(out))
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
    return float(1.0 / torch.cat(zs).std())                                          # host sync


def load_latents_or_images(data: str | None, image_root: str | None, vae: AutoencoderKL | None,
                           scale: float) -> Dataset:
    """The CLI's data choice: a latents file, or an ImageFolder encoded on the fly through ``vae``."""
    if (data is None) == (image_root is None):
        raise InvalidArgumentError("give exactly one of --data (latents file) or --image-root (ImageFolder + --vae)")
    if data is not None:
        return LatentDataset(data)
    if vae is None:
        raise InvalidArgumentError("--image-root needs --vae (a VAE checkpoint) to encode the images")
    return ImageFolderLatents(image_root, vae, scale)


__all__ = [
    "TrainConfig", "TrainResult", "Trainer", "train", "LatentDataset", "ImageFolderImages", "ImageFolderLatents",
    "cache_latents", "write_latents", "train_vae", "param_groups", "low_pass_latents", "to_tokens", "validation_loss",
    "init_distributed", "DistInfo", "center_crop", "scan_image_folder",
]
