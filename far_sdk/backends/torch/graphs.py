"""The torch backend's captured CUDA graphs (no torch import here: the backend passes its torch module in): one
``torch.cuda.CUDAGraph`` per stage key — ("transformer", B) or ("loop", B, n, filtered, masked, denoiser, noise) —
captured on a side stream after warm-up runs, replayed from then on, least recently used dropped beyond
``max_graphs``. A failed capture switches graphs off for the backend (eager launches from then on).

All graphs share one memory pool, which PyTorch documents as safe when they never replay concurrently: the
backend runs one generation at a time while graphs are on."""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable, Hashable
from typing import Any

from far_sdk.errors import CompileError

log = logging.getLogger(__name__)

#: Eager runs of a stage on the capture stream before its capture (lazy library set-up, autotuning).
WARMUP_RUNS = 2
#: PyTorch allows one CUDA graph capture at a time per process (torch.cuda.graph's documented restriction).
CAPTURE_LOCK = threading.Lock()


def compile_failure(e: BaseException) -> bool:
    """Whether ``e`` comes from torch.compile (Dynamo / Inductor) rather than from running or capturing."""
    mod = type(e).__module__ or ""
    return mod.startswith(("torch._dynamo", "torch._inductor")) or "inductor" in str(e).lower()[:200]


def run_compiled(body: Callable[[], None], key: Hashable) -> None:
    """``body()``, whose first call compiles: a compiler failure becomes CompileError (typed, named as what it is)."""
    try:
        body()
    except Exception as e:
        if compile_failure(e):
            raise CompileError(
                f"torch.compile failed for stage {key} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                "): retry with compile=False"
            ) from e
        raise


class StageGraphs:
    """Captured stages by key (LRU); ``captures`` counts captures since creation."""

    def __init__(self, torch: Any, device: Any, max_graphs: int, enabled: bool):
        self._torch, self._device, self.max_graphs = torch, device, max_graphs
        self.enabled = bool(enabled)
        self.captures = 0
        self._graphs: collections.OrderedDict[Hashable, Any] = collections.OrderedDict()
        if self.enabled:
            with torch.cuda.device(device):
                self._pool = torch.cuda.graph_pool_handle()
                self._stream = torch.cuda.Stream(device)

    def __len__(self) -> int:
        return len(self._graphs)

    def run(self, key: Hashable, body: Callable[[], None]) -> None:
        """Run ``body`` (static buffers in and out): replay its CUDA graph (capturing it first), or eagerly."""
        if not self.enabled:
            run_compiled(body, key)
            return
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._capture(body, key)
            if graph is None:
                body()
                return
            self._graphs[key] = graph
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)  # its pool blocks return to the pool
        else:
            self._graphs.move_to_end(key)
        graph.replay()

    def drop(self, which: Callable[[Hashable], bool] = lambda key: True) -> None:
        """Forget the graphs whose key ``which`` accepts (e.g. those reading a buffer that is replaced)."""
        for key in [k for k in self._graphs if which(k)]:
            del self._graphs[key]

    def _capture(self, body: Callable[[], None], key: Hashable) -> Any:
        torch, s = self._torch, self._stream
        g = torch.cuda.CUDAGraph()
        s.wait_stream(torch.cuda.current_stream(self._device))  # uploads and zero-fills land before the warm-up
        with CAPTURE_LOCK:
            with torch.cuda.stream(s):
                for _ in range(WARMUP_RUNS):  # compiles, lazy cuBLAS set-up: never inside a capture
                    run_compiled(body, key)  # a compiler failure is a CompileError, not a capture failure
            torch.cuda.current_stream(self._device).wait_stream(s)
            try:  # "thread_local": CUDA calls of other threads may not invalidate this capture.
                with torch.cuda.graph(g, pool=self._pool, stream=s, capture_error_mode="thread_local"):
                    body()
            except RuntimeError as e:
                self._give_up(key, e)
                return None
        self.captures += 1
        log.debug("captured %s (%d graphs cached)", key, len(self._graphs) + 1)
        return g

    def _give_up(self, key: Hashable, e: BaseException) -> None:
        log.warning(
            "CUDA graph capture of %s failed (%s); running eager launches from now on",
            key,
            str(e).splitlines()[0] if str(e) else type(e).__name__,
        )
        self.enabled = False  # concurrent_generate stays False: the Generator read it at construction
        self._graphs.clear()
        self._torch.cuda.synchronize(self._device)
