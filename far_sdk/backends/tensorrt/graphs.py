"""Captured CUDA graphs of the TensorRT backend's denoiser loop (cuda-python, no torch): capture an enqueue
function on a stream, instantiate it, replay it by key, keep at most ``max_graphs`` (least recently used go
first). A capture that fails switches graphs off for the backend: plain launches from then on."""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Hashable
from typing import Any

from far_sdk.backends.tensorrt.engine import CudaError, check_cuda, check_cuda_quietly

log = logging.getLogger(__name__)


class LoopGraphs:
    """cudaGraphExec_t per key (e.g. (batch, n, addresses)), LRU-bounded; ``enabled`` turns False after a failed
    capture."""

    def __init__(self, cudart: Any, max_graphs: int, enabled: bool = True):
        self._cudart, self.max_graphs, self.enabled = cudart, max_graphs, bool(enabled)
        self._execs: collections.OrderedDict[Hashable, Any] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._execs)

    def launch(self, key: Hashable, stream: Any) -> bool:
        """Replay ``key``'s graph on ``stream``; False when none is captured."""
        exe = self._execs.get(key)
        if exe is None:
            return False
        self._execs.move_to_end(key)
        check_cuda(self._cudart.cudaGraphLaunch(exe, stream), "cudaGraphLaunch")
        return True

    def capture(self, key: Hashable, stream: Any, enqueue: Callable[[], None], what: str) -> bool:
        """Capture what ``enqueue()`` queues on ``stream`` as ``key``'s graph; False (and ``enabled`` off) when
        capture fails. The caller has run the work once before (lazy set-up must not happen inside a capture)."""
        cudart = self._cudart
        graph = None
        try:
            check_cuda(
                cudart.cudaStreamBeginCapture(stream, cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal),
                "cudaStreamBeginCapture",
            )
            try:
                enqueue()
            finally:
                graph = check_cuda(cudart.cudaStreamEndCapture(stream), "cudaStreamEndCapture")
            exe = check_cuda(cudart.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
        except CudaError as e:
            cudart.cudaGetLastError()  # clear the capture's error state
            log.warning("CUDA graph capture of %s failed (%s); running the steps as plain launches", what, e)
            self.enabled = False
            return False
        finally:
            if graph is not None:
                check_cuda_quietly(cudart.cudaGraphDestroy(graph), "cudaGraphDestroy")  # the exec does not need it
        self._execs[key] = exe
        while len(self._execs) > self.max_graphs:
            _, old = self._execs.popitem(last=False)
            check_cuda_quietly(cudart.cudaGraphExecDestroy(old), "cudaGraphExecDestroy")
        return True

    def drop(self) -> None:
        """Destroy every captured graph (their buffers or shapes changed)."""
        while self._execs:
            _, exe = self._execs.popitem(last=False)
            check_cuda_quietly(self._cudart.cudaGraphExecDestroy(exe), "cudaGraphExecDestroy")
