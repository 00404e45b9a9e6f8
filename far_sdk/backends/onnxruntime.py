"""ONNX Runtime backend (CPU; CUDA / TensorRT execution providers when onnxruntime-gpu and a GPU exist)."""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from ..bundle import Bundle
from ..errors import BackendUnavailableError, BundleError
from ..graphs import GRAPH_NAMES
from .base import Backend

log = logging.getLogger(__name__)

PROVIDER_ALIASES = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


def _import_ort():
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise BackendUnavailableError(
            "backend 'onnxruntime' needs the onnxruntime package: pip install onnxruntime (CPU) or onnxruntime-gpu"
        ) from e
    return ort


class OnnxRuntimeBackend(Backend):
    """One InferenceSession per graph, created once from the verified file path.

    ``device``: "cpu" (default), "cuda" or "tensorrt" (EPs, with the TensorRT EP's engine cache under
    ``bundle/trt/ort-cache``), or "auto" (the best EP this onnxruntime build and machine offer).
    ``threads``: intra-op threads (default: all cores the process may use).
    """

    name = "onnxruntime"

    def __init__(self, bundle: Bundle, *, device: str = "auto", threads: int | None = None):
        super().__init__(bundle)
        ort = _import_ort()
        self._ort = ort
        available = ort.get_available_providers()
        if device == "auto":
            device = "cuda" if "CUDAExecutionProvider" in available else "cpu"
        if device not in PROVIDER_ALIASES:
            raise BackendUnavailableError(f"onnxruntime device must be one of {sorted(PROVIDER_ALIASES)} or 'auto', got {device!r}")
        wanted = PROVIDER_ALIASES[device]
        if wanted[0] not in available:
            raise BackendUnavailableError(
                f"onnxruntime here offers {available}, not {wanted[0]}: install onnxruntime-gpu on a machine with a CUDA GPU"
            )
        self._device = device
        opts = ort.SessionOptions()
        if threads is None:
            threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers: list[Any] = []
        for p in wanted:
            if p == "TensorrtExecutionProvider":
                cache = bundle.path / "trt" / "ort-cache"
                cache.mkdir(parents=True, exist_ok=True)
                providers.append((p, {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
                                      "trt_timing_cache_enable": True, "trt_fp16_enable": False}))
            else:
                providers.append(p)
        self._sessions = {}
        for g in GRAPH_NAMES:
            path = bundle.graph_file(g)  # verified by Bundle.load before any parse
            try:
                self._sessions[g] = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
            except Exception as e:  # onnxruntime's own exception classes
                raise BundleError(f"onnxruntime could not load graph {g!r} from {path}: {str(e).splitlines()[0]}") from e
        self._outputs = {g: [o.name for o in s.get_outputs()] for g, s in self._sessions.items()}

    @property
    def device(self) -> str:
        return self._device

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update(onnxruntime=self._ort.__version__, providers=self._sessions["denoiser"].get_providers())
        return d

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        sess = self._sessions[graph]
        try:
            outs = sess.run(self._outputs[graph], feeds)
        except Exception as e:
            raise BundleError(f"onnxruntime failed running graph {graph!r}: {str(e).splitlines()[0]}") from e
        return dict(zip(self._outputs[graph], outs))

    def close(self) -> None:
        self._sessions.clear()
