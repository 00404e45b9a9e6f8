"""GPU performance check (``scripts/gpu_check.py --perf``): one run that decides issue 24's figures (<= 8 min on
one H100/H200, exports included).

    python scripts/gpu_check.py --perf --out DIR                     # FAR-L + FAR-H, batch 1/8/64, bf16
    python scripts/gpu_check.py --perf --smoke-only --out DIR        # the correctness smoke test alone
    python scripts/gpu_check.py --perf --tiny --out DIR              # the script itself on a CPU (figures meaningless)

Stages, each written to ``DIR/perf.json`` and ``DIR/perf.md`` as soon as it ends (a run killed at its
time limit keeps what finished; ``DIR`` defaults to ``$OUT``), each skipped once ``--budget-s`` is spent:

1. the machine: versions, GPU, the bf16 matmul peak (8192^3 on random data, median of 10 after 3
   warm-ups) and device copy bandwidth, measured in this run;
2. smoke test on a random-init far_tiny + kl16-tiny bundle: the fast path (compiled, CUDA graphs,
   device noise) against the eager fp32 torch path and ONNX Runtime on the CPU, device-drawn noise
   against the same draws uploaded from NumPy, and bf16 per call (one transformer call, one denoiser
   step of the compiled, captured path) against fp32. A failure here stops the run (``--keep-going``);
3. per model (random-init, no ONNX validation): one Generator (torch backend, ``--precision``, compiled, CUDA
   graphs) per batch size with the paper schedule and at batch 1 with the ``fast`` and ``distilled`` presets (the
   latter runs a stand-in student, the teacher's own MLP added by ``far-export fewstep``: speed only): ``warmup()`` (the
   first call without warm-up), the first call after it, then timed calls -- per image median, min and max,
   stages, images/s, achieved TFLOP/s and its share of the measured peak, peak GPU memory; then the eager
   baselines at batch 1 (``torch-eager``: the official way, fp16 autocast and 100 inner steps; the same at equal
   inner steps; fp32 for information) and the speed-ups; then the timed kernels per call against fp32.

On a machine without CUDA every stage runs on the CPU (for testing the script; figures meaningless).
Exit status 0 when every stage that ran passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gpu_perf_report import markdown  # noqa: E402  (scripts/: the folder of this script)
from gpu_stages import (
    device_name,
    eager_baselines,
    environment,
    export_random,
    per_call_precision,
    smoke,
    time_generation,
)  # noqa: E402

import far_sdk  # noqa: E402


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


# ---- stages ---------------------------------------------------------------------------------------------


def bench_model(model: str, a: argparse.Namespace, tmp: Path, run: Run) -> dict[str, Any]:
    """Export a random-init ``model``, time the fast path (torch backend, compiled, CUDA graphs) at each batch size
    with the bundle's (paper) plan and at batch 1 with the ``fast`` and ``distilled`` presets, then the eager
    baselines and the compiled kernels per call against fp32."""
    import torch

    t = time.perf_counter()
    bundle = export_random(model, a.vae_config, tmp / model)
    add_stand_in_student(bundle, tmp / f"{model}-student.safetensors")
    res: dict[str, Any] = {"model": model, "vae": a.vae_config, "export_s": time.perf_counter() - t, "rows": []}
    log(f"{model}: exported in {res['export_s']:.0f} s")
    t = time.perf_counter()
    gen = far_sdk.Generator(bundle, backend="torch", device=device_name(), precision=a.precision, cuda_graphs=True)
    res["load_s"] = time.perf_counter() - t
    steps = {"num_steps": a.steps} if a.steps else {}
    rows = [(B, {**steps}) for B in a.batch_list] + [(1, {"preset": p, **steps}) for p in ("fast", "distilled")]
    for B, plan_kw in rows:
        if run.left() < 20:
            res["rows"].append({"batch": B, "settings": plan_kw, "status": "skipped", "reason": "budget"})
            continue
        iters = a.iters if B == 1 else max(2, a.iters // (2 if B <= 8 else 3))
        try:
            row = time_generation(gen, B, plan_kw, iters, run)
        except Exception as e:  # noqa: BLE001 - a failed row is recorded, the run goes on
            row = {"batch": B, "settings": plan_kw, "status": "failed", "error": f"{type(e).__name__}: {e}"}
            row["traceback"] = traceback.format_exc()[-2000:]
        res["rows"].append(row)
        log(
            f"{model} batch {B} {plan_kw or ''}: "
            + (
                f"{row['ms_per_image']['median']:.1f} ms/image, first after warm-up {row['warm_ratio']:.2f}x"
                if "ms_per_image" in row
                else row.get("error", row.get("reason", ""))
            )
        )
        run.record(f"model {model} (partial)", res)
    gen.close()
    del gen
    gc.collect()
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    if run.left() > a.eager_need_s:
        res["eager"] = eager_baselines(bundle, iters=2 if a.tiny else 3, num_steps=a.steps)
    res["per_call"] = (
        per_call_precision(bundle, device_name(), a.precision) if run.left() > 30 else {"skipped": "budget"}
    )
    return res


def add_stand_in_student(bundle: Path, path: Path) -> None:
    """Give a random-init bundle a few-step denoiser for timing ``preset="distilled"`` (speed only): the teacher's own
    diffusion MLP saved as the student (far-train distill's file format) and added by ``far-export fewstep``."""
    from export.fewstep import add_fewstep
    from far_sdk.bundle.bundle import Bundle
    from far_sdk.maths.distilled import DISTILLED_STEPS, TEACHER_STEPS
    from training.distill.train import save_student
    from training.from_bundle import load_bundle_models

    far, _vae = load_bundle_models(Bundle.load(bundle))
    info = {"steps": list(DISTILLED_STEPS), "teacher_steps": TEACHER_STEPS, "method": "random-init stand-in (speed)"}
    save_student(far.diffloss.net, path, info)
    add_fewstep(bundle, path, validate=False)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--perf", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--models", default="far_large,far_huge")
    ap.add_argument("--vae-config", default="kl16")
    ap.add_argument("--batches", default=None, help="images per call (default 1,8,64; --tiny 1,2)")
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu-perf-out"))
    ap.add_argument("--budget-s", type=float, default=470.0, help="stop starting stages after this many seconds")
    ap.add_argument("--smoke-only", action="store_true")
    ap.add_argument("--skip-smoke", action="store_true")
    ap.add_argument("--keep-going", action="store_true", help="run the models even when the smoke test fails")
    ap.add_argument("--iters", type=int, default=10, help="timed generations at batch 1 (fewer at larger batches)")
    ap.add_argument("--steps", type=int, default=None, help="outer steps (default: the bundle's, 10)")
    ap.add_argument(
        "--tiny",
        action="store_true",
        help="a CPU smoke run of the script itself: far_tiny + kl16-tiny, batches 1,2, few iterations (figures "
        "meaningless)",
    )
    a = ap.parse_args(argv)
    if a.tiny:
        a.models, a.vae_config, a.iters, a.budget_s = "far_tiny", "kl16-tiny", 2, min(a.budget_s, 300)
    a.batches = a.batches or ("1,2" if a.tiny else "1,8,64")
    a.batch_list = [int(b) for b in a.batches.split(",")]
    a.eager_need_s = 20 if a.tiny else 60
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    command = " ".join(["python", "scripts/gpu_check.py", *(sys.argv[1:] if argv is None else argv)])
    run = Run(Path(a.out), a.budget_s, command)
    run.stage("machine", environment, small=a.tiny)
    with tempfile.TemporaryDirectory(prefix="far-gpu-perf-") as tmp:
        tmp = Path(tmp)
        if not a.skip_smoke:
            sm = run.stage("smoke", smoke, tmp, a.precision, compile="auto" if a.tiny else True)
            if sm["status"] != "ok" and not a.keep_going:
                log("smoke test failed: stopping (pass --keep-going to time the models anyway)")
                print(markdown(run.data))
                return 1
        if not a.smoke_only:
            for model in a.models.split(","):
                run.stage(f"model {model}", bench_model, model, a, tmp, run, need_s=20 if a.tiny else 60)
    print(markdown(run.data))
    return 0 if all(v.get("status") in ("ok", "skipped") for v in run.data["stages"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
