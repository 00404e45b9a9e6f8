"""TensorRT backend: the bundle's engines (built by ``far-export trt``) run with ``tensorrt`` and
cuda-python (``cuda.bindings.runtime``); no torch. One engine's runner and the CUDA helpers live in
:mod:`far_sdk.backends.tensorrt.engine`; this module runs the three engines as a backend.

Lifecycle per graph, as in the TensorRT demo's ``Engine``: sidecar check
(:func:`far_sdk.backends.tensorrt.cache.find_plan`,
before TensorRT sees the plan) -> deserialize (checked for ``None``) -> one execution context ->
device buffers preallocated for the profile's max batch, named after the graph spec. All work goes
to one CUDA stream.

The inner loop stays on the GPU: :meth:`TensorRTBackend.transformer` leaves ``cond`` in device
memory; :meth:`TensorRTBackend.denoise` uploads x, all n noises and the n-row step table once, runs
the n denoiser steps back to back (ping-pong x buffers; ``noise``/``step`` bound to slots of the
uploaded blocks), replayed from a captured CUDA graph per (batch, n) when capture works, and
downloads x once: one host sync per call.

Concurrency: one backend owns one stream, one context per graph and its captured graphs, none of
which may run twice at once, so every public call holds one lock; and ``cond`` lives in one device
buffer, valid until the next transformer call. Run generations in parallel with one backend (one
Generator) per thread.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from far_sdk.backends.base import MAX_CUDA_GRAPHS, Backend, check_backend_options
from far_sdk.backends.tensorrt.cache import (
    PRECISIONS,
    ROWS_PER_IMAGE,
    EngineKey,
    EngineNotBuiltError,
    find_plan,
    format_profile,
    parse_batch_profile,
    read_plan,
)
from far_sdk.backends.tensorrt.engine import EngineRunner, check_cuda, device_env, import_runtime, select_device
from far_sdk.backends.tensorrt.graphs import LoopGraphs
from far_sdk.backends.tensorrt.transfers import StreamIO
from far_sdk.bundle.bundle import Bundle
from far_sdk.bundle.graphs import GRAPH_NAMES, TEXT_ENCODER
from far_sdk.errors import BackendUnavailableError, EngineProfileError, IncompatibleBundleError, InvalidArgumentError
from far_sdk.maths.diffusion import Step

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrtCondRef:
    """A reference to the backend's one ``cond`` buffer [2B, L, W] in GPU memory, as the transformer
    left it; valid until the next transformer call on the same backend (``generation`` and ``owner``
    detect a stale or foreign reference)."""

    ptr: int
    images: int
    generation: int
    owner: int


# ---- the backend -------------------------------------------------------------------------------------


class TensorRTBackend(Backend):
    """Engines from the bundle's engine cache (:func:`~far_sdk.backends.tensorrt.cache.trt_dir`) built for this GPU
    and TensorRT (see ``far-export trt``).

    ``precision``: the transformer's and denoiser's ("fp16" | "bf16" | "fp32"; None: the built one,
    fp16 first); ``vae_precision`` likewise for the VAE decoder (None: fp32 first); ``batch``: the
    profile to load ("MIN:OPT:MAX" or a 3-tuple; None: the largest built); ``cuda_graphs``: replay
    the denoiser loop from captured CUDA graphs (falls back to plain launches if capture fails);
    ``max_cuda_graphs``: captured loops kept (LRU). Options of other backends (e.g. ``threads``) are
    ignored, names no backend knows rejected (:func:`far_sdk.backends.base.check_backend_options`).
    """

    name = "tensorrt"
    concurrent_generate = False

    def __init__(
        self,
        bundle: Bundle,
        *,
        device: Any = None,
        precision: str | None = None,
        vae_precision: str | None = None,
        batch: Any = None,
        opt_level: int | None = None,
        cuda_graphs: bool = True,
        max_cuda_graphs: int = MAX_CUDA_GRAPHS,
        **other: Any,
    ):
        super().__init__(bundle)
        self._closed, self._lock = True, threading.Lock()
        check_backend_options(
            self.name,
            ("device", "precision", "vae_precision", "batch", "opt_level", "cuda_graphs", "max_cuda_graphs"),
            other,
            log,
        )
        for label, p in (("precision", precision), ("vae_precision", vae_precision)):
            if p is not None and p not in PRECISIONS:
                raise InvalidArgumentError(f"{label} must be one of {PRECISIONS} or None, got {p!r}")
        if isinstance(max_cuda_graphs, bool) or not isinstance(max_cuda_graphs, int) or max_cuda_graphs < 1:
            raise InvalidArgumentError(f"max_cuda_graphs must be a positive integer, got {max_cuda_graphs!r}")
        self._trt, self._cudart = trt, cudart = import_runtime()
        self._device = select_device(cudart, device)
        self.env = device_env(trt, cudart, self._device)
        profile = None if batch is None else parse_batch_profile(batch)
        # Every sidecar is checked before any plan reaches TensorRT.
        self.keys: dict[str, EngineKey] = {}
        for g in GRAPH_NAMES:
            vae = g == "vae_decoder"
            self.keys[g], _ = find_plan(
                bundle,
                g,
                env=self.env,
                precision=vae_precision if vae else precision,
                profile=profile,
                opt_level=opt_level,
                prefer=("fp32", "bf16", "fp16") if vae else ("fp16", "bf16", "fp32"),
                verify_sha=False,
            )  # read_plan below hashes the bytes it loads
        self._find_text_encoder(bundle, precision, profile, opt_level)
        self._min_images = max(k.profile[0] for k in self.keys.values())
        self._max_images = min(k.profile[2] for k in self.keys.values())
        if self._min_images > self._max_images:
            raise IncompatibleBundleError(
                f"the engines' batch profiles do not overlap ({self._profiles()}): rebuild them with one --batch"
            )
        self._runners: dict[str, EngineRunner] = {}
        self._graphs = LoopGraphs(cudart, max_cuda_graphs, enabled=cuda_graphs)  # the denoiser loop's, by key
        self._cond_generation, self._io = 0, None
        self._closed = False
        try:
            self._io = StreamIO(cudart)
            for g in self.keys:
                key = self.keys[g]
                self._runners[g] = EngineRunner(
                    trt,
                    cudart,
                    read_plan(bundle, key),
                    bundle.graph_spec(g),
                    key.profile[2],
                    what=f"the {g} engine {key.plan_name}",
                )
        except BaseException:
            self.close()
            raise
        log.info("TensorRT backend on %s: %s", self.env.describe(), self._profiles())

    def _find_text_encoder(self, bundle: Bundle, precision: str | None, profile: Any, opt_level: int | None) -> None:
        """A text bundle's encoder engine, when one was built (far-export trt); else prompts run on ONNX Runtime."""
        if bundle.graph_entry(TEXT_ENCODER) is None:
            return
        try:
            self.keys[TEXT_ENCODER], _ = find_plan(
                bundle,
                TEXT_ENCODER,
                env=self.env,
                precision=precision,
                profile=profile,
                opt_level=opt_level,
                verify_sha=False,
            )
            self.extra_graphs = (TEXT_ENCODER,)
        except EngineNotBuiltError as e:
            log.info("no TensorRT text encoder engine (%s): prompts are encoded on ONNX Runtime", e)

    # ---- properties ---------------------------------------------------------------------------------
    @property
    def device(self) -> str:
        return f"cuda:{self._device}"

    @property
    def precision(self) -> str:
        return self.keys["denoiser"].precision

    @property
    def max_batch(self) -> int:
        return self._max_images

    def _profiles(self) -> str:
        return ", ".join(f"{g} {k.precision} batch {format_profile(k.profile)}" for g, k in self.keys.items())

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update(
            tensorrt=self.env.tensorrt,
            gpu=self.env.gpu,
            compute_capability=self.env.compute_capability,
            batch=f"{self._min_images}..{self._max_images}",
            cuda_graphs=self._graphs.enabled,
            cuda_graphs_cached=len(self._graphs),
            engines={
                g: {
                    "precision": k.precision,
                    "profile": format_profile(k.profile),
                    "opt_level": k.opt_level,
                    "plan": k.plan_name,
                }
                for g, k in self.keys.items()
            },
        )
        return d

    # ---- small steps (call with the lock held) ----------------------------------------------------------
    def _enter(self) -> None:
        if self._closed:
            raise BackendUnavailableError("this TensorRT backend was closed")
        check_cuda(self._cudart.cudaSetDevice(self._device), "cudaSetDevice")  # the current device is per host thread

    def _check_images(self, images: int, what: str) -> None:
        if not self._min_images <= images <= self._max_images:
            raise EngineProfileError(
                f"{what}: {images} images per call, but this bundle's engines take "
                f"{self._min_images}..{self._max_images} "
                f"({self._profiles()}). Split the batch (generate(max_batch=...)) or rebuild with "
                f"`far-export trt --bundle {self.bundle.path} --batch "
                f"1:{max(1, min(images, self._max_images))}:{max(images, self._max_images)} --rebuild`"
            )

    def _upload_input(self, r: EngineRunner, name: str, value: Any, images: int) -> None:
        """Validate ``value``'s shape for ``images`` images and queue its copy into ``r``'s buffer ``name``."""
        array = np.ascontiguousarray(value, dtype=r.tensors[name].dtype)
        if array.shape != r.shape(name, images):
            raise InvalidArgumentError(
                f"{r.spec.name}.{name}: expected shape {r.shape(name, images)} for {images} images, got {array.shape}"
            )
        self._io.upload(r.buffers[name], array, f"{r.spec.name}.{name}")

    # ---- the stages -------------------------------------------------------------------------------------
    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if graph not in (*GRAPH_NAMES, *self.extra_graphs):
            raise InvalidArgumentError(f"graph must be one of {(*GRAPH_NAMES, *self.extra_graphs)}, got {graph!r}")
        with self._lock:
            self._enter()
            r = self._runners[graph]
            first = next(t for t in r.spec.inputs if any(isinstance(d, str) for d in t.shape))
            axis, sym = next((i, d) for i, d in enumerate(first.shape) if isinstance(d, str))
            images, rem = divmod(int(np.shape(feeds[first.name])[axis]), ROWS_PER_IMAGE[sym])
            if rem:
                raise InvalidArgumentError(
                    f"{graph}.{first.name}: the batch axis must hold {ROWS_PER_IMAGE[sym]} rows per image"
                )
            self._check_images(images, f"graph {graph!r}")
            if r.set_images(images):
                self._graphs.drop()
            for t in r.spec.inputs:
                self._upload_input(r, t.name, feeds[t.name], images)
            r.bind()
            r.enqueue(self._io.handle)
            if graph == "transformer":
                self._cond_generation += 1  # its cond buffer was overwritten
            out = {
                t.name: self._io.download(r.buffers[t.name], r.shape(t.name, images), t.dtype, f"{graph}.{t.name}")
                for t in r.spec.outputs
            }
            self._io.sync()  # host sync: the outputs are read now
            return out

    def transformer(
        self, tokens: np.ndarray, conditioning: dict[str, np.ndarray], level: int, mask: np.ndarray | None = None
    ) -> TrtCondRef:
        """tokens [2B, L, C], conditioning (the CFG batch's inputs: class ids, or a text bundle's context and null),
        mask [2B, L] (a masking transformer) -> cond [2B, L, W], left on the GPU (no host sync)."""
        with self._lock:
            self._enter()
            r = self._runners["transformer"]
            rows = int(np.shape(tokens)[0])
            if rows % 2:
                raise InvalidArgumentError(
                    f"the transformer takes the CFG batch [cond; uncond]: an even number of rows, got {rows}"
                )
            images = rows // 2
            self._check_images(images, "transformer")
            r.set_images(images)
            self._upload_input(r, "tokens", tokens, images)
            for name, value in conditioning.items():  # class ids, or a text bundle's context and null flags
                self._upload_input(r, name, value, images)
            self._upload_input(r, "level", np.array([level], dtype=np.float32), images)
            for name, value in self._mask_feed(mask, rows, int(np.shape(tokens)[1])).items():
                self._upload_input(r, name, value, images)
            r.bind()
            r.enqueue(self._io.handle)
            self._cond_generation += 1
            return TrtCondRef(ptr=r.buffers["cond"], images=images, generation=self._cond_generation, owner=id(self))

    def denoise(self, x: np.ndarray, noises: np.ndarray, cond: Any, steps: np.ndarray) -> np.ndarray:
        """n guided DDPM steps on the GPU: x [B, L, C], noises [n, B, L, C], steps [n, 10] -> x_0 [B, L, C] (one host
        sync)."""
        with self._lock:
            self._enter()
            r = self._runners["denoiser"]
            x = np.ascontiguousarray(x, dtype=np.float32)
            noises = np.ascontiguousarray(noises, dtype=np.float32)
            steps = np.ascontiguousarray(steps, dtype=np.float32)
            B, n = x.shape[0], steps.shape[0]
            self._check_images(B, "denoise")
            if noises.shape != (n, *x.shape) or steps.shape != (n, len(Step)):
                raise InvalidArgumentError(
                    f"denoise: x {x.shape} needs noises {(n, *x.shape)} and steps {(n, len(Step))}, "
                    f"got {noises.shape} and {steps.shape}"
                )
            if n == 0:
                return x.copy()
            if r.set_images(B):
                self._graphs.drop()
            cond_ptr = self._cond_ptr(r, cond, B)
            self._upload_input(r, "x", x, B)
            noise_ptr, noise_stride = self._io.upload_slots("noise", noises, self._graphs.drop)
            step_ptr, step_stride = self._io.upload_slots("step", steps, self._graphs.drop)
            xs = (r.buffers["x"], r.buffers["x_prev"])  # ping-pong: step i reads xs[i % 2], writes the other

            def addresses(i: int) -> dict[str, int]:
                return {
                    "x": xs[i % 2],
                    "x_prev": xs[(i + 1) % 2],
                    "cond": cond_ptr,
                    "noise": noise_ptr + i * noise_stride,
                    "step": step_ptr + i * step_stride,
                }

            self._run_steps(r, n, (B, n, cond_ptr, noise_ptr, noise_stride, step_ptr, step_stride), addresses)
            out = self._io.download(xs[n % 2], x.shape, "float32", "denoiser.x_prev")
            self._io.sync()  # the one host sync of the inner loop
            return out

    def _cond_ptr(self, r: EngineRunner, cond: Any, images: int) -> int:
        if isinstance(cond, TrtCondRef):
            if cond.owner != id(self) or cond.generation != self._cond_generation:
                raise InvalidArgumentError(
                    "cond is stale: another transformer call on this TensorRT backend ran since it was computed (a "
                    "backend "
                    "keeps one cond on the GPU; run concurrent generations with one Generator per thread)"
                )
            if cond.images != images:
                raise InvalidArgumentError(f"cond was computed for {cond.images} images, x has {images}")
            return cond.ptr
        host = np.asarray(cond, dtype=np.float32).reshape(
            r.shape("cond", images)
        )  # a host cond [2B, L, W] or [2, B, L, W]
        self._upload_input(r, "cond", host, images)
        return r.buffers["cond"]

    def _run_steps(self, r: EngineRunner, n: int, key: tuple, addresses) -> None:
        """The n steps: replay their captured graph (capturing it first), or plain launches."""
        graphs, stream = self._graphs, self._io.stream
        if graphs.enabled and graphs.launch(key, stream):
            return
        if graphs.enabled:
            if r.needs_warmup:
                # TensorRT finishes shape-dependent setup in the first enqueue after a shape change, which must
                # not happen inside a capture. Step 0 reads xs[0] and writes xs[1]: harmless, the graph redoes it.
                self._enqueue_steps(r, 1, addresses)
                self._io.sync()
            what = f"the {n}-step denoiser loop"
            if graphs.capture(key, stream, lambda: self._enqueue_steps(r, n, addresses), what):
                graphs.launch(key, stream)
                return
        self._enqueue_steps(r, n, addresses)

    def _enqueue_steps(self, r: EngineRunner, n: int, addresses) -> None:
        for i in range(n):
            r.bind(addresses(i))
            r.enqueue(self._io.handle)

    def synchronize(self) -> None:
        with self._lock:
            self._enter()
            self._io.sync()

    def close(self) -> None:
        """Free graphs, buffers, contexts, engines and the stream. Idempotent; the backend is unusable afterwards."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._io is not None:
                self._io.sync_quietly()
            self._graphs.drop()
            for r in self._runners.values():
                r.close()
            self._runners.clear()
            if self._io is not None:
                self._io.close()
                self._io = None
