"""GPU performance check (``scripts/gpu_check.py --perf``): one run that decides issue 10's figures.

    python scripts/gpu_check.py --perf --out DIR                     # FAR-L + FAR-H, batch 1/8/64, bf16
    python scripts/gpu_check.py --perf --smoke-only --out DIR        # the correctness smoke test alone
    python scripts/gpu_check.py --perf --models far_tiny --vae-config kl16-tiny --batches 1,2 --out DIR   # on a CPU

Stages, each written to ``DIR/perf.json`` and ``DIR/perf.md`` as soon as it ends (a run killed at its
time limit keeps what finished), each skipped once ``--budget-s`` is spent:

1. the machine: versions, GPU, the bf16 matmul peak (8192^3 on random data, median of 10 after 3
   warm-ups) and device copy bandwidth, measured in this run;
2. smoke test on a random-init far_tiny + kl16-tiny bundle: the fast path (compiled, CUDA graphs,
   device noise) against the eager fp32 torch path and ONNX Runtime on the CPU, device-drawn noise
   against the same draws uploaded from NumPy, and bf16 per call (one transformer call, one denoiser
   step) against fp32. A failure here stops the run (``--keep-going`` to continue);
3. per model (random-init, exported with ``far-export``'s ``export_bundle``, no ONNX validation): one
   Generator (torch backend, ``--precision``, compiled, CUDA graphs) timed at each batch size —
   warm-up generations (compiles, captures) reported apart, then timed ones: per image median, min and
   max, stages, images/s, achieved TFLOP/s and its share of the measured peak; then the eager PyTorch
   reference sampler the official way (fp32, 100 inner steps) at batch 1, and the speed-up.

On a machine without CUDA every stage runs on the CPU (for testing the script; figures meaningless).
Exit status 0 when every stage that ran passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import far_sdk  # noqa: E402

#: Issue 10's targets (ms per image at batch 1, bf16, paper schedule), speed-up over eager, batch-64 share of peak.
TARGETS = {"far_large": 100.0, "far_huge": 120.0}
SPEEDUP_TARGET, PEAK_SHARE_TARGET = 12.0, 0.5
#: Per-call bounds of reduced precision against fp32: ||a - b|| / ||b|| over one call.
CALL_TOL = {"bf16": 2e-2, "fp16": 5e-3, "fp32": 1e-5}


def log(msg: str) -> None:
    print(f"[gpu_perf {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Run:
    """Results written after every stage; the budget clock."""

    def __init__(self, out: Path, budget_s: float, command: str):
        self.out, self.budget_s, self.t0 = out, budget_s, time.perf_counter()
        self.data: dict[str, Any] = {"command": command, "stages": {}}
        out.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.t0)

    def record(self, name: str, value: Any) -> None:
        self.data["stages"][name] = value
        self.data["elapsed_s"] = time.perf_counter() - self.t0
        (self.out / "perf.json").write_text(json.dumps(self.data, indent=1, default=str))
        (self.out / "perf.md").write_text(markdown(self.data))

    def stage(self, name: str, fn, *args, need_s: float = 0.0, **kw) -> Any:
        if self.left() < need_s:
            log(f"{name}: skipped ({self.left():.0f} s of budget left, needs ~{need_s:.0f})")
            self.record(name, {"status": "skipped", "reason": f"budget: {self.left():.0f} s left"})
            return None
        log(f"{name} ...")
        t = time.perf_counter()
        try:
            res = fn(*args, **kw)
            res.setdefault("status", "ok")
        except Exception as e:  # noqa: BLE001 - a stage's failure is a result, not the end of the run
            res = {"status": "failed", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        res["seconds"] = time.perf_counter() - t
        log(
            f"{name}: {res['status']} in {res['seconds']:.1f} s"
            + (f" — {res.get('error')}" if res["status"] == "failed" else "")
        )
        self.record(name, res)
        return res


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


# ---- bundles and timing ----------------------------------------------------------------------------


def export_random(model: str, vae_config: str, dest: Path, seed: int = 0) -> Path:
    from export.random_bundle import random_bundle

    return random_bundle(dest, model, vae_config, seed=seed, name=f"random-{model}-{vae_config}", validate=False)


def time_generation(
    gen: far_sdk.Generator, batch: int, plan_kw: dict, warmup: int, iters: int, run: Run | None = None
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


# ---- stages ---------------------------------------------------------------------------------------------


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
    c32 = b32.transformer(tokens, ids, 4).float().cpu().numpy()
    clo = blo.transformer(tokens, ids, 4).float().cpu().numpy()
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


def bench_model(model: str, vae_config: str, tmp: Path, batches: list[int], precision: str, run: Run) -> dict[str, Any]:
    import torch

    t = time.perf_counter()
    bundle = export_random(model, vae_config, tmp / model)
    res: dict[str, Any] = {"model": model, "vae": vae_config, "export_s": time.perf_counter() - t, "rows": []}
    log(f"{model}: exported in {res['export_s']:.0f} s")
    t = time.perf_counter()
    gen = far_sdk.Generator(
        bundle, backend="torch", device=device_name(), precision=precision, compile=True, cuda_graphs=True
    )
    res["load_s"] = time.perf_counter() - t
    for B in batches:
        if run.left() < 20:
            res["rows"].append({"batch": B, "status": "skipped", "reason": "budget"})
            continue
        warm, iters = (2, 10) if B == 1 else ((1, 5) if B <= 8 else (1, 3))
        try:
            row = time_generation(gen, B, {}, warm, iters, run)
        except Exception as e:  # noqa: BLE001 - a failed row is recorded, the run goes on
            row = {
                "batch": B,
                "status": "failed",
                "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc()[-2000:],
            }
        res["rows"].append(row)
        log(
            f"{model} batch {B}: "
            + (
                f"{row['ms_per_image']['median']:.1f} ms/image, {row['images_per_s']:.1f} img/s"
                if "ms_per_image" in row
                else row.get("error", row.get("reason", ""))
            )
        )
        run.record(f"model {model} (partial)", res)
    gen.close()
    del gen
    gc.collect()
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    if run.left() > 45:
        res["eager_official_b1"] = eager_baseline(bundle)
    res["per_call"] = per_call_precision(bundle, device_name(), precision) if run.left() > 30 else {"skipped": "budget"}
    return res


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


# ---- report ---------------------------------------------------------------------------------------------


def markdown(data: dict[str, Any]) -> str:
    st = data.get("stages", {})
    lines = [f"# GPU perf ({data.get('command', '')})", ""]
    env = st.get("machine", {})
    if env:
        lines.append(
            "machine: " + ", ".join(f"{k}={env[k]}" for k in ("gpu", "torch", "torch_cuda", "triton") if k in env)
        )
        pk = env.get("peaks", {})
        if pk.get("matmul"):
            lines.append(
                f"measured matmul peak: {pk['matmul']['tflops_median']:.0f} TFLOP/s ({pk['matmul']['dtype']}, "
                f"n={pk['matmul']['n']}); "
                f"copy {pk['copy']['tb_per_s_median']:.2f} TB/s"
            )
    sm = st.get("smoke")
    if sm:
        lines += ["", f"smoke: {sm.get('status')} {sm.get('error', '')}"]
        for k, v in (sm.get("checks") or {}).items():
            lines.append(f"- {k}: {v:.3g}")
        if sm.get("per_call"):
            lines.append(f"- per call {sm['per_call']}")
    peak = (env.get("peaks") or {}).get("matmul", {}).get("tflops_median")
    lines += [
        "",
        "| model | batch | ms/image median (min-max) | transformer | denoise | VAE | img/s | TFLOP/s | % peak | "
        "target |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, m in st.items():
        if not name.startswith("model ") or "(partial)" in name and name.replace(" (partial)", "") in st:
            continue
        for r in m.get("rows", []):
            if "ms_per_image" not in r:
                lines.append(
                    f"| {m.get('model')} | {r.get('batch')} | {r.get('status')}: "
                    f"{r.get('error', r.get('reason', ''))[:80]} | | | | | | | |"
                )
                continue
            s, sg = r["ms_per_image"], r["stages_ms_per_image"]
            tf = r.get("achieved_tflops")
            share = tf / peak if tf and peak else None
            tgt = ""
            if r["batch"] == 1 and m.get("model") in TARGETS:
                tgt = f"<= {TARGETS[m['model']]:.0f} ms: {'met' if s['median'] <= TARGETS[m['model']] else 'MISSED'}"
            elif r["batch"] >= 64 and share is not None:
                tgt = f">= 50% peak: {'met' if share >= PEAK_SHARE_TARGET else 'MISSED'}"
            lines.append(
                f"| {m.get('model')} | {r['batch']} | {s['median']:.1f} ({s['min']:.1f}-{s['max']:.1f}) | "
                f"{sg['transformer']:.1f} | "
                f"{sg['denoise']:.1f} | {sg['vae_decode']:.1f} | {r['images_per_s']:.1f} | {tf or 0:.0f} | "
                f"{(share or 0) * 100:.0f}% | {tgt} |"
            )
        eb = m.get("eager_official_b1")
        if eb and m.get("rows") and "ms_per_image" in m["rows"][0]:
            sp = eb["ms_per_image"]["median"] / m["rows"][0]["ms_per_image"]["median"]
            lines.append(
                f"| {m.get('model')} eager official (fp32, 100 inner) | 1 | {eb['ms_per_image']['median']:.1f} | | | "
                "| | | | "
                f"speed-up {sp:.1f}x (>= 12x: {'met' if sp >= SPEEDUP_TARGET else 'MISSED'}) |"
            )
        if m.get("per_call"):
            lines.append(f"| {m.get('model')} per call {m['per_call']} | | | | | | | | | |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--perf", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--models", default="far_large,far_huge")
    ap.add_argument("--vae-config", default="kl16")
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu-perf-out"))
    ap.add_argument("--budget-s", type=float, default=470.0, help="stop starting stages after this many seconds")
    ap.add_argument("--smoke-only", action="store_true")
    ap.add_argument("--skip-smoke", action="store_true")
    ap.add_argument("--keep-going", action="store_true", help="run the models even when the smoke test fails")
    return ap.parse_args(argv)


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


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    command = " ".join(["python", "scripts/gpu_check.py", *(sys.argv[1:] if argv is None else argv)])
    run = Run(Path(a.out), a.budget_s, command)
    run.stage("machine", environment)
    with tempfile.TemporaryDirectory(prefix="far-gpu-perf-") as tmp:
        tmp = Path(tmp)
        if not a.skip_smoke:
            sm = run.stage("smoke", smoke, tmp, a.precision)
            if sm["status"] != "ok" and not a.keep_going:
                log("smoke test failed: stopping (pass --keep-going to time the models anyway)")
                print(markdown(run.data))
                return 1
        if not a.smoke_only:
            for model in a.models.split(","):
                run.stage(
                    f"model {model}",
                    bench_model,
                    model,
                    a.vae_config,
                    tmp,
                    [int(b) for b in a.batches.split(",")],
                    a.precision,
                    run,
                    need_s=60,
                )
    print(markdown(run.data))
    return 0 if all(v.get("status") in ("ok", "skipped") for v in run.data["stages"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
