"""``far_sdk.Generator``: the FAR sampling loop, written once over a :class:`~far_sdk.backends.Backend`.

The loop (:meth:`Generator.iter_steps`) is a generator of outer steps; :meth:`Generator.generate`
drains it, so progress bars, ``on_step`` callbacks, previews and early stops need no extra plumbing.
Per outer step s (levels low -> high):

1. transformer on the CFG batch [tokens; tokens] with class ids [labels; null] -> cond [2B, L, W]
   (mask mode: it drops the step's masked tokens, :mod:`far_sdk.masking`)
2. x_T = noise; n guided DDPM steps (the denoiser graph), n from the inner-step schedule
3. low-pass the result to the next level (M X M^T, the exact filter matrices) -> next tokens
   (mask mode: zeros where the next step's mask is 1)
Finally the VAE decoder turns the last latents into RGB.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from .backends import Backend, create_backend
from .backends.base import HostDraws, LoopState, SeededDraws
from .bundle import Bundle
from .errors import EngineProfileError, GeneratorClosedError, InvalidArgumentError, NumericalError
from .filters import filter_matrix
from .masking import check_mode, source_orders, step_masks
from .noise import CheckedNoise, NoiseFn, SeededNoise
from .options import SamplingOptions, resolve_plan, resolve_text_plan
from .schedules import InnerSteps, SamplingPlan
from .text import TextCondition, TextEncoder, refuse_text, text_condition

log = logging.getLogger(__name__)

OutputType = Literal["pil", "np", "latent"]
STAGES = ("transformer", "denoise", "filter", "vae_decode")


@dataclass(frozen=True)
class StepInfo:
    """What ``on_step`` receives after each outer step."""

    step: int                      # 0-based outer step
    num_steps: int
    level: int                     # input frequency level of this step
    latents: np.ndarray            # [B, C, H, W]: this step's full estimate (before low-passing)
    preview: list | None = None    # decoded RGB previews (PIL images) when preview is on
    handed_on: np.ndarray | None = None  # [B, C, H, W]: what the next step sees (low-passed; the last step: latents)


@dataclass(frozen=True)
class GenerationOutput:
    """Result of :meth:`Generator.generate`."""

    images: list | np.ndarray | None   # list[PIL.Image] ("pil"), uint8 [B, H, W, 3] ("np"), None ("latent")
    latents: np.ndarray                # [B, C, H, W] float32, sampler scale (decode divides by latent_scale)
    timings: dict[str, float]          # seconds per stage, plus "total"
    seeds: tuple[int, ...] | None      # per-image seeds, when drawn from a seed
    class_labels: tuple[int, ...]      # () for a text bundle
    plan: SamplingPlan = field(repr=False)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3], as the official evaluation saves them
    (p = x/2 + 1/2; floor(clamp(255 p + 0.5, 0, 255)))."""
    p = images * 0.5 + 0.5
    return np.clip(255.0 * p + 0.5, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


class Generator:
    """Generate images from a FAR bundle.

    >>> gen = far_sdk.Generator("engines/far-demo")            # backend="auto"
    >>> out = gen.generate(class_labels=[3, 7], seed=0)
    >>> out.images[0].save("three.png")

    ``backend``: "auto" | "tensorrt" | "onnxruntime" | "torch", or a ready :class:`Backend`.
    ``backend_options`` go to the backend (e.g. ``device="cuda"``, ``threads=4``, ``precision="bf16"``).
    Thread-safe: several threads may call :meth:`generate` on one Generator. With ONNX Runtime and
    torch on CPU the calls run concurrently (each keeps its own state; sessions are shared); with
    TensorRT or torch CUDA graphs, whose buffers and captured graphs serve one call at a time, they are
    serialised — use one Generator per thread (or per GPU stream) for parallelism there.
    """

    def __init__(self, bundle: str | os.PathLike | Bundle, backend: str | Backend = "auto", *, verify: bool = True, **backend_options: Any):
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle, verify=verify)
        self.backend = backend if isinstance(backend, Backend) else create_backend(self.bundle, backend, **backend_options)
        m = self.bundle.model_config
        self.grid = int(m["grid_size"])
        self.channels = int(m["token_channels"])
        self.seq_len = self.grid * self.grid
        self._label_ids = {v.lower(): k for k, v in self.bundle.id2label.items()}
        self._text_encoder = TextEncoder(self.bundle) if (self.bundle.text or {}).get("encoder") else None
        self._lock = threading.Lock() if not self.backend.concurrent_generate else contextlib.nullcontext()
        log.info("far_sdk.Generator: bundle %s on %s", self.bundle.path, self.backend.describe())

    # ---- argument handling ------------------------------------------------------------------------
    def class_ids(self, class_labels: Sequence[int | str] | int | str) -> tuple[int, ...]:
        """Validate labels (ids, or names from the bundle's id2label) -> class ids."""
        if isinstance(class_labels, (int, str, np.integer)):
            class_labels = [class_labels]
        ids = []
        n = self.bundle.num_classes
        for lab in class_labels:
            if isinstance(lab, str):
                key = lab.strip().lower()
                if key.isdigit():
                    lab = int(key)
                elif key in self._label_ids:
                    lab = self._label_ids[key]
                else:
                    known = ", ".join(sorted(self._label_ids)[:10]) or "none: this bundle has no id2label table"
                    raise InvalidArgumentError(f"unknown class name {lab!r}; known names include: {known}")
            if isinstance(lab, bool) or not isinstance(lab, (int, np.integer)) or not 0 <= int(lab) < n:
                raise InvalidArgumentError(f"class id {lab!r} is outside 0..{n - 1} (this bundle has {n} classes)")
            ids.append(int(lab))
        if not ids:
            raise InvalidArgumentError("class_labels is empty: pass at least one class id")
        return tuple(ids)

    def plan(self, options: SamplingOptions | None = None, *, preset: str | None = None, **fields: Any) -> SamplingPlan:
        """The validated :class:`SamplingPlan` for ``options`` (and/or its fields as keywords; None = not given)
        over ``preset`` over the bundle's defaults (far_sdk.options.resolve_plan); the mode must be one of the
        bundle's ``sampling_modes`` (:class:`InvalidArgumentError` naming them)."""
        given = SamplingOptions(**fields).over(options) if options is not None else SamplingOptions(**fields)
        text = self.bundle.conditioning == "text"   # FAR-T2I: the official T2I schedule (far_sdk.options.resolve_text_plan)
        plan = (resolve_text_plan if text else resolve_plan)(self.bundle.defaults, given, preset_name=preset)
        check_mode(plan.mode, self.bundle.sampling_modes, f"bundle {self.bundle.name!r}")
        return plan

    # ---- the loop ---------------------------------------------------------------------------------
    def iter_steps(self, class_ids: Sequence[int] | TextCondition, plan: SamplingPlan, noise: NoiseFn,
                   timings: dict[str, float] | None = None) -> Iterator[tuple[int, LoopState]]:
        """The sampling loop. Yields (step, state) after each outer step; ``self.backend.fetch(state.raw)``
        is that step's sample [B, L, C] before low-passing, ``state.tokens`` what the next step sees.

        ``noise`` is drawn in the documented order (far_sdk.noise): per outer step x_T, then one
        draw per inner step; mask mode first takes one token order per image (``noise.orders``).
        A :class:`SeededNoise` is handed to the backend as stream positions (:class:`SeededDraws`),
        so a GPU backend draws the same numbers on the device; any other source is called on the host. Stage times are added to ``timings`` (device-synchronised).
        Raises :class:`NumericalError` when a step's sample is not finite.
        """
        be, B, L, C, G = self.backend, len(class_ids), self.seq_len, self.channels, self.grid
        t = timings if timings is not None else {}
        if isinstance(class_ids, TextCondition):   # a text bundle: context [2B, T, D] and null flags (far_sdk.text)
            ids: Any = class_ids.cfg_feeds()
        else:
            ids = np.array(list(class_ids) + [self.bundle.null_class_id] * B, dtype=np.int64)  # [labels; null]
        state = be.begin(ids, B, L, C)
        seeded = isinstance(noise, SeededNoise)
        masks = list(step_masks(source_orders(noise, B, L), plan.num_steps)) if plan.mode == "mask" else None
        for s in range(plan.num_steps):
            n = plan.inner_steps[s]
            last = [0.0]

            def mark(stage: str, last=last) -> None:
                be.synchronize()                                  # device work of the stage is done
                now = time.perf_counter()
                t[stage] = t.get(stage, 0.0) + now - last[0]
                last[0] = now

            t0 = time.perf_counter()
            if seeded:
                draws: HostDraws | SeededDraws = SeededDraws(noise.seeds, noise.position)
                noise.skip((n + 1) * L * C)
            else:
                x = noise((B, L, C))
                draws = HostDraws(x=x, noises=np.stack([noise((B, L, C)) for _ in range(n)]).reshape(n, B, L, C))
            steps = plan.step_table(s)
            after = plan.filter_after[s]
            fm = None if after is None else filter_matrix(after, plan.filter, G).astype(np.float32)
            t["denoise"] = t.get("denoise", 0.0) + time.perf_counter() - t0   # host-side draws count as "denoise"
            last[0] = time.perf_counter()
            mask_kw = {}
            if masks is not None:   # (B, L) float32: dropped by this step's transformer; kept in what it hands on
                mask_kw = dict(mask=masks[s], keep_next=1 - masks[s + 1] if s + 1 < plan.num_steps else None)
            be.outer_step(state, level=plan.levels[s], steps=steps, filter_matrix=fm, draws=draws, mark=mark, **mask_kw)
            if not be.all_finite(state.raw):
                raise NumericalError(
                    f"outer step {s} (level {plan.levels[s]}) produced non-finite latents (NaN or inf): check the noise "
                    "source and the bundle's weights; an unclipped sampler on an untrained model can also overflow "
                    "(try x0_clip=)", step=s)
            yield s, state

    def latents_of(self, state: LoopState, which: str = "raw") -> np.ndarray:
        """The last outer step's sample ("raw") or what it hands on ("tokens": low-passed) as host latents
        [B, C, H, W] (a host sync on GPUs)."""
        raw = self.backend.fetch(state.raw if which == "raw" else state.tokens)
        G = self.grid
        return np.ascontiguousarray(raw.reshape(raw.shape[0], G, G, -1).transpose(0, 3, 1, 2))

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """latents [B, C, H, W] -> float RGB [B, 3, H', W'] in about [-1, 1]."""
        out = self.backend.decode(np.ascontiguousarray(latents, dtype=np.float32))
        self.backend.synchronize()
        return out

    def generate(
        self,
        class_labels: Sequence[int | str] | int | str | None = None,
        *,
        prompt: str | Sequence[str] | None = None,
        prompt_embeds: np.ndarray | None = None,
        negative_prompt_embeds: np.ndarray | None = None,
        seed: int | None = 0,
        mode: str | None = None,
        preset: str | None = None,
        num_steps: int | None = None,
        cfg: float | None = None,
        cfg_schedule: str | None = None,
        temperature: float | None = None,
        temperature_schedule: str | None = None,
        inner_steps: InnerSteps | None = None,
        inner_sampler: str | None = None,
        eta: float | None = None,
        filter: str | None = None,
        levels: Sequence[int] | None = None,
        x0_clip: float | bool | None = None,
        options: SamplingOptions | None = None,
        noise: NoiseFn | None = None,
        output_type: OutputType = "pil",
        progress: bool = False,
        on_step: Callable[[StepInfo], Any] | None = None,
        preview: bool | str = False,
        max_batch: int | None = None,
    ) -> GenerationOutput:
        """Generate one image per class label (class bundles) or per prompt (text bundles, FAR-T2I).

        prompt: text bundles with a bundled text encoder (far_sdk.text); prompt_embeds: [B, T, D] float32 text hidden
          states instead (diffusers' name); negative_prompt_embeds [B, T, D]: the unconditional rows' context in
          place of the learned null context. A text bundle samples in mask mode with the official T2I schedule.

        seed: image i draws its noise from the Philox4x32-10 stream of seed + i (far_sdk.noise); None draws
          a fresh seed from the OS's entropy (``out.seeds`` reports it, so the images can be regenerated); so an
          image depends only on its seed and settings — on every backend and whatever the batch split. ``noise`` instead replays a noise
          source (far_sdk.noise's documented order); then no batch splitting happens.
        mode: "nomask" (the official evaluated sampler) | "mask" (the official ``sample_tokens_mask``: 11 outer
          steps (levels 0, 12, 12, 4, ..., 11), tokens unmasked in each image's seeded random order, far_sdk.masking;
          a replayed ``noise`` must supply the orders too, ReplayNoise(draws, orders=...)); None: the bundle's
          default. A bundle lists the modes it runs in ``sampling_modes``: a model built with mask=True runs
          in mask mode only; one built without runs both, its transformer seeing masked tokens as zeros.
        num_steps (1..16, default 10), levels (explicit outer levels), cfg (guidance scale; diffusers'
          ``guidance_scale``), cfg_schedule ("linear" official | "constant"), temperature,
          temperature_schedule ("official" | "constant"), inner_steps ("frequency-aware" (default),
          "official" = 100, an int, or one int per outer step), filter ("spatial" | "fourier"):
          None takes the bundle's default. x0_clip: clamp each step's x0 estimate to [-x0_clip, x0_clip]
          (None: the bundle's default; False: no clipping, the official sampler).
        options: a :class:`~far_sdk.options.SamplingOptions` holding any of the settings above at once (e.g. a
          saved configuration); the keywords given override its fields.
        inner_sampler: "ddpm" (the official sampler, the default) | "ddim" (``inner_steps`` DDIM steps
          per outer step, on DDIM's own respacing); eta: DDIM's noise level in [0, 1] (default 0,
          deterministic; 1 = DDPM's posterior noise). Passing eta with "ddpm" is an error.
        preset: a named setting from far_sdk.options.PRESETS, applied over the bundle's defaults and
          under the options above: "fast" (15 DDPM steps per outer step: 4.7x fewer than "paper" at
          the same measured quality on the demo), "paper" (DDPM, frequency-aware 40..100), "official" (DDPM, 100).
        on_step(StepInfo) after each outer step; returning False stops early (the output then holds
          that step's estimate). preview=True (or "handed-on") decodes what each step hands on — its
          estimate low-passed to the next level, the paper's coarse-to-fine picture — for
          ``StepInfo.preview``; preview="raw" decodes the full estimate instead (noisy at low levels).
        max_batch: most images per backend call (default: the engine's limit); larger batches are split.
        """
        if self._closed:
            raise GeneratorClosedError("this Generator is closed; create a new far_sdk.Generator to generate again")
        text = self.bundle.conditioning == "text"
        if not text:
            refuse_text(self.bundle, prompt, prompt_embeds, negative_prompt_embeds)
            if class_labels is None or not isinstance(class_labels, (Sequence, int, str, np.integer, np.ndarray)):
                raise InvalidArgumentError(f"class_labels must be a class id, a class name or a list of them, got {class_labels!r}")
        if noise is not None:
            if not callable(noise):
                raise InvalidArgumentError(f"noise must be a callable noise(shape) -> float32 array, got {type(noise).__name__}")
            if not isinstance(noise, SeededNoise):   # a SeededNoise is ours: finite, and drawn on the device where it can be
                noise = CheckedNoise(noise)
        ids = (text_condition(self.bundle, self._text_encoder, class_labels, prompt, prompt_embeds, negative_prompt_embeds)
               if text else self.class_ids(class_labels))
        if options is not None and not isinstance(options, SamplingOptions):
            raise InvalidArgumentError(f"options must be a far_sdk.SamplingOptions, got {type(options).__name__}")
        plan = self.plan(options, preset=preset, mode=mode, num_steps=num_steps, levels=levels, cfg=cfg, cfg_schedule=cfg_schedule,
                         temperature=temperature, temperature_schedule=temperature_schedule, inner_steps=inner_steps,
                         inner_sampler=inner_sampler, eta=eta, filter=filter, x0_clip=x0_clip)
        if preview not in (False, True, "handed-on", "raw"):
            raise InvalidArgumentError(f"preview must be False, True, 'handed-on' or 'raw', got {preview!r}")
        if output_type not in ("pil", "np", "latent"):
            raise InvalidArgumentError(f"output_type must be 'pil', 'np' or 'latent', got {output_type!r}")
        B = len(ids)
        limit = self.backend.max_batch
        if max_batch is not None:
            if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
                raise InvalidArgumentError(f"max_batch must be a positive integer, got {max_batch!r}")
            if limit is not None and max_batch > limit:
                raise EngineProfileError(f"max_batch={max_batch} exceeds this engine's profile (at most {limit} images per call); rebuild the engine with a larger --batch")
            limit = max_batch
        if noise is None:
            if seed is None:   # a fresh seed, reported in GenerationOutput.seeds so the images can be made again
                seed = int(np.random.SeedSequence().generate_state(1, dtype=np.uint64)[0] >> np.uint64(2))
            source = SeededNoise.from_seed(seed, B)
            seeds = source.seeds
        else:
            source, seeds = noise, None
            if limit is not None and B > limit:
                raise EngineProfileError(f"a replayed noise source cannot be split across calls; pass at most {limit} labels")
        chunk = B if limit is None else limit
        timings: dict[str, float] = {k: 0.0 for k in STAGES}
        t_start = time.perf_counter()
        bar = self._progress(plan, B, progress, chunks=math.ceil(B / chunk))
        with self._lock:
            latents_parts, stopped = self._run_chunks(ids, plan, source, chunk, timings, bar, on_step, preview)
        if bar is not None:
            bar.close()
        latents = np.concatenate(latents_parts)
        images = None
        if output_type != "latent":
            t0 = time.perf_counter()
            with self._lock:
                rgb = np.concatenate([self.decode(latents[i:i + chunk]) for i in range(0, latents.shape[0], chunk)])
            timings["vae_decode"] += time.perf_counter() - t0
            u8 = to_uint8(rgb)
            images = self._to_pil(u8) if output_type == "pil" else u8
        timings["total"] = time.perf_counter() - t_start
        return GenerationOutput(images=images, latents=latents, timings=timings, seeds=seeds,
                                class_labels=() if text else ids[:latents.shape[0]], plan=plan)

    def _run_chunks(self, ids, plan, source, chunk, timings, bar, on_step, preview):
        latents_parts, stopped = [], False
        B = len(ids)
        for start in range(0, B, chunk):
            part_ids = ids[start:start + chunk]
            part_noise = source.split(start, start + len(part_ids)) if isinstance(source, SeededNoise) else source
            state = None
            for s, state in self.iter_steps(part_ids, plan, part_noise, timings):
                if bar is not None:
                    bar.update(1)
                if on_step is not None:
                    raw = self.latents_of(state)
                    handed = self.latents_of(state, "tokens")
                    pv = None
                    if preview:
                        t0 = time.perf_counter()
                        pv = self._to_pil(to_uint8(self.decode(raw if preview == "raw" else handed)))
                        timings["vae_decode"] += time.perf_counter() - t0
                    info = StepInfo(step=s, num_steps=plan.num_steps, level=plan.levels[s], latents=raw, preview=pv, handed_on=handed)
                    if on_step(info) is False:
                        stopped = True
                        break
            latents_parts.append(self.latents_of(state))
            if stopped:
                break
        return latents_parts, stopped

    @staticmethod
    def _to_pil(u8: np.ndarray) -> list:
        from PIL import Image

        return [Image.fromarray(a) for a in u8]

    @staticmethod
    def _progress(plan: SamplingPlan, batch: int, enabled: bool, chunks: int):
        if not enabled:
            return None
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return None
        return tqdm(total=plan.num_steps * chunks, desc=f"FAR {plan.num_steps} steps x{batch}", unit="step", leave=False)

    _closed = False

    def close(self) -> None:
        """Release the backend (sessions, GPU memory). Idempotent; :meth:`generate` afterwards raises
        :class:`~far_sdk.errors.GeneratorClosedError`."""
        if not self._closed:
            self._closed = True
            self.backend.close()

    def __enter__(self) -> "Generator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
