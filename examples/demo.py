"""`make demo`: generate a grid of every class (and a GIF of the coarse-to-fine steps) from the demo bundle, and
the same grid with its distilled few-step denoiser (``preset="distilled"``) when the bundle has one.

Uses the committed demo bundle ``engines/far-demo`` (trained on scikit-learn's digits by
examples/train_demo.py). Should it be missing (a partial checkout), this exports a RANDOM-INITIALISED
tiny model to ``build/demo-random`` and runs that instead, saying so: the pipeline is real, the
pictures are not.

    .venv/bin/python examples/demo.py [--bundle DIR] [--backend onnxruntime] [--out out/demo]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from PIL import Image  # noqa: E402

import far_sdk  # noqa: E402
from far_sdk.images import make_image_grid  # noqa: E402


def random_demo_bundle(path: Path) -> Path:
    """Export a random-initialised far_tiny + kl16-tiny bundle once (needs torch; ~10 s)."""
    if (path / "manifest.json").exists():
        return path
    from export.random_bundle import random_bundle

    print(
        f"engines/far-demo is not there yet: exporting a random-initialised tiny bundle to {path} (untrained weights)"
    )
    return random_bundle(
        path, "far_tiny", "kl16-tiny", seed=0, name="demo-random-init", id2label={i: str(i) for i in range(10)}
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default=None)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--out", default="out/demo")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    bundle = Path(a.bundle) if a.bundle else ROOT / "engines" / "far-demo"
    if not (bundle / "manifest.json").exists():
        bundle = random_demo_bundle(ROOT / "build" / "demo-random")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    gen = far_sdk.Generator(bundle, backend=a.backend)
    zoom = max(1, 128 // int(gen.bundle.manifest.get("image_size", 256)))  # show 32 px digits at 128 px

    def grid(images):
        g = make_image_grid(images, cols=min(len(images), 10))
        return g.resize((g.width * zoom, g.height * zoom), Image.NEAREST) if zoom > 1 else g

    labels = list(range(gen.bundle.num_classes))
    frames = []
    t0 = time.perf_counter()
    res = gen.generate(
        labels, seed=a.seed, progress=True, preview=True, on_step=lambda info: frames.append(grid(info.preview))
    )
    dt = time.perf_counter() - t0
    grid(res.images).save(out / "grid.png")
    frames[0].save(
        out / "steps.gif", save_all=True, append_images=frames[1:], duration=[400] * (len(frames) - 1) + [2000], loop=0
    )
    b = gen.backend.describe()
    print(
        f"bundle {gen.bundle.name} on {b['backend']}/{b['device']}: {len(labels)} images, {res.plan.num_steps} outer "
        "steps, "
        f"inner steps {list(res.plan.inner_steps)}, {dt:.1f} s (with per-step previews)"
    )
    print("stage seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in res.timings.items()))
    print(f"wrote {out / 'grid.png'} and {out / 'steps.gif'} ({len(frames)} frames)")
    if gen.bundle.manifest.get("fewstep") and gen.backend.runs_fewstep:  # far-export fewstep's distilled denoiser
        t0 = time.perf_counter()
        few = gen.generate(labels, seed=a.seed, preset="distilled")
        grid(few.images).save(out / "distilled_grid.png")
        print(
            f"preset distilled: {sum(few.plan.inner_steps)} inner steps instead of {sum(res.plan.inner_steps)}, "
            f"{time.perf_counter() - t0:.1f} s (no previews); wrote {out / 'distilled_grid.png'}"
        )
    t2i = ROOT / "engines" / "far-t2i-demo"
    if not a.bundle and (t2i / "manifest.json").exists():
        text_demo(t2i, out, a.seed, grid)


#: Prompts for the text-to-image grid: held-out paraphrases of training/demo_t2i.py (never seen in training).
T2I_PROMPTS = (
    "an image of a handwritten 0",
    "the digit three, drawn by hand",
    "please draw a 5",
    "a small seven written in ink",
    "a photo of the number nine",
)


def text_demo(bundle: Path, out: Path, seed: int, grid) -> None:
    """engines/far-t2i-demo: 2 images per prompt through the bundled ONNX text encoder (torch-free), its fast
    defaults."""
    gen = far_sdk.Generator(bundle, backend="onnxruntime")
    prompts = [p for p in T2I_PROMPTS for _ in range(2)]
    t0 = time.perf_counter()
    res = gen.generate(prompt=prompts, seed=seed)
    grid(res.images).save(out / "t2i_grid.png")
    print(
        f"bundle {gen.bundle.name} (text-to-image): {len(prompts)} images for {len(T2I_PROMPTS)} prompts "
        f"({', '.join(map(repr, T2I_PROMPTS))}), {res.plan.num_steps} outer steps, {time.perf_counter() - t0:.1f} s; "
        f"wrote {out / 't2i_grid.png'} (2 per prompt, one row)"
    )


if __name__ == "__main__":
    main()
