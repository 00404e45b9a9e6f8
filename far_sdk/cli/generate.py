"""``far generate`` (images into a grid, and a GIF of the steps) and ``far info`` (a bundle's manifest, summarised)."""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

from far_sdk.backends.create import BACKEND_NAMES
from far_sdk.bundle.bundle import Bundle
from far_sdk.cli.run import check_writable_file, non_negative_int, positive_int
from far_sdk.cli.sampling import add_sampling_args, options_from_args
from far_sdk.errors import InvalidArgumentError
from far_sdk.fileio import atomic_write_bytes
from far_sdk.images import IMAGE_SUFFIXES, encode_image, make_image_grid
from far_sdk.pipeline import Generator


def add_generate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", required=True, help="bundle directory (engines/NAME)")
    p.add_argument(
        "--class",
        dest="classes",
        action="append",
        default=None,
        help="class id or name; repeat for several (each is generated -n times)",
    )
    p.add_argument(
        "--prompt",
        dest="prompts",
        action="append",
        default=None,
        help="text prompt for a text-conditioned (FAR-T2I) bundle with a bundled text encoder; repeatable",
    )
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


def run_generate(a: argparse.Namespace) -> int:
    check_outputs(a)
    opts = {"device": a.device} if a.device else {}
    if (a.classes is None) == (a.prompts is None):
        raise InvalidArgumentError(
            "pass --class (class bundles) or --prompt (text-conditioned bundles), one of them, repeatable"
        )
    labels = [c for c in (a.classes or a.prompts) for _ in range(a.num_per_class)]
    cond = {"class_labels": labels} if a.classes else {"prompt": labels}
    frames: list = []

    def on_step(info):
        if info.preview:
            frames.append(make_image_grid(info.preview, a.cols or min(len(labels), 8)))

    with Generator(a.bundle, backend=a.backend, **opts) as gen:
        out = gen.generate(
            **cond,
            seed=a.seed,
            preset=a.preset,
            options=options_from_args(a),
            progress=not a.no_progress,
            on_step=on_step if a.preview_gif else None,
            preview=bool(a.preview_gif),
        )
        where = f"{gen.backend.describe()['backend']}/{gen.backend.device}"
    cols = a.cols or min(len(labels), 8)
    # Encode everything first, then write each file atomically: a failure leaves no partial file.
    png = encode_image(make_image_grid(out.images, cols), a.out)
    # one frame per outer step; the last one is the final image (held longer)
    gif = (
        encode_image(
            frames[0],
            a.preview_gif,
            save_all=True,
            append_images=frames[1:],
            duration=[300] * (len(frames) - 1) + [1500],
            loop=0,
        )
        if a.preview_gif
        else None
    )
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
    print(
        f"wrote {a.out} ({len(out.images)} images, "
        f"{f'classes {list(out.class_labels)}' if a.classes else f'{len(a.prompts)} prompts'}, seeds "
        f"{out.seeds[0]}..{out.seeds[-1]}) "
        f"on {where}; {p.mode} mode, {p.num_steps} outer steps, {sum(p.inner_steps)} {sampler} inner steps"
    )
    print("  " + "  ".join(f"{k} {v:.3f}s" for k, v in t.items()))
    if a.preview_gif:
        print(f"wrote {a.preview_gif} ({len(frames)} frames)")
    return 0


def add_info(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", required=True)
    p.add_argument("--json", action="store_true", help="print the whole manifest")
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="skip the files' sha256 check (the manifest's own digest is always checked)",
    )


def run_info(a: argparse.Namespace) -> int:
    b = Bundle.load(a.bundle, verify=not a.no_verify)
    m = b.manifest
    if a.json:
        print(json.dumps(m, indent=2))
        return 0
    cfg = m["model"]
    text = b.text
    cond = (
        f"text [{text['max_length']} x {text['hidden_size']}]{' + encoder' if 'encoder' in text else ''}"
        if text
        else f"classes {b.num_classes}"
    )
    print(
        f"bundle   {b.path}  ({m['name']}, format v{m['format_version']}, "
        f"{'files verified' if not a.no_verify else 'files not verified'})"
    )
    print(f"manifest sha256 {m['manifest_sha256']} (digest and schema checked)")
    print(
        f"model    D={cfg['encoder_embed_dim']} depth {cfg['encoder_depth']}+{cfg['decoder_depth']} heads "
        f"{cfg['encoder_num_heads']} "
        f"MLP {cfg['diffloss_d']}x{cfg['diffloss_w']}  {cond}  grid "
        f"{cfg['grid_size']}x{cfg['grid_size']}x{cfg['token_channels']}"
    )
    print(
        f"vae      {m['vae'].get('ch')}ch x {m['vae'].get('ch_mult')}  latent scale {b.latent_scale}  image "
        f"{m.get('image_size')}px"
    )
    print(f"modes    {', '.join(b.sampling_modes)} (model built with mask={cfg.get('mask', True)})")
    print(f"defaults {b.defaults.to_dict()}")
    print(f"source   {m.get('source')}")
    for g, spec in m["graphs"].items():
        val = spec.get("validation") or {}  # None: exported without validation
        print(
            f"graph    {g:12s} {spec['file']:22s} opset {spec.get('opset')}  max abs err vs torch "
            f"{val.get('max_abs', 'n/a')}"
        )
    for name, f in m["files"].items():
        print(f"file     {name:26s} {f['size'] / 1e6:9.2f} MB  sha256 {f['sha256'][:16]}…")
    if b.id2label:
        print("labels   " + ", ".join(f"{k}={v}" for k, v in sorted(b.id2label.items())[:20]))
    plans = sorted((b.path / "trt").glob("*.plan")) if (b.path / "trt").is_dir() else []
    print(
        f"trt      {len(plans)} plan(s) built on this machine"
        if plans
        else "trt      no TensorRT plans (build with far-export trt)"
    )
    return 0
