"""Training FAR (class-conditional) on cached or on-the-fly VAE latents, on one device or under torchrun.

One optimiser step (official ``engine_far.py``, with the paper's mask ratio and loss weight):

    r ~ U{0, .., F-1}, one per batch (per process)          F = grid side (16)
    x_in = M_r X M_r^T (zeros at r = 0),  target = X        X: latents [B, C, H, W]
    optional frequency-aware mask (m ~ U[r_r, 1), schedules.sample_mask)
    label dropout (p = label_drop_prob) -> fake_latent
    loss = w_r * mean over all B*L*mul rows of (mse + vb)   w_r = 1 + sin(pi/2 r / F), or 1
    backward; clip the global grad norm (3.0); AdamW; EMA (0.9999) over all parameters

Step s draws from a seed of (seed, rank, s), the data order from (seed, epoch): a resumed run repeats an uninterrupted
one. Under torchrun each process draws its own level; only rank 0 logs and writes checkpoints (bare model names).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from far_sdk.errors import ConfigError, InvalidArgumentError
from far_sdk.maths.diffusion import NUM_TRAIN_TIMESTEPS
from far_sdk.maths.filters import FilterType

from .config import FARConfig
from .config_t2i import T2IConfig
from .data import ImageFolderLatents
from .far import FAR
from .filters import grid_to_tokens, low_pass
from .train_t2i import T2ITrainer
from .trainer import TrainConfig, Trainer, TrainResult, init_distributed

log = logging.getLogger(__name__)


@torch.no_grad()
def validation_loss(
    model: FAR,
    latents: torch.Tensor,
    labels: torch.Tensor,
    level: int,
    generator: torch.Generator,
    kind: FilterType = "spatial",
) -> float:
    """Deterministic loss of one batch at one level: mean of mse + vb with t and noise drawn from
    ``generator`` (CPU), eval mode (no dropout), no label drop, no mask, no weight."""
    was_training = model.training
    model.eval()
    B, C = latents.shape[:2]
    x_in = low_pass(latents, level, kind)
    z = model.condition(grid_to_tokens(x_in), model.class_emb(labels))  # (B, L, D)
    target = grid_to_tokens(latents).reshape(-1, C)  # (B*L, C)
    n = target.shape[0]
    t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (n,), generator=generator).to(latents.device)
    noise = torch.randn(n, C, generator=generator).to(latents)
    lvl = torch.full((n, 1), float(level), device=latents.device)
    mse, vb = model.diffloss.loss_terms(target, t, noise, z.reshape(n, -1), lvl)
    model.train(was_training)
    return float((mse + vb).mean())  # host sync


def _latent_source(dataset: Dataset, device: torch.device):
    """(dataset to load, batch -> latents on device): ImageFolderLatents loads images and encodes batches here."""
    if isinstance(dataset, ImageFolderLatents):
        dataset.vae.to(device)
        return dataset.images, lambda x: dataset.encode(x.to(device, non_blocking=True))
    return dataset, lambda x: x


def train(config: TrainConfig, dataset: Dataset) -> TrainResult:
    """Train on ``dataset`` (items (latents [C, H, W], label)); see the module docstring for one step."""
    from tqdm import tqdm  # noqa: PLC0415 - loaded on first use: `import far_sdk` stays light

    use_cuda = (config.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    info = init_distributed(use_cuda)
    try:
        trainer = _trainer_class(config)(config, info)
        source, to_latents = _latent_source(dataset, trainer.device)
        sampler = DistributedSampler(
            source, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=config.seed, drop_last=True
        )
        steps_per_epoch = len(sampler) // config.batch_size
        if steps_per_epoch == 0:
            raise InvalidArgumentError(
                f"dataset of {len(source)} samples gives no full batch of {config.batch_size} "
                f"per process ({info.world_size} processes): lower --batch-size"
            )
        total = config.steps or config.epochs * steps_per_epoch
        trainer.total_steps = total
        if config.resume:
            trainer.load(config.resume, steps_per_epoch)
        trainer.wrap_ddp()
        out = Path(config.out_dir) if config.out_dir else None
        ckpt_path = out / "checkpoint-last.pth" if out else None
        result = TrainResult(trainer.model, trainer.ema, trainer.global_step, trainer.optimizer)
        bar = tqdm(
            total=total, initial=trainer.global_step, disable=not (config.progress and info.is_main), desc="train"
        )
        log.info(
            "training %d steps (%d per epoch), global batch %d, lr %.3g, device %s%s",
            total,
            steps_per_epoch,
            config.batch_size * info.world_size,
            trainer.lr,
            trainer.device,
            ", bf16" if trainer.amp else "",
        )
        pending: list[torch.Tensor] = []
        while trainer.global_step < total:
            epoch, skip = divmod(trainer.global_step, steps_per_epoch)
            sampler.set_epoch(epoch)
            order = list(sampler)[skip * config.batch_size : steps_per_epoch * config.batch_size]
            loader = DataLoader(
                source,
                batch_size=config.batch_size,
                sampler=order,
                drop_last=True,
                num_workers=config.num_workers,
                pin_memory=trainer.device.type == "cuda",
            )
            for x, y in loader:
                trainer.check_targets(y)
                x = to_latents(x)
                _check_latents(x, trainer.model_config)
                loss, lr = trainer.step(x, y)
                pending.append(loss)
                bar.update(1)
                step = trainer.global_step
                if step % config.log_every == 0 or step == total:
                    mean = float(torch.stack(pending).float().mean())  # host sync
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


def _trainer_class(config: TrainConfig) -> type[Trainer]:
    return T2ITrainer if isinstance(config.model_config(), T2IConfig) else Trainer


def _check_latents(x: torch.Tensor, mc: FARConfig | T2IConfig) -> None:
    if tuple(x.shape[1:]) != (mc.token_channels, mc.grid_size, mc.grid_size):
        raise ConfigError(
            f"latents have shape {list(x.shape[1:])} but the model expects "
            f"[{mc.token_channels}, {mc.grid_size}, {mc.grid_size}]"
        )


__all__ = ["TrainConfig", "TrainResult", "Trainer", "train", "validation_loss"]
