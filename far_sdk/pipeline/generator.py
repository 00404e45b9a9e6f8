"""``far_sdk.Generator``: the FAR sampling loop, written once over a :class:`~far_sdk.backends.Backend`.

The loop (:meth:`Generator.iter_steps`) is a generator of outer steps; :meth:`Generator.generate`
drains it, so progress bars, ``on_step`` callbacks, previews and early stops need no extra plumbing.
Per outer step s (levels low -> high):

1. transformer on the CFG batch [tokens; tokens] with the conditioning [labels; null] -> cond [2B, L, W]
   (mask mode: it drops the step's masked tokens, :mod:`far_sdk.maths.masking`)
2. x_T = noise; n guided DDPM steps (the denoiser graph), n from the inner-step schedule
3. low-pass the result to the next level (M X M^T, the exact filter matrices) -> next tokens
   (mask mode: zeros where the next step's mask is 1)
Finally the VAE decoder turns the last latents into RGB.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from far_sdk.backends.base import Backend, HostDraws, LoopState, SeededDraws
from far_sdk.backends.create import create_backend
from far_sdk.bundle.bundle import Bundle
from far_sdk.bundle.graphs import DENOISER_FEWSTEP
from far_sdk.bundle.hub import locate_bundle
from far_sdk.compat import diffusers_callback, repeat_each
from far_sdk.conditioning import ClassCondition, Condition, condition_for
from far_sdk.errors import (
    GeneratorClosedError,
    InvalidArgumentError,
    NumericalError,
    check_choice,
)
from far_sdk.images import to_pil, to_uint8
from far_sdk.maths.filters import filter_matrix, tokens_to_grid
from far_sdk.maths.masking import check_mode, source_orders, step_masks
from far_sdk.maths.noise import NoiseFn, SeededNoise
from far_sdk.maths.schedules import SamplingPlan
from far_sdk.options import SamplingOptions, options_doc, options_from_keywords, resolve_plan, resolve_text_plan
from far_sdk.pipeline import img2img
from far_sdk.pipeline.batching import chunk_size, noise_source
from far_sdk.pipeline.fewstep import check_fewstep
from far_sdk.pipeline.outputs import OUTPUT_TYPES, PREVIEWS, STAGES, GenerationOutput, OutputType, StepInfo
from far_sdk.pipeline.warmup import warmup
from far_sdk.text import text_encoder_of

log = logging.getLogger(__name__)


class Generator:
    """Generate images from a FAR bundle.

    >>> gen = far_sdk.Generator("engines/far-demo")            # backend="auto"
    >>> out = gen.generate(class_labels=[3, 7], seed=0)
    >>> out.images[0].save("three.png")

    ``bundle``: a bundle directory, ``"hub:OWNER/REPO[@REVISION]"`` (a bundle published on the Hugging Face Hub,
    fetched once into the cache: far_sdk.bundle.hub), or a loaded :class:`Bundle`.
    ``backend``: "auto" | "tensorrt" | "onnxruntime" | "torch", or a ready :class:`Backend`.
    ``backend_options`` go to the backend (e.g. ``device="cuda"``, ``threads=4``, ``precision="bf16"``).
    Thread-safe: several threads may call :meth:`generate` on one Generator. With ONNX Runtime and
    torch on CPU the calls run concurrently (each keeps its own state; sessions are shared); with
    TensorRT or torch CUDA graphs, whose buffers and captured graphs serve one call at a time, they are
    serialised — use one Generator per thread (or per GPU stream) for parallelism there.
    """

    def __init__(
        self,
        bundle: str | os.PathLike | Bundle,
        backend: str | Backend = "auto",
        *,
        verify: bool = True,
        **backend_options: Any,
    ):
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.load(locate_bundle(bundle), verify=verify)
        self.backend = (
            backend if isinstance(backend, Backend) else create_backend(self.bundle, backend, **backend_options)
        )
        m = self.bundle.model_config
        self.grid = int(m["grid_size"])
        self.channels = int(m["token_channels"])
        self.seq_len = self.grid * self.grid
        self._text_encoder = text_encoder_of(self.bundle, self.backend)
        self._image_encoder = img2img.ImageEncoder(self.bundle, self.backend)
        self._lock = threading.Lock() if not self.backend.concurrent_generate else contextlib.nullcontext()
        log.info("far_sdk.Generator: bundle %s on %s", self.bundle.path, self.backend.describe())

    def plan(self, options: SamplingOptions | None = None, *, preset: str | None = None, **fields: Any) -> SamplingPlan:
        """The validated :class:`SamplingPlan` for ``options`` (and/or its fields as keywords; None = not given)
        over ``preset`` over the bundle's defaults (far_sdk.options.resolve_plan); the mode must be one of the
        bundle's ``sampling_modes`` (:class:`InvalidArgumentError` naming them)."""
        if options is not None and not isinstance(options, SamplingOptions):
            raise InvalidArgumentError(f"options must be a far_sdk.SamplingOptions, got {type(options).__name__}")
        given = options_from_keywords(fields, base=options, where="plan()")
        text = self.bundle.conditioning == "text"  # FAR-T2I: the official T2I schedule (resolve_text_plan)
        plan = (resolve_text_plan if text else resolve_plan)(self.bundle.defaults, given, preset_name=preset)
        check_mode(plan.mode, self.bundle.sampling_modes, f"bundle {self.bundle.name!r}")
        if plan.mode == "mask" and not text and not self.bundle.model_config.get("mask", True):
            warnings.warn(
                f"mode 'mask' on bundle {self.bundle.name!r}, whose model was trained without token masking: its "
                "transformer sees the masked tokens as zeros, which it never saw in training, so expect worse images "
                "(the demo: 0.885 vs 1.000 class accuracy, docs/BENCHMARKS.md); mode 'nomask' is its evaluated sampler",
                UserWarning,
                stacklevel=3,
            )
        if plan.inner_sampler == "distilled":
            check_fewstep(self.bundle, self.backend)
        return plan

    # ---- the loop ---------------------------------------------------------------------------------
    def iter_steps(
        self,
        condition: Condition,
        plan: SamplingPlan,
        noise: NoiseFn,
        timings: dict[str, float] | None = None,
        start: img2img.Start | None = None,
    ) -> Iterator[tuple[int, LoopState]]:
        """The sampling loop. Yields (step, state) after each outer step; ``self.backend.fetch(state.raw)``
        is that step's sample [B, L, C] before low-passing, ``state.tokens`` what the next step sees.

        ``noise`` is drawn in the documented order (far_sdk.maths.noise): per outer step x_T, then one
        draw per inner step; mask mode first takes one token order per image (``noise.orders``).
        A :class:`SeededNoise` is handed to the backend as stream positions (:class:`SeededDraws`),
        so a GPU backend draws the same numbers on the device; any other source is called on the host.
        Stage times are added to ``timings`` (device-synchronised). ``start`` (image-to-image,
        :mod:`far_sdk.pipeline.img2img`): the input's latents take the place of step ``start.step - 1``'s sample,
        yielded first as that step; the loop runs from ``start.step`` on.
        Raises :class:`NumericalError` when a step's sample is not finite.
        """
        be, B, L, C = self.backend, len(condition), self.seq_len, self.channels
        t = timings if timings is not None else {}
        state = be.begin(condition.cfg_feeds(), B, L, C)
        masks = list(step_masks(source_orders(noise, B, L), plan.num_steps)) if plan.mode == "mask" else None
        first = 0 if start is None else start.step
        if first:
            img2img.begin_at(be, state, start, plan, masks, noise)
            yield first - 1, state
        for s in range(first, plan.num_steps):
            last = [0.0]

            def mark(stage: str, last=last) -> None:
                be.synchronize()  # device work of the stage is done
                now = time.perf_counter()
                t[stage] = t.get(stage, 0.0) + now - last[0]
                last[0] = now

            t0 = time.perf_counter()
            draws = self._draws(noise, plan.inner_steps[s], B)
            after = plan.filter_after[s]
            fm = None if after is None else filter_matrix(after, plan.filter, self.grid).astype(np.float32)
            t["denoise"] = t.get("denoise", 0.0) + time.perf_counter() - t0  # host-side draws count as "denoise"
            last[0] = time.perf_counter()
            mask_kw = {}
            if masks is not None:  # (B, L) float32: dropped by this step's transformer; kept in what it hands on
                mask_kw = dict(mask=masks[s], keep_next=1 - masks[s + 1] if s + 1 < plan.num_steps else None)
            be.outer_step(
                state,
                level=plan.levels[s],
                steps=plan.step_table(s),
                filter_matrix=fm,
                draws=draws,
                mark=mark,
                **mask_kw,
                **({"denoiser": DENOISER_FEWSTEP} if plan.inner_sampler == "distilled" else {}),
            )
            if not be.all_finite(state.raw):
                raise NumericalError(
                    f"outer step {s} (level {plan.levels[s]}) produced non-finite latents (NaN or inf): check the "
                    "noise source and the bundle's weights; an unclipped sampler on an untrained model can also "
                    "overflow (try x0_clip=)",
                    step=s,
                )
            yield s, state

    def _draws(self, noise: NoiseFn, n: int, batch: int) -> HostDraws | SeededDraws:
        """One outer step's noise: x_T and n inner draws, as stream positions (a SeededNoise) or host arrays."""
        L, C = self.seq_len, self.channels
        if isinstance(noise, SeededNoise):
            draws = SeededDraws(noise.seeds, noise.position)
            noise.skip((n + 1) * L * C)
            return draws
        x = noise((batch, L, C))
        return HostDraws(x=x, noises=np.stack([noise((batch, L, C)) for _ in range(n)]).reshape(n, batch, L, C))

    def latents_of(self, state: LoopState, which: str = "raw") -> np.ndarray:
        """The last outer step's sample ("raw") or what it hands on ("tokens": low-passed) as host latents
        [B, C, H, W] (a host sync on GPUs)."""
        raw = state.raw if which == "raw" else state.tokens
        raw = raw if isinstance(raw, np.ndarray) else self.backend.fetch(raw)  # an image-to-image start: on the host
        return np.ascontiguousarray(tokens_to_grid(raw, self.grid))

    def encode(self, images: Any, *, sample: bool = False, seed: int = 0) -> np.ndarray:
        """Images (a PIL image, a uint8 array [H, W, 3] / [B, H, W, 3], or a list) -> latents [B, C, H, W] at the
        sampler's scale, through the bundle's ``vae_encoder`` graph: the posterior mean, or (``sample``) a posterior
        sample with image i's noise from seed + i (:mod:`far_sdk.pipeline.img2img`: resizing, the noise stream).
        A bundle without the graph raises :class:`~far_sdk.errors.MissingEncoderError` (re-export it)."""
        if self._closed:
            raise GeneratorClosedError("this Generator is closed; create a new far_sdk.Generator to encode again")
        size = int(self.bundle.manifest["image_size"])
        n = len(img2img.image_batch(images, size)) if sample else 0
        seeds = tuple(range(seed, seed + n)) if sample else None
        with self._lock:
            return img2img.encode(self._image_encoder, images, size, sample=sample, seeds=seeds)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """latents [B, C, H, W] -> float RGB [B, 3, H', W'] in about [-1, 1]."""
        out = self.backend.decode(np.ascontiguousarray(latents, dtype=np.float32))
        self.backend.synchronize()
        return out

    def warmup(self, batch_sizes: Any = (1,), **settings: Any) -> dict[int, float]:
        """Generate once per batch size now (compiles, CUDA-graph captures, engine set-up) so the first request
        runs at steady-state speed; ``settings``: the preset / sampling keywords that will be served. Returns the
        seconds per batch size (:func:`far_sdk.pipeline.warmup.warmup`)."""
        return warmup(self, batch_sizes, **settings)

    def generate(
        self,
        class_labels: Any = None,
        *,
        prompt: str | list[str] | None = None,
        prompt_embeds: np.ndarray | None = None,
        negative_prompt_embeds: np.ndarray | None = None,
        negative_prompt: str | list[str] | None = None,
        seed: int | None = 0,
        preset: str | None = None,
        options: SamplingOptions | None = None,
        noise: NoiseFn | None = None,
        output_type: OutputType = "pil",
        progress: bool = False,
        on_step: Callable[[StepInfo], Any] | None = None,
        preview: bool | str = False,
        max_batch: int | None = None,
        num_images_per_prompt: int = 1,
        callback_on_step_end: Callable[..., Any] | None = None,
        image: Any = None,
        start_level: int | None = None,
        strength: float | None = None,
        **sampling: Any,
    ) -> GenerationOutput:
        """Generate one image per class label (class bundles) or per prompt (text bundles, FAR-T2I).

        class_labels: class ids or names (the bundle's id2label). prompt: text bundles with a bundled text
          encoder (far_sdk.text); prompt_embeds: [B, T, D] float32 text hidden states instead (diffusers' name);
          negative_prompt_embeds [B, T, D]: the unconditional rows' context in place of the learned null context;
          negative_prompt: text encoded like the prompt for that (one string for every image, or one per prompt).
          A text bundle samples in mask mode with the official T2I schedule.
        seed: image i draws its noise from the Philox4x32-10 stream of seed + i (far_sdk.maths.noise); None draws
          a fresh seed from the OS's entropy (``out.seeds`` reports it, so the images can be regenerated): an image
          depends only on its seed and settings, on every backend and whatever the batch split. ``noise`` instead
          replays a noise source (the documented order; mask mode also needs ``orders``); no batch split then.
        preset: a named setting (far_sdk.options.PRESETS: "fast", "paper", "official") over the bundle's defaults.
        options: a :class:`~far_sdk.SamplingOptions` (e.g. a saved configuration); the sampling keywords below
          override its fields. Precedence: built-in < bundle defaults < preset < options < keywords.
        on_step(StepInfo) after each outer step; returning False stops early (the output then holds that step's
          estimate). preview=True (or "handed-on") decodes what each step hands on (its estimate low-passed to
          the next level: the paper's coarse-to-fine picture) into ``StepInfo.preview``; "raw" decodes the full
          estimate. output_type: "pil" | "np" (uint8 [B, H, W, 3]) | "latent". progress: a tqdm bar.
        max_batch: most images per backend call (default: the engine's limit); larger batches are split.
        diffusers' names: num_images_per_prompt=n generates n images per label or prompt (consecutive seeds);
          guidance_scale = cfg; callback_on_step_end(generator, step, level, {"latents": [B, C, H, W]}) -> dict is
          called after each outer step (the level stands for diffusers' timestep; returning changed latents is an
          error: they are not fed back; stop early with on_step returning False).
        image (image-to-image, :mod:`far_sdk.pipeline.img2img`): a PIL image or uint8 array (one for every output, one
          per label / prompt, or one per output), encoded by the bundle's vae_encoder (posterior mean) and put in
          the loop low-passed as at outer step ``start_level`` (0..num_steps; 0: from scratch, bit for bit today's
          output) or ``strength`` in [0, 1] (start_level = round((1 - strength) num_steps); 1: from scratch).

        Sampling keywords (None or left out: the bundle's default; see ``far info``):
        """
        if self._closed:
            raise GeneratorClosedError("this Generator is closed; create a new far_sdk.Generator to generate again")
        if options is not None and not isinstance(options, SamplingOptions):
            raise InvalidArgumentError(f"options must be a far_sdk.SamplingOptions, got {type(options).__name__}")
        check_choice("output_type", output_type, OUTPUT_TYPES)
        if preview not in PREVIEWS:
            raise InvalidArgumentError(f"preview must be one of {PREVIEWS}, got {preview!r}")
        condition = condition_for(
            self.bundle,
            self._text_encoder,
            class_labels,
            prompt,
            prompt_embeds,
            negative_prompt_embeds,
            negative_prompt,
        )
        condition = repeat_each(condition, num_images_per_prompt)
        if callback_on_step_end is not None:
            on_step = diffusers_callback(self, callback_on_step_end, on_step)
        plan = self.plan(
            options_from_keywords(sampling, base=options, where="generate()", other_names=_GENERATE_NAMES),
            preset=preset,
        )
        chunk = chunk_size(self.backend.max_batch, len(condition), max_batch, replayed=noise is not None)
        start = img2img.start_for(self, image, start_level, strength, plan, len(condition), num_images_per_prompt)
        source, seeds = noise_source(noise, seed, len(condition))
        timings: dict[str, float] = dict.fromkeys(STAGES, 0.0)
        t_start = time.perf_counter()
        steps = plan.num_steps + (1 - start.step if start is not None else 0)
        bar = self._progress(plan, len(condition), progress, chunks=math.ceil(len(condition) / chunk), steps=steps)
        with self._lock:
            latents = self._run_chunks(condition, plan, source, chunk, timings, bar, on_step, preview, start)
        if bar is not None:
            bar.close()
        images = None if output_type == "latent" else self._images(latents, chunk, output_type, timings)
        timings["total"] = time.perf_counter() - t_start
        labels = condition.ids[: latents.shape[0]] if isinstance(condition, ClassCondition) else ()
        return GenerationOutput(
            images=images, latents=latents, timings=timings, seeds=seeds, class_labels=labels, plan=plan
        )

    def _images(
        self, latents: np.ndarray, chunk: int, output_type: str, timings: dict[str, float]
    ) -> list | np.ndarray:
        t0 = time.perf_counter()
        with self._lock:
            rgb = np.concatenate([self.decode(latents[i : i + chunk]) for i in range(0, latents.shape[0], chunk)])
        timings["vae_decode"] += time.perf_counter() - t0
        u8 = to_uint8(rgb)
        return to_pil(u8) if output_type == "pil" else u8

    def _run_chunks(self, condition, plan, source, chunk, timings, bar, on_step, preview, begin=None) -> np.ndarray:
        """The loop over batches of at most ``chunk`` images; their final latents [B', C, H, W] (B' < B after a
        stop)."""
        parts = []
        for start in range(0, len(condition), chunk):
            part = condition[start : start + chunk]
            part_noise = source.split(start, start + len(part)) if isinstance(source, SeededNoise) else source
            state, stopped = None, False
            at = None if begin is None else begin.part(start, start + len(part))
            for s, state in self.iter_steps(part, plan, part_noise, timings, at):
                if bar is not None:
                    bar.update(1)
                if on_step is not None and on_step(self._step_info(s, state, plan, preview, timings)) is False:
                    stopped = True
                    break
            parts.append(self.latents_of(state))
            if stopped:
                break
        return np.concatenate(parts)

    def _step_info(self, s: int, state: LoopState, plan: SamplingPlan, preview: bool | str, timings: dict) -> StepInfo:
        raw, handed = self.latents_of(state), self.latents_of(state, "tokens")
        pv = None
        if preview:
            t0 = time.perf_counter()
            pv = to_pil(to_uint8(self.decode(raw if preview == "raw" else handed)))
            timings["vae_decode"] += time.perf_counter() - t0
        return StepInfo(
            step=s, num_steps=plan.num_steps, level=plan.levels[s], latents=raw, preview=pv, handed_on=handed
        )

    @staticmethod
    def _progress(plan: SamplingPlan, batch: int, enabled: bool, chunks: int, steps: int):
        if not enabled:
            return None
        from tqdm.auto import tqdm  # noqa: PLC0415 - loaded on first use: `import far_sdk` stays light

        return tqdm(total=steps * chunks, desc=f"FAR {plan.num_steps} steps x{batch}", unit="step", leave=False)

    _closed = False

    def close(self) -> None:
        """Release the backend (sessions, GPU memory). Idempotent; :meth:`generate` afterwards raises
        :class:`~far_sdk.errors.GeneratorClosedError`."""
        if not self._closed:
            self._closed = True
            self.backend.close()

    def __enter__(self) -> Generator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        d = self.backend.describe()
        return (
            f"far_sdk.Generator(bundle={str(self.bundle.path)!r}, backend={d['backend']!r}, device={d['device']!r}, "
            f"precision={d['precision']!r})"
        )


#: generate()'s own keyword names (an unknown keyword's "did you mean" looks among these and the sampling options).
_GENERATE_NAMES = tuple(inspect.signature(Generator.generate).parameters)[1:-1]
Generator.generate.__doc__ += "\n" + options_doc(" " * 10) + "\n"
