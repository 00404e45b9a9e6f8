"""``far_sdk.Generator``: the FAR sampling loop, written once over a :class:`~far_sdk.backends.Backend`.

The loop (:meth:`Generator.iter_steps`) is a generator of outer steps; :meth:`Generator.generate`
drains it, so progress bars, ``on_step`` callbacks, previews and early stops need no extra plumbing.
Per outer step s (levels low -> high):

1. transformer on the CFG batch [tokens; tokens] with class ids [labels; null] -> cond [2B, L, W]
2. x_T = noise; n guided DDPM steps (the denoiser graph), n from the inner-step schedule
3. low-pass the result to the next level (M X M^T, the exact filter matrices) -> next tokens
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
from .bundle import Bundle
from .errors import EngineProfileError, InvalidArgumentError
from .filters import filter_matrix
from .noise import NoiseFn, SeededNoise
from .schedules import InnerSteps, SamplingPlan, make_plan, preset_options

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
    preview: list | None = None    # decoded RGB previews (PIL images) when preview=True


@dataclass(frozen=True)
class GenerationOutput:
    """Result of :meth:`Generator.generate`."""

    images: list | np.ndarray | None   # list[PIL.Image] ("pil"), uint8 [B, H, W, 3] ("np"), None ("latent")
    latents: np.ndarray                # [B, C, H, W] float32, sampler scale (decode divides by latent_scale)
    timings: dict[str, float]          # seconds per stage, plus "total"
    seeds: tuple[int, ...] | None      # per-image seeds, when drawn from a seed
    class_labels: tuple[int, ...]
    plan: SamplingPlan = field(repr=False)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3], as the official evaluation saves them
    (p = x/2 + 1/2; floor(clamp(255 p + 0.5, 0, 255)))."""
    p = images * 0.5 + 0.5
    return np.clip(255.0 * p + 0.5, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def resolve_plan(defaults: dict[str, Any], *, preset=None, num_steps=None, levels=None, cfg=None, cfg_schedule=None,
                 temperature=None, temperature_schedule=None, inner_steps=None, filter=None, x0_clip=...,
                 inner_sampler=None, eta=None) -> SamplingPlan:
    """The sampling plan for a bundle's ``defaults`` (manifest "defaults"), overridden by the named
    ``preset`` (far_sdk.schedules.PRESETS), overridden by the options given (None / omitted = the
    bundle's default; ``x0_clip=None`` explicitly disables clipping). A default or preset ``eta``
    applies only when the resolved sampler is "ddim"; an explicit one with "ddpm" is an error."""
    d = {**defaults, **(preset_options(preset) if preset is not None else {})}
    pick = lambda v, k, default: v if v is not None else d.get(k, default)  # noqa: E731
    sampler = pick(inner_sampler, "inner_sampler", "ddpm")
    if eta is None and sampler == "ddim":
        eta = d.get("eta")
    return make_plan(
        num_steps=pick(num_steps, "num_steps", 10) if levels is None else num_steps,
        levels=levels,
        cfg=pick(cfg, "cfg", 3.0),
        cfg_schedule_kind=pick(cfg_schedule, "cfg_schedule", "linear"),
        temperature=pick(temperature, "temperature", 1.0),
        temperature_schedule_kind=pick(temperature_schedule, "temperature_schedule", "official"),
        inner_steps=pick(inner_steps, "inner_steps", "frequency-aware"),
        filter=pick(filter, "filter", "spatial"),
        x0_clip=d.get("x0_clip") if x0_clip is ... else x0_clip,
        inner_sampler=sampler,
        eta=eta,
    )


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

    def plan(self, **options: Any) -> SamplingPlan:
        """Resolve options (None = the bundle's defaults) into a validated :class:`SamplingPlan`."""
        return resolve_plan(self.bundle.defaults, **options)

    # ---- the loop ---------------------------------------------------------------------------------
    def iter_steps(self, class_ids: Sequence[int], plan: SamplingPlan, noise: NoiseFn,
                   timings: dict[str, float] | None = None) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """The sampling loop. Yields (step, raw latents [B, C, H, W], tokens handed on [B, L, C]).

        ``noise`` is called in the documented order (far_sdk.noise): per outer step x_T, then one
        draw per inner step. Stage times are added to ``timings`` (device-synchronised).
        """
        be, B, L, C, G = self.backend, len(class_ids), self.seq_len, self.channels, self.grid
        t = timings if timings is not None else {}
        ids = np.array(list(class_ids) + [self.bundle.null_class_id] * B, dtype=np.int64)  # [labels; null]
        tokens = np.zeros((B, L, C), dtype=np.float32)
        for s in range(plan.num_steps):
            t0 = time.perf_counter()
            cond = be.transformer(np.concatenate([tokens, tokens]), ids, plan.levels[s])    # (2B, L, W)
            be.synchronize()
            t1 = time.perf_counter()
            n = plan.inner_steps[s]
            x = noise((B, L, C))
            noises = np.stack([noise((B, L, C)) for _ in range(n)])                          # (n, B, L, C)
            steps = plan.step_table(s)
            x = be.denoise(x, noises, cond, steps)                                           # (B, L, C), host
            t2 = time.perf_counter()
            raw = x.reshape(B, G, G, C).transpose(0, 3, 1, 2)                                # (B, C, H, W)
            after = plan.filter_after[s]
            if after is not None:
                m = filter_matrix(after, plan.filter, G).astype(np.float32)
                nxt = m @ raw @ m.T
            else:
                nxt = raw
            tokens = np.ascontiguousarray(nxt.transpose(0, 2, 3, 1)).reshape(B, L, C)
            t3 = time.perf_counter()
            for k, dt in (("transformer", t1 - t0), ("denoise", t2 - t1), ("filter", t3 - t2)):
                t[k] = t.get(k, 0.0) + dt
            yield s, np.ascontiguousarray(raw), tokens

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """latents [B, C, H, W] -> float RGB [B, 3, H', W'] in about [-1, 1]."""
        out = self.backend.decode(np.ascontiguousarray(latents, dtype=np.float32))
        self.backend.synchronize()
        return out

    def generate(
        self,
        class_labels: Sequence[int | str] | int | str,
        *,
        seed: int | None = 0,
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
        x0_clip: float | None = ...,
        noise: NoiseFn | None = None,
        output_type: OutputType = "pil",
        progress: bool = False,
        on_step: Callable[[StepInfo], Any] | None = None,
        preview: bool = False,
        max_batch: int | None = None,
    ) -> GenerationOutput:
        """Generate one image per class label.

        seed: image i draws its noise from PCG64(seed + i), so an image depends only on its seed and
          settings — on every backend and whatever the batch split. ``noise`` instead replays a noise
          source (far_sdk.noise's documented order); then no batch splitting happens.
        num_steps (1..16, default 10), levels (explicit outer levels), cfg (guidance scale; diffusers'
          ``guidance_scale``), cfg_schedule ("linear" official | "constant"), temperature,
          temperature_schedule ("official" | "constant"), inner_steps ("frequency-aware" (default),
          "official" = 100, an int, or one int per outer step), filter ("spatial" | "fourier"):
          None takes the bundle's default. x0_clip: clamp each step's x0 estimate to [-x0_clip, x0_clip]
          (omitted: the bundle's default; None: no clipping, the official sampler).
        inner_sampler: "ddpm" (the official sampler, the default) | "ddim" (``inner_steps`` DDIM steps
          per outer step, on DDIM's own respacing); eta: DDIM's noise level in [0, 1] (default 0,
          deterministic; 1 = DDPM's posterior noise). Passing eta with "ddpm" is an error.
        preset: a named setting from far_sdk.schedules.PRESETS, applied over the bundle's defaults and
          under the options above: "fast" (15 DDPM steps per outer step: 4.7x fewer than "paper" at
          the same measured quality on the demo), "paper" (DDPM, frequency-aware 40..100), "official" (DDPM, 100).
        on_step(StepInfo) after each outer step; returning False stops early (the output then holds
          that step's estimate). preview=True decodes each step's estimate for ``StepInfo.preview``.
        max_batch: most images per backend call (default: the engine's limit); larger batches are split.
        """
        ids = self.class_ids(class_labels)
        plan = self.plan(preset=preset, num_steps=num_steps, levels=levels, cfg=cfg, cfg_schedule=cfg_schedule,
                         temperature=temperature, temperature_schedule=temperature_schedule, inner_steps=inner_steps,
                         inner_sampler=inner_sampler, eta=eta, filter=filter, x0_clip=x0_clip)
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
            source = SeededNoise.from_seed(0 if seed is None else seed, B)
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
                                class_labels=ids[:latents.shape[0]], plan=plan)

    def _run_chunks(self, ids, plan, source, chunk, timings, bar, on_step, preview):
        latents_parts, stopped = [], False
        B = len(ids)
        for start in range(0, B, chunk):
            part_ids = ids[start:start + chunk]
            part_noise = source.split(start, start + len(part_ids)) if isinstance(source, SeededNoise) else source
            raw = None
            for s, raw, _tokens in self.iter_steps(part_ids, plan, part_noise, timings):
                if bar is not None:
                    bar.update(1)
                if on_step is not None:
                    pv = None
                    if preview:
                        t0 = time.perf_counter()
                        pv = self._to_pil(to_uint8(self.decode(raw)))
                        timings["vae_decode"] += time.perf_counter() - t0
                    if on_step(StepInfo(step=s, num_steps=plan.num_steps, level=plan.levels[s], latents=raw, preview=pv)) is False:
                        stopped = True
                        break
            latents_parts.append(raw)
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

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> "Generator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
