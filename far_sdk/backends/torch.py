"""PyTorch backend: runs the bundle's weights through the same graph modules the ONNX graphs were
exported from. Imports torch and ``training`` only when chosen.

On CUDA it is the fallback for users without TensorRT: fp32, bf16 or fp16 weights and activations
(the step vector and the VAE decoder stay fp32), ``cond`` and ``x`` on the GPU through the inner
loop, and, with ``cuda_graphs=True`` (the default), the whole n-step denoiser loop of a call captured
once per (batch, n) into a ``torch.cuda.CUDAGraph`` and replayed:

- static device tensors x [B, L, C], noises [n, B, L, C], cond [2, B, L, W] (network dtype) and
  steps [n, 10] (fp32) are allocated outside the capture, so they never live in the graph pool;
- first use of a (B, n): a few eager steps on a dedicated side stream (lazy cuBLAS/cuDNN set-up must
  not happen inside a capture), then the n-step loop captured on that same stream;
- every call: copy the inputs into the static tensors, replay, copy x_0 out once (the host sync).

All captured graphs share one memory pool. PyTorch documents pool sharing as safe when graphs are
never replayed concurrently; they may be replayed in any order here because a replay reads only its
own static inputs (allocated outside the pool) and the weights, and its output is copied to the host
before the lock is released, so a later replay of another graph may overwrite it. The lock, the
static inputs and the graph cache are per backend: such a backend serves one generation at a time
(``concurrent_generate`` is False), as the TensorRT backend does.
"""

from __future__ import annotations

import collections
import logging
import re
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..bundle import Bundle
from ..errors import BackendUnavailableError, BundleError, InvalidArgumentError
from .base import Backend, check_backend_options

log = logging.getLogger(__name__)

_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
#: Captured (batch, n) loops kept per backend, least recently used dropped first. The paper's
#: frequency-aware schedule alone uses 10 distinct n per batch size, so 32 keeps three batch sizes.
MAX_CUDA_GRAPHS = 32
#: Eager denoiser steps run on the capture stream before a capture (lazy library set-up, autotuning).
WARMUP_STEPS = 3
#: Options other backends take; create_backend("auto", ...) hands every option to each backend it tries.
#: PyTorch allows one CUDA graph capture at a time per process (torch.cuda.graph's documented restriction).
_CAPTURE_LOCK = threading.Lock()


def _import_torch():
    try:
        import torch
    except ImportError as e:
        raise BackendUnavailableError("backend 'torch' needs PyTorch: pip install torch (and far-sdk's training package)") from e
    return torch


@dataclass
class _LoopGraph:
    """One captured n-step denoiser loop and the static tensors its kernels read and write."""

    graph: Any      # torch.cuda.CUDAGraph
    x: Any          # (B, L, C)      network dtype, input
    noises: Any     # (n, B, L, C)   network dtype, input
    cond: Any       # (2, B, L, W)   network dtype, input
    steps: Any      # (n, 10)        float32, input
    out: Any        # (B, L, C)      network dtype, output (lives in the shared graph pool)


class TorchBackend(Backend):
    """``device``: "cpu", "cuda", "cuda:N" or "auto"; ``precision``: "fp32" | "bf16" | "fp16" (the VAE stays fp32);
    ``threads``: CPU intra-op threads; ``cuda_graphs``: on CUDA, replay the denoiser loop from captured
    CUDA graphs (no effect on CPU; falls back to eager launches if a capture fails);
    ``max_cuda_graphs``: captured loops kept (LRU)."""

    name = "torch"

    def __init__(self, bundle: Bundle, *, device: str = "auto", precision: str = "fp32", threads: int | None = None,
                 cuda_graphs: bool = True, max_cuda_graphs: int = MAX_CUDA_GRAPHS, **other: Any):
        super().__init__(bundle)
        check_backend_options(self.name, ("device", "precision", "threads", "cuda_graphs", "max_cuda_graphs"), other, log)
        torch = _import_torch()
        self._torch = torch
        from safetensors.torch import load_file

        from training.config import FARConfig
        from training.far import FAR
        from training.graph_modules import DenoiserGraph, TransformerGraph, VAEDecoderGraph
        from training.vae import AutoencoderKL, VAEConfig

        if not isinstance(device, str) or not (device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", device)):
            raise InvalidArgumentError(f"torch backend device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda"):
            if not torch.cuda.is_available():
                raise BackendUnavailableError(
                    f"backend 'torch' with device {device!r} needs a CUDA build of PyTorch and a GPU (this torch "
                    f"{torch.__version__} sees none); use device='cpu'")
            index = int(device[5:]) if ":" in device else torch.cuda.current_device()
            if index >= torch.cuda.device_count():
                raise BackendUnavailableError(f"backend 'torch': CUDA device {index} requested, {torch.cuda.device_count()} "
                                              "visible (check CUDA_VISIBLE_DEVICES)")
            device = f"cuda:{index}"
        if precision not in _DTYPES:
            raise InvalidArgumentError(f"precision must be one of {sorted(_DTYPES)}, got {precision!r}")
        if isinstance(max_cuda_graphs, bool) or not isinstance(max_cuda_graphs, int) or max_cuda_graphs < 1:
            raise InvalidArgumentError(f"max_cuda_graphs must be a positive integer, got {max_cuda_graphs!r}")
        if threads:
            torch.set_num_threads(int(threads))
        self._device = torch.device(device)
        self._precision = precision
        self._dtype = getattr(torch, _DTYPES[precision])

        m = bundle.manifest
        state = bundle.load_torch_weights()
        far_sd = {k[4:]: v for k, v in state.items() if k.startswith("far.")}
        vae_sd = {k[4:]: v for k, v in state.items() if k.startswith("vae.")}
        with torch.device("meta"):
            far = FAR(FARConfig.from_dict(m["model"]))
            vae = AutoencoderKL(VAEConfig.from_dict(m["vae"]))
        try:
            far.load_state_dict(far_sd, strict=True, assign=True)
            missing, unexpected = vae.load_state_dict(vae_sd, strict=False, assign=True)
        except RuntimeError as e:
            raise BundleError(f"{bundle.path}/weights.safetensors does not match the manifest's model config: {str(e).splitlines()[0]}") from e
        bad = [k for k in missing if k.startswith(("decoder.", "post_quant_conv."))]
        if bad or unexpected:
            raise BundleError(f"{bundle.path}/weights.safetensors: VAE decoder keys missing {bad[:5]} / unexpected {unexpected[:5]}")
        far.eval()
        vae.eval()
        dev, dt = self._device, self._dtype
        self._graphs = {
            "transformer": TransformerGraph(far).to(dev, dt).eval(),
            "denoiser": DenoiserGraph(far.diffloss.net).to(dev, dt).eval(),
            # fp16 VAE decoders overflow in many projects: the decoder always runs in fp32.
            "vae_decoder": VAEDecoderGraph(vae, float(m["latent_scale"])).to(dev, torch.float32).eval(),
        }

        # CUDA graphs of the denoiser loop (CUDA only).
        self._use_graphs = bool(cuda_graphs) and self._device.type == "cuda"
        self._max_graphs = max_cuda_graphs
        self._loops: collections.OrderedDict[tuple[int, int], _LoopGraph] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._captures = 0
        if self._use_graphs:
            with torch.cuda.device(self._device):
                self._pool = torch.cuda.graph_pool_handle()
                self._capture_stream = torch.cuda.Stream(self._device)
        # The static buffers and graphs serve one call at a time (see the module docstring).
        self.concurrent_generate = not self._use_graphs

    # ---- properties ----------------------------------------------------------------------------
    @property
    def device(self) -> str:
        return str(self._device)

    @property
    def precision(self) -> str:
        return self._precision

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update(torch=self._torch.__version__, dtype=str(self._dtype).replace("torch.", ""), vae_dtype="float32",
                 cuda_graphs=self._use_graphs)
        if self._device.type == "cuda":
            d.update(gpu=self._torch.cuda.get_device_name(self._device), cuda=self._torch.version.cuda,
                     cuda_graphs_cached=len(self._loops), cuda_graph_captures=self._captures)
        return d

    def synchronize(self) -> None:
        if self._device.type == "cuda":
            self._torch.cuda.synchronize(self._device)

    def _t(self, a: np.ndarray, dtype=None):
        t = self._torch.from_numpy(np.ascontiguousarray(a)).to(self._device)
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        mod = self._graphs[graph]
        dt = torch.float32 if graph == "vae_decoder" else self._dtype
        with torch.inference_mode():
            # the step vector (timestep, coefficients) always stays fp32
            out = mod(*(self._t(feeds[n], torch.float32 if n == "step" else dt) for n in mod.input_names))
        name = mod.output_names[0]
        return {name: out.float().cpu().numpy()}  # host sync

    # Keep cond and x on the device through the inner loop (one host copy in, one out).
    def transformer(self, tokens, class_ids, level):
        torch = self._torch
        with torch.inference_mode():
            lv = torch.tensor([float(level)], device=self._device, dtype=self._dtype)
            return self._graphs["transformer"](self._t(tokens, self._dtype), self._t(class_ids), lv)  # (2B, L, W), on the device

    def denoise(self, x, noises, cond, steps):
        torch = self._torch
        B, n = x.shape[0], steps.shape[0]
        if self._use_graphs and n > 0:
            with self._lock, torch.inference_mode(), torch.cuda.device(self._device):
                out = self._denoise_graph(x, noises, cond, steps)
                if out is not None:
                    return out
        mod = self._graphs["denoiser"]
        with torch.inference_mode():
            xt = self._t(x, self._dtype)
            nz = self._t(noises, self._dtype)
            st = self._t(steps, torch.float32)  # timestep and coefficients stay fp32
            c2 = self._cond(cond, B)
            for i in range(st.shape[0]):
                xt = mod(xt, nz[i], c2, st[i])
            return xt.float().cpu().numpy()  # host sync

    def _cond(self, cond: Any, B: int):
        """cond [2B, L, W] (a device tensor from :meth:`transformer`, or a host array) -> [2, B, L, W] on the device, no copy."""
        if not isinstance(cond, self._torch.Tensor):
            cond = self._t(np.asarray(cond, dtype=np.float32), self._dtype)
        return cond.reshape(2, B, *cond.shape[-2:])

    # ---- CUDA graphs (call with the lock held, in inference mode, on the backend's device) --------
    def _denoise_graph(self, x, noises, cond, steps) -> np.ndarray | None:
        """Replay (capturing first if new) the n-step loop for x's batch; None if capture failed (eager from now on)."""
        torch = self._torch
        B, n = x.shape[0], steps.shape[0]
        key = (B, n)
        loop = self._loops.get(key)
        if loop is None:
            loop = self._capture(x.shape, noises.shape, self._cond(cond, B).shape, steps.shape)
            if loop is None:
                return None
            self._loops[key] = loop
            while len(self._loops) > self._max_graphs:
                self._loops.popitem(last=False)  # its graph and static tensors go; their pool blocks return to the pool
        else:
            self._loops.move_to_end(key)
        # Inputs into the static tensors on the current stream, in the order the replay will see them.
        # Host sources are pageable, so these copies are staged by CUDA before the calls return.
        loop.x.copy_(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), non_blocking=True)
        loop.noises.copy_(torch.from_numpy(np.ascontiguousarray(noises, dtype=np.float32)), non_blocking=True)
        loop.steps.copy_(torch.from_numpy(np.ascontiguousarray(steps, dtype=np.float32)), non_blocking=True)
        loop.cond.copy_(self._cond(cond, B), non_blocking=True)  # device to device
        loop.graph.replay()
        return loop.out.float().cpu().numpy()  # the one host sync; read before any other replay (lock held)

    def _capture(self, x_shape, noises_shape, cond_shape, steps_shape) -> _LoopGraph | None:
        torch = self._torch
        dev, dt = self._device, self._dtype
        mod = self._graphs["denoiser"]
        n = steps_shape[0]
        # Static inputs: allocated here, outside any capture, so they are not in the graph pool. Zeros keep the
        # warm-up finite; the real values are copied in before every replay.
        loop = _LoopGraph(graph=torch.cuda.CUDAGraph(), x=torch.zeros(x_shape, device=dev, dtype=dt),
                          noises=torch.zeros(noises_shape, device=dev, dtype=dt), cond=torch.zeros(cond_shape, device=dev, dtype=dt),
                          steps=torch.zeros(steps_shape, device=dev, dtype=torch.float32), out=None)
        s = self._capture_stream
        s.wait_stream(torch.cuda.current_stream(dev))  # the zero-fills above run before the warm-up reads them
        try:
            with _CAPTURE_LOCK:
                with torch.cuda.stream(s):
                    xt = loop.x
                    for i in range(min(n, WARMUP_STEPS)):
                        xt = mod(xt, loop.noises[i], loop.cond, loop.steps[i])
                torch.cuda.current_stream(dev).wait_stream(s)
                del xt
                # "thread_local": CUDA calls of other threads (e.g. another Generator's eager work) may not
                # invalidate this capture; captures themselves are serialised by the lock.
                with torch.cuda.graph(loop.graph, pool=self._pool, stream=s, capture_error_mode="thread_local"):
                    xt = loop.x
                    for i in range(n):                                           # x ping-pongs through the pool
                        xt = mod(xt, loop.noises[i], loop.cond, loop.steps[i])   # (B, L, C)
                    loop.out = xt
        except RuntimeError as e:
            log.warning("CUDA graph capture of the %d-step denoiser loop (batch %d) failed (%s); running eager launches from now on",
                        n, x_shape[0], str(e).splitlines()[0] if str(e) else type(e).__name__)
            self._use_graphs = False  # concurrent_generate stays False: the Generator read it at construction
            self._loops.clear()
            return None
        self._captures += 1
        log.debug("captured the %d-step denoiser loop for batch %d (%d graphs cached)", n, x_shape[0], len(self._loops) + 1)
        return loop

    def close(self) -> None:
        with self._lock:
            self._loops.clear()
            self._graphs.clear()
