"""The torch backend's per-batch-size static buffers and its out-of-memory translation (no torch import
here: the backend passes its torch module in). Split from :mod:`far_sdk.backends.torch.backend` to keep it readable."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from far_sdk.errors import DeviceOutOfMemoryError


@dataclass
class Batch:
    """Static device buffers of one batch size, shared by that size's graphs and eager runs."""

    B: int
    tokens: Any  # (B, L, C)            fp32: the transformer's input tokens
    raw: Any  # (B, L, C)            fp32: the last outer step's sample
    cond: Any  # (2, B, L, W)         network dtype: the transformer's output
    ids: Any  # (2B,)                int64
    seeds: Any  # (B,)                 int64
    level: Any  # (1,)                 fp32
    steps: Any  # (MAX_INNER_STEPS, STEP_STRIDE) fp32: rows 0..n-1 = this outer step's step table
    pos: Any  # (MAX_INNER_STEPS + 1, 2) int64: [k, 0] = stream position of draw k (x_T = draw 0)
    fmat: Any  # (G, G)               fp32
    mask: Any  # (2B, L)              fp32: mask mode: 1 = the transformer drops the token
    keep: Any  # (B, L, 1)            fp32: mask mode: 1 = kept in what the step hands on
    noise: Any = None  # (n + 1, B, L, C)     fp32: uploaded host draws (grown on demand)
    text: Any = None  # text bundles: (context (2B, T, D_text), null (2B,)) in the network dtype / fp32
    graphs: dict = field(default_factory=dict)


class memory_errors:
    """torch's allocation failures (CUDA OOM, the CPU allocator's RuntimeError) -> DeviceOutOfMemoryError."""

    def __init__(self, torch, batch: int):
        self._torch, self._batch = torch, batch

    def __enter__(self):
        return None

    def __exit__(self, typ, e, tb):
        if e is None:
            return False
        oom = isinstance(e, (MemoryError, self._torch.cuda.OutOfMemoryError)) or (
            isinstance(e, RuntimeError)
            and ("out of memory" in str(e).lower() or "can't allocate memory" in str(e).lower())
        )
        if oom:
            raise DeviceOutOfMemoryError(
                f"out of memory generating {self._batch} images per call: pass a smaller max_batch "
                f"or fewer labels ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
            ) from e
        return False
