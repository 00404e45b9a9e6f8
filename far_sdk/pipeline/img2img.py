"""Image-to-image: start FAR's outer loop from an input image low-passed to a chosen level.

FAR's sampler state after outer step s is the image low-passed to the next step's level. Image-to-image puts the
input there and runs the remaining outer steps unchanged (transformer, denoiser, every backend as they are):

1. images -> float32 [B, 3, S, S] in [-1, 1] (:func:`image_batch`; S the bundle's ``image_size``): PIL images (any
   mode, converted to RGB) or uint8 arrays [H, W, 3] / [B, H, W, 3] / grey [H, W]; an image of another size is
   centre-cropped to a square (the shorter side) and resized with Pillow's bicubic filter. The uint8 -> float
   conversion is x / 127.5 - 1, on the host (the ``vae_encoder`` graph takes floats).
2. the bundle's ``vae_encoder`` graph -> the posterior mean (default) or a sample mean + std * eps with eps from
   stream 2 of the image's seed (far_sdk.maths.noise), at the sampler's scale: the latents z [B, C, H, W].
3. ``start_level=k`` (an outer step 1..num_steps): the state handed to step k is what step k - 1 would hand on
   were its sample z: z low-passed to ``plan.filter_after[k - 1]`` (= ``plan.levels[k]``, the level step k sees;
   mask mode: also zeroed where step k's mask drops tokens). Steps k..num_steps - 1 then run as usual, each
   with the noise it draws in a full run (a seeded source skips the positions of steps 0..k-1), so the output is
   the full run's with steps < k replaced by the input. ``start_level=0`` ignores the image: today's generation,
   bit for bit. ``start_level=num_steps`` runs no step: the output is the encoded input (its VAE reconstruction).
4. ``strength`` s in [0, 1] (diffusers' name) maps to k = round((1 - s) * num_steps): 1.0 = from scratch
   (k = 0), 0.0 = the input back (k = num_steps); with the demo's 10 steps, strength 0.3 starts at step 7.

``on_step`` sees the start first: a StepInfo for step k - 1 whose latents are z and whose handed-on latents (and
preview) are the input's low-passed picture.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from far_sdk.bundle.graphs import VAE_ENCODER
from far_sdk.errors import BackendUnavailableError, InvalidArgumentError, MissingEncoderError
from far_sdk.images import MAX_IMAGE_SIDE
from far_sdk.maths.filters import filter_matrix, grid_to_tokens, low_pass_tokens
from far_sdk.maths.noise import ENCODE_STREAM, SeededNoise, philox_normals
from far_sdk.maths.schedules import SamplingPlan

#: Most images per encoder call.
ENCODE_CHUNK = 64


@dataclass(frozen=True)
class Start:
    """Where an image-to-image run starts: the input's latents [B, C, H, W] (sampler scale) and the outer step."""

    latents: np.ndarray
    step: int

    def part(self, start: int, stop: int) -> Start:
        return Start(self.latents[start:stop], self.step)

    def __len__(self) -> int:
        return int(self.latents.shape[0])


def start_step(plan: SamplingPlan, start_level: Any, strength: Any) -> int:
    """The outer step an image-to-image run starts from (module docstring): ``start_level`` (0..num_steps) or
    ``strength`` (0..1), at most one of them; neither: 0."""
    S = plan.num_steps
    if start_level is not None and strength is not None:
        raise InvalidArgumentError("give start_level or strength, not both (strength s starts at round((1 - s) S))")
    if strength is not None:
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 <= strength <= 1.0:
            raise InvalidArgumentError(f"strength must be a number in [0, 1] (1: from scratch), got {strength!r}")
        return int(round((1.0 - float(strength)) * S))
    if start_level is None:
        return 0
    if isinstance(start_level, bool) or not isinstance(start_level, (int, np.integer)) or not 0 <= start_level <= S:
        raise InvalidArgumentError(
            f"start_level must be an outer step in 0..{S} (this plan's num_steps; 0: from scratch), got {start_level!r}"
        )
    return int(start_level)


def to_pixels(im: Any, size: int, where: str) -> np.ndarray:
    """One image (PIL or uint8 array) -> uint8 [size, size, 3], cropped and resized as the module docstring says."""
    from PIL import Image  # noqa: PLC0415 - loaded on first image: `import far_sdk` stays light

    if isinstance(im, Image.Image):
        if max(im.size) > MAX_IMAGE_SIDE or min(im.size) < 1:
            raise InvalidArgumentError(
                f"{where}: image of {im.size[0]} x {im.size[1]} pixels; at most {MAX_IMAGE_SIDE}"
            )
        pil = im.convert("RGB")
    else:
        a = np.asarray(im)
        if a.dtype != np.uint8:
            raise InvalidArgumentError(
                f"{where}: image arrays must be uint8 pixels [H, W, 3] or [H, W] (0..255), got dtype {a.dtype}"
            )
        if a.ndim == 2:
            a = np.repeat(a[:, :, None], 3, axis=2)
        if a.ndim != 3 or a.shape[2] != 3 or min(a.shape[:2]) < 1:
            raise InvalidArgumentError(f"{where}: image arrays must be [H, W, 3] or [H, W], got shape {a.shape}")
        if max(a.shape[:2]) > MAX_IMAGE_SIDE:
            raise InvalidArgumentError(
                f"{where}: image of {a.shape[1]} x {a.shape[0]} pixels; at most {MAX_IMAGE_SIDE}"
            )
        if a.shape[:2] == (size, size):
            return np.ascontiguousarray(a)
        pil = Image.fromarray(np.ascontiguousarray(a))
    w, h = pil.size
    if (w, h) != (size, size):
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        pil = pil.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(pil, dtype=np.uint8)


def image_batch(images: Any, size: int, where: str = "image") -> np.ndarray:
    """PIL images / uint8 arrays (one, a list, or a [B, H, W, 3] array) -> float32 [B, 3, size, size] in [-1, 1]."""
    if images is None:
        raise InvalidArgumentError(f"{where} is None; pass a PIL image, a uint8 array [H, W, 3] or a list of them")
    if isinstance(images, np.ndarray) and images.ndim == 4:
        items = list(images)
    elif isinstance(images, (list, tuple)):
        items = list(images)
    else:
        items = [images]
    if not items:
        raise InvalidArgumentError(f"{where} is empty")
    u8 = np.stack([to_pixels(im, size, f"{where}[{i}]") for i, im in enumerate(items)])  # (B, S, S, 3)
    return np.ascontiguousarray(u8.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(127.5) - np.float32(1.0)


class ImageEncoder:
    """Runs the bundle's ``vae_encoder`` graph: on the backend when it runs it (``backend.extra_graphs``: torch),
    else in an ONNX Runtime CPU session made on first use (ONNX Runtime, TensorRT)."""

    def __init__(self, bundle: Any, backend: Any):
        self.bundle, self.backend = bundle, backend
        self._sess = None
        self._lock = threading.Lock()

    def check(self) -> None:
        if self.bundle.graph_entry(VAE_ENCODER) is None:
            raise MissingEncoderError(
                f"bundle {self.bundle.name!r} carries no vae_encoder graph, which image inputs need: re-export it with "
                "`far-export onnx` (it writes the encoder by default), or add one with scripts/add_vae_encoder.py"
            )

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """float32 [B, 3, S, S] in [-1, 1] -> (mean, std) [B, C, H, W] at the sampler's scale."""
        self.check()
        outs = [self._run(x[i : i + ENCODE_CHUNK]) for i in range(0, x.shape[0], ENCODE_CHUNK)]
        return np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])

    def _run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        feeds = {"image": np.ascontiguousarray(x, dtype=np.float32)}
        if VAE_ENCODER in getattr(self.backend, "extra_graphs", ()):
            out = self.backend.run(VAE_ENCODER, feeds)
        else:
            with self._lock:
                if self._sess is None:
                    self._sess = self._session()
            mean, std = self._sess.run(["mean", "std"], feeds)
            out = {"mean": mean, "std": std}
        return np.asarray(out["mean"], dtype=np.float32), np.asarray(out["std"], dtype=np.float32)

    def _session(self) -> Any:
        try:
            import onnxruntime as ort  # noqa: PLC0415 - the backend's runtime: loaded when chosen
        except ImportError as e:
            raise BackendUnavailableError(
                f"image inputs on the {self.backend.name} backend run vae_encoder.onnx in ONNX Runtime: pip install "
                f"onnxruntime ({e})"
            ) from e
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        path = self.bundle.graph_file(VAE_ENCODER)
        self.bundle.verify([self.bundle.graph_entry(VAE_ENCODER)["file"]])
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def encode(
    encoder: ImageEncoder, images: Any, size: int, *, sample: bool = False, seeds: tuple[int, ...] | None = None
) -> np.ndarray:
    """images -> latents [B, C, H, W] at the sampler's scale: the posterior mean, or (``sample``) mean + std * eps with
    eps the first C H W normals of stream 2 of image i's seed ``seeds[i]``."""
    encoder.check()
    x = image_batch(images, size)
    mean, std = encoder(x)
    if not sample:
        return mean
    if seeds is None or len(seeds) != mean.shape[0]:
        raise InvalidArgumentError(f"sampling the posterior of {mean.shape[0]} images needs as many seeds")
    eps = philox_normals(seeds, 0, math.prod(mean.shape[1:]), stream=ENCODE_STREAM).reshape(mean.shape)
    return (mean + std * eps).astype(np.float32)


def match_batch(latents: np.ndarray, batch: int, per_prompt: int) -> np.ndarray:
    """One image for every output, one per label / prompt (repeated ``per_prompt`` times), or one per output."""
    n = latents.shape[0]
    if n == batch:
        return latents
    if n == 1:
        return np.repeat(latents, batch, axis=0)
    if per_prompt > 1 and n * per_prompt == batch:
        return np.repeat(latents, per_prompt, axis=0)
    raise InvalidArgumentError(
        f"got {n} images for {batch} outputs: give one image, one per class label / prompt, or one per output"
    )


def begin_at(backend: Any, state: Any, start: Start, plan: SamplingPlan, masks: list | None, noise: Any) -> None:
    """Put the input in ``state`` as step ``start.step - 1``'s output (module docstring) and move a seeded noise
    source past the draws of the skipped steps."""
    k = start.step
    raw = grid_to_tokens(np.ascontiguousarray(start.latents, dtype=np.float32))  # (B, L, C)
    B, L, C = raw.shape
    grid = int(round(math.sqrt(L)))
    after = plan.filter_after[k - 1]
    tokens = raw if after is None else low_pass_tokens(raw, filter_matrix(after, plan.filter, grid).astype(np.float32))
    if masks is not None and k < plan.num_steps:
        tokens = tokens * (1 - masks[k])[:, :, None].astype(np.float32)
    backend.set_start(state, np.ascontiguousarray(raw), np.ascontiguousarray(tokens, dtype=np.float32))
    if isinstance(noise, SeededNoise):
        noise.skip(sum((plan.inner_steps[s] + 1) * L * C for s in range(k)))


def start_for(gen: Any, image: Any, start_level: Any, strength: Any, plan: SamplingPlan, batch: int, per_prompt: int):
    """generate()'s image-to-image start: a :class:`Start`, or None from scratch (the image is then not even
    encoded)."""
    if image is None:
        if start_level is not None or strength is not None:
            raise InvalidArgumentError("start_level and strength go with image= (the picture to start from)")
        return None
    if start_level is None and strength is None:
        raise InvalidArgumentError(
            "image= needs start_level= (the outer step to start from, 1..num_steps) or strength= (in [0, 1]; "
            "1: from scratch): how much of the image to keep"
        )
    k = start_step(plan, start_level, strength)
    if k == 0:
        return None
    with gen._lock:
        z = encode(gen._image_encoder, image, int(gen.bundle.manifest["image_size"]))
    return Start(match_batch(z, batch, per_prompt), k)
