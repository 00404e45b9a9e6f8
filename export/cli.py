"""``far-export``: FAR checkpoints -> verified bundles (-> TensorRT engines).

    far-export onnx --hub figereatfish/FAR --model far_large --out engines/far_large     # official weights by name
    far-export onnx --checkpoint checkpoint-last.pth --vae kl16.ckpt --out engines/far_large
    far-export onnx --checkpoint custom.pth --config custom.json --vae kl16.ckpt --out engines/custom
    far-export onnx --random-init --model far_tiny --vae-config kl16-tiny --out engines/tiny

Each subcommand is one entry of :data:`SUBCOMMANDS`: ``name -> (help, add_arguments, run)``.
``run(args)`` returns the exit status; any failure ends the command with one line on stderr and
the status of :data:`far_sdk.errors.EXIT_CODES` (see :mod:`far_sdk.cli.run`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from export.hub import OFFICIAL_VAE, fetch, hub_checkpoint, with_hub
from export.trt_build import TRT_HELP, add_trt_args, run_trt
from far_sdk import __version__
from far_sdk.bundle.schema import ENCODER_WEIGHT_DTYPES
from far_sdk.cli.run import ArgumentParser, check_writable_dir, non_negative_int, run_command
from far_sdk.errors import InvalidArgumentError

_EXPORT_LOGGER = "export"


# ---- onnx ----------------------------------------------------------------------------------------


def _add_onnx_args(p: argparse.ArgumentParser) -> None:
    from training.config import FAR_CONFIGS
    from training.config_vae import VAE_CONFIGS

    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--checkpoint",
        metavar="PATH|hub:OWNER/REPO/PATH[@REV]",
        help="FAR checkpoint (checkpoint-last.pth), a local file or one on the Hugging Face Hub",
    )
    src.add_argument(
        "--hub",
        metavar="OWNER/REPO",
        help="the checkpoint from this Hub repository by --model: --hub figereatfish/FAR --model far_large fetches "
        "far_large/checkpoint-last.pth and the official VAE (huggingface_hub's cache; HF_HUB_OFFLINE, HF_TOKEN)",
    )
    src.add_argument("--random-init", action="store_true", help="random weights (tests, benchmarks); needs --model")
    p.add_argument("--hub-file", metavar="PATH", help="with --hub: the checkpoint's path in the repository")
    p.add_argument(
        "--hub-revision",
        metavar="REV",
        help="with --hub: a branch, tag or commit (default: main); the manifest records the commit it resolved to",
    )
    arch = p.add_mutually_exclusive_group()
    arch.add_argument(
        "--model",
        choices=sorted(FAR_CONFIGS),
        help="architecture preset; with --checkpoint, read from the checkpoint's saved args when omitted",
    )
    arch.add_argument(
        "--config",
        type=Path,
        metavar="CFG.JSON",
        help="architecture of a custom shape: a JSON object of FARConfig fields (training/config.py), "
        "e.g. for a checkpoint whose saved args name no official preset",
    )
    p.add_argument("--no-ema", action="store_true", help="export the live weights instead of the EMA weights")
    p.add_argument(
        "--vae",
        metavar="PATH|hub:OWNER/REPO/PATH[@REV]",
        help=f"KL-16 tokenizer checkpoint (kl16.ckpt); required with --checkpoint; with --hub default {OFFICIAL_VAE}",
    )
    p.add_argument(
        "--vae-config",
        choices=sorted(VAE_CONFIGS),
        help="VAE architecture (default: kl16, the official one; a --random-init model other than far_base/large/"
        "huge must name it: kl16-tiny for tests)",
    )
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of --random-init weights (default: 0)")
    p.add_argument("--out", type=Path, required=True, help="bundle directory to write, e.g. engines/far_large")
    p.add_argument("--name", help="bundle name (default: the --out directory's name)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset, >= 17")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out directory")
    p.add_argument(
        "--reuse",
        action="store_true",
        help="with --random-init: keep a bundle already at --out when it was made from the same model, VAE, seed and "
        "far_sdk version (a cache for benchmarks: far-export onnx --random-init --model far_large --out DIR --reuse)",
    )
    p.add_argument(
        "--cfg", type=float, default=3.0, help="default guidance scale recorded in the bundle (default: 3.0)"
    )
    p.add_argument("--latent-scale", type=float, default=0.2325, help="VAE latent scale (default: 0.2325, FAR's)")
    p.add_argument("--id2label", type=Path, help='JSON file {"0": "tench", ...} of class names')
    p.add_argument(
        "--text-encoder",
        metavar="[qwen2-vl:|small:]DIR",
        help="FAR-T2I: the text encoder to bundle as text_encoder.onnx + tokenizer.json (then generate(prompt=...) "
        "works torch-free): qwen2-vl:DIR, a local Qwen2-VL-2B-Instruct directory (the official encoder, 300 tokens "
        "behind the official system prompt), or small:DIR (SmallTextEncoder.save_pretrained); a bare DIR: the kind "
        "read from its files",
    )
    p.add_argument(
        "--text-encoder-dtype",
        choices=ENCODER_WEIGHT_DTYPES,
        help="with a qwen2-vl text encoder: store its weights as float16 or bfloat16 (the graph computes and "
        "returns float32; default float32: a 6.2 GB graph for the 1.5B model, float16 3.1 GB)",
    )
    p.add_argument("--no-validate", action="store_true", help="skip the onnxruntime-vs-PyTorch check (not recommended)")
    p.add_argument(
        "--no-vae-encoder",
        action="store_true",
        help="leave out the optional vae_encoder graph (image-to-image: generate(image=...), "
        "far generate --init-image)",
    )


def _run_onnx(args: argparse.Namespace) -> int:
    from export.onnx_export import checkpoint_source, export_bundle, random_init_source
    from export.random_bundle import random_bundle, random_models
    from training.checkpoint import load_official_checkpoint
    from training.config import read_config_file
    from training.config_vae import VAE_CONFIGS
    from training.vae import load_official_vae

    out: Path = args.out
    if out.exists() and not out.is_dir():
        raise InvalidArgumentError(f"--out {out} is a file, not a directory")
    if args.reuse and not args.random_init:
        raise InvalidArgumentError("--reuse applies to --random-init bundles only")
    if out.is_dir() and any(out.iterdir()) and not (args.overwrite or args.reuse):
        raise InvalidArgumentError(f"{out} exists and is not empty; pass --overwrite to replace it")
    check_writable_dir(
        out.parent if str(out.parent) else Path("."), "--out", shown=out
    )  # before any loading or tracing
    if args.random_init and args.model is None and args.config is None:
        raise InvalidArgumentError(
            "--random-init needs --model (one of the presets) or --config (a JSON file of FARConfig fields)"
        )
    if (args.hub_file or args.hub_revision) and not args.hub:
        raise InvalidArgumentError("--hub-file and --hub-revision go with --hub OWNER/REPO")
    if args.hub:
        args.checkpoint = hub_checkpoint(args.hub, args.model, args.hub_file, args.hub_revision)
        args.vae = args.vae or OFFICIAL_VAE
    if args.checkpoint is not None and args.vae is None:
        raise InvalidArgumentError("--checkpoint needs --vae (the KL-16 tokenizer checkpoint, e.g. kl16.ckpt)")
    args.vae_config = args.vae_config or _default_vae_config(args)
    id2label = None
    if args.id2label is not None:
        try:
            id2label = json.loads(args.id2label.read_text())
        except (OSError, ValueError) as e:
            raise InvalidArgumentError(f"--id2label {args.id2label}: cannot read a JSON object ({e})") from e
        if not isinstance(id2label, dict):
            raise InvalidArgumentError(f"--id2label {args.id2label} must hold a JSON object of id -> name")

    config = read_config_file(args.config) if args.config is not None else args.model  # checked before any loading
    vae_cfg = VAE_CONFIGS[args.vae_config]
    t0 = time.perf_counter()
    checkpoint, checkpoint_hub = fetch(args.checkpoint, "--checkpoint")
    vae_path, vae_hub = fetch(args.vae, "--vae")
    options = dict(
        name=args.name or out.resolve().name,
        latent_scale=args.latent_scale,
        id2label=id2label,
        opset=args.opset,
        validate=not args.no_validate,
        defaults={"cfg": args.cfg},
        vae_encoder=not args.no_vae_encoder,
    )
    if args.random_init and vae_path is None:
        path = random_bundle(
            out, config, vae_cfg, seed=args.seed, reuse=args.reuse, overwrite=args.overwrite, **options
        )
        print(f"random-init model and VAE exported in {time.perf_counter() - t0:.1f} s")
        return _report(path)
    if args.random_init:
        far, _ = random_models(config, vae_cfg, seed=args.seed)
        source = random_init_source(args.seed)
    else:
        far = load_official_checkpoint(checkpoint, use_ema=not args.no_ema, config=config)
        source = checkpoint_source(checkpoint, use_ema=not args.no_ema, vae=vae_path)
    source = with_hub(source, checkpoint_hub, vae_hub)
    if vae_path is not None:
        vae = load_official_vae(vae_path, vae_cfg)
    print(f"loaded {'random-init ' if args.random_init else ''}model and VAE in {time.perf_counter() - t0:.1f} s")

    if args.text_encoder is not None:
        from export.t2i_export import load_text_encoder

        options["text_encoder"] = load_text_encoder(args.text_encoder)
        if args.text_encoder_dtype is not None:
            options["text_encoder_options"] = {"weight_dtype": args.text_encoder_dtype}
    elif args.text_encoder_dtype is not None:
        raise InvalidArgumentError("--text-encoder-dtype goes with --text-encoder qwen2-vl:DIR")
    return _report(export_bundle(far, vae, out, overwrite=args.overwrite, source=source, **options))


#: The official model sizes, exported with the official KL-16 VAE unless --vae-config says otherwise.
_OFFICIAL_MODELS = ("far_base", "far_large", "far_huge", "far_t2i")


def _default_vae_config(args: argparse.Namespace) -> str:
    """kl16 (the official VAE), except for a random-init model of another size, which must name its VAE: a tiny
    model around the full KL-16 decoder (152.8 MB of random weights) is rarely what a test or benchmark meant."""
    if not args.random_init or args.vae is not None or args.model in _OFFICIAL_MODELS:
        return "kl16"
    import torch

    from training.config_vae import VAE_CONFIGS
    from training.vae import AutoencoderKL

    with torch.device("meta"):  # count the parameters without allocating them
        vae = AutoencoderKL(VAE_CONFIGS["kl16"])
    n = sum(p.numel() for m in (vae.decoder, vae.post_quant_conv) for p in m.parameters())
    raise InvalidArgumentError(
        f"--random-init {'--model ' + args.model if args.model else '--config ' + str(args.config)} without "
        f"--vae-config would build the official KL-16 decoder: {n / 1e6:.1f} M random parameters, a "
        f"{4 * n / 1e6:.1f} MB vae_decoder.onnx. Pass --vae-config kl16-tiny (tests) or kl16-small, or --vae-config "
        "kl16 to mean it"
    )


def _report(path: Path) -> int:
    manifest = json.loads((path / "manifest.json").read_text())
    print(f"{'graph':<12} {'file':<22} {'MB':>9} {'max abs':>10} {'max rel':>10}")
    for gname, g in manifest["graphs"].items():
        size = sum(manifest["files"][f]["size"] for f in (g["file"], g.get("external_data")) if f)
        val = g["validation"]
        err = f"{val['max_abs']:>10.2e} {val['max_rel']:>10.2e}" if val else f"{'skipped':>10} {'':>10}"
        print(f"{gname:<12} {g['file']:<22} {size / 1e6:>9.1f} {err}")
    print(f"bundle written to {path}")
    return 0


def _add_fewstep_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", help="the bundle directory to add the few-step denoiser to (in place)")
    p.add_argument("--student", required=True, help="far-train distill's student.safetensors")
    p.add_argument("--no-validate", action="store_true", help="skip the onnxruntime-vs-PyTorch check")


def _run_fewstep(args: argparse.Namespace) -> int:
    from export.fewstep import add_fewstep

    changed = add_fewstep(args.bundle, args.student, validate=not args.no_validate)
    print(f"{args.bundle}: denoiser_fewstep {'added' if changed else 'already present (unchanged)'}")
    return 0


# ---- dispatch ------------------------------------------------------------------------------------

Subcommand = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]

#: name -> (help, add_arguments, run). Adding a subcommand is adding one entry.
SUBCOMMANDS: dict[str, Subcommand] = {
    "onnx": ("export a checkpoint (or random weights) to a verified ONNX bundle", _add_onnx_args, _run_onnx),
    "trt": (TRT_HELP, add_trt_args, run_trt),
    "fewstep": (
        "add a distilled few-step denoiser (far-train distill's student) to a bundle, in place",
        _add_fewstep_args,
        _run_fewstep,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="far-export", description="Turn FAR checkpoints into bundles and engines.")
    parser.add_argument("--version", action="version", version=f"far-export (far-sdk {__version__})")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only the summary, not per-graph progress")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_, add_args, run) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        add_args(p)
        p.set_defaults(run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Progress comes from the library's loggers; shown on stderr for the duration of the command.
    log = logging.getLogger(_EXPORT_LOGGER)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    old_level = log.level
    if not args.quiet:
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    try:
        return run_command(
            f"far-export {args.command}", lambda: args.run(args), interrupted="interrupted; nothing was written"
        )
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)


if __name__ == "__main__":
    sys.exit(main())
