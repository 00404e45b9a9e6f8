"""ONNX Runtime's TensorRT execution provider, set up the way our own TensorRT engines are (used by
:class:`far_sdk.backends.onnxruntime.OnnxRuntimeBackend` with ``device="tensorrt"``):

- explicit optimisation profiles (``trt_profile_min/opt/max_shapes``) over each graph's batch axis, in images per
  call as ``far-export trt --batch`` (the transformer's axis holds the 2x CFG rows), so one engine serves the
  whole range instead of one per new shape;
- its engine and timing caches in the bundle's engine cache (:func:`far_sdk.backends.tensorrt.cache.trt_dir`, the
  user's far-sdk cache), never inside the bundle: a read-only bundle works;
- fp16 (``trt_fp16``) never through the EP's ``trt_fp16_enable`` flag, which builds a weakly typed network free to
  run the guided update in fp16 (it overflows at t = 999), but from the mixed-precision copy of the graph
  (:mod:`far_sdk.backends.mixed_precision`: fp32 islands with explicit Casts) with the flag off, which the EP
  builds strongly typed; the denoiser session is then validated against fp32 on the extreme step rows and a whole
  outer step (:mod:`far_sdk.backends.validation`) before it is used.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from far_sdk.backends.tensorrt.cache import trt_dir
from far_sdk.backends.tensorrt.cache_key import ROWS_PER_IMAGE, format_profile
from far_sdk.backends.validation import run_case, validation_cases
from far_sdk.bundle.bundle import Bundle
from far_sdk.errors import BackendUnavailableError, NumericalError
from far_sdk.fileio import atomic_writer

log = logging.getLogger(__name__)

#: Largest accepted max|TensorRT EP - CPU fp32| / max|CPU fp32| of the fp16 denoiser per validation check.
FP16_TOLERANCE_REL = 3e-2


def profile_shapes(bundle: Bundle, graph: str, profile: tuple[int, int, int]) -> dict[str, str]:
    """The ``trt_profile_{min,opt,max}_shapes`` options of ``graph`` for (min, opt, max) images per call:
    "name:d0xd1x...,name:..." over the inputs with a batch axis."""
    spec = bundle.graph_spec(graph)
    out = {}
    for which, images in zip(("min", "opt", "max"), profile):
        out[f"trt_profile_{which}_shapes"] = ",".join(
            f"{t.name}:" + "x".join(str(ROWS_PER_IMAGE[d] * images if isinstance(d, str) else d) for d in t.shape)
            for t in spec.inputs
            if any(isinstance(d, str) for d in t.shape)
        )
    return out


def provider_options(
    bundle: Bundle, graph: str, device_id: int, profile: tuple[int, int, int], fp16: bool
) -> dict[str, str]:
    """The TensorRT EP's options for ``graph`` (values as the strings onnxruntime parses)."""
    cache = trt_dir(bundle) / "ort-cache" / ("fp16" if fp16 else "fp32") / format_profile(profile).replace(":", "-")
    cache.mkdir(parents=True, exist_ok=True)
    return {
        "device_id": str(device_id),
        "trt_engine_cache_enable": "1",
        "trt_engine_cache_path": str(cache),
        "trt_timing_cache_enable": "1",
        "trt_timing_cache_path": str(cache),
        "trt_fp16_enable": "0",  # reduced precision comes from the graph's types (see the module docstring)
        **profile_shapes(bundle, graph, profile),
    }


def model_path(bundle: Bundle, graph: str, fp16: bool) -> Path:
    """The ONNX file the EP loads: the bundle's verified file, or (fp16) its mixed-precision copy, written once
    into the engine cache (named by the graph's sha256, so a re-exported bundle gets a new one)."""
    path = bundle.graph_file(graph)
    if not fp16:
        return path
    sha = bundle.manifest["files"][bundle.manifest["graphs"][graph]["file"]]["sha256"]
    out = trt_dir(bundle) / "ort-mixed" / f"{graph}-fp16-{sha[:16]}.onnx"
    if out.is_file():
        return out
    try:
        import onnx  # noqa: PLC0415 - needed only to rewrite a graph for fp16 TensorRT-EP sessions
    except ImportError as e:
        raise BackendUnavailableError(
            "onnxruntime's TensorRT EP in fp16 (trt_fp16=True) needs the onnx package to keep the fp32 islands: "
            "pip install onnx (or 'far-sdk[gpu]')"
        ) from e
    from far_sdk.backends.mixed_precision import mixed_precision  # noqa: PLC0415 - imports onnx

    model = mixed_precision(onnx.load(str(path)), "fp16")
    out.parent.mkdir(parents=True, exist_ok=True)
    data = out.with_name(out.name + ".data")
    onnx.save_model(model, str(data.with_suffix(".tmp")), save_as_external_data=True, location=data.name)
    with atomic_writer(out) as f:  # the graph last: a crash leaves no graph pointing at missing weights
        f.write(data.with_suffix(".tmp").read_bytes())
    data.with_suffix(".tmp").unlink()
    return out


def validate_denoiser(bundle: Bundle, session: Any, reference: Any, images: int) -> dict[str, float]:
    """Run the TensorRT EP's denoiser ``session`` and the CPU fp32 ``reference`` session on the validation cases
    (t = 999, t = 0, a whole outer step); NumericalError when one is non-finite or beyond
    :data:`FP16_TOLERANCE_REL`. Returns each check's max relative error."""
    spec = bundle.graph_spec("denoiser")
    names = spec.output_names
    errors = {}
    for name, case in validation_cases(spec, images, bundle.manifest):
        got = run_case(lambda f: dict(zip(names, session.run(names, f))), case)["x_prev"]
        ref = run_case(lambda f: dict(zip(names, reference.run(names, f))), case)["x_prev"]
        rel = float(np.abs(got.astype(np.float64) - ref).max() / max(float(np.abs(ref).max()), 1e-30))
        if not (np.isfinite(got).all() and rel <= FP16_TOLERANCE_REL):
            raise NumericalError(
                f"onnxruntime's TensorRT EP fp16 denoiser fails validation at {name}: max rel {rel:.3g} against fp32 "
                f"(bound {FP16_TOLERANCE_REL:g}{', non-finite output' if not np.isfinite(got).all() else ''}); "
                "use trt_fp16=False"
            )
        errors[name] = rel
    log.info("TensorRT EP fp16 denoiser validated against fp32: %s", errors)
    return errors
