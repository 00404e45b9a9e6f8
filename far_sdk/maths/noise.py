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

One seed, one image, on every backend
-------------------------------------
:class:`SeededNoise` gives image i of a call the seed ``seed + i`` and draws each image's numbers
from a counter-based generator, Philox4x32-10, so a GPU can compute the same numbers on the
device from (seed, position) alone. The definition, which every backend implements
(:func:`philox_normals` here, ``training.torch_noise`` on the torch device):

- Key: seed s (0 <= s < 2**63) gives k0 = s & 0xFFFFFFFF, k1 = (s >> 32) & 0xFFFFFFFF.
- Philox4x32-10 (Salmon et al. 2011, Random123 / cuRAND), all arithmetic mod 2**32 on a counter
  (c0, c1, c2, c3): 10 rounds of

      (hi0, lo0) = mulhilo32(0xD2511F53, c0);  (hi1, lo1) = mulhilo32(0xCD9E8D57, c2)
      (c0, c1, c2, c3) = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0)
      k0 += 0x9E3779B9;  k1 += 0xBB67AE85

  where mulhilo32(a, b) = (a*b >> 32, a*b & 0xFFFFFFFF) of the 64-bit product. The output is the
  four words r0..r3 of the final counter (Random123's known-answer vectors hold: tests/test_noise.py).
- Words: each image has streams of uint32 words indexed by a position j = 0, 1, 2, ...: word j of
  stream t is lane j % 4 of the Philox block b = j // 4 run on the counter
  (b & 0xFFFFFFFF, b >> 32, t, 0).
- Normals (stream 0): with u_i = ((r_i >> 9) + 1/2) * 2**-23 (exact in float32, 0 < u_i < 1), block
  b's words give, in float32 arithmetic with 2pi rounded to float32,

      z_{4b+0} = sqrt(-2 ln u0) cos(2pi u1),  z_{4b+1} = sqrt(-2 ln u0) sin(2pi u1),
      z_{4b+2} = sqrt(-2 ln u2) cos(2pi u3),  z_{4b+3} = sqrt(-2 ln u2) sin(2pi u3)

  (Box-Muller). Normal j is z_j: every image has one stream of normals, and the draws above consume
  it in order — a (B, L, C) draw takes each image's next L*C normals, row-major. The integer part is
  bit-exact everywhere; ln, sqrt, cos and sin are float32 library functions, so backends agree to a
  few float32 ulps, not bitwise.
- Token orders (mask mode): the first L words of stream 1, r_0..r_{L-1}; the order is
  ``argsort(r, stable)``. They do not consume the normal stream.
- Image-to-image's posterior sample (``Generator.encode(..., sample=True)``): normals 0..C*H*W-1 of stream 2
  (the same Box-Muller on stream 2's words), row-major over [C, H, W]; not the sampler's stream either.

Because the numbers are a function of (seed, position), an image depends only on its seed — not
on the batch it is generated in — and a backend that draws on its device only tells the host
source how many normals it used (:meth:`SeededNoise.skip`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from far_sdk.errors import InvalidArgumentError, check_finite

NoiseFn = Callable[[tuple[int, ...]], np.ndarray]

#: Philox4x32 multipliers and Weyl key increments (Random123's PHILOX_M4x32_0/1, PHILOX_W32_0/1).
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
PHILOX_ROUNDS = 10
#: Counter word c2 of each stream.
NORMAL_STREAM, ORDER_STREAM, ENCODE_STREAM = 0, 1, 2
#: 2pi rounded to float32, the Box-Muller angle factor.
TWO_PI_F32 = np.float32(2.0 * math.pi)
#: Philox blocks computed per pass: the working arrays stay in the CPU cache (64k blocks ~ 3 MB).
_BLOCKS_PER_PASS = 1 << 16
#: SeededNoise computes at least this many normals per call (all images together) and serves
#: later draws from them: a draw of one 4096-normal image costs ~10x its arithmetic in NumPy overhead.
_PREFETCH_NORMALS = 1 << 18

_MASK = np.uint64(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)


def philox4x32_10(c0, c1, c2, c3, k0, k1) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Philox4x32-10 on broadcastable uint32 arrays (counter c0..c3, key k0, k1) -> 4 uint32 arrays.

    Elementwise, for r in 0..9: (hi0, lo0) = mulhilo32(M0, c0), (hi1, lo1) = mulhilo32(M1, c2),
    c = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0), then k += (W0, W1) mod 2**32. Products are exact
    in uint64 (< 2**64).
    """
    args = [np.asarray(a) for a in (c0, c1, c2, c3, k0, k1)]
    for name, a in zip(("c0", "c1", "c2", "c3", "k0", "k1"), args):
        if a.dtype.kind not in "ui" or (a.size and (a.min() < 0 or a.max() > 0xFFFFFFFF)):
            raise InvalidArgumentError(
                f"philox4x32_10: {name} must hold integers in [0, 2**32), got {a.dtype} values "
                f"{a.min() if a.size else None}..{a.max() if a.size else None}"
            )
    shape = np.broadcast_shapes(*(a.shape for a in args))
    c = np.empty((4, *(shape or (1,))), dtype=np.uint32)  # rows c0..c3 (0-d inputs as (1,))
    for i in range(4):
        c[i] = args[i]
    _philox_rounds(c, args[4].astype(np.uint32), args[5].astype(np.uint32))  # 0-d keys broadcast as scalars
    return tuple(c[i].reshape(shape) for i in range(4))


def _philox_rounds(c: np.ndarray, k0: np.ndarray, k1: np.ndarray) -> None:
    """Run the 10 rounds in place on c = uint32 [4, ...] (rows c0..c3) with keys broadcastable to c[0]."""
    p0 = np.empty(c.shape[1:], dtype=np.uint64)
    p1 = np.empty(c.shape[1:], dtype=np.uint64)
    c0, c1, c2, c3 = c
    ka, kb = k0.astype(np.uint64), k1.astype(np.uint64)
    for r in range(PHILOX_ROUNDS):
        # round keys k + r*W mod 2**32, in uint64 so nothing overflows
        rk0 = ((ka + np.uint64(r * PHILOX_W0)) & _MASK).astype(np.uint32)
        rk1 = ((kb + np.uint64(r * PHILOX_W1)) & _MASK).astype(np.uint32)
        np.multiply(c0, np.uint64(PHILOX_M0), out=p0, dtype=np.uint64)  # exact: < 2**64
        np.multiply(c2, np.uint64(PHILOX_M1), out=p1, dtype=np.uint64)
        np.right_shift(p1, _SHIFT32, out=c0, casting="unsafe")  # hi1 (< 2**32)
        c0 ^= c1
        c0 ^= rk0
        np.copyto(c1, p1, casting="unsafe")  # lo1: uint64 -> uint32 keeps the low word
        np.right_shift(p0, _SHIFT32, out=c2, casting="unsafe")  # hi0
        c2 ^= c3
        c2 ^= rk1
        np.copyto(c3, p0, casting="unsafe")  # lo0


def _check_seeds(seeds) -> np.ndarray:
    """Seeds as uint64 [B], each checked 0 <= s < 2**63."""
    if np.ndim(seeds) != 1:
        raise InvalidArgumentError(f"seeds must be a 1-d sequence of integers (one per image), got {seeds!r}")
    try:
        arr = np.asarray([_check_seed(s) for s in np.asarray(seeds, dtype=object).reshape(-1)], dtype=np.uint64)
    except TypeError as e:
        raise InvalidArgumentError(
            f"seeds must be a sequence of non-negative integers below 2**63, got {seeds!r}"
        ) from e
    return arr


def _check_range(start, count) -> tuple[int, int]:
    for name, v in (("start", start), ("count", count)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise InvalidArgumentError(f"{name} must be a non-negative integer, got {v!r}")
    if int(start) + int(count) > 2**63:
        raise InvalidArgumentError(f"positions start + count must stay below 2**63, got {start} + {count}")
    return int(start), int(count)


def _words(seeds: np.ndarray, block0: int, nblocks: int, stream: int) -> np.ndarray:
    """uint32 [4, B, nblocks]: the Philox output words of blocks block0.. block0+nblocks-1 of each seed."""
    B = seeds.shape[0]
    b = np.arange(block0, block0 + nblocks, dtype=np.uint64)  # (nb,)
    c = np.empty((4, B, nblocks), dtype=np.uint32)
    c[0] = (b & _MASK).astype(np.uint32)
    c[1] = (b >> _SHIFT32).astype(np.uint32)
    c[2] = stream
    c[3] = 0
    k0 = (seeds & _MASK).astype(np.uint32)[:, None]  # (B, 1)
    k1 = ((seeds >> _SHIFT32) & _MASK).astype(np.uint32)[:, None]
    _philox_rounds(c, k0, k1)
    return c


def philox_uint32(seeds, start: int, count: int, stream: int = NORMAL_STREAM) -> np.ndarray:
    """uint32 [B, count]: words start..start+count-1 of stream ``stream`` of each seed.

    Word j is lane j % 4 of Philox4x32-10 on counter (b & 0xFFFFFFFF, b >> 32, stream, 0), b = j // 4,
    key (s & 0xFFFFFFFF, s >> 32).
    """
    seeds = _check_seeds(seeds)
    start, count = _check_range(start, count)
    if isinstance(stream, bool) or not isinstance(stream, (int, np.integer)) or not 0 <= stream <= 0xFFFFFFFF:
        raise InvalidArgumentError(f"stream must be an integer in [0, 2**32), got {stream!r}")
    block0, off = divmod(start, 4)
    nblocks = (off + count + 3) // 4
    c = _words(seeds, block0, nblocks, int(stream))  # (4, B, nb)
    return np.ascontiguousarray(np.moveaxis(c, 0, -1).reshape(len(seeds), -1)[:, off : off + count])


def philox_normals(seeds, start: int, count: int, stream: int = NORMAL_STREAM) -> np.ndarray:
    """float32 [B, count]: standard normals start..start+count-1 of each seed's stream (``stream``: the counter's
    word c2, 0 for the sampler's normals).

    Block b of stream 0 gives normals 4b..4b+3 by Box-Muller on u_i = ((r_i >> 9) + 1/2) 2**-23:
    z = sqrt(-2 ln u0) (cos 2pi u1, sin 2pi u1), sqrt(-2 ln u2) (cos 2pi u3, sin 2pi u3), in float32.
    """
    seeds = _check_seeds(seeds)
    start, count = _check_range(start, count)
    B = len(seeds)
    block0, off = divmod(start, 4)
    nblocks = (off + count + 3) // 4
    out = np.empty((B, nblocks, 4), dtype=np.float32)
    per_pass = max(1, _BLOCKS_PER_PASS // max(B, 1))
    for first in range(0, nblocks, per_pass):
        n = min(per_pass, nblocks - first)
        _box_muller(_words(seeds, block0 + first, n, int(stream)), out[:, first : first + n])
    flat = out.reshape(B, 4 * nblocks)
    if off == 0 and count == 4 * nblocks:
        return flat
    return np.ascontiguousarray(flat[:, off : off + count])


def _box_muller(words: np.ndarray, out: np.ndarray) -> None:
    """words uint32 [4, B, n] (r0..r3 of n blocks) -> out float32 [B, n, 4] (z0..z3), in place on words."""
    # u = ((r >> 9) + 1/2) 2**-23 exactly: the bits of 1 + (r >> 9) 2**-23 in [1, 2), minus 1 - 2**-24
    # (the difference (2 (r >> 9) + 1) 2**-24 has 24 significant bits, so the subtraction is exact).
    np.right_shift(words, np.uint32(9), out=words)
    words |= np.uint32(0x3F800000)
    u = words.view(np.float32)  # (4, B, n)
    u -= np.float32(1.0 - 2.0**-24)
    rad = u[0::2]  # (2, B, n): u0, u2
    np.log(rad, out=rad)
    rad *= np.float32(-2.0)
    np.sqrt(rad, out=rad)
    theta = u[1::2]  # (2, B, n): u1, u3
    theta *= TWO_PI_F32
    np.multiply(rad, np.cos(theta), out=np.moveaxis(out[..., 0::2], -1, 0))  # z0, z2
    np.sin(theta, out=theta)
    np.multiply(rad, theta, out=np.moveaxis(out[..., 1::2], -1, 0))  # z1, z3


class SeededNoise:
    """Per-image seeded noise: image i draws the Philox normal stream of ``seeds[i]`` (module docstring).

    Each image's numbers depend only on its seed and its position in its stream, so an image does not
    depend on the batch it is generated in, large batches can be split across engine calls, and a
    device that draws the same numbers itself only reports how many it used (:meth:`skip`).
    """

    def __init__(self, seeds: Sequence[int], position: int = 0):
        self.seeds = tuple(_check_seed(s) for s in seeds)
        self._keys = np.asarray(self.seeds, dtype=np.uint64)
        self._position = _check_range(position, 0)[0]
        self._buf: np.ndarray | None = None  # float32 [B, m]: normals _buf_start.. of each image
        self._buf_start = 0

    @classmethod
    def from_seed(cls, seed: int, batch: int) -> SeededNoise:
        """Seeds seed, seed + 1, ..., seed + batch - 1 (image i of a call gets seed + i)."""
        seed = _check_seed(seed)
        if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 0:
            raise InvalidArgumentError(f"batch must be a non-negative integer, got {batch!r}")
        if seed + batch > 2**63:
            raise InvalidArgumentError(
                f"seeds seed .. seed + batch - 1 must stay below 2**63, got seed {seed}, batch {batch}"
            )
        return cls([seed + i for i in range(batch)])

    @property
    def position(self) -> int:
        """Normals consumed per image so far: the next draw starts at this index of every image's stream."""
        return self._position

    def __call__(self, shape: tuple[int, ...]) -> np.ndarray:
        """float32 ``shape``: the next prod(shape[1:]) normals of each image's stream, row-major."""
        shape = tuple(int(d) for d in shape)
        if not shape or shape[0] != len(self.seeds):
            raise InvalidArgumentError(
                f"noise asked for shape {shape}: its first axis must be the batch, {len(self.seeds)} seeds"
            )
        n = math.prod(shape[1:])
        pos = self._position
        buf = self._buf
        if buf is None or pos < self._buf_start or pos + n > self._buf_start + buf.shape[1]:
            ahead = max(n, _PREFETCH_NORMALS // max(len(self.seeds), 1))
            ahead = min(ahead, 2**63 - pos)
            buf = self._buf = philox_normals(self._keys, pos, ahead)
            self._buf_start = pos
        i = pos - self._buf_start
        self._position = pos + n
        return buf[:, i : i + n].reshape(shape).copy()  # a copy: callers may write into their draws

    def skip(self, count: int) -> None:
        """Advance every image's position by ``count`` without drawing (a device drew those normals)."""
        count = _check_range(self._position, count)[1]
        self._position += count

    def orders(self, batch: int, length: int) -> np.ndarray:
        """int64 [batch, length]: one token order per image (mask mode): argsort(stream-1 words 0..length-1, stable).

        Does not move :attr:`position`.
        """
        if batch != len(self.seeds):
            raise InvalidArgumentError(f"orders asked for batch {batch}, source has {len(self.seeds)} seeds")
        r = philox_uint32(self._keys, 0, length, stream=ORDER_STREAM)  # (B, length)
        return np.argsort(r, axis=1, kind="stable").astype(np.int64)

    def split(self, start: int, stop: int) -> SeededNoise:
        """A source for images start..stop-1 at this source's position (for batch splitting).

        The part draws the same numbers those images would draw here; drawing from it does not move
        this source.
        """
        return SeededNoise(self.seeds[start:stop], position=self._position)


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
            raise InvalidArgumentError(
                f"noise draw {self._draws} has shape {d.shape}, the sampler asked for {tuple(shape)}"
            )
        check_finite(d, f"noise draw {self._draws} (from the noise source)")
        self._draws += 1
        return d

    def __getattr__(self, name: str) -> Any:
        return getattr(self._source, name)


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**63:
        raise InvalidArgumentError(f"seed must be a non-negative integer below 2**63, got {seed!r}")
    return int(seed)
