"""How :meth:`far_sdk.Generator.generate` splits a batch into backend calls and where its noise comes from."""

from __future__ import annotations

import numpy as np

from far_sdk.errors import EngineProfileError, InvalidArgumentError
from far_sdk.maths.noise import CheckedNoise, NoiseFn, SeededNoise


def chunk_size(limit: int | None, batch: int, max_batch: int | None, *, replayed: bool) -> int:
    """Images per backend call: the engine's ``limit`` (None: any), lowered to ``max_batch``; a replayed noise source
    cannot be split."""
    if max_batch is not None:
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise InvalidArgumentError(f"max_batch must be a positive integer, got {max_batch!r}")
        if limit is not None and max_batch > limit:
            raise EngineProfileError(
                f"max_batch={max_batch} exceeds this engine's profile (at most {limit} images per "
                "call); rebuild the engine with a larger --batch"
            )
        limit = max_batch
    if replayed and limit is not None and batch > limit:
        raise EngineProfileError(f"a replayed noise source cannot be split across calls; give at most {limit} images")
    return batch if limit is None else limit


def noise_source(noise: NoiseFn | None, seed: int | None, batch: int) -> tuple[NoiseFn, tuple[int, ...] | None]:
    """(the noise source, the per-image seeds or None for a replayed source)."""
    if noise is not None:
        if not callable(noise):
            raise InvalidArgumentError(
                f"noise must be a callable noise(shape) -> float32 array, got {type(noise).__name__}"
            )
        # a SeededNoise is ours: finite, and drawn on the device where it can be
        return (noise if isinstance(noise, SeededNoise) else CheckedNoise(noise)), None
    if seed is None:  # a fresh seed, reported in GenerationOutput.seeds so the images can be made again
        seed = int(np.random.SeedSequence().generate_state(1, dtype=np.uint64)[0] >> np.uint64(2))
    source = SeededNoise.from_seed(seed, batch)
    return source, source.seeds
