"""What :meth:`far_sdk.Generator.generate` returns and hands ``on_step``, and the names of its stages and modes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from far_sdk.maths.schedules import SamplingPlan

OutputType = Literal["pil", "np", "latent"]
OUTPUT_TYPES = ("pil", "np", "latent")
STAGES = ("transformer", "denoise", "filter", "vae_decode")
PREVIEWS = (False, True, "handed-on", "raw")


@dataclass(frozen=True)
class StepInfo:
    """What ``on_step`` receives after each outer step."""

    step: int  # 0-based outer step
    num_steps: int
    level: int  # input frequency level of this step
    latents: np.ndarray  # [B, C, H, W]: this step's full estimate (before low-passing)
    preview: list | None = None  # decoded RGB previews (PIL images) when preview is on
    handed_on: np.ndarray | None = None  # [B, C, H, W]: what the next step sees (low-passed; the last step: latents)


@dataclass(frozen=True)
class GenerationOutput:
    """Result of :meth:`Generator.generate`."""

    images: list | np.ndarray | None  # list[PIL.Image] ("pil"), uint8 [B, H, W, 3] ("np"), None ("latent")
    latents: np.ndarray  # [B, C, H, W] float32 (C: the model's token channels), sampler scale
    timings: dict[str, float]  # seconds per stage, plus "total"
    seeds: tuple[int, ...] | None  # per-image seeds, when drawn from a seed
    class_labels: tuple[int, ...]  # () for a text bundle
    plan: SamplingPlan = field(repr=False)
