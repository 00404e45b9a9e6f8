"""What a ``far serve`` replica runs: validated requests (:class:`Job`), merged by settings into ``generate`` calls.

Every group of jobs that shares its settings becomes as few ``Generator.generate`` calls as the backend allows
(:func:`run_group`). Each image keeps its own seed stream (``noise=SeededNoise(seeds)``: image j of a request with
seed s draws the stream of seed s + j, as ``generate(labels, seed=s)`` does), so merging requests never changes an
image. A streamed job also gets, after every outer step, its images' decoded previews of what the step hands on
(the coarse-to-fine picture); decoding them never touches the sampling loop's state, so they change no image either.
No Ray or HTTP here: the replica (:mod:`far_sdk.scale.serve.app`) calls these in a worker thread.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from far_sdk.images import to_uint8
from far_sdk.maths.noise import SeededNoise
from far_sdk.pipeline import STAGES, Generator, StepInfo

#: previews are sent at most this many pixels on a side (downscaled with a box filter when larger)
PREVIEW_MAX_PX = 128
#: preview(step, num_steps, level, uint8 [B, h, w, 3]) -- called from the generating thread
PreviewSink = Callable[[int, int, int, np.ndarray], None]


@dataclass(eq=False)
class Job:
    """One validated generate request. ``settings`` (sorted (name, value) pairs: the sampling options given and the
    preset) and whether negative prompts are given form the batching key; ``class_ids`` (class bundles) or
    ``prompts`` (text bundles) hold one entry per image."""

    seed: int
    settings: tuple[tuple[str, Any], ...]
    class_ids: tuple[int, ...] = ()
    prompts: tuple[str, ...] = ()
    negative_prompts: tuple[str, ...] | None = None
    output_format: str = "json"
    image: np.ndarray | None = None  # image-to-image: uint8 [S, S, 3] every image of the job starts from
    start: tuple[str, Any] | None = None  # with image: ("start_level", k) or ("strength", s)
    preview: PreviewSink | None = None  # set for a streamed request
    cancelled: threading.Event = field(default_factory=threading.Event)  # its client has gone
    arrived: float = field(default_factory=time.perf_counter)

    def __len__(self) -> int:
        return len(self.class_ids) or len(self.prompts)

    @property
    def seeds(self) -> tuple[int, ...]:
        return tuple(self.seed + j for j in range(len(self)))

    @property
    def key(self) -> tuple:
        return (self.settings, self.negative_prompts is not None, self.start)


@dataclass(frozen=True)
class GroupResult:
    """The answer of one group: each job's uint8 [B_i, H, W, 3] images and what the merged call did."""

    images: list[np.ndarray]
    plan: dict[str, Any]
    timings: dict[str, float]  # seconds per stage of the merged call(s), "preview" (streamed decodes), "generate"
    batch_images: int
    batch_requests: int
    stopped: bool = False  # every client of the group left, so the loop stopped early (images are partial)


def group_by_settings(jobs: list[Job]) -> dict[tuple, list[int]]:
    """Indices of ``jobs`` per batching key, in arrival order: each group is one generate call."""
    groups: dict[tuple, list[int]] = {}
    for i, j in enumerate(jobs):
        groups.setdefault(j.key, []).append(i)
    return groups


def chunk_bounds(sizes: list[int], streamed: list[bool], limit: int | None) -> list[tuple[int, int]]:
    """Image ranges of the generate calls for jobs of ``sizes`` images: at most ``limit`` images each, and a streamed
    job never split across two calls (the app refuses a streamed job larger than ``limit``)."""
    total = sum(sizes)
    if limit is None or total <= limit:
        return [(0, total)]
    bounds, start, pos = [], 0, 0
    for n, s in zip(sizes, streamed):
        if s and pos + n - start > limit and pos > start:
            bounds.append((start, pos))
            start = pos
        pos += n
        while pos - start > limit and not s:
            bounds.append((start, start + limit))
            start += limit
    if pos > start:
        bounds.append((start, pos))
    return bounds


def _downscale(images: np.ndarray) -> np.ndarray:
    from PIL import Image  # noqa: PLC0415 - Pillow loads on the first preview: importing far_sdk stays light

    h, w = images.shape[1:3]
    f = max(h, w) / PREVIEW_MAX_PX
    if f <= 1:
        return images
    size = (max(1, round(w / f)), max(1, round(h / f)))
    return np.stack([np.asarray(Image.fromarray(im).resize(size, Image.Resampling.BOX)) for im in images])


def run_group(gen: Generator, jobs: list[Job], negative_keyword: str = "negative_prompt") -> GroupResult:
    """Run ``jobs`` (one batching key) as few ``generate`` calls as ``gen``'s backend allows."""
    settings = dict(jobs[0].settings)
    sizes = [len(j) for j in jobs]
    offsets = np.cumsum([0, *sizes])
    seeds = [s for j in jobs for s in j.seeds]
    labels = [c for j in jobs for c in j.class_ids]
    prompts = [p for j in jobs for p in j.prompts]
    negative = [p for j in jobs for p in (j.negative_prompts or ())] if jobs[0].negative_prompts is not None else None
    timings = dict.fromkeys((*STAGES, "preview", "generate"), 0.0)
    parts, plan, stopped = [], None, False
    for a, b in chunk_bounds(sizes, [j.preview is not None for j in jobs], gen.backend.max_batch):
        in_call = [(i, j) for i, j in enumerate(jobs) if offsets[i] < b and offsets[i + 1] > a]

        def on_step(info: StepInfo, a=a, in_call=in_call) -> bool:
            nonlocal stopped
            if all(j.cancelled.is_set() for _, j in in_call):
                stopped = True
                return False  # every client of this call has gone: free the replica
            t0 = time.perf_counter()
            for i, j in in_call:
                if j.preview is not None and not j.cancelled.is_set():
                    rows = info.handed_on[offsets[i] - a : offsets[i + 1] - a]
                    j.preview(info.step, info.num_steps, info.level, _downscale(to_uint8(gen.decode(rows))))
            timings["preview"] += time.perf_counter() - t0
            return True

        cond: dict[str, Any] = {"prompt": prompts[a:b]} if prompts else {"class_labels": labels[a:b]}
        if negative is not None:
            cond[negative_keyword] = negative[a:b]
        if jobs[0].start is not None:  # one start picture per image (each job's, repeated)
            cond.update([jobs[0].start], image=[j.image for j in jobs for _ in range(len(j))][a:b])
        out = gen.generate(
            **cond, noise=SeededNoise(seeds[a:b]), output_type="np", on_step=on_step, **settings
        )  # an engine's profile caps one call; a seed stream never depends on the split
        for k in STAGES:
            timings[k] += out.timings[k]
        timings["generate"] += out.timings["total"]
        parts.append(out.images)
        plan = out.plan
    images = np.concatenate(parts)
    per_job = [images[offsets[i] : offsets[i + 1]] for i in range(len(jobs))]
    return GroupResult(
        images=per_job,
        plan=plan.to_dict(),
        timings=timings,
        batch_images=int(offsets[-1]),
        batch_requests=len(jobs),
        stopped=stopped,
    )


def encode_png(image: np.ndarray) -> bytes:
    from PIL import Image  # noqa: PLC0415 - Pillow loads on the first image: importing far_sdk stays light

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()
