"""The ``far`` command: generate images from a bundle, inspect it, benchmark it, serve it, evaluate it."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import sys
from pathlib import Path

from .backends import BACKEND_NAMES
from .bench_cli import add_bench_args, run_bench
from .cli_scale import add_dataset, add_eval, add_serve, run_dataset, run_eval, run_serve
from .clirun import ArgumentParser, check_writable_file, non_negative_int, positive_int, run_command
from .errors import InvalidArgumentError
from .fileio import atomic_write_bytes
from .options import add_sampling_args, options_from_args

#: --out formats (Pillow writes each without extra libraries).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def _grid(images, cols: int):
    from PIL import Image

    w, h = images[0].size
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


def add_generate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", required=True, help="bundle directory (engines/NAME)")
    p.add_argument("--class", dest="classes", action="append", default=None,
                   help="class id or name; repeat for several (each is generated -n times)")
    p.add_argument("--prompt", dest="prompts", action="append", default=None,
                   help="text prompt for a text-conditioned (FAR-T2I) bundle with a bundled text encoder; repeatable")
    p.add_argument("-n", "--num-per-class", type=positive_int, default=1)
    p.add_argument("--seed", type=non_negative_int, default=0, help="image i uses seed + i")
    p.add_argument("--backend", default="auto", choices=BACKEND_NAMES)
    p.add_argument("--device", default=None, help="backend device (cpu, cuda, ...)")
    add_sampling_args(p)
    p.add_argument("--out", default="far.png", help=f"grid image path ({', '.join(IMAGE_SUFFIXES)})")
    p.add_argument("--cols", type=positive_int, default=None, help="grid columns (default: up to 8)")
    p.add_argument("--preview-gif", default=None, help="write a GIF (.gif) of each outer step's decoded estimate")
    p.add_argument("--no-progress", action="store_true")


def check_outputs(a: argparse.Namespace) -> None:
    """Output paths and formats, checked before the bundle is even loaded."""
    out = check_writable_file(a.out, "--out", suffixes=IMAGE_SUFFIXES)
    if a.preview_gif:
        gif = check_writable_file(a.preview_gif, "--preview-gif", suffixes=(".gif",))
        if gif.resolve() == out.resolve():
            raise InvalidArgumentError(f"--out and --preview-gif name the same file {out}")


def _encode(image, path: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=_FORMATS[Path(path).suffix.lower()], **kw)
    return buf.getvalue()


_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF", ".gif": "GIF"}


def run_generate(a: argparse.Namespace) -> int:
    from .pipeline import Generator

    check_outputs(a)
    opts = {"device": a.device} if a.device else {}
    if (a.classes is None) == (a.prompts is None):
        raise InvalidArgumentError("pass --class (class bundles) or --prompt (text-conditioned bundles), one of them, repeatable")
    labels = [c for c in (a.classes or a.prompts) for _ in range(a.num_per_class)]
    cond = {"class_labels": labels} if a.classes else {"prompt": labels}
    frames: list = []

    def on_step(info):
        if info.preview:
            frames.append(_grid(info.preview, a.cols or min(len(labels), 8)))

    with Generator(a.bundle, backend=a.backend, **opts) as gen:
        out = gen.generate(**cond, seed=a.seed, preset=a.preset, options=options_from_args(a), progress=not a.no_progress,
                           on_step=on_step if a.preview_gif else None, preview=bool(a.preview_gif))
        where = f"{gen.backend.describe()['backend']}/{gen.backend.device}"
    cols = a.cols or min(len(labels), 8)
    # Encode everything first, then write each file atomically: a failure leaves no partial file.
    png = _encode(_grid(out.images, cols), a.out)
    # one frame per outer step; the last one is the final image (held longer)
    gif = _encode(frames[0], a.preview_gif, save_all=True, append_images=frames[1:],
                  duration=[300] * (len(frames) - 1) + [1500], loop=0) if a.preview_gif else None
    existed = Path(a.out).exists()
    atomic_write_bytes(Path(a.out), png)
    if gif is not None:
        try:
            atomic_write_bytes(Path(a.preview_gif), gif)
        except BaseException:
            if not existed:
                with contextlib.suppress(OSError):
                    Path(a.out).unlink()
            raise
    t = out.timings
    p = out.plan
    sampler = p.inner_sampler + (f" eta {p.eta:g}" if p.inner_sampler == "ddim" else "")
    print(f"wrote {a.out} ({len(out.images)} images, {f'classes {list(out.class_labels)}' if a.classes else f'{len(a.prompts)} prompts'}, seeds {out.seeds[0]}..{out.seeds[-1]}) "
          f"on {where}; {p.mode} mode, {p.num_steps} outer steps, {sum(p.inner_steps)} {sampler} inner steps")
    print("  " + "  ".join(f"{k} {v:.3f}s" for k, v in t.items()))
    if a.preview_gif:
        print(f"wrote {a.preview_gif} ({len(frames)} frames)")
    return 0


def add_info(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", required=True)
    p.add_argument("--json", action="store_true", help="print the whole manifest")
    p.add_argument("--no-verify", action="store_true", help="skip the files' sha256 check (the manifest's own digest is always checked)")


def run_info(a: argparse.Namespace) -> int:
    from .bundle import Bundle

    b = Bundle.load(a.bundle, verify=not a.no_verify)
    m = b.manifest
    if a.json:
        print(json.dumps(m, indent=2))
        return 0
    cfg = m["model"]
    text = b.text
    cond = (f"text [{text['max_length']} x {text['hidden_size']}]{' + encoder' if 'encoder' in text else ''}" if text
            else f"classes {b.num_classes}")
    print(f"bundle   {b.path}  ({m['name']}, format v{m['format_version']}, "
          f"{'files verified' if not a.no_verify else 'files not verified'})")
    print(f"manifest sha256 {m['manifest_sha256']} (digest and schema checked)")
    print(f"model    D={cfg['encoder_embed_dim']} depth {cfg['encoder_depth']}+{cfg['decoder_depth']} heads {cfg['encoder_num_heads']} "
          f"MLP {cfg['diffloss_d']}x{cfg['diffloss_w']}  {cond}  grid {cfg['grid_size']}x{cfg['grid_size']}x{cfg['token_channels']}")
    print(f"vae      {m['vae'].get('ch')}ch x {m['vae'].get('ch_mult')}  latent scale {b.latent_scale}  image {m.get('image_size')}px")
    print(f"modes    {', '.join(b.sampling_modes)} (model built with mask={cfg.get('mask', True)})")
    print(f"defaults {b.defaults.to_dict()}")
    print(f"source   {m.get('source')}")
    for g, spec in m["graphs"].items():
        val = spec.get("validation", {})
        print(f"graph    {g:12s} {spec['file']:22s} opset {spec.get('opset')}  max abs err vs torch {val.get('max_abs', 'n/a')}")
    for name, f in m["files"].items():
        print(f"file     {name:26s} {f['size'] / 1e6:9.2f} MB  sha256 {f['sha256'][:16]}…")
    if b.id2label:
        print("labels   " + ", ".join(f"{k}={v}" for k, v in sorted(b.id2label.items())[:20]))
    plans = sorted((b.path / "trt").glob("*.plan")) if (b.path / "trt").is_dir() else []
    print(f"trt      {len(plans)} plan(s) built on this machine" if plans else "trt      no TensorRT plans (build with far-export trt)")
    return 0


COMMANDS = {
    "generate": (add_generate, run_generate, "generate images into a grid PNG (and a GIF of the steps)"),
    "info": (add_info, run_info, "print a bundle's manifest summary"),
    "bench": (add_bench_args, run_bench, "time each stage per backend and batch (vs the eager PyTorch sampler), FLOPs, memory"),
    "serve": (add_serve, run_serve, "serve a bundle over HTTP on Ray Serve (dynamic batching, replicas, bounded queue)"),
    "generate-dataset": (add_dataset, run_dataset, "generate N images as ADM-format .npz shards (resumable; Ray workers or one process)"),
    "eval": (add_eval, run_eval, "FID, IS, precision/recall of samples vs a reference through torch-fidelity"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="far", description="FAR image generation from a far-sdk bundle")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add, _run, help_) in COMMANDS.items():
        add(sub.add_parser(name, help=help_, description=help_))
    return parser


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run_command(f"far {a.command}", lambda: COMMANDS[a.command][1](a))


if __name__ == "__main__":
    sys.exit(main())
