"""Noise sources: where every random draw of a sampling run comes from (NumPy only).

A noise source is a callable ``noise(shape) -> float32 ndarray`` of standard normals. Samplers
call it in one documented order, so any implementation can replay another's draws:

    for each outer step s:
        noise((B, L, C))            # x_T, the inner loop's starting point
        for each inner step (noisiest first):
            noise((B, L, C))        # the DDPM step's fresh noise (the last one is multiplied by 0)

B = batch, L = 256 tokens (row-major over the 16 x 16 grid), C = 16 channels. Only the
conditional CFG half is drawn: the official code also draws noise for the unconditional half,
but those values never influence the result.

Mask mode also needs one permutation of the L token positions per image, drawn before the loop
(``orders(batch, L)``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .errors import InvalidArgumentError, check_finite

NoiseFn = Callable[[tuple[int, ...]], np.ndarray]


class SeededNoise:
    """Per-image seeded noise: image i draws from its own ``PCG64(seeds[i])`` generator.

    Because each row has its own generator, an image depends only on its seed — not on the
    batch it was generated in — so large batches can be split across engine calls and every
    backend sees the same numbers.
    """

    def __init__(self, seeds: Sequence[int]):
        self.seeds = tuple(_check_seed(s) for s in seeds)
        self._gens = [np.random.Generator(np.random.PCG64(s)) for s in self.seeds]

    @classmethod
    def from_seed(cls, seed: int, batch: int) -> "SeededNoise":
        """Seeds seed, seed + 1, ..., seed + batch - 1 (image i of a call gets seed + i)."""
        seed = _check_seed(seed)
        return cls([seed + i for i in range(batch)])

    def __call__(self, shape: tuple[int, ...]) -> np.ndarray:
        if shape[0] != len(self._gens):
            raise InvalidArgumentError(f"noise asked for batch {shape[0]}, source has {len(self._gens)} seeds")
        return np.stack([g.standard_normal(shape[1:], dtype=np.float32) for g in self._gens])

    def orders(self, batch: int, length: int) -> np.ndarray:
        """int64 [batch, length]: one random token order per image (mask mode), drawn before the loop."""
        if batch != len(self._gens):
            raise InvalidArgumentError(f"orders asked for batch {batch}, source has {len(self._gens)} seeds")
        return np.stack([g.permutation(length) for g in self._gens]).astype(np.int64)

    def split(self, start: int, stop: int) -> "SeededNoise":
        """A source for images start..stop-1 that continues the same streams (for batch splitting)."""
        part = SeededNoise.__new__(SeededNoise)
        part.seeds = self.seeds[start:stop]
        part._gens = self._gens[start:stop]
        return part


class ReplayNoise:
    """Replays recorded draws in order, checking each requested shape (for parity with other implementations)."""

    def __init__(self, draws: Sequence[np.ndarray], orders: np.ndarray | None = None):
        self._draws = list(draws)
        self._i = 0
        self._orders = orders

    def __call__(self, shape: tuple[int, ...]) -> np.ndarray:
        if self._i >= len(self._draws):
            raise InvalidArgumentError(f"replay noise exhausted after {self._i} draws")
        d = np.asarray(self._draws[self._i], dtype=np.float32)
        if tuple(d.shape) != tuple(shape):
            raise InvalidArgumentError(f"replay draw {self._i} has shape {d.shape}, sampler asked for {tuple(shape)}")
        self._i += 1
        return d

    def orders(self, batch: int, length: int) -> np.ndarray:
        if self._orders is None:
            raise InvalidArgumentError("this replay source holds no token orders (needed in mask mode)")
        return np.asarray(self._orders, dtype=np.int64).reshape(batch, length)

    @property
    def remaining(self) -> int:
        return len(self._draws) - self._i


class CheckedNoise:
    """A caller's noise source, each draw checked where it enters: shape, and finite values
    (:class:`~far_sdk.errors.NumericalError` naming the draw). Other attributes (``orders``) pass through."""

    def __init__(self, source: NoiseFn):
        self._source = source
        self._draws = 0

    def __call__(self, shape: tuple[int, ...]) -> np.ndarray:
        d = np.asarray(self._source(shape), dtype=np.float32)
        if d.shape != tuple(shape):
            raise InvalidArgumentError(f"noise draw {self._draws} has shape {d.shape}, the sampler asked for {tuple(shape)}")
        check_finite(d, f"noise draw {self._draws} (from the noise source)")
        self._draws += 1
        return d

    def __getattr__(self, name: str) -> Any:
        return getattr(self._source, name)


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**63:
        raise InvalidArgumentError(f"seed must be a non-negative integer below 2**63, got {seed!r}")
    return int(seed)
