"""The stages of ``scripts/gpu_check.py --perf`` (scripts/gpu_perf.py), one function each, every one returning a
JSON-able dict: the machine and its measured peaks, the correctness smoke test, the per-call check of reduced
precision against fp32, timing one Generator at one batch size, and the official-way eager baseline.
On a machine without CUDA everything runs on the CPU (figures meaningless)."""

from __future__ import annotations

import gc
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

import far_sdk

#: Per-call bounds of reduced precision against fp32: ||a - b|| / ||b|| over one call.
CALL_TOL = {"bf16": 2e-2, "fp16": 5e-3, "fp32": 1e-5}


# ---- the machine ---------------------------------------------------------------------------------------


def device_name() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure_peaks() -> dict[str, Any]:
    import torch

    dev = device_name()
    n = 8192 if dev == "cuda" else 1024
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    a, b = (torch.randn(n, n, device=dev, dtype=dt) for _ in range(2))
    for _ in range(3):
        a @ b
    sync()
    times = []
    for _ in range(10):
        t = time.perf_counter()
        a @ b
        sync()
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    out = {
        "matmul": {
            "n": n,
            "dtype": str(dt),
            "tflops_median": 2 * n**3 / med / 1e12,
            "tflops_best": 2 * n**3 / min(times) / 1e12,
        }
    }
    del a, b
    x = torch.randn(256 << 20, device=dev)  # 1 GiB fp32
    y = torch.empty_like(x)
    y.copy_(x)
    sync()
    times = []
    for _ in range(10):
        t = time.perf_counter()
        y.copy_(x)
        sync()
        times.append(time.perf_counter() - t)
    out["copy"] = {"bytes": 2 * x.numel() * 4, "tb_per_s_median": 2 * x.numel() * 4 / statistics.median(times) / 1e12}
    del x, y
    return out


def environment() -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "numpy": np.__version__,
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["capability"] = "{}.{}".format(*torch.cuda.get_device_capability(0))
    env["peaks"] = measure_peaks()
    return env


# ---- bundles and timing ----------------------------------------------------------------------------


def export_random(model: str, vae_config: str, dest: Path, seed: int = 0) -> Path:
    from export.random_bundle import random_bundle

    return random_bundle(dest, model, vae_config, seed=seed, name=f"random-{model}-{vae_config}", validate=False)


def time_generation(
    gen: far_sdk.Generator, batch: int, plan_kw: dict, warmup: int, iters: int, run: Any = None
) -> dict[str, Any]:
    from far_sdk.bench.protocol import analytic_flops
    from far_sdk.bench.results import summarize

    labels = [i % gen.bundle.num_classes for i in range(batch)]
    first = []
    for w in range(warmup):
        t = time.perf_counter()
        gen.generate(labels, seed=w, output_type="np", **plan_kw)
        first.append(time.perf_counter() - t)
    its = []
    for i in range(iters):
        if run is not None and i >= 2 and run.left() < 10:
            break  # out of budget: keep what was timed (the row says how many)
        t = time.perf_counter()
        out = gen.generate(labels, seed=1000 + i, output_type="np", **plan_kw)
        its.append(
            {
                **{k: out.timings[k] for k in ("transformer", "denoise", "filter", "vae_decode")},
                "total": time.perf_counter() - t,
            }
        )
    tot = [r["total"] / batch * 1e3 for r in its]
    med_total = statistics.median(r["total"] for r in its)
    flops = analytic_flops(gen.bundle.manifest, out.plan, batch)
    res = {
        "batch": batch,
        "warmup_s": first,
        "iters": len(its),
        "ms_per_image": summarize(tot).__dict__,
        "stages_ms_per_image": {
            k: statistics.median(r[k] for r in its) / batch * 1e3
            for k in ("transformer", "denoise", "filter", "vae_decode")
        },
        "images_per_s": batch / med_total,
        "backend": gen.backend.describe(),
        "inner_steps": list(out.plan.inner_steps),
    }
    if flops is not None:
        res["tflop_per_image"] = flops["total"] / 1e12
        res["achieved_tflops"] = flops["total"] * batch / med_total / 1e12
    return res


# ---- correctness ----------------------------------------------------------------------------------


def smoke(tmp: Path, precision: str) -> dict[str, Any]:
    """Correctness of the fast path on a tiny random model (see the module docstring)."""
    import torch

    from far_sdk.maths.noise import SeededNoise

    dev = device_name()
    bundle = export_random("far_tiny", "kl16-tiny", tmp / "smoke")
    kw = dict(num_steps=4, inner_steps=[3, 4, 5, 6], output_type="latent")
    labels = [1, 7, 3]
    res: dict[str, Any] = {"device": dev, "checks": {}}
    checks = res["checks"]
    ref = far_sdk.Generator(bundle, backend="onnxruntime", device="cpu").generate(labels, seed=3, **kw).latents
    eager_cpu = far_sdk.Generator(bundle, backend="torch", device="cpu").generate(labels, seed=3, **kw).latents

    def rel(a, b):
        return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))

    checks["torch cpu eager vs onnxruntime cpu"] = rel(eager_cpu, ref)
    fast = far_sdk.Generator(bundle, backend="torch", device=dev, precision="fp32", compile=True, cuda_graphs=True)
    a = fast.generate(labels, seed=3, **kw).latents
    b = fast.generate(labels, seed=3, **kw).latents
    checks["fast fp32 vs onnxruntime cpu"] = rel(a, ref)
    checks["fast fp32 replay bitwise"] = float(np.abs(a - b).max())
    src = SeededNoise.from_seed(3, len(labels))
    c = fast.generate(labels, noise=lambda shape: src(shape), **kw).latents  # the same draws, uploaded from NumPy
    checks["fast fp32 device noise vs uploaded NumPy noise"] = rel(a, c)
    res["describe"] = fast.backend.describe()
    eager_dev = far_sdk.Generator(
        bundle, backend="torch", device=dev, precision="fp32", compile=False, cuda_graphs=False
    )
    checks["eager fp32 on device vs onnxruntime cpu"] = rel(eager_dev.generate(labels, seed=3, **kw).latents, ref)
    res["per_call"] = per_call_precision(bundle, dev, precision)
    ok = (
        checks["fast fp32 vs onnxruntime cpu"] < 1e-3
        and checks["fast fp32 replay bitwise"] == 0.0
        and checks["fast fp32 device noise vs uploaded NumPy noise"] < 1e-3
        and res["per_call"]["ok"]
    )
    res["status"] = "ok" if ok else "failed"
    for g in (fast, eager_dev):
        g.close()
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return res


def per_call_precision(bundle_dir: Path, dev: str, precision: str) -> dict[str, Any]:
    """One transformer call and one denoiser step in ``precision`` vs fp32, on random non-trivial inputs."""
    from far_sdk.maths.diffusion import denoise_step_table

    gens = {
        p: far_sdk.Generator(bundle_dir, backend="torch", device=dev, precision=p, cuda_graphs=False, compile=False)
        for p in ("fp32", precision)
    }
    b32, blo = gens["fp32"].backend, gens[precision].backend
    m = gens["fp32"].bundle.manifest["model"]
    B, L, C = 2, m["grid_size"] ** 2, m["token_channels"]
    rng = np.random.default_rng(0)
    tokens = rng.standard_normal((2 * B, L, C)).astype(np.float32)
    ids = np.array([1, 2, m["num_classes"], m["num_classes"]])
    c32 = b32.transformer(tokens, {"class_ids": ids}, 4).float().cpu().numpy()
    clo = blo.transformer(tokens, {"class_ids": ids}, 4).float().cpu().numpy()
    x = rng.standard_normal((B, L, C)).astype(np.float32)
    noise = rng.standard_normal((1, B, L, C)).astype(np.float32)
    steps = denoise_step_table(50, 3.0, 1.0, None)[25:26]  # a mid-schedule step
    x32 = b32.denoise(x, noise, c32, steps)
    xlo = blo.denoise(x, noise, c32, steps)  # same cond: the step's own error

    def nrel(a, b):
        return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))

    out = {
        "precision": precision,
        "transformer_rel": nrel(clo, c32),
        "denoiser_step_rel": nrel(xlo, x32),
        "tolerance": CALL_TOL[precision],
    }
    out["ok"] = out["transformer_rel"] < CALL_TOL[precision] and out["denoiser_step_rel"] < CALL_TOL[precision]
    for g in gens.values():
        g.close()
    return out


def eager_baseline(bundle_dir: Path) -> dict[str, Any]:
    """The PyTorch reference sampler the official way (fp32, 100 inner steps, MLP condition every step) at batch 1."""
    import dataclasses

    import torch

    from far_sdk.bench.protocol import bench_backend, bench_plan
    from far_sdk.bench.results import summarize
    from far_sdk.maths.schedules import make_plan

    bundle = far_sdk.Bundle.load(bundle_dir, verify=False)
    plan = bench_plan(bundle)
    official = dataclasses.replace(plan, inner_steps=make_plan(plan.num_steps, inner_steps="official").inner_steps)
    raw = bench_backend(
        bundle_dir, "torch-eager", 1, official, warmup=1, iters=3, backend_options={"device": device_name()}
    )
    tot = [r["total"] * 1e3 for r in raw["iterations"]]
    gc.collect()
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return {
        "ms_per_image": summarize(tot).__dict__,
        "inner_steps": list(official.inner_steps),
        "stages_ms": {
            k: statistics.median(r[k] for r in raw["iterations"]) * 1e3
            for k in ("transformer", "denoise", "filter", "vae_decode")
        },
    }
