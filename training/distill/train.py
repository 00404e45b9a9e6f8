"""``far-train distill``: train a few-step student of a FAR model's denoiser (docs/DISTILLATION.md).

1. Teacher data (data-free): the frozen FAR samples ``images`` random-class images with its 100-step DDPM
   inner loop (:mod:`.teacher`); kept in ``OUT/teacher-rank{R}.safetensors`` so a resumed run reuses it.
2. The student: a copy of the teacher's ``diffloss.net`` (same architecture, initialised from it) whose
   condition projections stay frozen (the transformer graph computes them with the teacher's weights), trained
   with AdamW on :func:`.objective.distill_loss` over all seven (K, jump) pairs, K in {1, 2, 4}.
3. Outputs in ``OUT``: ``checkpoint-last.pth`` (the official layout: the teacher FAR as ``model`` /
   ``model_ema``, the student's AdamW state as ``optimizer``, plus ``student`` and ``distill`` entries; resumed
   with ``--resume``) and ``student.safetensors`` (what ``far-export fewstep BUNDLE --student`` takes).

Under ``torchrun`` every process makes its own teacher data (seed + rank) and the student is wrapped in
DistributedDataParallel (gloo on the CPU, nccl on CUDA); rank 0 writes the files.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from far_sdk.errors import CheckpointError, ConfigError
from far_sdk.fileio import atomic_writer
from far_sdk.maths.distilled import DISTILLED_STEPS, TEACHER_STEPS
from far_sdk.options import DEFAULTS, SamplingOptions, resolve_plan

from ..checkpoint import load_official_checkpoint, save_official_checkpoint
from ..diffloss import SimpleMLPAdaLN
from ..far import FAR
from ..safe_load import check_state_dict, safe_torch_load
from ..trainer import init_distributed
from .objective import JUMPS, distill_loss, jump_moments
from .teacher import TeacherData, teacher_trajectories

log = logging.getLogger(__name__)

#: The safetensors metadata key of a student file (JSON: how it was made).
STUDENT_METADATA_KEY = "far_sdk_distill"
#: Parameters a student never trains: the transformer graph computes the condition with the teacher's.
FROZEN_PREFIXES = ("cond_embed.", "index_cond_embed.")


@dataclass
class DistillConfig:
    out_dir: str
    images: int = 256  # teacher images per process
    keep_tokens: int | None = 32  # tokens per image and outer step on the teacher's chain (None: all)
    context_steps: int = 15  # inner steps of the other tokens (they only make the next step's input)
    teacher_batch: int = 32
    steps: int = 2000
    batch_size: int = 2048  # rows (tokens x outer steps) per optimiser step and process
    lr: float = 2e-4
    seed: int = 0
    save_every: int = 500
    log_every: int = 50
    threads: int | None = None


class StudentJump(nn.Module):
    """The student as one module (so DistributedDataParallel sees its forward): :func:`.objective.jump_moments`."""

    def __init__(self, net: SimpleMLPAdaLN):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, cond: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return jump_moments(self.net, x, cond, rows)


def make_student(teacher: SimpleMLPAdaLN) -> SimpleMLPAdaLN:
    student = copy.deepcopy(teacher).train()
    for name, p in student.named_parameters():
        p.requires_grad_(not name.startswith(FROZEN_PREFIXES))
    return student


def teacher_plan(defaults: Any = DEFAULTS, context_steps: int = 15):
    """The teacher's sampler: the given defaults (a bundle's), no-mask DDPM; tokens not kept for distillation
    run ``context_steps`` per outer step (the kept ones the :data:`TEACHER_STEPS`-step chain)."""
    return resolve_plan(defaults, SamplingOptions(mode="nomask", inner_sampler="ddpm", inner_steps=context_steps))


def make_teacher_data(model: FAR, plan, cfg: DistillConfig, rank: int) -> TeacherData:
    gen = torch.Generator().manual_seed(cfg.seed * 1000003 + rank)
    parts, t0 = [], time.perf_counter()
    for start in range(0, cfg.images, cfg.teacher_batch):
        b = min(cfg.teacher_batch, cfg.images - start)
        labels = torch.randint(0, model.config.num_classes, (b,), generator=gen)
        parts.append(teacher_trajectories(model, labels, plan, gen, keep=cfg.keep_tokens))
        log.info("teacher: %d/%d images (%.0f s)", start + b, cfg.images, time.perf_counter() - t0)
    return TeacherData.cat(parts)


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save  # noqa: PLC0415

    with atomic_writer(path) as f:
        f.write(save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata))


def save_student(net: SimpleMLPAdaLN, path: Path, info: dict[str, Any]) -> Path:
    """``student.safetensors``: the student's state dict (SimpleMLPAdaLN names) and ``info`` as JSON metadata."""
    state = {k: v.detach().cpu().float() for k, v in net.state_dict().items()}
    _save_tensors(state, path, {STUDENT_METADATA_KEY: json.dumps(info, sort_keys=True), "format": "pt"})
    return path


@torch.no_grad()
def evaluate(net: SimpleMLPAdaLN, data: TeacherData, rows: int = 8192, seed: int = 1) -> float:
    """Mean distillation loss over ``rows`` fixed rows of ``data`` and every jump (a fixed draw: comparable)."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(data), (rows,), generator=gen)
    jump = torch.arange(rows) % len(JUMPS)
    loss, _ = distill_loss(
        StudentJump(net), data.states[idx], data.cond[idx], data.cfg[idx], data.temperature[idx], jump
    )
    return float(loss)


def distill(model: FAR, cfg: DistillConfig, *, source: str, defaults: Any = DEFAULTS, resume: bool = False) -> dict:
    """Train a student of ``model`` (the teacher, frozen) and write the outputs; returns the run's summary."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dist_info = init_distributed(use_cuda=False)
    try:
        return _distill(model, cfg, dist_info, source=source, defaults=defaults, resume=resume)
    finally:
        if dist_info.owns_group:
            torch.distributed.destroy_process_group()


def _distill(model: FAR, cfg: DistillConfig, dist_info: Any, *, source: str, defaults: Any, resume: bool) -> dict:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model.float().eval().requires_grad_(False)
    plan = teacher_plan(defaults, cfg.context_steps)
    data_file = out / f"teacher-rank{dist_info.rank}.safetensors"
    t_start = time.perf_counter()
    if resume and data_file.is_file():
        from safetensors.torch import load_file  # noqa: PLC0415

        data = TeacherData(**load_file(str(data_file)))
        log.info("teacher data: %d rows from %s", len(data), data_file)
    else:
        data = make_teacher_data(model, plan, cfg, dist_info.rank)
        _save_tensors(data.tensors(), data_file)
    teacher_seconds = time.perf_counter() - t_start
    n_val = max(len(data) // 20, 1)
    val = TeacherData(*(t[:n_val] for t in data.tensors().values()))
    train = TeacherData(*(t[n_val:] for t in data.tensors().values()))

    student = make_student(model.diffloss.net)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    step, history, ckpt_path = 0, [], out / "checkpoint-last.pth"
    if resume and ckpt_path.is_file():
        ck = safe_torch_load(ckpt_path, allowed_globals=[argparse.Namespace])
        if not isinstance(ck, dict) or "student" not in ck:
            raise CheckpointError(f"{ckpt_path} is not a far-train distill checkpoint (no 'student' entry)")
        check_state_dict(ck["student"], {k: v.shape for k, v in student.state_dict().items()}, source=str(ckpt_path))
        student.load_state_dict(ck["student"])
        opt.load_state_dict(ck["optimizer"])
        step, history = int(ck["distill"]["step"]), list(ck["distill"]["history"])
        log.info("resumed from %s at step %d", ckpt_path, step)
    val_before = evaluate(model.diffloss.net, val)
    jump_net: nn.Module = StudentJump(student)
    if dist_info.distributed:
        jump_net = nn.parallel.DistributedDataParallel(jump_net)

    def summary() -> dict[str, Any]:
        return {
            "method": "gaussian moment matching on teacher DDPM trajectories",
            "steps": list(DISTILLED_STEPS),
            "teacher_steps": TEACHER_STEPS,
            "context_steps": cfg.context_steps,
            "teacher": source,
            "cfg": "two rows (conditional, unconditional); trained on the guided teacher",
            "teacher_plan": {"cfg": list(plan.cfg), "temperature": list(plan.temperature), "x0_clip": plan.x0_clip},
            "config": asdict(cfg),
            "world_size": dist_info.world_size,
            "train_steps": step,
            "rows": len(data),
            "teacher_seconds": round(teacher_seconds, 1),
            "seconds": round(time.perf_counter() - t_start, 1),
            "val_loss_teacher_init": val_before,
            "val_loss": evaluate(student, val),
        }

    def save() -> None:
        if not dist_info.is_main:
            return
        info = summary()
        save_official_checkpoint(
            ckpt_path,
            model,
            optimizer=opt,
            extra={"student": student.state_dict(), "distill": {"step": step, "history": history, "info": info}},
        )
        save_student(student, out / "student.safetensors", info)
        log.info("saved step %d (val loss %.4f, teacher-init %.4f)", step, info["val_loss"], val_before)

    gen = torch.Generator().manual_seed(cfg.seed * 7919 + dist_info.rank * 104729 + step)
    t0 = time.perf_counter()
    while step < cfg.steps:
        idx = torch.randint(0, len(train), (cfg.batch_size,), generator=gen)
        jump = torch.randint(0, len(JUMPS), (cfg.batch_size,), generator=gen)
        loss, stats = distill_loss(
            jump_net, train.states[idx], train.cond[idx], train.cfg[idx], train.temperature[idx], jump
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        step += 1
        if step % cfg.log_every == 0 or step == cfg.steps:
            history.append((step, stats["nll"]))
            log.info(
                "step %d nll %.4f mse %.5f log_std %.3f (%.2f s/step)",
                step,
                stats["nll"],
                stats["mse"],
                stats["log_std"],
                (time.perf_counter() - t0) / max(step, 1),
            )
        if step % cfg.save_every == 0 or step == cfg.steps:
            save()
    if step == 0 or not (out / "student.safetensors").is_file():
        save()
    return summary()


def load_teacher(bundle: str | None, checkpoint: str | None) -> tuple[FAR, Any, str]:
    """(teacher FAR, sampling defaults, source description) from a bundle or a FAR checkpoint."""
    if (bundle is None) == (checkpoint is None):
        raise ConfigError("give the teacher as --bundle DIR or --checkpoint FILE (one of them)")
    if bundle is not None:
        from far_sdk.bundle.bundle import Bundle  # noqa: PLC0415

        from ..from_bundle import load_bundle_models  # noqa: PLC0415

        b = Bundle.load(bundle)
        far, _vae = load_bundle_models(b)
        return far, b.manifest.get("defaults", {}), f"bundle {b.name} ({b.path})"
    far = load_official_checkpoint(checkpoint)
    if not isinstance(far, FAR):
        raise ConfigError(f"{checkpoint}: distillation supports class-conditional FAR models (not FAR-T2I) for now")
    return far, DEFAULTS, f"checkpoint {checkpoint}"
