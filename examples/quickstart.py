"""The smallest use of far_sdk: load a bundle, generate, save one PNG per image and a grid.

    python examples/quickstart.py                       # engines/far-demo, into out/quickstart/
    python examples/quickstart.py hub:OWNER/REPO out/x  # a bundle published on the Hugging Face Hub

The settings are diffusers' names where they have one (guidance_scale = cfg); the rest are FAR's own: outer steps
(num_steps) and denoising steps per outer step (inner_steps, or a preset).
"""

import sys
from pathlib import Path

import far_sdk

bundle = sys.argv[1] if len(sys.argv) > 1 else "engines/far-demo"
out_dir = Path(sys.argv[2] if len(sys.argv) > 2 else "out/quickstart")
out_dir.mkdir(parents=True, exist_ok=True)

with far_sdk.Generator(bundle) as gen:  # backend "auto": TensorRT plans if built, else ONNX Runtime, else torch
    print(gen)
    out = gen.generate(
        class_labels=[1, 7],
        num_images_per_prompt=2,  # two images per label, consecutive seeds
        seed=0,
        preset="fast",  # 15 DDPM steps per outer step: the paper schedule's quality on the demo
        guidance_scale=3.0,
        progress=True,
    )
for label, seed, image in zip(out.class_labels, out.seeds, out.images):
    image.save(out_dir / f"class{label}_seed{seed}.png")
far_sdk.make_image_grid(out.images, scale=4).save(out_dir / "grid.png")
print(f"{len(out.images)} images, latents {out.latents.shape}, into {out_dir}/")
print({k: round(v, 3) for k, v in out.timings.items()})
