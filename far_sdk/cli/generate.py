"""``far generate``: images into a grid (``--out``), one PNG per image with its settings (``--out-dir``), a GIF of
the steps (``--preview-gif``); ``--from-image`` makes an image written with ``--out-dir`` again."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
from pathlib import Path

import far_sdk
from far_sdk.backends.create import BACKEND_NAMES
from far_sdk.bundle.hub import HUB_PREFIX, locate_bundle, parse_hub_spec
from far_sdk.cli.outputs import SETTINGS_KEY, Settings, encode_png, image_name
from far_sdk.cli.run import (
    add_bundle_argument,
    check_writable_dir,
    check_writable_file,
    non_negative_int,
    positive_int,
)
from far_sdk.cli.sampling import add_sampling_args, options_from_args
from far_sdk.errors import InvalidArgumentError
from far_sdk.fileio import atomic_write_bytes
from far_sdk.images import IMAGE_SUFFIXES, encode_image, make_image_grid, read_image, read_png_text
from far_sdk.options import SamplingOptions
from far_sdk.pipeline import GenerationOutput, Generator

DEFAULT_OUT = "far.png"


def add_generate(p: argparse.ArgumentParser) -> None:
    add_bundle_argument(p)
    what = p.add_argument_group("what to generate (one of --class, --prompt, --from-image)")
    what.add_argument(
        "--class",
        dest="classes",
        action="append",
        metavar="ID|NAME",
        help="class id or name (far info lists the names); repeat for several",
    )
    what.add_argument(
        "--prompt",
        dest="prompts",
        action="append",
        metavar="TEXT",
        help="text prompt, for a text-conditioned (FAR-T2I) bundle with a bundled text encoder; repeatable",
    )
    what.add_argument(
        "--negative-prompt",
        dest="negative_prompts",
        action="append",
        metavar="TEXT",
        help="text bundles: what the unconditional (CFG) rows see instead of the learned null context; once for "
        "every --prompt, or once per --prompt",
    )
    what.add_argument(
        "--from-image",
        metavar="IMAGE.png",
        help="make an image written with --out-dir again from the settings it carries (on its backend); "
        "sampling flags given here override its settings",
    )
    what.add_argument(
        "-n",
        "--num-per-class",
        type=positive_int,
        default=1,
        metavar="N",
        help="images per --class or --prompt (diffusers' num_images_per_prompt)",
    )
    what.add_argument("--seed", type=non_negative_int, help="image i uses seed + i (default: 0)")
    i2i = p.add_argument_group("image-to-image (a bundle with the vae_encoder graph; docs/IMAGE_TO_IMAGE.md)")
    i2i.add_argument("--init-image", metavar="PICTURE", help="start every image from this picture (PNG, JPEG, ...)")
    how = i2i.add_mutually_exclusive_group()
    how.add_argument(
        "--strength",
        type=float,
        metavar="S",
        help="with --init-image: 0..1, how much may change (1: from scratch; starts at step round((1 - S) steps))",
    )
    how.add_argument(
        "--start-level",
        type=non_negative_int,
        metavar="K",
        help="with --init-image: the outer step to start from, 1..steps (the picture low-passed to that step's level)",
    )
    run = p.add_argument_group("where it runs")
    run.add_argument("--backend", choices=BACKEND_NAMES, help="default: auto (TensorRT plans, else ONNX Runtime)")
    run.add_argument("--device", help="backend device (cpu, cuda, ...; default: the backend's)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_sampling_args(p)
    out = p.add_argument_group("outputs")
    out.add_argument(
        "--out",
        help=f"grid of all images ({', '.join(IMAGE_SUFFIXES)}); default: {DEFAULT_OUT} unless --out-dir is given",
    )
    out.add_argument(
        "--out-dir",
        metavar="DIR",
        help="one PNG per image, named by class or prompt and seed, with its settings embedded (--from-image)",
    )
    out.add_argument(
        "--scale", type=positive_int, help="enlarge every image N times, nearest-neighbour (small images stay crisp)"
    )
    out.add_argument("--cols", type=positive_int, help="grid columns (default: up to 8)")
    out.add_argument("--preview-gif", metavar="FILE.gif", help="a GIF of each outer step's decoded estimate")


def check_outputs(a: argparse.Namespace) -> None:
    """Output paths and formats, checked before the bundle is even loaded."""
    if a.out is None and a.out_dir is None:
        a.out = DEFAULT_OUT
    out = check_writable_file(a.out, "--out", suffixes=IMAGE_SUFFIXES) if a.out else None
    if a.out_dir is not None:
        if Path(a.out_dir).exists() and not Path(a.out_dir).is_dir():
            raise InvalidArgumentError(f"--out-dir {a.out_dir} is a file; give a directory")
        check_writable_dir(a.out_dir, "--out-dir")
    if a.preview_gif:
        gif = check_writable_file(a.preview_gif, "--preview-gif", suffixes=(".gif",))
        if out is not None and gif.resolve() == out.resolve():
            raise InvalidArgumentError(f"--out and --preview-gif name the same file {out}")


def settings_of(a: argparse.Namespace) -> Settings:
    """The call to make: from the flags, or from ``--from-image``'s settings with the flags given put over them."""
    given = options_from_args(a)
    if a.from_image is None:
        if (a.classes is None) == (a.prompts is None):
            raise InvalidArgumentError("give --class (class bundles) or --prompt (text bundles), or --from-image")
        labels = [c for c in (a.classes or a.prompts) for _ in range(a.num_per_class)]
        conditioning = {"class_labels" if a.classes else "prompt": labels}
        if a.negative_prompts is not None:
            conditioning["negative_prompt"] = negative_prompt_list(a.negative_prompts, a.prompts, a.num_per_class)
        if a.bundle_spec.startswith(HUB_PREFIX):  # pinned to the commit it resolved to (its local directory's name)
            bundle = f"{HUB_PREFIX}{parse_hub_spec(a.bundle_spec)[0]}@{Path(a.bundle).name}"
        else:
            bundle = str(Path(a.bundle).resolve())  # where --from-image finds it again, from any directory
        return Settings(
            bundle=bundle,
            manifest_sha256="",
            backend=a.backend or "auto",
            device=a.device,
            conditioning=conditioning,
            seed=0 if a.seed is None else a.seed,
            index=0,
            preset=a.preset,
            options=given.to_dict(),
            scale=a.scale or 1,
        )
    if a.classes or a.prompts or a.negative_prompts:
        raise InvalidArgumentError(
            "--from-image takes its --class / --prompt from the image (and its --negative-prompt); leave them out"
        )
    s = Settings.from_png(a.from_image)
    if "init_image" in read_png_text(a.from_image)[1][SETTINGS_KEY]:  # its settings do not carry the start picture
        raise InvalidArgumentError(
            f"--from-image {a.from_image} was made from a start picture (--init-image), which its settings do not "
            "carry: repeat that far generate --init-image call instead"
        )
    return Settings(
        bundle=a.bundle_spec or s.bundle,
        manifest_sha256=s.manifest_sha256,
        backend=a.backend or s.backend,
        device=a.device or s.device,
        conditioning=s.conditioning,
        seed=s.seed if a.seed is None else a.seed,
        index=s.index,
        preset=a.preset or s.preset,
        options=given.over(SamplingOptions.from_dict(s.options)).to_dict(),
        scale=a.scale or s.scale,
    )


def negative_prompt_list(negatives: list[str], prompts: list[str] | None, n: int) -> list[str]:
    """--negative-prompt given once (for every image) or once per --prompt -> one per image (-n N repeats each)."""
    if prompts is None:
        raise InvalidArgumentError("--negative-prompt goes with --prompt (text bundles)")
    if len(negatives) == 1:
        return negatives * (len(prompts) * n)
    if len(negatives) != len(prompts):
        raise InvalidArgumentError(
            f"--negative-prompt given {len(negatives)} times for {len(prompts)} --prompt: give it once (for every "
            "prompt) or once per --prompt"
        )
    return [neg for neg in negatives for _ in range(n)]


def init_image(a: argparse.Namespace) -> dict:
    """generate()'s image-to-image keywords from --init-image / --strength / --start-level (checked first)."""
    if a.init_image is None:
        if a.strength is not None or a.start_level is not None:
            raise InvalidArgumentError("--strength and --start-level go with --init-image PICTURE")
        return {}
    if a.from_image is not None:
        raise InvalidArgumentError("--init-image cannot be combined with --from-image (its settings do not record it)")
    if a.strength is None and a.start_level is None:
        raise InvalidArgumentError("--init-image needs --strength S (0..1) or --start-level K: how much may change")
    kw = {"image": read_image(a.init_image, f"--init-image {a.init_image}")}
    return kw | ({"strength": a.strength} if a.strength is not None else {"start_level": a.start_level})


def run_generate(a: argparse.Namespace) -> int:
    check_outputs(a)
    start = init_image(a)
    call = settings_of(a)
    if a.bundle is None:  # --from-image: the bundle the image came from
        if not call.bundle.startswith(HUB_PREFIX) and not Path(call.bundle).is_dir():
            raise InvalidArgumentError(
                f"--from-image {a.from_image} was made with bundle {call.bundle}, which is not here: give the bundle "
                "(far generate BUNDLE --from-image ...)"
            )
        a.bundle = str(locate_bundle(call.bundle))
    per_image = next(v for k, v in call.conditioning.items() if k != "negative_prompt")  # the labels or prompts
    cols = a.cols or (1 if a.from_image else min(len(per_image), 8))
    frames: list = []

    def on_step(info):
        if info.preview:
            frames.append(make_image_grid(info.preview, cols, scale=call.scale))

    with Generator(a.bundle, backend=call.backend, **({"device": call.device} if call.device else {})) as gen:
        digest = gen.bundle.manifest["manifest_sha256"]
        if call.manifest_sha256 and call.manifest_sha256 != digest:
            print(
                f"note: {a.bundle} is not the bundle {a.from_image} came from; the image will differ", file=sys.stderr
            )
        out = gen.generate(
            **call.conditioning,
            seed=call.seed,
            preset=call.preset,
            options=SamplingOptions.from_dict(call.options),
            progress=not a.no_progress,
            on_step=on_step if a.preview_gif else None,
            preview=bool(a.preview_gif),
            **start,
        )
        used = gen.backend.describe()
        call = dataclasses.replace(call, backend=used["backend"], manifest_sha256=digest)
        extra = {"bundle_name": gen.bundle.name, "device_used": used["device"], "far_sdk": far_sdk.__version__}
        if start:  # provenance only: --from-image does not replay a start picture
            extra["init_image"] = {"file": Path(a.init_image).name, **{k: v for k, v in start.items() if k != "image"}}
        id2label = gen.bundle.id2label
    keep = [call.index] if a.from_image else list(range(len(out.images)))
    labels = list(out.class_labels) or per_image
    extra["plan"] = {k: v for k, v in out.plan.to_dict().items() if k != "filter_after"}
    # Encode everything first, then write each file atomically: a failure leaves no partial file.
    grid = [] if not a.out else [(Path(a.out), make_image_grid([out.images[i] for i in keep], cols, scale=call.scale))]
    files = [(path, encode_image(image, path)) for path, image in grid]
    for i in keep if a.out_dir is not None else ():
        one = dataclasses.replace(call, index=i)
        png = encode_png(out.images[i], one, {**extra, "label": labels[i]})
        files.append((Path(a.out_dir) / image_name(one, labels[i], id2label), png))
    if a.preview_gif:  # one frame per outer step; the last one is the final image (held longer)
        durations = [300] * (len(frames) - 1) + [1500]
        gif = encode_image(
            frames[0], a.preview_gif, save_all=True, append_images=frames[1:], duration=durations, loop=0
        )
        files.append((Path(a.preview_gif), gif))
    write_all(files)
    _report(out, keep, labels, used, [p for p, _ in files], len(frames))
    return 0


def write_all(files: list[tuple[Path, bytes]]) -> None:
    """Write each file atomically; if one fails, remove those this call created (a file that existed before stays
    as its last complete write left it)."""
    created: list[Path] = []
    try:
        for path, data in files:
            existed = path.exists()
            atomic_write_bytes(path, data)
            if not existed:
                created.append(path)
    except BaseException:
        for path in created:
            with contextlib.suppress(OSError):
                path.unlink()
        raise


def _report(out: GenerationOutput, keep: list[int], labels: list, used: dict, paths: list[Path], frames: int) -> None:
    p = out.plan
    sampler = p.inner_sampler + (f" eta {p.eta:g}" if p.inner_sampler == "ddim" else "")
    n = len({labels[i] for i in keep})
    what = f"classes {[labels[i] for i in keep]}" if out.class_labels else f"{n} prompt{'s' * (n != 1)}"
    print(
        f"generated {len(keep)} image(s) ({what}, seeds {out.seeds[keep[0]]}..{out.seeds[keep[-1]]}) on "
        f"{used['backend']}/{used['device']}; {p.mode} mode, {p.num_steps} outer steps, {sum(p.inner_steps)} "
        f"{sampler} inner steps"
    )
    print("  " + "  ".join(f"{k} {v:.3f}s" for k, v in out.timings.items()))
    for path in paths:
        print(f"wrote {path}" + (f" ({frames} frames)" if path.suffix == ".gif" else ""))
