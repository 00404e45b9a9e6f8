"""Build-time validation of a TensorRT engine: seeded inputs of a graph, the engine's outputs against
onnxruntime (CPU) on the same inputs, within a tolerance per precision. Used by :mod:`export.trt_build`
before a plan is written."""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from far_sdk.backends.tensorrt import cache as tc
from far_sdk.backends.tensorrt.engine import run_plan_once
from far_sdk.bundle.bundle import Bundle
from far_sdk.bundle.graphs import GraphSpec
from far_sdk.errors import ExportError
from far_sdk.maths.diffusion import denoise_step_table
from far_sdk.maths.masking import random_mask

logger = logging.getLogger(__name__)

#: Largest accepted max|engine - onnxruntime| / max|onnxruntime| per precision at build-time validation.
TOLERANCE_REL = {"fp32": 1e-3, "fp16": 3e-2, "bf16": 6e-2}
VALIDATION_SEED = 0


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
        shape = tuple(tc.ROWS_PER_IMAGE[d] * images if isinstance(d, str) else d for d in t.shape)
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


def onnxruntime_reference(bundle: Bundle, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
    try:
        import onnxruntime as ort  # noqa: PLC0415 - the backend's runtime: loaded when chosen
    except ImportError:
        logger.warning("onnxruntime is not installed: the %s engine is checked for finite outputs only", graph)
        return None
    spec = bundle.graph_spec(graph)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(bundle.graph_file(graph)), opts, providers=["CPUExecutionProvider"])
    return dict(zip(spec.output_names, session.run(spec.output_names, feeds)))


def compare_outputs(
    graph: str, precision: str, got: dict[str, np.ndarray], ref: dict[str, np.ndarray] | None
) -> dict[str, Any]:
    """Check an engine's outputs: all finite, and within :data:`TOLERANCE_REL` of ``ref`` (when given).

    ``max_abs = max |got - ref|``, ``max_rel = max_abs / max |ref|`` (worst over the outputs).
    """
    flag = "--vae-precision" if graph == "vae_decoder" else "--precision"
    for name, g in got.items():
        if not np.isfinite(g).all():
            if graph == "vae_decoder" and precision != "fp32":
                raise ExportError(
                    f"the VAE decoder overflows in {precision} ({name} has NaN/inf at build-time validation): "
                    "rebuild with --vae-precision fp32. Nothing was written."
                )
            raise ExportError(
                f"the {graph} engine ({precision}) produced NaN/inf in {name} at build-time validation: "
                f"rebuild with {flag} fp32. Nothing was written."
            )
    if ref is None:
        return {"max_abs": None, "max_rel": None, "reference": None}
    worst_abs = worst_rel = 0.0
    for name, g in got.items():
        r = np.asarray(ref[name], dtype=np.float64)
        if g.shape != r.shape:
            raise ExportError(f"the {graph} engine's {name} has shape {g.shape}, onnxruntime's {r.shape}")
        err = float(np.abs(g.astype(np.float64) - r).max(initial=0.0))
        scale = float(np.abs(r).max(initial=0.0))
        worst_abs = max(worst_abs, err)
        worst_rel = max(worst_rel, err / scale if scale > 0 else (0.0 if err == 0 else math.inf))
    tol = TOLERANCE_REL[precision]
    if not worst_rel <= tol:
        raise ExportError(
            f"the {graph} engine ({precision}) disagrees with onnxruntime (CPU): max abs {worst_abs:.3g}, max rel "
            f"{worst_rel:.3g} "
            f"> {tol:g}. Rebuild with {flag} fp32, or pass --no-validate to keep it anyway. Nothing was written."
        )
    return {"max_abs": worst_abs, "max_rel": worst_rel, "tolerance_rel": tol, "reference": "onnxruntime-cpu"}


def validate_plan(trt: Any, cudart: Any, bundle: Bundle, key: tc.EngineKey, plan: Any) -> dict[str, Any]:
    """Run the new plan once at the opt batch and compare with onnxruntime (CPU) on the same seeded inputs."""
    spec, images = bundle.graph_spec(key.graph), key.profile[1]
    feeds = sample_feeds(spec, images, bundle.manifest)
    got = run_plan_once(trt, cudart, plan, spec, images, feeds, what=f"the new {key.graph} engine")
    result = compare_outputs(key.graph, key.precision, got, onnxruntime_reference(bundle, key.graph, feeds))
    return {**result, "images": images, "seed": VALIDATION_SEED}
