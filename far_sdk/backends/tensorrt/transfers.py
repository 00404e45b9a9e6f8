"""The TensorRT backend's one CUDA stream and its host <-> device copies (cuda-python, no torch): host arrays
handed to a copy stay alive until the next :meth:`StreamIO.sync`; blocks of per-step rows (noises, step
table) live in ALIGN-ed slots so an engine can bind any row in place."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from far_sdk.backends.tensorrt.engine import aligned, check_cuda, check_cuda_quietly, copy_to_device, copy_to_host


class StreamIO:
    """A non-blocking stream, the host arrays its queued copies read or write, and named device blocks."""

    def __init__(self, cudart: Any):
        self._cudart = cudart
        self._pending: list[np.ndarray] = []  # host arrays kept alive until the next sync
        self._blocks: dict[str, tuple[int, int]] = {}  # name -> (device ptr, bytes)
        self.stream = check_cuda(
            cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking), "cudaStreamCreateWithFlags"
        )

    @property
    def handle(self) -> int:
        return int(self.stream)

    def sync(self) -> None:
        """Host sync: wait for the stream; host arrays handed to copies may go afterwards."""
        check_cuda(self._cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        self._pending.clear()

    def upload(self, dst: int, array: np.ndarray, what: str) -> None:
        self._pending.append(array)
        copy_to_device(self._cudart, dst, array, self.stream, what)

    def download(self, src: int, shape: tuple[int, ...], dtype: str, what: str) -> np.ndarray:
        """Queue a copy into a new host array: read it after :meth:`sync`."""
        out = copy_to_host(self._cudart, src, shape, dtype, self.stream, what)
        self._pending.append(out)
        return out

    def upload_slots(self, name: str, array: np.ndarray, before_free: Callable[[], None]) -> tuple[int, int]:
        """Upload array [n, ...] into block ``name``, one ALIGN-ed slot per row; returns (block ptr, slot stride).
        A block too small is freed and reallocated: ``before_free()`` first drops whatever still points at it."""
        cudart = self._cudart
        n, row = array.shape[0], array[0].nbytes
        stride = aligned(row)
        ptr, size = self._blocks.get(name, (0, 0))
        if size < n * stride:
            if ptr:
                self.sync()  # no queued work may still read the old block
                before_free()
                check_cuda(cudart.cudaFree(ptr), f"cudaFree({name} block)")
                del self._blocks[name]
            size = aligned(n * stride)
            ptr = int(check_cuda(cudart.cudaMalloc(size), f"cudaMalloc({size} bytes for {name})"))
            self._blocks[name] = (ptr, size)
        self._pending.append(array)
        check_cuda(
            cudart.cudaMemcpy2DAsync(
                ptr, stride, array.ctypes.data, row, row, n, cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream
            ),
            f"copy of {n} {name} rows to the GPU",
        )
        return ptr, stride

    def sync_quietly(self) -> None:
        check_cuda_quietly(self._cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def close(self) -> None:
        """Free the blocks and destroy the stream (after :meth:`sync_quietly` and once nothing else uses them)."""
        for name, (ptr, _) in self._blocks.items():
            check_cuda_quietly(self._cudart.cudaFree(ptr), f"cudaFree({name} block)")
        self._blocks.clear()
        self._pending.clear()
        check_cuda_quietly(self._cudart.cudaStreamDestroy(self.stream), "cudaStreamDestroy")
