"""The backend protocol: how one graph of a bundle runs. The sampling loop is written once, in
:mod:`far_sdk.pipeline`, against this small interface."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from ..bundle import Bundle
from ..errors import InvalidArgumentError

#: Every option some backend takes. backend="auto" passes the caller's options to each backend it
#: tries, so a backend ignores the others' options but refuses names no backend knows.
BACKEND_OPTIONS = frozenset({"device", "threads", "precision", "cuda_graphs", "max_cuda_graphs", "io_binding",
                             "trt_fp16", "tf32", "vae_precision", "batch", "opt_level"})


def check_backend_options(backend: str, own: tuple[str, ...], other: dict[str, Any], log: Any) -> None:
    """Raise for option names no backend knows; log (and ignore) those meant for other backends."""
    unknown = sorted(set(other) - BACKEND_OPTIONS)
    if unknown:
        raise InvalidArgumentError(f"backend {backend!r} has no option(s) {unknown}; it takes {', '.join(own)}")
    if other:
        log.info("%s backend: ignoring options of other backends %s", backend, sorted(other))


class Backend(ABC):
    """Runs a bundle's three graphs. Subclasses implement :meth:`run`; fast ones override the
    stage methods (e.g. to keep ``cond`` and the inner loop on the device).

    Arrays crossing this interface are host NumPy float32 unless a method says otherwise; the
    ``cond`` returned by :meth:`transformer` is opaque (it may live on a device) and is only passed
    back to :meth:`denoise` of the same backend.
    """

    name: str = "base"
    #: False when one backend instance cannot serve two generations at once (e.g. TensorRT keeps one
    #: cond and one CUDA graph per context): the Generator then serialises its calls with a lock.
    concurrent_generate: bool = True

    def __init__(self, bundle: Bundle):
        self.bundle = bundle

    # ---- what a backend must provide ----------------------------------------------------------
    @abstractmethod
    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run graph ``graph`` on named host arrays; returns its named outputs as host arrays."""

    @property
    def device(self) -> str:
        return "cpu"

    @property
    def precision(self) -> str:
        return "fp32"

    @property
    def max_batch(self) -> int | None:
        """Largest number of images per call (an engine profile's limit), or None for no limit."""
        return None

    def synchronize(self) -> None:
        """Wait for queued device work (timers read the host clock only after this)."""

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "device": self.device, "precision": self.precision}

    # ---- the stages the loop calls (default: one graph call each) ------------------------------
    def transformer(self, tokens: np.ndarray, class_ids: np.ndarray, level: int) -> Any:
        """tokens [N, L, C], class_ids [N] -> cond [N, L, W] (opaque; see class docstring)."""
        out = self.run("transformer", {"tokens": tokens, "class_ids": class_ids,
                                       "level": np.array([level], dtype=np.float32)})
        return out["cond"]

    def denoise(self, x: np.ndarray, noises: np.ndarray, cond: Any, steps: np.ndarray) -> np.ndarray:
        """Run len(steps) guided DDPM steps from x [B, L, C]; noises [n, B, L, C], steps [n, 10] -> x_0 [B, L, C]."""
        B = x.shape[0]
        cond2 = np.asarray(cond).reshape(2, B, *np.asarray(cond).shape[1:])  # [2B, L, W] -> [2, B, L, W], no copy
        for i in range(steps.shape[0]):
            x = self.run("denoiser", {"x": x, "noise": noises[i], "cond": cond2, "step": steps[i]})["x_prev"]
        return x

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """latents [B, C, H, W] (sampler scale) -> image [B, 3, 16H, 16W] in about [-1, 1]."""
        return self.run("vae_decoder", {"latents": latents})["image"]

    def close(self) -> None:
        """Release sessions/engines. The backend is unusable afterwards."""
