"""The smallest use of far_sdk: load a bundle, generate, save.

.venv/bin/python examples/quickstart.py engines/far-demo
"""

import sys

import far_sdk

bundle = sys.argv[1] if len(sys.argv) > 1 else "engines/far-demo"
gen = far_sdk.Generator(bundle, backend="auto")  # "tensorrt" | "onnxruntime" | "torch"
out = gen.generate(
    class_labels=[1, 7],
    seed=0,
    num_steps=10,
    cfg=3.0,
    cfg_schedule="linear",
    temperature=1.0,
    inner_steps="frequency-aware",
    filter="spatial",
    progress=True,
)
for label, seed, image in zip(out.class_labels, out.seeds, out.images):
    image.save(f"far_class{label}_seed{seed}.png")
print({k: round(v, 3) for k, v in out.timings.items()})
