"""PyTorch backend: runs the bundle's weights through the same graph modules the ONNX graphs were
exported from. Imports torch and ``training`` only when chosen.

The whole generation stays on the device between the class ids going in and the latents coming out
(one host copy per image at the end, plus a few bytes of plan per outer step):

- per outer step two stages: the transformer (``TransformerGraph``) writes ``cond``; then the n-step
  inner loop (``FusedDenoiserStep``: one adaLN GEMM for all blocks, the time embeddings of all n steps
  in one call, latents in fp32) and the low-pass filter on the device;
- seeded noise (:class:`~far_sdk.backends.base.SeededDraws`) is drawn on the device by the same
  Philox4x32-10 as :mod:`far_sdk.maths.noise` (``training.torch_noise.philox_normals_torch``), inside the step, so
  no noise crosses the bus; replayed noise (:class:`~far_sdk.backends.base.HostDraws`) is uploaded;
- on CUDA with ``cuda_graphs=True`` (default) each stage is captured once into a
  ``torch.cuda.CUDAGraph`` — the transformer per batch size, the inner loop per (batch, n, filtered,
  noise kind) — and replayed (LRU of ``max_cuda_graphs``);
- with ``compile=True`` (default on CUDA: "auto") the denoiser step (noise, network, DDPM update) is
  compiled by ``torch.compile`` (Inductor) into a few fused kernels before capture; on the CPU it is
  off by default (Inductor's C++ build takes a minute there) and may be switched on.

Static buffers (:class:`_Batch`, per batch size) are allocated outside any capture, so the graphs only
read and write them; intermediates live in one shared graph pool, safe (PyTorch documents) when graphs
never replay concurrently: one generation at a time (``concurrent_generate`` is False with graphs).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import re
import threading
from typing import Any

import numpy as np

from far_sdk.backends.base import (
    MAX_CUDA_GRAPHS,
    Backend,
    HostDraws,
    LoopState,
    Mark,
    SeededDraws,
    check_backend_options,
)
from far_sdk.backends.torch.state import Batch as _Batch
from far_sdk.backends.torch.state import memory_errors
from far_sdk.bundle.bundle import Bundle
from far_sdk.errors import BackendUnavailableError, InvalidArgumentError
from far_sdk.maths.diffusion import Step

log = logging.getLogger(__name__)

_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
#: Eager runs of a stage on the capture stream before its capture (lazy library set-up, autotuning).
WARMUP_RUNS = 2
#: Largest inner-step count (far_sdk.maths.diffusion.respaced_timesteps allows 1..1000).
MAX_INNER_STEPS = 1000
#: Row stride of the static step table (floats): 64-byte rows keep every row view 16-byte aligned,
#: which Inductor's kernels assume for their inputs.
STEP_STRIDE = 16
#: PyTorch allows one CUDA graph capture at a time per process (torch.cuda.graph's documented restriction).
_CAPTURE_LOCK = threading.Lock()


def _import_torch():
    try:
        import torch  # noqa: PLC0415 - PyTorch is optional for the runtime: loaded when used
    except ImportError as e:
        raise BackendUnavailableError(
            "backend 'torch' needs PyTorch: pip install torch (and far-sdk's training package)"
        ) from e
    return torch


class TorchBackend(Backend):
    """``device``: "cpu", "cuda", "cuda:N" or "auto"; ``precision``: "fp32" | "bf16" | "fp16" (networks
    only: latents, noise and the DDPM arithmetic stay fp32, the VAE decoder runs in fp32);
    ``threads``: CPU intra-op threads; ``cuda_graphs``: on CUDA, replay captured CUDA graphs (falls back
    to eager launches if a capture fails); ``max_cuda_graphs``: captured graphs kept (LRU);
    ``compile``: True | False | "auto" (CUDA only) — compile the denoiser step with torch.compile."""

    name = "torch"

    def __init__(
        self,
        bundle: Bundle,
        *,
        device: str = "auto",
        precision: str = "fp32",
        threads: int | None = None,
        cuda_graphs: bool = True,
        max_cuda_graphs: int = MAX_CUDA_GRAPHS,
        compile: bool | str = "auto",
        **other: Any,
    ):
        super().__init__(bundle)
        check_backend_options(
            self.name, ("device", "precision", "threads", "cuda_graphs", "max_cuda_graphs", "compile"), other, log
        )
        torch = _import_torch()
        self._torch = torch
        # training's modules import torch: loaded with this backend, never by `import far_sdk`
        from training.filters import low_pass_tokens  # noqa: PLC0415
        from training.from_bundle import load_bundle_models  # noqa: PLC0415
        from training.graph_modules import (  # noqa: PLC0415
            DenoiserGraph,
            FusedDenoiserStep,
            TextTransformerGraph,
            TransformerGraph,
            VAEDecoderGraph,
        )

        if not isinstance(device, str) or not (device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", device)):
            raise InvalidArgumentError(
                f"torch backend device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}"
            )
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda"):
            if not torch.cuda.is_available():
                raise BackendUnavailableError(
                    f"backend 'torch' with device {device!r} needs a CUDA build of PyTorch and a GPU (this torch "
                    f"{torch.__version__} sees none); use device='cpu'"
                )
            index = int(device[5:]) if ":" in device else torch.cuda.current_device()
            if index >= torch.cuda.device_count():
                raise BackendUnavailableError(
                    f"backend 'torch': CUDA device {index} requested, {torch.cuda.device_count()} "
                    "visible (check CUDA_VISIBLE_DEVICES)"
                )
            device = f"cuda:{index}"
        if precision not in _DTYPES:
            raise InvalidArgumentError(f"precision must be one of {sorted(_DTYPES)}, got {precision!r}")
        if isinstance(max_cuda_graphs, bool) or not isinstance(max_cuda_graphs, int) or max_cuda_graphs < 1:
            raise InvalidArgumentError(f"max_cuda_graphs must be a positive integer, got {max_cuda_graphs!r}")
        if compile not in (True, False, "auto"):
            raise InvalidArgumentError(f"compile must be True, False or 'auto', got {compile!r}")
        if threads:
            torch.set_num_threads(int(threads))
        self._device = torch.device(device)
        self._precision = precision
        self._dtype = getattr(torch, _DTYPES[precision])
        on_cuda = self._device.type == "cuda"

        m = bundle.manifest
        far, vae = load_bundle_models(bundle)
        dev, dt = self._device, self._dtype
        self._graphs = {
            "transformer": (TextTransformerGraph(far) if bundle.conditioning == "text" else TransformerGraph(far))
            .to(dev, dt)
            .eval(),
            "denoiser": DenoiserGraph(far.diffloss.net).to(dev, dt).eval(),
            # fp16 VAE decoders overflow in many projects: the decoder always runs in fp32.
            "vae_decoder": VAEDecoderGraph(vae, float(m["latent_scale"])).to(dev, torch.float32).eval(),
        }
        self._fused = FusedDenoiserStep(self._graphs["denoiser"].net).eval()  # after the move: copies in place
        self._grid = int(m["model"]["grid_size"])
        self._low_pass_tokens = low_pass_tokens
        self._width = int(m["mlp_width"])

        from training.torch_noise import philox_normals_torch  # noqa: PLC0415 - imports torch

        fused, L, C = self._fused, int(m["model"]["grid_size"]) ** 2, int(m["model"]["token_channels"])

        def step_seeded(x, cond, temb, step, seeds, pos):
            """One inner step whose noise is drawn on the device (positions pos.. of each seed's stream)."""
            noise = philox_normals_torch(seeds, pos, L * C).reshape(x.shape)  # (B, L, C) fp32
            return fused(x, noise, cond, temb, step)

        def step_host(x, noise, cond, temb, step):
            return fused(x, noise, cond, temb, step)

        self._compiled = (compile is True) or (compile == "auto" and on_cuda)
        draw = philox_normals_torch
        if self._compiled:
            step_seeded = torch.compile(step_seeded, fullgraph=True)
            step_host = torch.compile(step_host, fullgraph=True)
            draw = torch.compile(draw, fullgraph=True)  # x_T: one kernel instead of a few hundred
        self._step_seeded, self._step_host, self._draw = step_seeded, step_host, draw

        # CUDA graphs (CUDA only)
        self._use_graphs = bool(cuda_graphs) and on_cuda
        self._max_graphs = max_cuda_graphs
        self._lru: collections.OrderedDict[tuple, None] = collections.OrderedDict()
        self._batches: dict[int, _Batch] = {}
        # graphs: one generation at a time (static buffers); eager: per-generation buffers, no lock needed
        self._lock = threading.RLock() if self._use_graphs else contextlib.nullcontext()
        self._captures = 0
        if self._use_graphs:
            with torch.cuda.device(self._device):
                self._pool = torch.cuda.graph_pool_handle()
                self._capture_stream = torch.cuda.Stream(self._device)
        # The static buffers and graphs serve one generation at a time (see the module docstring).
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
        d.update(
            torch=self._torch.__version__,
            dtype=str(self._dtype).replace("torch.", ""),
            vae_dtype="float32",
            latents_dtype="float32",
            cuda_graphs=self._use_graphs,
            compiled=self._compiled,
            noise="philox4x32-10 on device",
        )
        if self._device.type == "cuda":
            d.update(
                gpu=self._torch.cuda.get_device_name(self._device),
                cuda=self._torch.version.cuda,
                cuda_graphs_cached=len(self._lru),
                cuda_graph_captures=self._captures,
            )
        return d

    def synchronize(self) -> None:
        if self._device.type == "cuda":
            self._torch.cuda.synchronize(self._device)

    def _t(self, a: np.ndarray, dtype=None):
        t = self._torch.from_numpy(np.ascontiguousarray(a)).to(self._device)
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    # ---- single graph calls (the Backend protocol; not the hot path) -----------------------------
    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        if graph not in self._graphs:
            raise InvalidArgumentError(f"graph must be one of {tuple(self._graphs) or '(closed)'}, got {graph!r}")
        mod = self._graphs[graph]
        dt = torch.float32 if graph == "vae_decoder" else self._dtype
        with torch.inference_mode():
            # the step vector (timestep, coefficients) always stays fp32
            out = mod(*(self._t(feeds[n], torch.float32 if n == "step" else dt) for n in mod.input_names))
        name = mod.output_names[0]
        return {name: out.float().cpu().numpy()}  # host sync

    def transformer(self, tokens, conditioning, level, mask=None):
        """tokens [2B, L, C], mask [2B, L] (a masking transformer) -> cond [2B, L, W] as a device tensor (eager: the
        loop uses :meth:`outer_step`)."""
        torch = self._torch
        extra = [self._t(v) for v in self._mask_feed(mask, tokens.shape[0], tokens.shape[1]).values()]  # fp32: 0 / 1
        with torch.inference_mode():
            lv = torch.tensor([float(level)], device=self._device, dtype=self._dtype)
            cond_in = [self._t(v, self._dtype if k == "context" else None) for k, v in conditioning.items()]
            return self._graphs["transformer"](self._t(tokens, self._dtype), *cond_in, lv, *extra)  # (2B, L, W)

    def denoise(self, x, noises, cond, steps):
        """n guided steps from host x [B, L, C] with host noises [n, B, L, C] -> host x_0 (through the same
        captured / compiled inner loop as :meth:`outer_step`)."""
        torch = self._torch
        B, L, C = x.shape
        n = int(steps.shape[0])
        if n == 0:
            return np.array(x, dtype=np.float32)
        with self._lock, torch.inference_mode(), self._on_device():
            bb = self._batch(B, L, C, cached=self._use_graphs)
            if not isinstance(cond, torch.Tensor):
                cond = self._t(np.asarray(cond, dtype=np.float32), self._dtype)
            bb.cond.copy_(cond.reshape(bb.cond.shape))
            self._upload_plan(bb, steps, None, None)
            self._upload_noise(bb, HostDraws(x=np.asarray(x), noises=np.asarray(noises)), n)
            self._run_stage(
                bb, ("loop", B, n, False, False, "host"), lambda: self._loop_body(bb, n, False, False, "host")
            )
            return bb.raw.to("cpu", copy=True).numpy()  # host sync

    # ---- the loop ----------------------------------------------------------------------------------
    def begin(self, conditioning: dict[str, np.ndarray], batch: int, seq_len: int, channels: int) -> LoopState:
        torch = self._torch
        with self._lock, torch.inference_mode(), self._on_device():
            # graphs read fixed addresses: one cached set of buffers per batch size (one generation at a
            # time); eager runs get their own, so concurrent generations on the CPU never share them
            bb = self._batch(batch, seq_len, channels, cached=self._use_graphs)
            bb.tokens.zero_()
            feeds = conditioning
            if "class_ids" in feeds:  # a class bundle
                bb.ids.copy_(torch.from_numpy(feeds["class_ids"]))
            else:  # a text bundle: buffers of this batch's context shape (fixed per bundle), refilled per generation
                ctx = torch.from_numpy(feeds["context"]).to(self._device, self._dtype)
                null = torch.from_numpy(feeds["null"]).to(self._device)
                if bb.text is None or bb.text[0].shape != ctx.shape:
                    bb.text = (torch.empty_like(ctx), torch.empty_like(null))
                bb.text[0].copy_(ctx)
                bb.text[1].copy_(null)
        return LoopState(conditioning=conditioning, batch=batch, tokens=bb.tokens, raw=bb.raw, buffers=bb)

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
    ) -> None:
        torch = self._torch
        B, n = state.batch, int(steps.shape[0])
        L, C = state.tokens.shape[1], state.tokens.shape[2]
        filtered, masked = filter_matrix is not None, keep_next is not None
        mask_feed = self._mask_feed(
            None if mask is None else np.concatenate([mask, mask]), 2 * B, L
        )  # {"mask": (2B, L)} or {}
        with self._lock, torch.inference_mode(), self._on_device(), memory_errors(torch, B):
            bb = state.buffers
            bb.level.fill_(float(level))
            if mask_feed:
                bb.mask.copy_(torch.from_numpy(mask_feed["mask"]), non_blocking=True)
            if masked:
                bb.keep.copy_(
                    torch.from_numpy(np.ascontiguousarray(keep_next, dtype=np.float32)[:, :, None]), non_blocking=True
                )
            self._run_stage(bb, ("transformer", B), lambda: self._transformer_body(bb))
            mark("transformer")
            if isinstance(draws, SeededDraws) and not self._compiled and self._device.type == "cpu":
                # eager on the CPU: NumPy draws the stream faster than torch's int64 ops (docs/BENCHMARKS.md, noise)
                draws = draws.materialize(n, L, C)
            kind = "host" if isinstance(draws, HostDraws) else ("fused" if self._compiled else "batched")
            self._upload_plan(bb, steps, filter_matrix, draws)
            if kind == "host":
                self._upload_noise(bb, draws, n)
            elif kind == "batched":
                self._noise_buffer(bb, n)
            self._run_stage(
                bb, ("loop", B, n, filtered, masked, kind), lambda: self._loop_body(bb, n, filtered, masked, kind)
            )
            mark("denoise")  # the filter runs inside the loop's stage
        state.tokens, state.raw = bb.tokens, bb.raw

    def fetch(self, array: Any) -> np.ndarray:
        with self._lock:
            return array.to(
                "cpu", dtype=self._torch.float32, copy=True
            ).numpy()  # host sync; a copy: the buffer is reused

    def all_finite(self, array: Any) -> bool:
        with self._lock:
            return bool(self._torch.isfinite(array).all())  # host sync

    def decode(self, latents: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            out = self._graphs["vae_decoder"](self._t(latents, torch.float32))
        return out.cpu().numpy()  # host sync

    # ---- stage bodies: only static buffers in, static buffers out --------------------------------
    def _transformer_body(self, bb: _Batch) -> None:
        torch, dt = self._torch, self._dtype
        tok = bb.tokens.to(dt)
        extra = (bb.mask,) if self.takes_mask else ()  # (2B, L) fp32
        cond_in = bb.text if bb.text is not None else (bb.ids,)  # text: (context, null)
        cond = self._graphs["transformer"](torch.cat([tok, tok]), *cond_in, bb.level.to(dt), *extra)  # (2B, L, W)
        bb.cond.copy_(cond.reshape(bb.cond.shape))

    def _loop_body(self, bb: _Batch, n: int, filtered: bool, masked: bool, kind: str) -> None:
        """x_T and n inner steps, then the low-pass (and, ``masked``, the zeroing of the tokens the next
        step masks: ``bb.keep``). kind: "fused" (seeded; each step draws its own noise
        inside the compiled step), "batched" (seeded; all n + 1 draws in one call first, for eager runs where
        per-step drawing would cost hundreds of small ops) or "host" (uploaded draws in ``bb.noise``)."""
        B, L, C = bb.tokens.shape
        temb = self._fused.time_table(bb.steps[:n, Step.timestep], self._dtype)  # (n, W)
        if kind == "fused":
            x = self._draw(bb.seeds, bb.pos[0, :1], L * C).reshape(B, L, C)  # x_T, fp32
            for i in range(n):
                x = self._step_seeded(x, bb.cond, temb[i], bb.steps[i, : len(Step)], bb.seeds, bb.pos[i + 1, :1])
        else:
            if kind == "batched":  # stream order: image-major
                z = self._draw(bb.seeds, bb.pos[0, :1], (n + 1) * L * C).reshape(B, n + 1, L, C)
                bb.noise[: n + 1].copy_(z.transpose(0, 1))  # (n + 1, B, L, C)
            x = bb.noise[0]
            for i in range(n):
                x = self._step_host(x, bb.noise[i + 1], bb.cond, temb[i], bb.steps[i, : len(Step)])
        bb.raw.copy_(x)
        if filtered:  # M X M^T per channel
            bb.tokens.copy_(self._low_pass_tokens(x, bb.fmat))
        else:
            bb.tokens.copy_(x)
        if masked:
            bb.tokens.mul_(bb.keep)  # (B, L, C) * (B, L, 1)

    # ---- buffers, uploads, graphs ------------------------------------------------------------------
    def _on_device(self):
        return self._torch.cuda.device(self._device) if self._device.type == "cuda" else contextlib.nullcontext()

    def _batch(self, B: int, L: int, C: int, cached: bool) -> _Batch:
        bb = self._batches.get(B) if cached else None
        if bb is None:
            torch, dev, G, W = self._torch, self._device, self._grid, self._width
            f32 = dict(device=dev, dtype=torch.float32)
            bb = _Batch(
                B=B,
                tokens=torch.zeros(B, L, C, **f32),
                raw=torch.zeros(B, L, C, **f32),
                cond=torch.zeros(2, B, L, W, device=dev, dtype=self._dtype),
                ids=torch.zeros(2 * B, device=dev, dtype=torch.long),
                seeds=torch.zeros(B, device=dev, dtype=torch.long),
                level=torch.zeros(1, **f32),
                steps=torch.zeros(MAX_INNER_STEPS, STEP_STRIDE, **f32),
                pos=torch.zeros(MAX_INNER_STEPS + 1, 2, device=dev, dtype=torch.long),
                fmat=torch.eye(G, **f32),
                mask=torch.ones(2 * B, L, **f32),
                keep=torch.ones(B, L, 1, **f32),
            )
            if cached:
                self._batches[B] = bb
        return bb

    def _upload_plan(self, bb: _Batch, steps: np.ndarray, fmat: np.ndarray | None, draws: Any) -> None:
        """Copy this outer step's plan into the static buffers (pageable sources: staged before return)."""
        torch = self._torch
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

    def _noise_buffer(self, bb: _Batch, n: int) -> None:
        """Make ``bb.noise`` hold at least n + 1 draws (a larger buffer drops the graphs that read the old one)."""
        if bb.noise is None or bb.noise.shape[0] < n + 1:
            for key in [k for k in bb.graphs if k[0] == "loop" and k[-1] != "fused"]:
                bb.graphs.pop(key)
                self._lru.pop(key, None)
            bb.noise = self._torch.empty(
                (n + 1,) + tuple(bb.tokens.shape), device=self._device, dtype=self._torch.float32
            )

    def _upload_noise(self, bb: _Batch, draws: HostDraws, n: int) -> None:
        torch = self._torch
        shape = (n + 1,) + tuple(bb.tokens.shape)
        self._noise_buffer(bb, n)
        bb.noise[0].copy_(torch.from_numpy(np.ascontiguousarray(draws.x, dtype=np.float32)), non_blocking=True)
        bb.noise[1 : n + 1].copy_(
            torch.from_numpy(np.ascontiguousarray(draws.noises, dtype=np.float32).reshape(shape[0] - 1, *shape[1:])),
            non_blocking=True,
        )

    def _run_stage(self, bb: _Batch, key: tuple, body) -> None:
        """Run ``body`` (static buffers in and out): replay its CUDA graph (capturing it first), or eagerly."""
        if not self._use_graphs:
            body()
            return
        graph = bb.graphs.get(key)
        if graph is None:
            graph = self._capture(body, key)
            if graph is None:
                body()
                return
            bb.graphs[key] = graph
            self._lru[key] = None
            while len(self._lru) > self._max_graphs:
                old, _ = self._lru.popitem(last=False)
                self._batches[old[1]].graphs.pop(old, None)  # its graph goes; its pool blocks return to the pool
        else:
            self._lru.move_to_end(key)
        graph.replay()

    def _capture(self, body, key: tuple):
        torch = self._torch
        s = self._capture_stream
        g = torch.cuda.CUDAGraph()
        s.wait_stream(torch.cuda.current_stream(self._device))  # uploads and zero-fills land before the warm-up
        try:
            with _CAPTURE_LOCK:
                with torch.cuda.stream(s):
                    for _ in range(WARMUP_RUNS):  # compiles, lazy cuBLAS set-up: never inside a capture
                        body()
                torch.cuda.current_stream(self._device).wait_stream(s)
                # "thread_local": CUDA calls of other threads may not invalidate this capture.
                with torch.cuda.graph(g, pool=self._pool, stream=s, capture_error_mode="thread_local"):
                    body()
        except RuntimeError as e:
            log.warning(
                "CUDA graph capture of %s failed (%s); running eager launches from now on",
                key,
                str(e).splitlines()[0] if str(e) else type(e).__name__,
            )
            self._use_graphs = False  # concurrent_generate stays False: the Generator read it at construction
            for bb in self._batches.values():
                bb.graphs.clear()
            self._lru.clear()
            torch.cuda.synchronize(self._device)
            return None
        self._captures += 1
        log.debug("captured %s (%d graphs cached)", key, len(self._lru) + 1)
        return g

    def close(self) -> None:
        with self._lock:
            self._lru.clear()
            self._batches.clear()
            self._graphs.clear()


def eager_backend(bundle: Bundle, **options: Any) -> Backend:
    """``backend="torch-eager"``: the official-way eager baseline (:class:`training.eager.OfficialEagerBackend`)."""
    _import_torch()
    from training.eager import OfficialEagerBackend  # noqa: PLC0415 - imports torch

    return OfficialEagerBackend(bundle, **options)
