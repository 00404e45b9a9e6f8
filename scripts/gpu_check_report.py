"""The machine description and the markdown report of ``scripts/gpu_check.py`` (kept apart so the
check itself reads in one sitting). Imported by gpu_check.py, which puts this folder on ``sys.path``
by being run as a script."""

from __future__ import annotations

import importlib.metadata
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


# ---- the machine --------------------------------------------------------------------------------------


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "numpy": np.__version__,
    }
    try:
        import torch

        env.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
            env["compute_capability"] = "{}.{}".format(*torch.cuda.get_device_capability(0))
            env["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    except ImportError:
        env["torch"] = None
    try:
        import onnxruntime as ort

        env.update(onnxruntime=ort.__version__, ort_providers=ort.get_available_providers())
    except ImportError:
        env["onnxruntime"] = None
    env["tensorrt"] = _version("tensorrt") or _version("tensorrt-cu12")
    env["cuda_python"] = _version("cuda-python")
    if shutil.which("nvidia-smi"):
        r = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        env["nvidia_smi"] = r.stdout.strip() or r.stderr.strip()
        env.setdefault("gpu", env["nvidia_smi"].split(",")[0] if r.returncode == 0 and r.stdout.strip() else None)
    env.setdefault("gpu", None)
    r = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    env["far_sdk_commit"] = r.stdout.strip() or None
    return env


# ---- report -------------------------------------------------------------------------------------------


def fmt(v: float | None, fmt: str = ".3g") -> str:
    return "-" if v is None else format(v, fmt)


def markdown(env: dict, command: str, info: dict, rows: list[Any], bench: list[dict] | None) -> str:
    """The report: the machine, the setup, one table row per path (gpu_check.Row), the IOBinding bench if run."""
    lines = [
        "# far-sdk GPU check\n",
        f"- command: `{command}`",
        f"- GPU: {env.get('gpu') or 'none'}" + (f" (nvidia-smi: {env['nvidia_smi']})" if env.get("nvidia_smi") else ""),
        f"- versions: python {env['python']}, torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), onnxruntime "
        f"{env.get('onnxruntime')} {env.get('ort_providers', [])}, tensorrt {env.get('tensorrt')}, cuda-python "
        f"{env.get('cuda_python')}, "
        f"far-sdk {env.get('far_sdk_commit')}",
        f"- bundle: {info['bundle']}; batch {info['batch']}, seed {info['seed']}, plan {info['plan']}",
        f"- reference: {info['reference']} ({info['reference_s']:.1f} s)",
        f"- timings: setup = backend creation (+ engine builds); first run apart; median of {info['repeats']} runs "
        "after it "
        "(transformer + denoise + filter + VAE decode, host arrays out)\n",
        "| path | status | max abs err | rel err (tol) | setup s | first run s | median s | denoise s | img/s | "
        "deterministic | notes |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        notes = r.reason
        if r.backend:
            keep = {
                k: r.backend[k]
                for k in ("device", "precision", "dtype", "cuda_graphs", "io_binding", "providers")
                if k in r.backend
            }
            notes = (notes + " " if notes else "") + ", ".join(f"{k}={v}" for k, v in keep.items())
        rel = (
            "-"
            if r.rel is None
            else (f"{r.rel:.3g} ({r.tolerance:g})" if r.tolerance is not None else f"{r.rel:.3g} (per call)")
        )
        lines.append(
            f"| {r.id} | {r.status} | {fmt(r.max_abs)} | {rel} | {fmt(r.setup_s, '.2f')} | {fmt(r.first_s, '.3f')} | "
            f"{fmt(r.median_s, '.3f')} | {fmt(r.stages_s.get('denoise'), '.3f')} | {fmt(r.images_per_s, '.2f')} | "
            f"{'-' if r.deterministic is None else ('yes' if r.deterministic else 'NO')} | {notes.replace('|', '/')} |"
        )
    if bench:
        lines += [
            "\n## ONNX Runtime CPU: IOBinding vs session.run (denoiser, median ms per call)\n",
            "| batch | calls | threads | io_binding ms | run() ms | bitwise equal |",
            "|---:|---:|---:|---:|---:|---|",
        ]
        lines += [
            f"| {b['batch']} | {b['calls']} | {b['threads'] or 'all'} | {b['io_binding_ms']:.3f} | {b['run_ms']:.3f} "
            f"| {b['bitwise_equal']} |"
            for b in bench
        ]
    return "\n".join(lines)
