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
import json
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gpu_check_report import environment, fmt, markdown  # noqa: E402  (scripts/: the folder of this script)
from gpu_paths import log, path_specs, run_path  # noqa: E402

import far_sdk  # noqa: E402

#: Bundles with weights up to this size get the reference sampler; larger ones the torch CPU backend.
SAMPLER_MAX_BYTES = 200e6


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
        cond = bes[False].transformer(tokens, {"class_ids": ids}, 2)
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
