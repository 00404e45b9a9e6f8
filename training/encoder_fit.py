"""Recover a VAE encoder for a bundle that keeps only the decoder: fit :class:`training.vae.Encoder` (+ ``quant_conv``,
the architecture of the bundle's ``vae`` config) to the bundle's FROZEN decoder.

The committed demo bundles (engines/far-demo, engines/far-t2i-demo) carry only the decode half of their VAE
(``weights.safetensors`` has no ``vae.encoder.*``). Image-to-image needs the encoder, so this fits one:

    loss = mean|x - D(z)| + mean (x - D(z))^2 + kl_weight * KL(q(z|x) || N(0, I)) / (3 H W),   z ~ q(z|x)
         + cycle_weight * mean (s E(D(y / s)) - y)^2,   y: latents the bundle's FAR model samples (sampler scale s)

the VAE's own training loss (:func:`training.vae_train.train_vae`) with the decoder D frozen, plus a latent cycle:
only the encoder learns, so the decoder and FAR weights stay byte-identical. Reconstruction alone is not enough:
the decoder ignores some latent directions, and an encoder fitted through it alone lands on latents that decode
right but that the FAR model never saw (the demo: 90 % relative error against its own samples re-encoded); the
cycle term pins those directions to where FAR's latents live (``--cycle N``: N latents sampled from the bundle,
class-balanced, ``--cycle-steps`` inner steps per outer step; the E(D(y)) mean is compared). Data: the demo digits
(:mod:`training.demo_data`, made in code), the training split; the held-out split measures the reconstruction
(posterior mean through the decoder) as L1 and PSNR on the [0, 1] pixel scale.

    python -m training.encoder_fit engines/far-demo --out build/vae_encoder.safetensors --budget-min 12

writes the encoder's tensors (``encoder.*``, ``quant_conv.*``: :func:`save_encoder`) and prints the held-out figures;
``scripts/add_vae_encoder.py`` then adds it to the bundle (``vae_encoder.onnx`` + ``vae_encoder.safetensors``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from pathlib import Path

import torch

from far_sdk.bundle.bundle import Bundle
from far_sdk.errors import ConfigError, InvalidArgumentError
from far_sdk.fileio import atomic_write_bytes

from .from_bundle import load_bundle_models
from .vae import AutoencoderKL

log = logging.getLogger(__name__)

#: The encoder's parameter prefixes in an AutoencoderKL state dict (what :func:`save_encoder` writes).
ENCODER_PREFIXES = ("encoder.", "quant_conv.")


def encoder_state(vae: AutoencoderKL) -> dict[str, torch.Tensor]:
    """The encode half of ``vae``'s state dict (``encoder.*``, ``quant_conv.*``), contiguous CPU float32."""
    return {
        k: v.detach().cpu().float().contiguous() for k, v in vae.state_dict().items() if k.startswith(ENCODER_PREFIXES)
    }


def save_encoder(vae: AutoencoderKL, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write :func:`encoder_state` as safetensors, atomically."""
    from safetensors.torch import save  # noqa: PLC0415 - loaded when the weights are written

    atomic_write_bytes(Path(path), save(encoder_state(vae), metadata=metadata or {}))


def fit_encoder(
    vae: AutoencoderKL,
    images: torch.Tensor,
    *,
    steps: int,
    lr: float = 1e-3,
    kl_weight: float = 1e-6,
    batch_size: int = 32,
    seed: int = 0,
    budget_s: float | None = None,
    log_every: int = 100,
    cycle: torch.Tensor | None = None,
    cycle_weight: float = 1.0,
    latent_scale: float = 1.0,
    reinit: bool = True,
) -> dict[str, float]:
    """Re-initialise ``vae``'s encoder (and ``quant_conv``) from ``seed`` and fit it to the frozen decoder on
    ``images`` [N, 3, R, R] in [-1, 1]; AdamW (LDM's betas), cosine decay to lr/20 over ``steps``; stops early
    after ``budget_s`` seconds. ``cycle``: latents [M, C, h, w] at the sampler scale (``latent_scale``) for the
    cycle term; ``reinit=False`` continues from the encoder's current weights. Returns {"steps", "seconds", "loss"}
    (the last logging window's mean)."""
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[0] < 1:
        raise InvalidArgumentError(f"images must be [N, 3, R, R] in [-1, 1], got {list(images.shape)}")
    if steps < 1:
        raise InvalidArgumentError(f"steps must be positive, got {steps}")
    torch.manual_seed(seed)
    for m in (vae.encoder, vae.quant_conv) if reinit else ():
        for mod in m.modules():
            if hasattr(mod, "reset_parameters"):
                mod.reset_parameters()
    for p in vae.parameters():
        p.requires_grad_(False)
    params = [p for m in (vae.encoder, vae.quant_conv) for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    vae.train()
    vae.decoder.eval()
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.5, 0.9), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * s / steps)))
    gen = torch.Generator().manual_seed(seed)
    t0, window, done = time.perf_counter(), [], 0
    for step in range(1, steps + 1):
        idx = torch.randint(0, images.shape[0], (batch_size,), generator=gen)
        x = images[idx]
        post = vae.encode(x)
        rec = vae.decode(post.sample(gen))
        diff = x - rec
        loss = diff.abs().mean() + diff.pow(2).mean() + kl_weight * post.kl().mean() / x[0].numel()
        if cycle is not None:
            y = cycle[torch.randint(0, cycle.shape[0], (batch_size,), generator=gen)]
            with torch.no_grad():
                img = vae.decode(y / latent_scale)
            loss = loss + cycle_weight * (vae.encode(img).mean * latent_scale - y).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        window.append(float(loss.detach()))
        done = step
        if step % log_every == 0:
            log.info(
                "encoder fit step %d/%d loss %.5f (%.0f s)",
                step,
                steps,
                sum(window) / len(window),
                time.perf_counter() - t0,
            )
            window = window[-log_every:]
        if budget_s is not None and time.perf_counter() - t0 > budget_s:
            log.info("encoder fit: time budget of %.0f s reached at step %d", budget_s, step)
            break
    vae.eval()
    for p in vae.parameters():
        p.requires_grad_(False)
    tail = window[-log_every:]
    return {"steps": done, "seconds": time.perf_counter() - t0, "loss": sum(tail) / len(tail)}


@torch.no_grad()
def cycle_error(vae: AutoencoderKL, latents: torch.Tensor, latent_scale: float) -> float:
    """mean |s E(D(y / s)) - y| / mean |y| over sampler-scale latents y: how well the encoder inverts the decoder on
    the FAR model's own latents."""
    back = vae.encode(vae.decode(latents / latent_scale)).mean * latent_scale
    return float((back - latents).abs().mean() / latents.abs().mean())


def far_latents(bundle_dir: str, n: int, inner_steps: int, seed: int) -> torch.Tensor:
    """``n`` latents [n, C, h, w] the bundle's FAR model samples (ONNX Runtime; class-balanced, seeds seed..)."""
    import far_sdk  # noqa: PLC0415

    with far_sdk.Generator(bundle_dir, backend="onnxruntime") as gen:
        classes = int(gen.bundle.model_config["num_classes"])
        labels = [i % classes for i in range(n)]
        out = gen.generate(labels, seed=seed, inner_steps=inner_steps, output_type="latent", max_batch=50)
    return torch.from_numpy(out.latents)


@torch.no_grad()
def reconstruction_error(vae: AutoencoderKL, images: torch.Tensor) -> dict[str, float]:
    """Held-out reconstruction through the posterior mean: L1 and PSNR on the [0, 1] pixel scale (images in [-1, 1];
    the reconstruction clamped to [-1, 1] as the runtime's uint8 conversion does)."""
    rec = vae.decode(vae.encode(images).mean).clamp(-1, 1)
    d = (rec - images).double() / 2  # [0, 1] scale
    mse = float(d.pow(2).mean())
    return {"l1": float(d.abs().mean()), "psnr_db": 10 * math.log10(1 / mse) if mse > 0 else math.inf}


def digits_for(bundle: Bundle) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train images, held-out images, held-out labels) of the demo digits at the bundle's image size."""
    from .demo_data import load_digits_images, split_indices  # noqa: PLC0415 - needs scikit-learn

    x, y = load_digits_images(int(bundle.manifest["image_size"]))
    tr, te = split_indices(y)
    return x[tr], x[te], y[te]


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", help="a bundle directory whose VAE config the encoder takes (its decoder stays frozen)")
    ap.add_argument("--out", required=True, help="the encoder's safetensors file")
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget-min", type=float, default=12.0, help="stop after this many minutes (wall clock)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--init", default=None, help="continue from this encoder file (else a fresh initialisation)")
    ap.add_argument("--cycle", type=int, default=0, help="FAR latents sampled for the cycle term (0: none)")
    ap.add_argument("--cycle-steps", type=int, default=6, help="inner steps per outer step when sampling them")
    ap.add_argument("--cycle-weight", type=float, default=1.0)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if a.threads:
        torch.set_num_threads(a.threads)
    bundle = Bundle.load(a.bundle)
    if bundle.manifest["vae"]["in_channels"] != 3:
        raise ConfigError("the encoder fit takes RGB images (vae.in_channels 3)")
    _, vae = load_bundle_models(bundle)
    vae.encoder.to_empty(device="cpu")
    vae.quant_conv.to_empty(device="cpu")
    if a.init:
        from safetensors.torch import load_file  # noqa: PLC0415

        vae.load_state_dict(load_file(a.init), strict=False, assign=True)
    train, held, _ = digits_for(bundle)
    scale = bundle.latent_scale
    t0 = time.perf_counter()
    cycle = far_latents(a.bundle, a.cycle + 100, a.cycle_steps, seed=10_000) if a.cycle else None
    held_cycle = None
    if cycle is not None:  # the last 100: held out, to measure the cycle error
        cycle, held_cycle = cycle[:-100], cycle[-100:]
        log.info("sampled %d FAR latents in %.0f s", a.cycle + 100, time.perf_counter() - t0)
    budget = a.budget_min * 60 - (time.perf_counter() - t0)
    stats = fit_encoder(
        vae,
        train,
        steps=a.steps,
        lr=a.lr,
        batch_size=a.batch,
        seed=a.seed,
        budget_s=budget,
        cycle=cycle,
        cycle_weight=a.cycle_weight,
        latent_scale=scale,
        reinit=a.init is None,
    )
    stats.update(reconstruction_error(vae, held), held_out_images=len(held))
    if held_cycle is not None:
        stats["cycle_rel_l1_held_out"] = cycle_error(vae, held_cycle, scale)
    meta = {"far_sdk_encoder_fit": json.dumps(stats | {"lr": a.lr, "batch": a.batch, "seed": a.seed})}
    save_encoder(vae, a.out, meta)
    print(json.dumps(stats, indent=1))
    return stats


if __name__ == "__main__":
    main()
