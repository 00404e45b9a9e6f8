"""The backend protocol: how one graph of a bundle runs. The sampling loop is written once, in
:mod:`far_sdk.pipeline`, against this small interface."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from far_sdk.bundle.bundle import Bundle
from far_sdk.errors import InvalidArgumentError
from far_sdk.maths.filters import low_pass_tokens
from far_sdk.maths.noise import philox_normals

#: Every option some backend takes. backend="auto" passes the caller's options to each backend it
#: tries, so a backend ignores the others' options but refuses names no backend knows.
BACKEND_OPTIONS = frozenset(
    {
        "device",
        "threads",
        "precision",
        "cuda_graphs",
        "max_cuda_graphs",
        "compile",
        "io_binding",
        "trt_fp16",
        "tf32",
        "vae_precision",
        "batch",
        "opt_level",
    }
)

#: Captured CUDA graphs a GPU backend keeps (least recently used dropped first; the ``max_cuda_graphs``
#: option overrides it). The paper's frequency-aware schedule uses 10 distinct inner-step counts per batch
#: size (+1 transformer graph), so 64 keeps five batch sizes warm.
MAX_CUDA_GRAPHS = 64


def check_backend_options(backend: str, own: tuple[str, ...], other: dict[str, Any], log: Any) -> None:
    """Raise for option names no backend knows; log (and ignore) those meant for other backends."""
    unknown = sorted(set(other) - BACKEND_OPTIONS)
    if unknown:
        raise InvalidArgumentError(f"backend {backend!r} has no option(s) {unknown}; it takes {', '.join(own)}")
    if other:
        log.info("%s backend: ignoring options of other backends %s", backend, sorted(other))


@dataclass(frozen=True)
class HostDraws:
    """One outer step's noise as host arrays: x_T [B, L, C] and the inner steps' draws [n, B, L, C]
    (a replayed or user-supplied noise source)."""

    x: np.ndarray
    noises: np.ndarray


@dataclass(frozen=True)
class SeededDraws:
    """One outer step's noise as a place in each image's Philox stream (:mod:`far_sdk.maths.noise`):
    normals ``start .. start + (n + 1) L C - 1`` of every seed — x_T first, then one [L, C] draw per
    inner step. A backend draws them where its data lives (the torch backend: on the GPU, fused into
    the denoiser step); the default materialises them with NumPy. Same numbers either way."""

    seeds: tuple[int, ...]
    start: int

    def materialize(self, n: int, seq_len: int, channels: int) -> HostDraws:
        B, L, C = len(self.seeds), seq_len, channels
        z = philox_normals(self.seeds, self.start, (n + 1) * L * C).reshape(B, n + 1, L, C)
        z = np.ascontiguousarray(z.transpose(1, 0, 2, 3))  # (n + 1, B, L, C)
        return HostDraws(x=z[0], noises=z[1:])


@dataclass
class LoopState:
    """What one generation carries from outer step to outer step. ``tokens`` and ``raw`` are backend
    arrays (host NumPy by default; device tensors on the torch backend): read them with
    :meth:`Backend.fetch`."""

    conditioning: dict[
        str, np.ndarray
    ]  # the transformer's conditioning inputs for the CFG batch (far_sdk.conditioning):
    # {"class_ids": [2B] int64} or a text bundle's {"context": [2B, T, D], "null": [2B]}
    batch: int
    tokens: Any  # [B, L, C] float32: what the next outer step's transformer sees
    raw: Any = None  # [B, L, C] float32: the last outer step's sample, before low-passing
    buffers: Any = None  # backend-private (e.g. the torch backend's static device buffers)


#: ``mark(stage)`` is called when a stage of an outer step ends ("transformer", "denoise", "filter");
#: the pipeline synchronises the device there and books the time since the previous mark.
Mark = Callable[[str], None]


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
    #: graphs :meth:`run` takes besides the three of every bundle (TensorRT: "text_encoder" when its engine is built)
    extra_graphs: tuple[str, ...] = ()
    #: whether :meth:`denoise` / :meth:`outer_step` run the bundle's distilled ``denoiser_fewstep`` graph
    #: (``denoiser="denoiser_fewstep"``); the Generator refuses ``inner_sampler="distilled"`` otherwise
    runs_fewstep: bool = False

    def __init__(self, bundle: Bundle):
        self.bundle = bundle
        #: whether the transformer graph takes ``mask`` (a model built with mask=True; far_sdk.bundle.graphs)
        self.takes_mask = "mask" in bundle.graph_spec("transformer").input_names

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

    def synchronize(self) -> None:  # noqa: B027 - a no-op for host backends; device backends override it
        """Wait for queued device work (timers read the host clock only after this)."""

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "device": self.device, "precision": self.precision}

    # ---- the stages the loop calls (default: one graph call each) ------------------------------
    def transformer(
        self, tokens: np.ndarray, conditioning: dict[str, np.ndarray], level: int, mask: np.ndarray | None = None
    ) -> Any:
        """tokens [N, L, C], conditioning (named inputs of N rows, :class:`LoopState`), mask [N, L] (1 = dropped;
        only for a transformer that takes it,
        :attr:`takes_mask`) -> cond [N, L, W] (opaque; see class docstring)."""
        feeds = {"tokens": tokens, **conditioning, "level": np.array([level], dtype=np.float32)}
        feeds.update(self._mask_feed(mask, tokens.shape[0], tokens.shape[1]))
        return self.run("transformer", feeds)["cond"]

    def _mask_feed(self, mask: np.ndarray | None, rows: int, length: int) -> dict[str, np.ndarray]:
        """{"mask": mask [N, L] float32} for a transformer that takes it, {} for one that does not (whose model
        ignores masks, as the official mask=False model does); a masking transformer without a mask is an error."""
        if not self.takes_mask:
            return {}
        if mask is None:
            raise InvalidArgumentError(
                f"bundle {self.bundle.name!r} was exported from a model built with mask=True: its "
                "transformer needs a mask (it samples in mask mode only; pass mode='mask')"
            )
        mask = np.ascontiguousarray(mask, dtype=np.float32)
        if mask.shape != (rows, length):
            raise InvalidArgumentError(f"transformer mask must have shape {(rows, length)}, got {mask.shape}")
        return {"mask": mask}

    def denoise(
        self, x: np.ndarray, noises: np.ndarray, cond: Any, steps: np.ndarray, denoiser: str = "denoiser"
    ) -> np.ndarray:
        """Run len(steps) guided steps of graph ``denoiser`` ("denoiser", or "denoiser_fewstep" where
        :attr:`runs_fewstep`) from x [B, L, C]; noises [n, B, L, C], steps [n, 10] -> x_0 [B, L, C]."""
        B = x.shape[0]
        cond2 = np.asarray(cond).reshape(2, B, *np.asarray(cond).shape[1:])  # [2B, L, W] -> [2, B, L, W], no copy
        for i in range(steps.shape[0]):
            x = self.run(denoiser, {"x": x, "noise": noises[i], "cond": cond2, "step": steps[i]})["x_prev"]
        return x

    # ---- one outer step (the loop calls these; fast backends override them) ---------------------
    def begin(self, conditioning: dict[str, np.ndarray], batch: int, seq_len: int, channels: int) -> LoopState:
        """State for a generation of ``batch`` images; ``conditioning``: the CFG batch's conditioning inputs
        (:class:`LoopState`); tokens start at 0."""
        return LoopState(
            conditioning=conditioning, batch=batch, tokens=np.zeros((batch, seq_len, channels), dtype=np.float32)
        )

    def outer_step(
        self,
        state: LoopState,
        *,
        level: int,
        steps: np.ndarray,
        filter_matrix: np.ndarray | None,
        draws: HostDraws | SeededDraws,
        mark: Mark,
        mask: np.ndarray | None = None,
        keep_next: np.ndarray | None = None,
        denoiser: str = "denoiser",
    ) -> None:
        """One outer step, in place on ``state``: cond = transformer([tokens; tokens]); x = n guided steps of
        graph ``denoiser`` (:meth:`denoise`) from x_T; state.raw = x; state.tokens = M x M^T per channel
        (``filter_matrix`` M [G, G]; None: not filtered). steps [n, len(Step)] (far_sdk.maths.diffusion.Step rows,
        noisiest first).
        Mask mode (:mod:`far_sdk.maths.masking`): ``mask`` [B, L] (1 = dropped) goes to the transformer as
        [mask; mask]; ``keep_next`` [B, L] multiplies the handed-on tokens (None: all kept)."""
        tokens = state.tokens
        B, L, C = tokens.shape
        mask2 = None if mask is None else np.concatenate([mask, mask])  # (2B, L)
        cond = self.transformer(np.concatenate([tokens, tokens]), state.conditioning, level, mask2)  # (2B, L, W)
        mark("transformer")
        n = int(steps.shape[0])
        host = draws if isinstance(draws, HostDraws) else draws.materialize(n, L, C)
        kw = {} if denoiser == "denoiser" else {"denoiser": denoiser}  # overrides may predate the keyword
        x = self.denoise(host.x, host.noises, cond, steps, **kw)  # (B, L, C), host
        mark("denoise")
        state.raw = x
        nxt = x if filter_matrix is None else low_pass_tokens(x, filter_matrix)
        state.tokens = nxt if keep_next is None else nxt * keep_next[:, :, None].astype(np.float32)
        mark("filter")

    def set_start(self, state: LoopState, raw: np.ndarray, tokens: np.ndarray) -> None:
        """Image-to-image (far_sdk.pipeline.img2img): put host arrays [B, L, C] in ``state`` as if an outer step had
        sampled ``raw`` and handed on ``tokens`` (a device backend uploads host ``tokens`` in its next outer step)."""
        state.raw, state.tokens = raw, tokens

    def fetch(self, array: Any) -> np.ndarray:
        """A backend array (``LoopState.tokens`` / ``.raw``) as a host float32 array (a host sync on devices)."""
        return np.asarray(array, dtype=np.float32)

    def all_finite(self, array: Any) -> bool:
        """Whether every element of a backend array is finite (checked after every outer step)."""
        return bool(np.isfinite(np.asarray(array)).all())

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """latents [B, C, H, W] (sampler scale) -> image [B, 3, 16H, 16W] in about [-1, 1]."""
        return self.run("vae_decoder", {"latents": latents})["image"]

    def close(self) -> None:  # noqa: B027 - nothing to release by default
        """Release sessions/engines. The backend is unusable afterwards."""
