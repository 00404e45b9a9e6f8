"""GPU check: every CUDA path this machine offers, against one CPU reference, with timings.

    .venv/bin/python scripts/gpu_check.py                                          # far_base + kl16 (minutes)
    .venv/bin/python scripts/gpu_check.py --model far_tiny --vae-config kl16-tiny --quick   # a quick run
    .venv/bin/python scripts/gpu_check.py --bundle engines/NAME --json out.json     # a bundle of real weights
    .venv/bin/python scripts/gpu_check.py --perf --out DIR     # speed: FAR-L/FAR-H, batch 1/8/64 (scripts/gpu_perf.py)

Exports a random-initialised bundle of ``--model`` / ``--vae-config`` to a temp dir (or takes
``--bundle``), computes reference latents on the CPU (the PyTorch reference sampler for small models,
the torch CPU backend for large ones) and then runs each path with the same labels, seeds and plan:
torch CUDA fp32 eager / fp32 CUDA graphs / bf16 and fp16 CUDA graphs, ONNX Runtime CPU and CUDA EP
(TensorRT EP too when present), and the TensorRT backend (engines built with ``far-export trt``'s
``build_engines``). Per path: max abs and relative error of the latents against the reference, the
setup time (backend creation, engine builds), the first run (CUDA-graph captures, lazy set-up)
reported apart, then the median of ``--repeats`` runs; every run ends in host arrays, i.e. after the
device is synchronised. Unavailable paths are listed as skipped with the reason, so on a machine with
no GPU only the CPU rows run. ``--io-binding-bench`` adds the ONNX Runtime CPU IOBinding-vs-run timing.

Exit status: 0 when no path failed or missed its tolerance, 1 otherwise, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import gc
import json
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gpu_check_report import environment, fmt, markdown  # noqa: E402  (scripts/: the folder of this script)

import far_sdk  # noqa: E402
from far_sdk.errors import BackendUnavailableError  # noqa: E402

#: Largest accepted max|latents - reference| / max|reference| over a whole generation (fp32 paths). Reduced
#: precision is judged per call instead (gpu_perf.per_call_precision: one transformer call and one denoiser
#: step against fp32): a chaotic sampler's final latents say little about a 1e-3 per-call difference.
TOLERANCE = {"fp32": 1e-3, "bf16": None, "fp16": None}
#: Bundles with weights up to this size get the reference sampler; larger ones the torch CPU backend.
SAMPLER_MAX_BYTES = 200e6


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


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- bundle, plan and reference -----------------------------------------------------------------------


def export_random_bundle(model: str, vae_config: str, out: Path, seed: int) -> Path:
    from export.random_bundle import random_bundle

    # No export validation: every path is compared with the reference below anyway.
    return random_bundle(out, model, vae_config, seed=seed, name=f"{model}-random", validate=False)


def reference_latents(
    bundle: far_sdk.Bundle, labels: list[int], seed: int, plan_kwargs: dict, kind: str
) -> tuple[np.ndarray, Any, str]:
    """(latents, resolved plan, what computed them) on the CPU in fp32."""
    gen = far_sdk.Generator(bundle, backend="torch", device="cpu", precision="fp32")
    plan = gen.plan(**plan_kwargs)
    if kind == "auto":
        kind = "sampler" if bundle.file("weights.safetensors").stat().st_size <= SAMPLER_MAX_BYTES else "torch-cpu"
    if kind == "torch-cpu":
        lat = gen.generate(labels, seed=seed, output_type="latent", **plan_kwargs).latents
        return lat, plan, "torch backend, CPU fp32 (far_sdk.Generator)"
    from far_sdk.maths.noise import SeededNoise
    from training.from_bundle import load_bundle_models
    from training.sampler import sample_reference

    far, _ = load_bundle_models(bundle)
    lat = sample_reference(far, labels, plan=plan, noise=SeededNoise.from_seed(seed, len(labels))).numpy()
    return lat, plan, "PyTorch reference sampler, CPU fp32 (training/sampler.py)"


def parse_inner_steps(text: str | None):
    if text is None or text in ("frequency-aware", "official"):
        return text
    parts = [int(p) for p in text.split(",")]
    return parts[0] if len(parts) == 1 else parts


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
        import gpu_perf

        row.per_call = gpu_perf.per_call_precision(bundle_dir, str(row.backend.get("device", "cuda")), spec.precision)
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


# ---- ONNX Runtime CPU: IOBinding vs session.run ----------------------------------------------------------


def bench_io_binding(
    bundle: far_sdk.Bundle, batches: list[int], calls: int, threads: int | None, reps: int = 7
) -> list[dict]:
    """Time ``calls`` denoiser calls (one denoise of n=calls steps) both ways, interleaved; median ms per call."""
    from far_sdk.backends.create import create_backend
    from far_sdk.maths.diffusion import denoise_step_table

    bes = {
        mode: create_backend(bundle, "onnxruntime", device="cpu", threads=threads, io_binding=mode)
        for mode in (True, False)
    }
    m = bundle.model_config
    L, C = int(m["grid_size"]) ** 2, int(m["token_channels"])
    rng = np.random.default_rng(0)
    rows = []
    for B in batches:
        x = rng.standard_normal((B, L, C), dtype=np.float32)
        noises = rng.standard_normal((calls, B, L, C), dtype=np.float32)
        tokens = rng.standard_normal((2 * B, L, C), dtype=np.float32)
        ids = np.array([i % bundle.num_classes for i in range(B)] + [bundle.null_class_id] * B, dtype=np.int64)
        cond = bes[False].transformer(tokens, ids, 2)
        steps = denoise_step_table(calls, 3.0, 1.0)
        times: dict[bool, list[float]] = {True: [], False: []}
        out = {}
        for r in range(reps):
            for mode in (True, False) if r % 2 else (False, True):
                t0 = time.perf_counter()
                out[mode] = bes[mode].denoise(x, noises, cond, steps)
                times[mode].append(time.perf_counter() - t0)
        rows.append(
            {
                "batch": B,
                "calls": calls,
                "threads": threads,
                "io_binding_ms": 1e3 * statistics.median(times[True]) / calls,
                "run_ms": 1e3 * statistics.median(times[False]) / calls,
                "bitwise_equal": bool(np.array_equal(out[True], out[False])),
            }
        )
    for be in bes.values():
        be.close()
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="far_base", help="FAR preset for the random-init bundle (default far_base)")
    ap.add_argument("--vae-config", default="kl16", help="VAE preset (default kl16; kl16-tiny for a quick run)")
    ap.add_argument("--bundle", default=None, help="use this bundle instead of exporting a random-init one")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="batch 2, 4 outer steps with 3..6 inner steps, 2 repeats, TensorRT fp32 only",
    )
    ap.add_argument("--batch", type=int, default=None, help="images per call (default 4; --quick 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None, help="outer steps (default: the bundle's, 10)")
    ap.add_argument(
        "--inner-steps", default=None, help="'frequency-aware', 'official', N or N1,N2,... (default: the bundle's)"
    )
    ap.add_argument("--repeats", type=int, default=None, help="timed runs after the first (default 5; --quick 2)")
    ap.add_argument(
        "--paths", default=None, help="comma-separated path ids to run (default: all but torch-cuda-fp16-graphs)"
    )
    ap.add_argument(
        "--trt-precisions", default=None, help="TensorRT backend precisions (default fp16,fp32; --quick fp32)"
    )
    ap.add_argument("--reference", choices=["auto", "sampler", "torch-cpu"], default="auto")
    ap.add_argument("--cpu-paths", action="store_true", help="time the CPU paths even for a large model")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for the CPU paths (default: all)")
    ap.add_argument("--io-binding-bench", action="store_true", help="also time ONNX Runtime CPU IOBinding vs run()")
    ap.add_argument("--bench-calls", type=int, default=200)
    ap.add_argument("--bench-batches", default="1,4")
    ap.add_argument("--json", default=None, help="write the results as JSON here")
    a = ap.parse_args(argv)
    a.batch = a.batch or (2 if a.quick else 4)
    a.repeats = a.repeats if a.repeats is not None else (2 if a.quick else 5)
    if a.quick:
        a.steps = a.steps or 4
        a.inner_steps = a.inner_steps or "3,4,5,6"
    a.trt_precisions = (a.trt_precisions or ("fp32" if a.quick else "fp16,fp32")).split(",")
    if a.batch < 1 or a.repeats < 0 or a.bench_calls < 1:
        ap.error("--batch and --bench-calls must be positive, --repeats non-negative")
    return a


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if "--perf" in args:  # the performance run (scripts/gpu_perf.py): issue 10's figures
        import gpu_perf

        return gpu_perf.main(args)
    a = parse_args(argv)
    command = " ".join(
        shlex.quote(x) for x in ["python", "scripts/gpu_check.py", *(sys.argv[1:] if argv is None else argv)]
    )
    env = environment()
    log(f"GPU: {env.get('gpu') or 'none'}; torch {env.get('torch')}, onnxruntime {env.get('onnxruntime')}")
    with tempfile.TemporaryDirectory(prefix="far-gpu-check-") as tmp:
        if a.bundle is None:
            t0 = time.perf_counter()
            bundle_dir = export_random_bundle(a.model, a.vae_config, Path(tmp) / "bundle", a.seed)
            log(f"exported random-init {a.model} + {a.vae_config} to {bundle_dir} in {time.perf_counter() - t0:.1f} s")
            bundle_name = f"random-init {a.model} + {a.vae_config}"
        else:
            bundle_dir, bundle_name = Path(a.bundle), a.bundle
        bundle = far_sdk.Bundle.load(bundle_dir)
        labels = [i % bundle.num_classes for i in range(a.batch)]
        plan_kwargs = {
            k: v
            for k, v in (("num_steps", a.steps), ("inner_steps", parse_inner_steps(a.inner_steps)))
            if v is not None
        }
        t0 = time.perf_counter()
        ref, plan, ref_what = reference_latents(bundle, labels, a.seed, plan_kwargs, a.reference)
        ref_s = time.perf_counter() - t0
        log(f"reference ({ref_what}) in {ref_s:.1f} s")
        small = bundle.file("weights.safetensors").stat().st_size <= SAMPLER_MAX_BYTES
        specs = path_specs(bundle_dir, a.batch, a.trt_precisions, a.threads, cpu_paths=a.cpu_paths or small)
        wanted = set(a.paths.split(",")) if a.paths else None
        if wanted and wanted - {s.id for s in specs}:
            print(
                f"unknown path ids {sorted(wanted - {s.id for s in specs})}; known: {[s.id for s in specs]}",
                file=sys.stderr,
            )
            return 2
        rows = []
        for spec in specs:
            if (spec.id not in wanted) if wanted is not None else not spec.default:
                continue
            log(f"{spec.id} ...")
            rows.append(run_path(spec, bundle_dir, labels, a.seed, plan_kwargs, ref, a.repeats))
            r = rows[-1]
            log(
                f"{spec.id}: {r.status} {r.reason}"
                + (f" rel err {r.rel:.3g}, median {fmt(r.median_s, '.3f')} s" if r.rel is not None else "")
            )
        bench = None
        if a.io_binding_bench:
            bench = bench_io_binding(bundle, [int(b) for b in a.bench_batches.split(",")], a.bench_calls, a.threads)
    info = {
        "bundle": bundle_name,
        "batch": a.batch,
        "seed": a.seed,
        "repeats": a.repeats,
        "reference": ref_what,
        "reference_s": ref_s,
        "plan": {"num_steps": plan.num_steps, "inner_steps": list(plan.inner_steps), "cfg": list(plan.cfg)},
    }
    print(markdown(env, command, info, rows, bench))
    if a.json:
        Path(a.json).write_text(
            json.dumps(
                {
                    "command": command,
                    "environment": env,
                    "setup": info,
                    "paths": [asdict(r) for r in rows],
                    "io_binding_bench": bench,
                },
                indent=2,
                default=str,
            )
        )
    return 1 if any(r.status in ("failed", "over tolerance") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
