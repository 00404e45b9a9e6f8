"""Build-time validation of a TensorRT engine: seeded inputs of a graph, the engine's outputs against
onnxruntime (CPU) on the same inputs, within a tolerance per precision. Used by :mod:`export.trt_build`
before a plan is written."""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from far_sdk.backends.tensorrt import cache as tc
from far_sdk.backends.tensorrt.engine import PlanSession
from far_sdk.backends.validation import VALIDATION_SEED, run_case, validation_cases
from far_sdk.bundle.bundle import Bundle
from far_sdk.errors import ExportError

logger = logging.getLogger(__name__)

#: Largest accepted max|engine - onnxruntime| / max|onnxruntime| per precision at build-time validation.
TOLERANCE_REL = {"fp32": 1e-3, "fp16": 3e-2, "bf16": 6e-2}


def onnxruntime_session(bundle: Bundle, graph: str) -> Any:
    """An onnxruntime CPU session of the bundle's fp32 graph (the reference), or None without onnxruntime."""
    try:
        import onnxruntime as ort  # noqa: PLC0415 - the backend's runtime: loaded when chosen
    except ImportError:
        logger.warning("onnxruntime is not installed: the %s engine is checked for finite outputs only", graph)
        return None
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(bundle.graph_file(graph)), opts, providers=["CPUExecutionProvider"])


def onnxruntime_reference(bundle: Bundle, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
    session = onnxruntime_session(bundle, graph)
    if session is None:
        return None
    names = bundle.graph_spec(graph).output_names
    return dict(zip(names, session.run(names, feeds)))


def compare_outputs(
    graph: str, precision: str, got: dict[str, np.ndarray], ref: dict[str, np.ndarray] | None, check: str = ""
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
                f"the {graph} engine ({precision}) produced NaN/inf in {name} at build-time validation{check}: "
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
            f"the {graph} engine ({precision}) disagrees with onnxruntime (CPU){check}: max abs {worst_abs:.3g}, "
            f"max rel {worst_rel:.3g} "
            f"> {tol:g}. Rebuild with {flag} fp32, or pass --no-validate to keep it anyway. Nothing was written."
        )
    return {"max_abs": worst_abs, "max_rel": worst_rel, "tolerance_rel": tol, "reference": "onnxruntime-cpu"}


def validate_plan(trt: Any, cudart: Any, bundle: Bundle, key: tc.EngineKey, plan: Any) -> dict[str, Any]:
    """Run the new plan at the opt batch on :func:`validation_cases` and compare each with onnxruntime (CPU) on the
    same inputs; the first failing check raises ExportError (nothing is written). Returns the worst errors and
    each check's."""
    spec, images = bundle.graph_spec(key.graph), key.profile[1]
    session = onnxruntime_session(bundle, key.graph)
    checks: dict[str, Any] = {}
    with PlanSession(trt, cudart, plan, spec, images, what=f"the new {key.graph} engine") as engine:
        for name, case in validation_cases(spec, images, bundle.manifest):
            got = run_case(engine.run, case)
            ref = None
            if session is not None:
                ref = run_case(lambda f: dict(zip(spec.output_names, session.run(spec.output_names, f))), case)
            checks[name] = compare_outputs(key.graph, key.precision, got, ref, f" ({name})")
    worst = max(checks.values(), key=lambda c: -1.0 if c["max_rel"] is None else c["max_rel"])
    return {**worst, "images": images, "seed": VALIDATION_SEED, "checks": checks}
