"""Choosing and creating a backend by name. Each backend imports its runtime (onnxruntime, torch, tensorrt) only
when it is created, so importing them all here costs nothing."""

from __future__ import annotations

import importlib.util
from typing import Literal

from far_sdk.backends.base import Backend
from far_sdk.backends.onnxruntime import OnnxRuntimeBackend
from far_sdk.backends.tensorrt.backend import TensorRTBackend
from far_sdk.backends.torch.backend import TorchBackend, eager_backend
from far_sdk.bundle.bundle import Bundle
from far_sdk.errors import BackendUnavailableError, InvalidArgumentError

BackendName = Literal["auto", "tensorrt", "onnxruntime", "torch", "torch-eager"]
#: What backend="auto" tries, in order.
BACKENDS = ("tensorrt", "onnxruntime", "torch")
#: Every name create_backend takes: BACKENDS, and "torch-eager", the official-way eager PyTorch
#: baseline (fp32, the official per-step work; ``far bench``'s eager rows), never chosen by "auto".
BACKEND_NAMES = ("auto",) + BACKENDS + ("torch-eager",)


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def create_backend(bundle: Bundle, backend: str = "auto", **options) -> Backend:
    """Create backend ``backend`` for ``bundle``.

    "auto" picks TensorRT when ``tensorrt`` and ``cuda-python`` are installed and plans for this
    GPU exist in the bundle, else ONNX Runtime, else PyTorch.
    """
    if backend == "auto":
        errors = []
        for name in BACKENDS:
            try:
                return create_backend(bundle, name, **options)
            except BackendUnavailableError as e:
                errors.append(f"{name}: {e}")
        raise BackendUnavailableError("no backend is usable here:\n  " + "\n  ".join(errors))
    if backend == "onnxruntime":
        return OnnxRuntimeBackend(bundle, **options)
    if backend == "torch":
        return TorchBackend(bundle, **options)
    if backend == "torch-eager":
        return eager_backend(bundle, **options)
    if backend == "tensorrt":
        if not _installed("tensorrt"):
            raise BackendUnavailableError(
                "backend 'tensorrt' needs the tensorrt and cuda-python packages and an NVIDIA GPU "
                "(pip install 'far-sdk[gpu]'), then engines built with `far-export trt --bundle ...`"
            )
        return TensorRTBackend(bundle, **options)
    raise InvalidArgumentError(f"backend must be one of {BACKEND_NAMES}, got {backend!r}")
