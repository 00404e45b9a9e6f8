#!/usr/bin/env python
"""Parameter counts and analytic FLOPs per image of the released FAR sizes.

    .venv/bin/python scripts/model_stats.py              # plain text
    .venv/bin/python scripts/model_stats.py --markdown   # the tables of docs/BENCHMARKS.md

Parameter counts are exact: each model is built on the meta device (no memory, no
initialisation cost) and its parameters' numel summed. FLOPs come from far_sdk/flops.py
(2 FLOPs per multiply-add; matmuls, convolutions and the attention products; biases, norms,
activations and softmax excluded — the torch FlopCounterMode convention). Runs in seconds on CPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from far_sdk.bench.flops import (  # noqa: E402
    denoiser_step_flops,
    generation_flops,
    transformer_flops,
    vae_decoder_flops,
)
from far_sdk.maths.schedules import inner_step_schedule  # noqa: E402
from training.config import FAR_CONFIGS  # noqa: E402
from training.config_vae import VAE_CONFIGS  # noqa: E402
from training.far import FAR  # noqa: E402
from training.vae import AutoencoderKL  # noqa: E402

MODELS = ("far_base", "far_large", "far_huge")
LABELS = {"far_base": "FAR-B", "far_large": "FAR-L", "far_huge": "FAR-H"}
OUTER_STEPS = 10
#: (label, inner_steps argument, eager accounting)
SCHEDULES = (
    ("frequency-aware 40..100 (paper)", "frequency-aware", False),
    ("fixed 100 (official release)", "official", False),
    ("fixed 100, official code as written (eager)", "official", True),
)
#: Exact counts (spec §2 and §9, confirmed by running the official modules).
EXPECTED_PARAMS = {
    "far_base": (207_926_816, 35_751_968),
    "far_large": (426_359_840, 20_263_968),
    "far_huge": (811_722_272, 20_526_112),
}
EXPECTED_VAE = (66_456_019, 38_189_203)


def far_param_counts(name: str) -> dict[str, int]:
    """{"total", "transformer", "diffusion_mlp"} of preset ``name``, built on the meta device."""
    with torch.device("meta"):
        model = FAR(FAR_CONFIGS[name])
    total = sum(p.numel() for p in model.parameters())
    mlp = sum(p.numel() for p in model.diffloss.parameters())
    return {"total": total, "transformer": total - mlp, "diffusion_mlp": mlp}


def vae_param_counts(name: str = "kl16") -> dict[str, int]:
    """{"total", "decode"} (decode = decoder.* + post_quant_conv.*) of a VAE preset, on the meta device."""
    with torch.device("meta"):
        vae = AutoencoderKL(VAE_CONFIGS[name])
    total = sum(p.numel() for p in vae.parameters())
    dec = sum(p.numel() for p in vae.decoder.parameters()) + sum(p.numel() for p in vae.post_quant_conv.parameters())
    return {"total": total, "decode": dec}


def collect() -> dict:
    vae_cfg = VAE_CONFIGS["kl16"]
    out = {
        "params": {n: far_param_counts(n) for n in MODELS},
        "vae": vae_param_counts("kl16"),
        "per_call": {},
        "generation": [],
        "schedules": {},
    }
    for label, inner, _ in SCHEDULES:
        out["schedules"][label] = inner_step_schedule(inner, OUTER_STEPS)
    for n in MODELS:
        cfg = FAR_CONFIGS[n]
        out["per_call"][n] = {
            "transformer": transformer_flops(cfg, 2),
            "denoiser": denoiser_step_flops(cfg, 1),
            "denoiser_eager": denoiser_step_flops(cfg, 1, include_condition=True, time_embed_per_row=True),
        }
        for label, inner, eager in SCHEDULES:
            f = generation_flops(cfg, vae_cfg, (OUTER_STEPS, inner), batch=1, cfg_guidance=True, eager=eager)
            out["generation"].append((n, label, sum(out["schedules"][label]), f))
    out["vae_decode"] = vae_decoder_flops(vae_cfg, 1)
    return out


def check(stats: dict) -> list[str]:
    errors = []
    for n, (total, mlp) in EXPECTED_PARAMS.items():
        got = stats["params"][n]
        if (got["total"], got["diffusion_mlp"]) != (total, mlp):
            errors.append(
                f"{n}: got total {got['total']:,} / MLP {got['diffusion_mlp']:,}, expected {total:,} / {mlp:,}"
            )
    v = stats["vae"]
    if (v["total"], v["decode"]) != EXPECTED_VAE:
        errors.append(
            f"kl16: got {v['total']:,} / decode {v['decode']:,}, expected {EXPECTED_VAE[0]:,} / {EXPECTED_VAE[1]:,}"
        )
    return errors


def _t(x: float) -> str:
    return f"{x / 1e12:.3f}"


def _g(x: float) -> str:
    return f"{x / 1e9:.2f}"


def markdown(stats: dict) -> str:
    L = []
    L.append("| model | total params | transformer | diffusion MLP (d x W) |")
    L.append("|---|---:|---:|---:|")
    for n in MODELS:
        p, cfg = stats["params"][n], FAR_CONFIGS[n]
        L.append(
            f"| {LABELS[n]} (`{n}`) | {p['total']:,} | {p['transformer']:,} | "
            f"{p['diffusion_mlp']:,} ({cfg.diffloss_d} x {cfg.diffloss_w}) |"
        )
    v = stats["vae"]
    L.append(f"| VAE `kl16` | {v['total']:,} | — | decode path (decoder + post_quant_conv): {v['decode']:,} |")
    L.append("")
    L.append(
        f"FLOPs per image, {OUTER_STEPS} outer steps, CFG on (transformer on 2 rows per outer step, diffusion MLP "
        "on 2 x 256 rows per inner step), one kl16 decode at 256 x 256. TFLOP = 1e12 FLOPs, "
        "1 multiply-add = 2 FLOPs."
    )
    L.append("")
    L.append(
        "| model | inner schedule | inner steps (sum) | transformer TFLOP | diffusion MLP TFLOP | VAE decode TFLOP | "
        "total TFLOP |"
    )
    L.append("|---|---|---:|---:|---:|---:|---:|")
    for n, label, steps, f in stats["generation"]:
        L.append(
            f"| {LABELS[n]} | {label} | {steps} | {_t(f['transformer'])} | {_t(f['diffusion_mlp'])} | "
            f"{_t(f['vae_decode'])} | {_t(f['total'])} |"
        )
    L.append("")
    L.append(
        "Inner steps per outer step: "
        + "; ".join(
            f"{label.split(' (')[0].split(',')[0]}: {', '.join(map(str, s))}"
            for label, s in list(stats["schedules"].items())[:2]
        )
        + "."
    )
    L.append("")
    L.append("Per call (batch 1 image, CFG on):")
    L.append("")
    L.append(
        "| model | transformer call (2 rows, incl. cond_embed) GFLOP | denoiser step GFLOP | denoiser step, eager "
        "GFLOP | kl16 decode GFLOP |"
    )
    L.append("|---|---:|---:|---:|---:|")
    for n in MODELS:
        c = stats["per_call"][n]
        L.append(
            f"| {LABELS[n]} | {_g(c['transformer'])} | {_g(c['denoiser'])} | {_g(c['denoiser_eager'])} | "
            f"{_g(stats['vae_decode'])} |"
        )
    return "\n".join(L)


def text(stats: dict) -> str:
    L = ["Parameters (exact, built on the meta device):"]
    for n in MODELS:
        p = stats["params"][n]
        L.append(
            f"  {n:10s} total {p['total']:>13,}  transformer {p['transformer']:>13,}  diffusion MLP "
            f"{p['diffusion_mlp']:>11,}"
        )
    v = stats["vae"]
    L.append(f"  {'kl16 VAE':10s} total {v['total']:>13,}  decoder + post_quant_conv {v['decode']:>11,}")
    L.append("")
    L.append(f"FLOPs per image ({OUTER_STEPS} outer steps, CFG on, kl16 decode), TFLOP:")
    L.append(
        f"  {'model':9s} {'inner schedule':45s} {'steps':>5s} {'transf.':>8s} {'MLP':>8s} {'VAE':>7s} {'total':>8s}"
    )
    for n, label, steps, f in stats["generation"]:
        L.append(
            f"  {LABELS[n]:9s} {label:45s} {steps:5d} {_t(f['transformer']):>8s} {_t(f['diffusion_mlp']):>8s} "
            f"{_t(f['vae_decode']):>7s} {_t(f['total']):>8s}"
        )
    L.append("")
    for label, s in stats["schedules"].items():
        L.append(f"  inner steps, {label}: {list(s)}")
    L.append("")
    L.append("Per call (1 image, CFG on), GFLOP:")
    for n in MODELS:
        c = stats["per_call"][n]
        L.append(
            f"  {LABELS[n]:9s} transformer {_g(c['transformer'])}  denoiser step {_g(c['denoiser'])} "
            f"(eager {_g(c['denoiser_eager'])})  kl16 decode {_g(stats['vae_decode'])}"
        )
    return "\n".join(L)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--markdown", action="store_true", help="emit markdown tables (for docs/BENCHMARKS.md)")
    args = ap.parse_args(argv)
    stats = collect()
    print(markdown(stats) if args.markdown else text(stats))
    errors = check(stats)
    for e in errors:
        print(f"MISMATCH: {e}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
