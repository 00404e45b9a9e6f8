"""What a benchmark records about where it ran: machine, library versions, memory, and the CPU
matmul peak that achieved GFLOP/s are compared with (``far bench --peak``)."""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from far_sdk import __version__


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": cores,
        "gpus": _gpus(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def _gpus() -> list[str]:
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout
            return [ln.strip() for ln in out.splitlines() if ln.strip()]
        except (OSError, subprocess.SubprocessError):
            pass
    torch = sys.modules.get("torch")  # only if already imported: never import torch just to look
    if torch is not None and torch.cuda.is_available():
        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return []


def versions() -> dict[str, str]:
    out = {"far_sdk": __version__, "python": platform.python_version()}
    for pkg in ("numpy", "onnxruntime", "onnxruntime-gpu", "torch", "tensorrt", "onnx"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def maxrss_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1 << 20) if sys.platform == "darwin" else r / 1024  # bytes on macOS, KiB on Linux


def rss_now_mb() -> float | None:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / (1 << 20)


def cuda_torch(device: str):
    """torch, when ``device`` is a CUDA device of an already imported torch; else None."""
    torch = sys.modules.get("torch")
    return torch if torch is not None and device.startswith("cuda") and torch.cuda.is_available() else None


def matmul_peak(n: int = 2048, repeats: int = 5, threads: int | None = None) -> dict[str, Any]:
    """Best-of-``repeats`` GFLOP/s of an n x n x n fp32 matmul (2 n^3 FLOPs) in NumPy and, if installed, torch.

    ``threads`` limits both (torch.set_num_threads; NumPy's BLAS through threadpoolctl when installed)
    so the peak matches the rows' thread count.
    """
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
    flops = 2.0 * n**3

    def best(fn) -> float:
        fn()  # warm-up (thread pool start, page faults)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return flops / min(times) / 1e9

    out: dict[str, Any] = {"n": n, "repeats": repeats, "dtype": "float32", "numpy_threads": "BLAS default"}
    limit = contextlib.nullcontext()
    if threads is not None and importlib.util.find_spec("threadpoolctl") is not None:
        from threadpoolctl import threadpool_limits  # noqa: PLC0415 - optional: loaded when present

        limit, out["numpy_threads"] = threadpool_limits(limits=int(threads), user_api="blas"), int(threads)
    with limit:
        out["numpy_gflops"] = best(lambda: a @ b)
    if importlib.util.find_spec("torch") is not None:
        import torch  # noqa: PLC0415 - PyTorch is optional for the runtime: loaded when used

        if threads is not None:
            torch.set_num_threads(int(threads))
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        out["torch_gflops"] = best(lambda: torch.mm(ta, tb))
        out["torch_threads"] = torch.get_num_threads()
    out["gflops"] = max(v for k, v in out.items() if k.endswith("_gflops"))
    return out
