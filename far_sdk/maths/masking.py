"""Mask mode's per-step masks (NumPy only), written once for every backend.

The official ``sample_tokens_mask`` (shared/spec/official-far.md §7), with S outer steps, L tokens
and one token order per image (a permutation of 0..L-1, :meth:`far_sdk.maths.noise.SeededNoise.orders`):

- step 0 sees every token masked (mask = 1 everywhere; the tokens are zeros);
- after step s < S - 1, m_s = floor(L cos(pi/2 (s + 1) / S)) tokens stay masked
  (:func:`far_sdk.maths.schedules.mask_keep_counts`): the first m_s entries of each image's order. They are
  zeroed in what step s hands on, and step s + 1's transformer drops them (a model built with
  mask=True; one built without ignores the mask and sees the zeros, as the official code does).

Which modes a bundle samples in follows from how its model was built (manifest ``model.mask``),
as in the official code: a mask=True model crashes in the no-mask sampler (the encoder's gather
needs a mask), so it samples in mask mode only; a mask=False model runs both samplers and ignores
the mask in its transformer.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from far_sdk.errors import InvalidArgumentError, arg
from far_sdk.maths.schedules import MODES, Mode, mask_keep_counts


def sampling_modes(model_mask: bool) -> tuple[Mode, ...]:
    """The modes a model built with ``mask=model_mask`` samples in (the manifest's ``sampling_modes``)."""
    return ("mask",) if model_mask else MODES


def check_mode(mode: object, supported: tuple[str, ...] | list[str], where: str = "this bundle") -> Mode:
    """``mode`` if it is one of ``supported``; else :class:`InvalidArgumentError` naming them."""
    if mode not in MODES:
        raise InvalidArgumentError(f"mode must be one of {MODES}, got {mode!r}")
    if mode not in supported:
        why = (
            " (its model was built with mask=True: the official no-mask sampler cannot run it)"
            if tuple(supported) == ("mask",)
            else ""
        )
        raise InvalidArgumentError(
            f"{where} samples in mode(s) {list(supported)} only, not {mode!r}{why}; pass {arg('mode', supported[0])}"
        )
    return mode  # type: ignore[return-value]


def check_orders(orders: object, batch: int, length: int) -> np.ndarray:
    """Token orders as int64 [batch, length], each row a permutation of 0..length-1; else InvalidArgumentError."""
    try:
        a = np.asarray(orders)
    except Exception as e:  # noqa: BLE001 - anything that is not array-like
        raise InvalidArgumentError(
            f"token orders must be an integer array [batch, {length}], got {type(orders).__name__}"
        ) from e
    if a.dtype.kind not in "iu" or a.shape != (batch, length):
        raise InvalidArgumentError(
            f"token orders must be integers of shape ({batch}, {length}) (one permutation of the "
            f"{length} token positions per image), got {a.dtype} {a.shape}"
        )
    a = a.astype(np.int64)
    if not (np.sort(a, axis=1) == np.arange(length)).all():
        bad = int(np.nonzero(~(np.sort(a, axis=1) == np.arange(length)).all(axis=1))[0][0])
        raise InvalidArgumentError(f"token order of image {bad} is not a permutation of 0..{length - 1}")
    return a


def step_masks(orders: np.ndarray, num_steps: int) -> Iterator[np.ndarray]:
    """float32 [B, L] per outer step s = 0..S-1: 1 where step s's transformer drops the token.

    Step 0: all ones; step s > 0: ones at orders[:, :m_{s-1}] (m = :func:`mask_keep_counts`).
    What step s hands on is multiplied by 1 - mask of step s + 1 (the last step hands on everything).
    """
    B, L = orders.shape
    counts = mask_keep_counts(num_steps, L)
    rows = np.arange(B)[:, None]
    for s in range(num_steps):
        m = np.ones((B, L), dtype=np.float32)
        if s > 0:
            m[:] = 0
            m[rows, orders[:, : counts[s - 1]]] = 1
        yield m


def source_orders(noise: object, batch: int, length: int) -> np.ndarray:
    """The token orders a noise source supplies (``noise.orders(batch, length)``), checked."""
    fn = getattr(noise, "orders", None)
    if not callable(fn):
        raise InvalidArgumentError(
            "mask mode needs one token order per image from the noise source: pass a seed, or a source with an "
            "orders(batch, length) method (far_sdk.maths.noise.ReplayNoise(draws, orders=...))"
        )
    return check_orders(fn(batch, length), batch, length)


def random_mask(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """float32 [N, L] of 0 / 1 (1 = dropped) for validating a masking graph: row 0 drops every token (mask
    mode's first step), every other row a random share of them, so rows keep different counts."""
    N, L = shape
    share = np.concatenate([[1.0], rng.uniform(0.0, 1.0, N - 1)])[:, None]
    return (rng.uniform(0.0, 1.0, (N, L)) < share).astype(np.float32)
