"""The inputs an engine is validated on before it is cached or chosen (TensorRT plans at build time,
``export.trt_validate``; ONNX Runtime TensorRT-EP sessions at creation, :mod:`far_sdk.backends.ort_tensorrt`):
seeded feeds of a graph, and for the denoiser the extreme step rows and a whole outer step. Torch-free."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from far_sdk.backends.tensorrt.cache_key import ROWS_PER_IMAGE
from far_sdk.bundle.graphs import GraphSpec
from far_sdk.maths.diffusion import denoise_step_table
from far_sdk.maths.masking import random_mask

VALIDATION_SEED = 0
#: Steps of the whole outer step the denoiser is validated on (t = 999 .. 0).
OUTER_STEPS = 10
#: The denoiser's checks (:func:`validation_cases`), all required before a reduced-precision engine is chosen.
DENOISER_CHECKS = ("t=999", "t=0", "outer step")


def sample_feeds(
    spec: GraphSpec, images: int, manifest: dict[str, Any], seed: int = VALIDATION_SEED
) -> dict[str, np.ndarray]:
    """Seeded inputs of ``spec`` for ``images`` images: N(0, 1) floats; class ids with the null class
    in the unconditional half; an integer level; a 0 / 1 mask (far_sdk.maths.masking.random_mask); a step row with
    non-zero noise (torch-free)."""
    rng = np.random.Generator(np.random.PCG64(seed))
    model = manifest["model"]
    num_classes, grid = int(model.get("num_classes", 1)), int(model["grid_size"])
    null = int(manifest.get("null_class_id", num_classes))
    feeds: dict[str, np.ndarray] = {}
    for t in spec.inputs:
        shape = tuple(ROWS_PER_IMAGE[d] * images if isinstance(d, str) else d for d in t.shape)
        if t.name == "class_ids":
            ids = rng.integers(0, num_classes, size=shape, dtype=np.int64)
            ids[shape[0] // 2 :] = null
            feeds[t.name] = ids
        elif t.name == "level":
            feeds[t.name] = np.full(shape, rng.integers(0, grid), dtype=np.float32)
        elif t.name == "null":  # text bundles: the unconditional half uses fake_latent
            feeds[t.name] = (np.arange(shape[0]) >= shape[0] // 2).astype(np.float32)
        elif t.name == "mask":
            feeds[t.name] = random_mask(rng, shape)
        elif t.name == "step":
            table = denoise_step_table(10, 3.0, 1.0)
            feeds[t.name] = table[rng.integers(0, len(table) - 1)].copy()  # the last row has noise scale 0
        elif t.name in ("input_ids", "attention_mask"):  # the text encoder: ids below the pad id, padded tails
            feeds.update(_text_feeds(rng, shape, manifest))
        else:
            feeds[t.name] = rng.standard_normal(shape, dtype=np.float32)
    return feeds


def _text_feeds(rng: np.random.Generator, shape: tuple[int, ...], manifest: dict[str, Any]) -> dict[str, np.ndarray]:
    enc = manifest["text"]["encoder"]
    pad, S = int(enc["pad_token_id"]), int(enc.get("system_length", 0))
    ids = rng.integers(0, max(pad, 1), size=shape, dtype=np.int64)
    for row, n in enumerate(rng.integers(0, shape[1] - S, size=shape[0])):  # prompts of random lengths
        ids[row, S + n :] = pad
    return {"input_ids": ids, "attention_mask": (ids != pad).astype(np.int64) | (np.arange(shape[1]) < S)}


def validation_cases(spec: GraphSpec, images: int, manifest: dict[str, Any]) -> list[tuple[str, Any]]:
    """(name, feeds) per check. The denoiser: the first step row (t = 999, where x0 = a x - b eps with a = b ~ 2e4
    overflows fp16 once |x| > 3.2), the last (t = 0, no noise), and a whole outer step (feeds[0] and the step table:
    :data:`OUTER_STEPS` steps from t = 999 to 0, x_prev fed back). Other graphs: one seeded call."""
    feeds = sample_feeds(spec, images, manifest)
    if spec.name != "denoiser":
        return [("call", feeds)]
    table = denoise_step_table(OUTER_STEPS, 3.0, 1.0)
    return [
        ("t=999", {**feeds, "step": table[0].copy()}),
        ("t=0", {**feeds, "step": table[-1].copy()}),
        ("outer step", (feeds, table)),
    ]


def run_case(run: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]], case: Any) -> dict[str, np.ndarray]:
    """``run(feeds)`` once, or (an outer step) once per step row with x_prev fed back as x."""
    if isinstance(case, dict):
        return run(case)
    feeds, table = case
    x = feeds["x"]
    for row in table:
        x = run({**feeds, "x": x, "step": row.copy()})["x_prev"]
    return {"x_prev": x}
