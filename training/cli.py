"""The ``far-train`` command: train FAR, cache VAE latents, train a VAE.

far-train train --data latents.npz --model far_small --batch-size 64 --steps 10000 --out runs/a
torchrun --nproc_per_node 8 -m training.cli train --data latents.safetensors --model far_large --epochs 400 --out runs/b
far-train train --data text_latents.npz --model far_t2i_demo --steps 3000 --out runs/t2i   # text-to-image
far-train cache-latents --image-root imagenet/train --vae kl16.ckpt --out latents.safetensors
far-train train-vae --image-root images/ --vae-config kl16-small --steps 20000 --out vae.pth
far-train distill --bundle engines/far-demo --images 256 --steps 2000 --out runs/distill   # few-step student
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import replace

from far_sdk import __version__
from far_sdk.cli.run import (
    ArgumentParser,
    check_writable_dir,
    check_writable_file,
    non_negative_int,
    positive_int,
    run_command,
)
from far_sdk.errors import ConfigError

#: The official kl16 tokenizer's latent scale (latents = posterior sample * scale).
OFFICIAL_LATENT_SCALE = 0.2325


def _add_train(p: argparse.ArgumentParser) -> None:
    from .config import FAR_CONFIGS
    from .config_t2i import T2I_CONFIGS
    from .config_vae import VAE_CONFIGS

    data = p.add_argument_group("data (one of --data or --image-root)")
    data.add_argument(
        "--data",
        help="cached latents (.npz / .safetensors with 'latents' and 'labels'; FAR-T2I: an .npz "
        "with 'latents', 'contexts' (text hidden states) and 'context_index')",
    )
    data.add_argument("--image-root", help="ImageFolder tree, encoded on the fly through --vae")
    data.add_argument("--vae", help="VAE checkpoint for --image-root (e.g. kl16.ckpt)")
    data.add_argument("--vae-config", default="kl16", choices=sorted(VAE_CONFIGS), help="the --vae's architecture")
    data.add_argument("--scale", type=float, default=OFFICIAL_LATENT_SCALE, help="latent scale for --image-root")
    data.add_argument("--num-workers", type=non_negative_int, default=0, help="DataLoader worker processes")
    p.add_argument(
        "--model",
        required=True,
        choices=sorted(FAR_CONFIGS) + sorted(T2I_CONFIGS),
        help="model preset (far_t2i*: text-to-image, trained on text hidden states)",
    )
    p.add_argument("--num-classes", type=positive_int, default=None, help="override the preset's class count")
    length = p.add_mutually_exclusive_group(required=True)
    length.add_argument("--steps", type=positive_int, help="optimiser steps to train (or --epochs)")
    length.add_argument("--epochs", type=positive_int, help="passes over the data (or --steps)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="per process")
    p.add_argument("--lr", type=float, default=None, help="absolute learning rate (default: blr * global batch / 256)")
    p.add_argument("--blr", type=float, default=1e-4, help="base learning rate, per 256 images (the official)")
    p.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant", help="after the warm-up")
    p.add_argument("--warmup", type=non_negative_int, default=0, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=float, default=0.02, help="AdamW weight decay (official decay groups)")
    p.add_argument("--grad-clip", type=float, default=None, help="default: 3.0 (FAR-T2I: 1.0, as the official runs)")
    p.add_argument("--ema-rate", type=float, default=None, help="default: 0.9999 (FAR-T2I: 0.999)")
    p.add_argument("--label-drop", type=float, default=None, help="default: the preset's (0.1)")
    p.add_argument("--diffusion-batch-mul", type=positive_int, default=None, help="default: the preset's (4)")
    p.add_argument("--mask", action="store_true", help="frequency-aware masking (builds the model with mask=True)")
    p.add_argument("--no-loss-weight", action="store_true", help="train unweighted, like the released models")
    p.add_argument(
        "--high-t-fraction",
        type=float,
        default=0.0,
        help="share of diffusion rows with t drawn from [950, 1000): sharpens eps at the noisiest steps, "
        "where sampling amplifies its error ~2e4x (0 = official uniform t)",
    )
    p.add_argument("--filter", choices=["spatial", "fourier"], default="spatial", help="the low-pass filter of levels")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto", help="auto: bf16 autocast on CUDA")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of initialisation and data order")
    p.add_argument("--out", required=True, help="output directory (checkpoint-last.pth)")
    p.add_argument("--resume", default=None, help="checkpoint file or directory holding checkpoint-last.pth")
    p.add_argument(
        "--save-every", type=positive_int, default=None, help="steps between checkpoints (always at the end)"
    )
    p.add_argument("--log-every", type=positive_int, default=10, help="steps between loss log lines")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _run_train(a: argparse.Namespace) -> int:
    from .config import get_config
    from .config_t2i import T2I_CONFIGS
    from .config_vae import VAE_CONFIGS
    from .data import load_latents_or_images
    from .train import TrainConfig, train
    from .train_t2i import TextLatentDataset
    from .vae import load_official_vae

    check_writable_dir(a.out, "--out")  # before any data is read
    model = a.model  # the preset's name goes into the checkpoint's args.model unless overridden
    t2i = a.model in T2I_CONFIGS
    if t2i and (a.mask or a.num_classes is not None or a.image_root or a.data is None):
        raise ConfigError(
            "FAR-T2I trains from --data (an .npz of latents, contexts and context_index) and always "
            "masks: drop --mask / --num-classes / --image-root"
        )
    if a.mask or a.num_classes is not None:
        base = get_config(a.model)
        model = replace(
            base, mask=base.mask or a.mask, num_classes=a.num_classes if a.num_classes is not None else base.num_classes
        )
    cfg = TrainConfig(
        model=model,
        batch_size=a.batch_size,
        steps=a.steps,
        epochs=a.epochs,
        lr=a.lr,
        blr=a.blr,
        lr_schedule=a.lr_schedule,
        warmup_steps=a.warmup,
        weight_decay=a.weight_decay,
        grad_clip=a.grad_clip if a.grad_clip is not None else (1.0 if t2i else 3.0),
        ema_rate=a.ema_rate if a.ema_rate is not None else (0.999 if t2i else 0.9999),
        label_drop=a.label_drop,
        diffusion_batch_mul=a.diffusion_batch_mul,
        use_mask=a.mask,
        use_loss_weight=not a.no_loss_weight,
        high_t_fraction=a.high_t_fraction,
        filter=a.filter,
        precision=a.precision,
        device=a.device,
        seed=a.seed,
        out_dir=a.out,
        save_every=a.save_every,
        log_every=a.log_every,
        num_workers=a.num_workers,
        resume=a.resume,
        progress=not a.no_progress,
    )
    vae = load_official_vae(a.vae, VAE_CONFIGS[a.vae_config]) if a.vae else None
    data = TextLatentDataset(a.data) if t2i else load_latents_or_images(a.data, a.image_root, vae, a.scale)
    result = train(cfg, data)
    if result.checkpoint is not None:
        last = result.history[-1][1] if result.history else float("nan")
        print(f"trained {result.step} steps (last loss {last:.4f}); checkpoint: {result.checkpoint}")
    return 0


def _add_cache(p: argparse.ArgumentParser) -> None:
    from .config_vae import VAE_CONFIGS

    p.add_argument("--image-root", required=True, help="ImageFolder tree: ROOT/<class>/<images>")
    p.add_argument("--vae", required=True, help="VAE checkpoint (e.g. kl16.ckpt)")
    p.add_argument("--vae-config", default="kl16", choices=sorted(VAE_CONFIGS), help="the --vae's architecture")
    p.add_argument("--out", required=True, help="output .npz or .safetensors")
    p.add_argument("--scale", type=float, default=OFFICIAL_LATENT_SCALE, help="latent scale (kl16: the official)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images per VAE call")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the posterior samples")
    p.add_argument("--num-workers", type=non_negative_int, default=0, help="DataLoader worker processes")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _run_cache(a: argparse.Namespace) -> int:
    import torch  # noqa: PLC0415 - PyTorch is optional for the runtime: loaded when used

    from .config_vae import VAE_CONFIGS
    from .data import cache_latents
    from .vae import load_official_vae

    check_writable_file(a.out, "--out", suffixes=(".npz", ".safetensors"))
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    vae = load_official_vae(a.vae, VAE_CONFIGS[a.vae_config]).to(device)
    out = cache_latents(
        a.image_root,
        vae,
        a.out,
        a.scale,
        a.batch_size,
        seed=a.seed,
        num_workers=a.num_workers,
        progress=not a.no_progress,
    )
    print(f"wrote {out}")
    return 0


def _add_vae(p: argparse.ArgumentParser) -> None:
    from .config_vae import VAE_CONFIGS

    p.add_argument("--image-root", required=True, help="ImageFolder tree (labels are ignored)")
    p.add_argument("--vae-config", default="kl16", choices=sorted(VAE_CONFIGS), help="architecture to train")
    p.add_argument("--steps", type=positive_int, required=True, help="optimiser steps")
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate")
    p.add_argument("--kl-weight", type=float, default=1e-6, help="weight of the KL term")
    p.add_argument("--batch-size", type=positive_int, default=8, help="images per step")
    p.add_argument(
        "--out", required=True, help="output checkpoint ({'model': state_dict}, loadable by load_official_vae)"
    )
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of initialisation and data order")
    p.add_argument("--log-every", type=positive_int, default=50, help="steps between loss log lines")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _run_vae(a: argparse.Namespace) -> int:
    from .config_vae import VAE_CONFIGS
    from .data import ImageFolderImages
    from .vae_train import train_vae

    check_writable_file(a.out, "--out")
    cfg = VAE_CONFIGS[a.vae_config]
    images = ImageFolderImages(a.image_root, cfg.resolution, flip=True)
    scale = train_vae(
        cfg,
        images,
        a.steps,
        a.lr,
        a.kl_weight,
        batch_size=a.batch_size,
        out=a.out,
        seed=a.seed,
        device=a.device,
        log_every=a.log_every,
        progress=not a.no_progress,
    )
    print(f"wrote {a.out}; latent scale estimate {scale:.4f} (train FAR with --scale {scale:.4f})")
    return 0


def _add_distill(p: argparse.ArgumentParser) -> None:
    teacher = p.add_argument_group("teacher (one of --bundle or --checkpoint)")
    teacher.add_argument("--bundle", help="a far-sdk bundle directory (its weights and sampling defaults)")
    teacher.add_argument("--checkpoint", help="a FAR checkpoint (official layout, ours included)")
    p.add_argument("--out", required=True, help="output directory (checkpoint-last.pth, student.safetensors)")
    p.add_argument("--images", type=positive_int, default=256, help="teacher images per process")
    p.add_argument(
        "--keep-tokens", type=positive_int, default=32, help="tokens per image and outer step on the 100-step chain"
    )
    p.add_argument(
        "--context-steps", type=positive_int, default=15, help="inner steps of the other tokens (the next input)"
    )
    p.add_argument("--teacher-batch", type=positive_int, default=32, help="images per teacher sampling batch")
    p.add_argument("--steps", type=positive_int, default=2000, help="optimiser steps")
    p.add_argument("--batch-size", type=positive_int, default=2048, help="rows per step and process")
    p.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the teacher's classes and noise")
    p.add_argument("--save-every", type=positive_int, default=500, help="steps between checkpoints")
    p.add_argument("--log-every", type=positive_int, default=50, help="steps between loss log lines")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    p.add_argument("--resume", action="store_true", help="continue from --out's checkpoint and teacher data")


def _run_distill(a: argparse.Namespace) -> int:
    from .distill.train import DistillConfig, distill, load_teacher

    check_writable_dir(a.out, "--out")
    model, defaults, source = load_teacher(a.bundle, a.checkpoint)
    cfg = DistillConfig(
        out_dir=a.out,
        images=a.images,
        keep_tokens=a.keep_tokens,
        context_steps=a.context_steps,
        teacher_batch=a.teacher_batch,
        steps=a.steps,
        batch_size=a.batch_size,
        lr=a.lr,
        seed=a.seed,
        save_every=a.save_every,
        log_every=a.log_every,
        threads=a.threads,
    )
    info = distill(model, cfg, source=source, defaults=defaults, resume=a.resume)
    print(
        f"distilled {info['train_steps']} steps in {info['seconds']:.0f} s (teacher data {info['teacher_seconds']:.0f}"
        f" s); held-out loss {info['val_loss']:.4f} (teacher-initialised {info['val_loss_teacher_init']:.4f}); "
        f"student: {a.out}/student.safetensors"
    )
    return 0


COMMANDS = {
    "train": (_add_train, _run_train, "train a class-conditional FAR model"),
    "cache-latents": (_add_cache, _run_cache, "encode an ImageFolder tree into a latents file"),
    "train-vae": (_add_vae, _run_vae, "train a KL autoencoder (tokenizer) and estimate its latent scale"),
    "distill": (_add_distill, _run_distill, "distil a FAR denoiser into a 1-, 2- or 4-step student"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="far-train", description="Train FAR and its tokenizer")
    parser.add_argument("--version", action="version", version=f"far-train (far-sdk {__version__})")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (add, _run, help_) in COMMANDS.items():
        add(sub.add_parser(name, help=help_, description=help_))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 talks
    level = logging.INFO if main_rank and not a.quiet else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    return run_command(
        f"far-train {a.command}",
        lambda: COMMANDS[a.command][1](a),
        interrupted="interrupted (the last checkpoint written is intact)",
    )


if __name__ == "__main__":
    sys.exit(main())
