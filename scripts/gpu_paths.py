"""The paths of ``scripts/gpu_check.py`` (kept apart so the check reads in one sitting): what each path is
(:class:`PathSpec`: backend, options, precision, whether it is available here), what it measured (:class:`Row`),
and :func:`run_path`, which times one path against the reference latents. Imported by gpu_check.py, which puts
this folder on ``sys.path``."""

from __future__ import annotations

import gc
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import far_sdk
from far_sdk.errors import BackendUnavailableError

#: Largest accepted max|latents - reference| / max|reference| over a whole generation (fp32 paths). Reduced
#: precision is judged per call instead (gpu_stages.per_call_precision: one transformer call and one denoiser
#: step against fp32): a chaotic sampler's final latents say little about a 1e-3 per-call difference.
TOLERANCE = {"fp32": 1e-3, "bf16": None, "fp16": None}


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class PathSpec:
    id: str
    backend: str
    options: dict[str, Any]
    precision: str
    on_gpu: bool
    check: Callable[[], str | None]  # None when available, else why not
    prepare: Callable[[], None] | None = None  # e.g. build TensorRT engines (counted in setup)
    default: bool = True  # run without --paths


@dataclass
class Row:
    id: str
    status: str  # ok | over tolerance | failed | skipped
    reason: str = ""
    precision: str = ""
    tolerance: float | None = None
    max_abs: float | None = None
    rel: float | None = None
    deterministic: bool | None = None
    setup_s: float | None = None
    first_s: float | None = None
    median_s: float | None = None
    stages_s: dict[str, float] = field(default_factory=dict)
    images_per_s: float | None = None
    backend: dict[str, Any] = field(default_factory=dict)
    per_call: dict[str, Any] | None = None  # reduced precision: per-call errors against fp32


# ---- the paths ----------------------------------------------------------------------------------------


def _torch_installed() -> str | None:
    try:
        import torch  # noqa: F401
    except ImportError:
        return "PyTorch is not installed"
    return None


def _torch_cuda() -> str | None:
    if _torch_installed():
        return _torch_installed()
    import torch

    if not torch.cuda.is_available():
        return (
            f"no CUDA GPU: torch.cuda.is_available() is False (torch {torch.__version__}, "
            f"CUDA build {torch.version.cuda})"
        )
    return None


def _ort_provider(provider: str) -> Callable[[], str | None]:
    def check() -> str | None:
        try:
            import onnxruntime as ort
        except ImportError:
            return "onnxruntime is not installed"
        if provider not in ort.get_available_providers():
            return (
                f"onnxruntime {ort.__version__} offers {ort.get_available_providers()}, not {provider} "
                "(install onnxruntime-gpu)"
            )
        return None

    return check


def _tensorrt() -> str | None:
    try:
        from far_sdk.backends.tensorrt.engine import import_runtime

        import_runtime()
    except BackendUnavailableError as e:
        return str(e)
    return None  # the TensorRT runtime needs no torch; the GPU itself is checked when the backend starts


def path_specs(
    bundle_dir: Path, batch: int, trt_precisions: list[str], cpu_threads: int | None, cpu_paths: bool
) -> list[PathSpec]:
    cpu_ok = (lambda: None) if cpu_paths else (lambda: "CPU path off for a large model (pass --cpu-paths to time it)")
    specs = [
        PathSpec(
            "torch-cpu-fp32",
            "torch",
            dict(device="cpu", threads=cpu_threads),
            "fp32",
            False,
            lambda: _torch_installed() or cpu_ok(),
        ),
        PathSpec(
            "ort-cpu",
            "onnxruntime",
            dict(device="cpu", threads=cpu_threads, io_binding=False),
            "fp32",
            False,
            lambda: _ort_provider("CPUExecutionProvider")() or cpu_ok(),
        ),
        PathSpec(
            "ort-cpu-iobinding",
            "onnxruntime",
            dict(device="cpu", threads=cpu_threads, io_binding=True),
            "fp32",
            False,
            lambda: _ort_provider("CPUExecutionProvider")() or cpu_ok(),
        ),
        PathSpec(
            "torch-cuda-fp32-eager",
            "torch",
            dict(device="cuda", precision="fp32", cuda_graphs=False),
            "fp32",
            True,
            _torch_cuda,
        ),
        PathSpec(
            "torch-cuda-fp32-graphs",
            "torch",
            dict(device="cuda", precision="fp32", cuda_graphs=True),
            "fp32",
            True,
            _torch_cuda,
        ),
        PathSpec(
            "torch-cuda-bf16-graphs",
            "torch",
            dict(device="cuda", precision="bf16", cuda_graphs=True),
            "bf16",
            True,
            _torch_cuda,
        ),
        # Opt-in: a random-init model's latents reach ~1e5, past fp16's range (65504), so fp16 state overflows.
        PathSpec(
            "torch-cuda-fp16-graphs",
            "torch",
            dict(device="cuda", precision="fp16", cuda_graphs=True),
            "fp16",
            True,
            _torch_cuda,
            default=False,
        ),
        PathSpec("ort-cuda", "onnxruntime", dict(device="cuda"), "fp32", True, _ort_provider("CUDAExecutionProvider")),
        PathSpec(
            "ort-cuda-no-iobinding",
            "onnxruntime",
            dict(device="cuda", io_binding=False),
            "fp32",
            True,
            _ort_provider("CUDAExecutionProvider"),
        ),
        PathSpec(
            "ort-tensorrt-ep-fp32",
            "onnxruntime",
            dict(device="tensorrt"),
            "fp32",
            True,
            _ort_provider("TensorrtExecutionProvider"),
        ),
    ]
    for p in trt_precisions:

        def build(p: str = p) -> None:
            from export.trt_build import build_engines

            build_engines(bundle_dir, precision=p, batch=(batch, batch, batch), progress=log)

        specs.append(
            PathSpec(
                f"tensorrt-{p}", "tensorrt", dict(precision=p, batch=(batch, batch, batch)), p, True, _tensorrt, build
            )
        )
    return specs


def run_path(
    spec: PathSpec, bundle_dir: Path, labels: list[int], seed: int, plan_kwargs: dict, ref: np.ndarray, repeats: int
) -> Row:
    row = Row(spec.id, "skipped", precision=spec.precision, tolerance=TOLERANCE[spec.precision])
    reason = spec.check()
    if reason:
        row.reason = reason
        return row
    gen = None
    try:
        t0 = time.perf_counter()
        if spec.prepare is not None:
            spec.prepare()
        gen = far_sdk.Generator(bundle_dir, backend=spec.backend, **spec.options)
        row.setup_s = time.perf_counter() - t0
        outs, totals, stages = [], [], {}
        for i in range(1 + repeats):
            t0 = time.perf_counter()
            out = gen.generate(labels, seed=seed, output_type="np", **plan_kwargs)
            gen.backend.synchronize()  # generate returns host arrays; nothing is queued, but never read a clock early
            dt = time.perf_counter() - t0
            outs.append(out.latents)
            if i == 0:
                row.first_s = dt
                continue
            totals.append(dt)
            for k, v in out.timings.items():
                stages.setdefault(k, []).append(v)
        row.backend = gen.backend.describe()
    except BackendUnavailableError as e:  # e.g. onnxruntime-gpu installed but its CUDA libraries missing
        row.reason = f"unavailable at setup: {str(e).splitlines()[0]}"
        return row
    except Exception as e:  # noqa: BLE001 - one broken path must not hide the others
        row.status, row.reason = "failed", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return row
    finally:
        if gen is not None:
            gen.close()
        del gen
        _free_gpu_memory()
    lat = outs[0]
    diff = np.abs(lat.astype(np.float64) - ref.astype(np.float64))
    row.max_abs = float(diff.max())
    row.rel = row.max_abs / max(float(np.abs(ref).max()), 1e-30)
    row.deterministic = all(np.array_equal(o, lat) for o in outs[1:])
    if totals:
        row.median_s = statistics.median(totals)
        row.images_per_s = len(labels) / row.median_s
        row.stages_s = {k: statistics.median(v) for k, v in stages.items() if k != "total"}
    finite = bool(np.isfinite(lat).all())
    if row.tolerance is not None:
        row.status = "ok" if finite and row.rel <= row.tolerance else "over tolerance"
    else:  # reduced precision: per call against fp32 (the whole-generation error above is informational)
        import gpu_stages

        row.per_call = gpu_stages.per_call_precision(bundle_dir, str(row.backend.get("device", "cuda")), spec.precision)
        row.status = "ok" if finite and row.per_call["ok"] else "over tolerance"
        row.reason = (
            f"per call vs fp32: transformer {row.per_call['transformer_rel']:.2g}, denoiser step "
            f"{row.per_call['denoiser_step_rel']:.2g} (bound {row.per_call['tolerance']:g})"
        )
    if not finite:
        row.reason = "non-finite latents"
    return row


def _free_gpu_memory() -> None:
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
