"""``Generator.warmup(batch_sizes=...)``: run one generation per batch size before any traffic, so a server's first
request does not pay for compilation, CUDA-graph capture, engine set-up or lazy library initialisation.

Every backend takes it: the torch backend compiles and captures the transformer per batch size and the inner loop
per (batch, inner-step count, ...); TensorRT captures its denoiser loops; ONNX Runtime initialises its sessions
(and the TensorRT EP builds its engines); on the CPU it is simply a first run. Warm with the settings that will
be served (``preset`` / sampling keywords): a captured loop is per inner-step count, so another schedule captures
again. Batches above the backend's limit are split as :meth:`Generator.generate` splits them."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from far_sdk.errors import InvalidArgumentError


def warmup(generator: Any, batch_sizes: Iterable[int] = (1,), **generate_kwargs: Any) -> dict[int, float]:
    """Run ``generator.generate`` once per batch size (class 0 ... or an empty prompt, seed 0, ``output_type="np"``
    so the VAE decoder warms too); returns the seconds each took (the compile / capture cost paid now)."""
    sizes = list(batch_sizes) if not isinstance(batch_sizes, int) else [batch_sizes]
    if not sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in sizes):
        raise InvalidArgumentError(f"batch_sizes must be positive integers, got {batch_sizes!r}")
    for reserved in ("class_labels", "prompt", "prompt_embeds", "seed", "output_type"):
        if reserved in generate_kwargs:
            raise InvalidArgumentError(f"warmup() chooses {reserved} itself; pass sampling settings only")
    text = generator.bundle.conditioning == "text"
    seconds = {}
    for b in sizes:
        condition = {"prompt": [""] * b} if text else {"class_labels": [0] * b}
        t = time.perf_counter()
        generator.generate(**condition, seed=0, output_type="np", **generate_kwargs)
        generator.backend.synchronize()
        seconds[b] = time.perf_counter() - t
    return seconds
