"""PyTorch backend: runs the bundle's weights through the same graph modules the ONNX graphs were exported from.
Imports torch and ``training`` only when chosen. The whole generation stays on the device between the class ids
going in and the latents coming out (one host copy per image at the end, plus a few bytes of plan per outer step):

- per outer step two stages: the transformer (``TransformerGraph``) writes ``cond``; then the n-step inner loop
  (``FusedDenoiserStep``: the adaLN modulations of many steps in one GEMM before them, the time embeddings of
  all n steps in one call, latents in fp32; the bundle's distilled student for ``denoiser_fewstep``) and the
  low-pass filter on the device;
- seeded noise (:class:`~far_sdk.backends.base.SeededDraws`) is drawn on the device by the same Philox4x32-10 as
  :mod:`far_sdk.maths.noise` (``training.torch_noise.philox_normals_torch``), inside the step, so no noise crosses
  the bus; replayed noise (:class:`~far_sdk.backends.base.HostDraws`) is uploaded;
- on CUDA with ``cuda_graphs=True`` (default) each stage is captured once into a ``torch.cuda.CUDAGraph`` (the
  transformer per batch size, the inner loop per (batch, n, filtered, denoiser, noise kind)), replayed (LRU);
- ``compile=True`` (default on CUDA: "auto"): the denoiser step (noise, network, DDPM update) and, on CUDA, the
  transformer compiled by ``torch.compile`` (Inductor) before capture; off by default on the CPU.

Static buffers (:class:`~far_sdk.backends.torch.state.Batch`, per batch size) are allocated outside any capture:
the graphs (:mod:`~far_sdk.backends.torch.graphs`) only read and write them; one generation at a time."""

from __future__ import annotations

import contextlib
import logging
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
from far_sdk.backends.torch.fast import (
    DTYPES,
    FastDecoder,
    check_options,
    compile_cache,
    import_torch,
    resolve_device,
    step_functions,
    table_steps,
)
from far_sdk.backends.torch.graphs import StageGraphs
from far_sdk.backends.torch.state import (
    Batch,
    decode_in_chunks,
    memory_errors,
    new_batch,
    noise_buffer,
    upload_noise,
    upload_plan,
)
from far_sdk.bundle.bundle import Bundle
from far_sdk.bundle.graphs import DENOISER_FEWSTEP
from far_sdk.errors import CompileError, InvalidArgumentError
from far_sdk.maths.diffusion import Step

log = logging.getLogger(__name__)


class TorchBackend(Backend):
    """``device``: "cpu", "cuda", "cuda:N" or "auto"; ``precision``: "fp32" | "bf16" | "fp16" (networks only:
    latents, noise and the DDPM arithmetic stay fp32, the VAE decoder runs in fp32); ``threads``: CPU intra-op
    threads; ``cuda_graphs``: on CUDA, replay captured CUDA graphs (falls back to eager launches if a capture
    fails); ``max_cuda_graphs``: captured graphs kept (LRU); ``compile``: True | False | "auto" (CUDA only)."""

    name = "torch"
    extra_graphs = ("vae_encoder",)  # image-to-image, for a bundle that has it (far_sdk.pipeline.img2img)

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
        torch = import_torch()
        self._torch = torch
        # training's modules import torch: loaded with this backend, never by `import far_sdk`
        from training.filters import low_pass_tokens  # noqa: PLC0415
        from training.from_bundle import encoder_graphs, load_bundle_models, load_bundle_student  # noqa: PLC0415
        from training.graph_modules import (  # noqa: PLC0415
            DenoiserGraph,
            FusedDenoiserStep,
            TextTransformerGraph,
            TransformerGraph,
            VAEDecoderGraph,
        )
        from training.torch_noise import philox_normals_torch  # noqa: PLC0415

        device = resolve_device(torch, device)
        check_options(precision, max_cuda_graphs, compile)
        if threads:
            torch.set_num_threads(int(threads))
        self._device = torch.device(device)
        self._precision = precision
        self._dtype = getattr(torch, DTYPES[precision])
        on_cuda = self._device.type == "cuda"

        m = bundle.manifest
        far, vae = load_bundle_models(bundle)
        dev, dt = self._device, self._dtype
        self._graphs = {
            "transformer": (TextTransformerGraph(far) if bundle.conditioning == "text" else TransformerGraph(far))
            .to(dev, dt)
            .eval(),
            "denoiser": DenoiserGraph(far.diffloss.net).to(dev, dt).eval(),
            # fp16 VAE decoders overflow in many projects: fp32 (bf16 in FastDecoder on CUDA)
            "vae_decoder": VAEDecoderGraph(vae, float(m["latent_scale"])).to(dev, torch.float32).eval(),
        }
        self._graphs.update({k: g.to(dev, torch.float32) for k, g in encoder_graphs(bundle, vae).items()})  # img2img
        self._fused = FusedDenoiserStep(self._graphs["denoiser"].net).eval()  # after the move: copies in place
        self._grid = int(m["model"]["grid_size"])
        self._low_pass_tokens = low_pass_tokens
        self._width = int(m["mlp_width"])

        self._compiled = compiled = (compile is True) or (compile == "auto" and on_cuda)
        if self._compiled and on_cuda:
            compile_cache()  # Inductor's caches in the far-sdk cache: a restarted server skips recompiling
        # on CUDA the transformer is compiled too (Inductor's GEMMs and fused elementwise kernels; the stage is then
        # captured as before); should its compilation fail, it runs uncompiled (outer_step)
        self._transformer, self._fast_vae = self._graphs["transformer"], None
        if self._compiled and on_cuda:
            self._transformer = torch.compile(self._graphs["transformer"])  # automatic dynamic: <= 2 compiles
            if precision == "bf16":  # the decoder in bf16, channels-last, compiled (fp32 if that fails)
                self._fast_vae = FastDecoder(torch, self._graphs["vae_decoder"])
        L, C = self._grid**2, int(m["model"]["token_channels"])
        steps = lambda fused: step_functions(torch, fused, philox_normals_torch, L * C, compiled)  # noqa: E731
        seeded, host, self._draw = steps(self._fused)
        self._steps = {"denoiser": (self._fused, seeded, host)}  # the inner loop's (fused step, functions) per graph
        student = load_bundle_student(bundle, far.diffloss.net)  # the distilled few-step denoiser, if any
        if student is not None:
            self._graphs[DENOISER_FEWSTEP], few = DenoiserGraph(student).eval(), FusedDenoiserStep(student).eval()
            self._steps[DENOISER_FEWSTEP] = (few, *steps(few)[:2])
        self.runs_fewstep = DENOISER_FEWSTEP in self._steps
        self._stages = StageGraphs(torch, self._device, max_cuda_graphs, enabled=bool(cuda_graphs) and on_cuda)
        self._use_graphs = self._stages.enabled  # as constructed: static buffers, one generation at a time
        self._batches: dict[int, Batch] = {}
        # graphs: one generation at a time (static buffers); eager: per-generation buffers, no lock needed
        self._lock = threading.RLock() if self._use_graphs else contextlib.nullcontext()
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
            vae_dtype="float32" if self._fast_vae is None or self._fast_vae.failed else "bfloat16",
            latents_dtype="float32",
            cuda_graphs=self._stages.enabled,
            compiled=self._compiled,
            transformer_compiled=self._transformer is not self._graphs.get("transformer"),
            noise="philox4x32-10 on device",
        )
        if self._device.type == "cuda":
            d.update(
                gpu=self._torch.cuda.get_device_name(self._device),
                cuda=self._torch.version.cuda,
                cuda_graphs_cached=len(self._stages),
                cuda_graph_captures=self._stages.captures,
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
        dt = torch.float32 if graph.startswith("vae_") else self._dtype
        with torch.inference_mode():
            # the step vector (timestep, coefficients) always stays fp32
            out = mod(*(self._t(feeds[n], torch.float32 if n == "step" else dt) for n in mod.input_names))
        outs = out if isinstance(out, tuple) else (out,)
        return {n: o.float().cpu().numpy() for n, o in zip(mod.output_names, outs)}  # host sync

    def transformer(self, tokens, conditioning, level, mask=None):
        """tokens [2B, L, C], mask [2B, L] (masking) -> cond [2B, L, W], a device tensor (the loop: outer_step)."""
        torch = self._torch
        extra = [self._t(v) for v in self._mask_feed(mask, tokens.shape[0], tokens.shape[1]).values()]  # fp32: 0 / 1
        with torch.inference_mode():
            lv = torch.tensor([float(level)], device=self._device, dtype=self._dtype)
            cond_in = [self._t(v, self._dtype if k == "context" else None) for k, v in conditioning.items()]
            return self._graphs["transformer"](self._t(tokens, self._dtype), *cond_in, lv, *extra)  # (2B, L, W)

    def denoise(self, x, noises, cond, steps, denoiser="denoiser"):
        """n guided steps from host x [B, L, C] with host noises [n, B, L, C] -> host x_0 (through the same
        captured / compiled inner loop as :meth:`outer_step`)."""
        torch = self._torch
        B, L, C = x.shape
        n = int(steps.shape[0])
        if n == 0:
            return np.array(x, dtype=np.float32)
        with self._lock, torch.inference_mode(), self._on_device(), memory_errors(torch, B, "denoising"):
            bb = self._batch(B, L, C, cached=self._use_graphs)
            if not isinstance(cond, torch.Tensor):
                cond = self._t(np.asarray(cond, dtype=np.float32), self._dtype)
            bb.cond.copy_(cond.reshape(bb.cond.shape))
            upload_plan(self._torch, bb, steps, None, None)
            upload_noise(torch, bb, HostDraws(x=np.asarray(x), noises=np.asarray(noises)), n, self._noise_replaced(B))
            key = ("loop", B, n, False, False, denoiser, "host")
            self._stages.run(key, lambda: self._loop_body(bb, n, False, False, "host", denoiser))
            return bb.raw.to("cpu", copy=True).numpy()  # host sync

    # ---- the loop ----------------------------------------------------------------------------------
    def begin(self, conditioning: dict[str, np.ndarray], batch: int, seq_len: int, channels: int) -> LoopState:
        torch = self._torch
        with self._lock, torch.inference_mode(), self._on_device(), memory_errors(torch, batch, "allocating"):
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
        denoiser: str = "denoiser",
    ) -> None:
        torch = self._torch
        B, n = state.batch, int(steps.shape[0])
        L, C = state.tokens.shape[1], state.tokens.shape[2]
        filtered, masked = filter_matrix is not None, keep_next is not None
        mask_feed = self._mask_feed(None if mask is None else np.concatenate([mask, mask]), 2 * B, L)  # {"mask"} or {}
        with self._lock, torch.inference_mode(), self._on_device(), memory_errors(torch, B):
            bb = state.buffers
            if isinstance(state.tokens, np.ndarray):  # an image-to-image start (Backend.set_start)
                bb.tokens.copy_(self._t(state.tokens))
            bb.level.fill_(float(level))
            if mask_feed:
                bb.mask.copy_(torch.from_numpy(mask_feed["mask"]), non_blocking=True)
            if masked:
                bb.keep.copy_(
                    torch.from_numpy(np.ascontiguousarray(keep_next, dtype=np.float32)[:, :, None]), non_blocking=True
                )
            try:
                self._stages.run(("transformer", B), lambda: self._transformer_body(bb))
            except CompileError as e:
                if self._transformer is self._graphs["transformer"]:
                    raise
                log.warning("the compiled transformer failed (%s); running it uncompiled", e)
                self._transformer = self._graphs["transformer"]
                self._stages.run(("transformer", B), lambda: self._transformer_body(bb))
            mark("transformer")
            if isinstance(draws, SeededDraws) and not self._compiled and self._device.type == "cpu":
                # eager on the CPU: NumPy draws the stream faster than torch's int64 ops (docs/BENCHMARKS.md, noise)
                draws = draws.materialize(n, L, C)
            kind = "host" if isinstance(draws, HostDraws) else ("fused" if self._compiled else "batched")
            upload_plan(self._torch, bb, steps, filter_matrix, draws)
            if kind == "host":
                upload_noise(torch, bb, draws, n, self._noise_replaced(B))
            elif kind == "batched":
                noise_buffer(torch, bb, n, self._noise_replaced(bb.B))
            self._stages.run(
                ("loop", B, n, filtered, masked, denoiser, kind),
                lambda: self._loop_body(bb, n, filtered, masked, kind, denoiser),
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
        """latents [B, C, h, w] -> images; in smaller chunks when the batch does not fit in memory."""
        return decode_in_chunks(self._torch, self._decode, latents)

    def _decode(self, latents: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode(), self._on_device():
            z = self._t(latents, torch.float32)
            out = self._fast_vae(z) if self._fast_vae is not None else None
            out = self._graphs["vae_decoder"](z) if out is None else out
            return out.cpu().numpy()  # host sync

    # ---- stage bodies: only static buffers in, static buffers out --------------------------------
    def _transformer_body(self, bb: Batch) -> None:
        torch, dt = self._torch, self._dtype
        tok = bb.tokens.to(dt)
        extra = (bb.mask,) if self.takes_mask else ()  # (2B, L) fp32
        cond_in = bb.text if bb.text is not None else (bb.ids,)  # text: (context, null)
        cond = self._transformer(torch.cat([tok, tok]), *cond_in, bb.level.to(dt), *extra)  # (2B, L, W)
        bb.cond.copy_(cond.reshape(bb.cond.shape))

    def _loop_body(self, bb: Batch, n: int, filtered: bool, masked: bool, kind: str, denoiser: str) -> None:
        """x_T and n inner steps, then the low-pass (and, ``masked``, the zeroing of the tokens the next
        step masks: ``bb.keep``). kind: "fused" (seeded; each step draws its own noise
        inside the compiled step), "batched" (seeded; all n + 1 draws in one call first, for eager runs where
        per-step drawing would cost hundreds of small ops) or "host" (uploaded draws in ``bb.noise``)."""
        B, L, C = bb.tokens.shape
        (fused, step_seeded, step_host), S = self._steps[denoiser], len(Step)  # the graph's weights (few-step)
        temb = fused.time_table(bb.steps[:n, Step.timestep], self._dtype)  # (n, W)
        k = table_steps(n, 2 * B * L, fused.ada_weight.shape[0], bb.cond.element_size())
        if kind == "batched":  # stream order: image-major
            z = self._draw(bb.seeds, bb.pos[0, :1], (n + 1) * L * C).reshape(B, n + 1, L, C)
            bb.noise[: n + 1].copy_(z.transpose(0, 1))  # (n + 1, B, L, C)
        if kind == "fused":
            x = self._draw(bb.seeds, bb.pos[0, :1], L * C).reshape(B, L, C)  # x_T, fp32
        else:
            x = bb.noise[0]
        for j in range(0, n, k):  # the adaLN modulations of k steps in one GEMM, then those k steps
            mods = fused.modulation_table(bb.cond, temb[j : j + k])  # (k, 2BL, (3 depth + 2) W)
            for i in range(j, min(n, j + k)):
                if kind == "fused":
                    x = step_seeded(x, mods[i - j], bb.steps[i, :S], bb.seeds, bb.pos[i + 1, :1])
                else:
                    x = step_host(x, bb.noise[i + 1], mods[i - j], bb.steps[i, :S])
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

    def _batch(self, B: int, L: int, C: int, cached: bool) -> Batch:
        bb = self._batches.get(B) if cached else None
        if bb is None:
            bb = new_batch(self._torch, B, L, C, self._grid, self._width, self._device, self._dtype)
            if cached:
                self._batches[B] = bb
        return bb

    def _noise_replaced(self, B: int):
        """Forget the graphs of batch B that read ``noise`` (every loop whose draws are not fused)."""
        return lambda: self._stages.drop(lambda k: k[0] == "loop" and k[1] == B and k[-1] != "fused")

    def close(self) -> None:
        with self._lock:
            self._stages.drop()
            self._batches.clear()
            self._graphs.clear()


def eager_backend(bundle: Bundle, **options: Any) -> Backend:
    """``backend="torch-eager"``: the official-way eager baseline (:class:`training.eager.OfficialEagerBackend`)."""
    import_torch()
    from training.eager import OfficialEagerBackend  # noqa: PLC0415 - imports torch

    return OfficialEagerBackend(bundle, **options)
