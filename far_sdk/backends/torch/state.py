"""The torch backend's per-batch-size static buffers, their uploads, and its out-of-memory translation (no torch
import here: the backend passes its torch module in). Split from :mod:`far_sdk.backends.torch.backend` to keep it
readable."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from far_sdk.backends.base import HostDraws, SeededDraws
from far_sdk.errors import DeviceOutOfMemoryError, InvalidArgumentError

#: Largest inner-step count (far_sdk.maths.diffusion.respaced_timesteps allows 1..1000).
MAX_INNER_STEPS = 1000
#: Row stride of the static step table (floats): 64-byte rows keep every row view 16-byte aligned,
#: which Inductor's kernels assume for their inputs.
STEP_STRIDE = 16


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


def new_batch(torch: Any, B: int, L: int, C: int, G: int, W: int, device: Any, dtype: Any) -> Batch:
    """Zeroed static buffers for B images of L tokens x C channels (grid G, MLP width W; ``dtype``: the networks')."""
    f32 = dict(device=device, dtype=torch.float32)
    return Batch(
        B=B,
        tokens=torch.zeros(B, L, C, **f32),
        raw=torch.zeros(B, L, C, **f32),
        cond=torch.zeros(2, B, L, W, device=device, dtype=dtype),
        ids=torch.zeros(2 * B, device=device, dtype=torch.long),
        seeds=torch.zeros(B, device=device, dtype=torch.long),
        level=torch.zeros(1, **f32),
        steps=torch.zeros(MAX_INNER_STEPS, STEP_STRIDE, **f32),
        pos=torch.zeros(MAX_INNER_STEPS + 1, 2, device=device, dtype=torch.long),
        fmat=torch.eye(G, **f32),
        mask=torch.ones(2 * B, L, **f32),
        keep=torch.ones(B, L, 1, **f32),
    )


def upload_plan(torch: Any, bb: Batch, steps: np.ndarray, fmat: np.ndarray | None, draws: Any) -> None:
    """Copy this outer step's plan into the static buffers (pageable sources: staged before return)."""
    n, L, C = int(steps.shape[0]), bb.tokens.shape[1], bb.tokens.shape[2]
    if n > MAX_INNER_STEPS:
        raise InvalidArgumentError(f"at most {MAX_INNER_STEPS} inner steps per outer step, got {n}")
    bb.steps[:n, : steps.shape[1]].copy_(
        torch.from_numpy(np.ascontiguousarray(steps, dtype=np.float32)), non_blocking=True
    )
    if fmat is not None:
        bb.fmat.copy_(torch.from_numpy(np.ascontiguousarray(fmat, dtype=np.float32)), non_blocking=True)
    if isinstance(draws, SeededDraws):
        pos = draws.start + np.arange(n + 1, dtype=np.int64) * (L * C)
        bb.pos[: n + 1, 0].copy_(torch.from_numpy(pos), non_blocking=True)
        bb.seeds.copy_(torch.tensor(draws.seeds, dtype=torch.long), non_blocking=True)


def noise_buffer(torch: Any, bb: Batch, n: int, replaced: Callable[[], None]) -> None:
    """Make ``bb.noise`` hold at least n + 1 draws; a larger buffer calls ``replaced()`` first (graphs reading the
    old one must go)."""
    if bb.noise is None or bb.noise.shape[0] < n + 1:
        replaced()
        bb.noise = torch.empty((n + 1,) + tuple(bb.tokens.shape), device=bb.tokens.device, dtype=torch.float32)


def upload_noise(torch: Any, bb: Batch, draws: HostDraws, n: int, replaced: Callable[[], None]) -> None:
    """Copy host draws (x_T, then n noises) into ``bb.noise``."""
    shape = (n + 1,) + tuple(bb.tokens.shape)
    noise_buffer(torch, bb, n, replaced)
    bb.noise[0].copy_(torch.from_numpy(np.ascontiguousarray(draws.x, dtype=np.float32)), non_blocking=True)
    bb.noise[1 : n + 1].copy_(
        torch.from_numpy(np.ascontiguousarray(draws.noises, dtype=np.float32).reshape(shape[0] - 1, *shape[1:])),
        non_blocking=True,
    )
