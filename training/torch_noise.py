"""The Philox noise of :mod:`far_sdk.maths.noise` in pure torch ops, so the torch backend draws it on its device.

Imported only by the torch backend. Same definition as :func:`far_sdk.maths.noise.philox_normals` (see that
module's docstring): Philox4x32-10 keyed by the seed, counter (b & 0xFFFFFFFF, b >> 32, stream, 0),
uniforms u = ((r >> 9) + 1/2) 2**-23, float32 Box-Muller. The integer words equal NumPy's bit for bit;
the normals agree to a few float32 ulps (ln, sqrt, cos and sin come from different libraries).

Written for CUDA-graph capture and torch.compile: no host syncs (no ``.item()``, ``.tolist()``,
data-dependent shapes or Python branches on tensor values); ``start`` and ``seeds`` are read only
on the device, so a captured graph can replay with new values copied into those static buffers.

On the CPU, NumPy's :func:`far_sdk.maths.noise.philox_normals` is the one to use: eager torch is several times
slower (hundreds of int64 kernels per call) and torch.compile, faster once compiled, recompiles for
seconds per shape (figures in docs/BENCHMARKS.md). This module is for the GPU.

torch has no full uint32 arithmetic, so 32-bit words live in int64 tensors and every intermediate
stays below 2**63 — no result relies on signed overflow. mulhilo32(a, M) for a 32-bit constant M
splits a into 16-bit halves:

    p_lo = (a & 0xFFFF) M < 2**48,   p_hi = (a >> 16) M < 2**48,   a M = p_hi 2**16 + p_lo
    lo32 = (p_lo + ((p_hi & 0xFFFF) << 16)) & 0xFFFFFFFF,   hi32 = (p_hi + (p_lo >> 16)) >> 16
"""

from __future__ import annotations

import torch

from far_sdk.errors import InvalidArgumentError
from far_sdk.maths.noise import NORMAL_STREAM, PHILOX_M0, PHILOX_M1, PHILOX_ROUNDS, PHILOX_W0, PHILOX_W1, TWO_PI_F32

_LO16, _LO32 = 0xFFFF, 0xFFFFFFFF
#: float32(2 pi) as a Python float: exactly representable in float32, so the angle u * 2pi rounds the
#: same whether a kernel multiplies in float32 or (Inductor's literals) in float64 and then rounds.
_TWO_PI = float(TWO_PI_F32)


def _mulhilo32(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(a*m >> 32, a*m & 0xFFFFFFFF) for int64 a in [0, 2**32) and a constant 0 <= m < 2**32, exactly."""
    p_lo = (a & _LO16) * m  # < 2**48
    p_hi = (a >> 16) * m  # < 2**48
    lo = (p_lo + ((p_hi & _LO16) << 16)) & _LO32
    hi = (p_hi + (p_lo >> 16)) >> 16
    return hi, lo


def _check(seeds: torch.Tensor, start: torch.Tensor, count: int) -> torch.Tensor:
    """Dtype/shape checks only (reading values would sync the device); returns start as a 0-d tensor."""
    if not isinstance(seeds, torch.Tensor) or seeds.dtype != torch.int64 or seeds.dim() != 1:
        raise InvalidArgumentError(f"seeds must be an int64 tensor [B] (each in [0, 2**63)), got {_describe(seeds)}")
    if not isinstance(start, torch.Tensor) or start.dtype != torch.int64 or start.numel() != 1 or start.dim() > 1:
        raise InvalidArgumentError(
            f"start must be an int64 tensor of shape [] or [1] (a position >= 0), got {_describe(start)}"
        )
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise InvalidArgumentError(f"count must be a non-negative Python int (a static shape), got {count!r}")
    return start.reshape(()).to(seeds.device)


def _describe(x) -> str:
    return f"{x.dtype} tensor of shape {list(x.shape)}" if isinstance(x, torch.Tensor) else repr(x)


def _philox_blocks(seeds: torch.Tensor, block0: torch.Tensor, nblocks: int, stream: int) -> list[torch.Tensor]:
    """Words r0..r3 (int64 [B, nblocks] each) of Philox blocks block0 .. block0 + nblocks - 1 of each seed."""
    b = block0 + torch.arange(nblocks, device=seeds.device, dtype=torch.int64)  # (nb,)
    c0 = (b & _LO32).unsqueeze(0)  # (1, nb)
    c1 = (b >> 32).unsqueeze(0)
    c2 = torch.full_like(c0, stream)
    c3 = torch.zeros_like(c0)
    k0 = (seeds & _LO32).unsqueeze(1)  # (B, 1)
    k1 = ((seeds >> 32) & _LO32).unsqueeze(1)
    for _ in range(PHILOX_ROUNDS):
        hi0, lo0 = _mulhilo32(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo32(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0  # (B, nb) from round 1 on
        k0 = (k0 + PHILOX_W0) & _LO32
        k1 = (k1 + PHILOX_W1) & _LO32
    return [c0, c1, c2, c3]  # (B, nb) each


def _span(start: torch.Tensor, count: int) -> tuple[torch.Tensor, int, torch.Tensor]:
    """(first block, blocks to compute, column index of each position in the [B, 4 * nblocks] words).

    start % 4 is only known on the device, so compute the most blocks any offset needs, ceil((count + 3) / 4),
    and select the count wanted columns with an index tensor (fixed shape, device-side values).
    """
    nblocks = (count + 6) // 4
    idx = (start & 3) + torch.arange(count, device=start.device, dtype=torch.int64)  # (count,)
    return start >> 2, nblocks, idx


def philox_uint32_torch(
    seeds: torch.Tensor, start: torch.Tensor, count: int, stream: int = NORMAL_STREAM
) -> torch.Tensor:
    """int64 [B, count] holding uint32 words start..start+count-1 of stream ``stream`` of each seed.

    Equal, bit for bit, to :func:`far_sdk.maths.noise.philox_uint32`. seeds: int64 [B] in [0, 2**63); start:
    int64 [] or [1] on seeds' device (>= 0; not checked: that would sync); count: a Python int.
    """
    start = _check(seeds, start, count)
    if isinstance(stream, bool) or not isinstance(stream, int) or not 0 <= stream <= _LO32:
        raise InvalidArgumentError(f"stream must be a Python int in [0, 2**32), got {stream!r}")
    block0, nblocks, idx = _span(start, count)
    words = torch.stack(_philox_blocks(seeds, block0, nblocks, stream), dim=-1)  # (B, nb, 4)
    return words.reshape(seeds.shape[0], 4 * nblocks).index_select(1, idx)  # (B, count)


def philox_normals_torch(seeds: torch.Tensor, start: torch.Tensor, count: int) -> torch.Tensor:
    """float32 [B, count] on seeds' device: normals start..start+count-1 of each seed's stream.

    Block b's words r0..r3 give u_i = ((r_i >> 9) + 1/2) 2**-23 (exact) and, in float32,
    z_{4b..4b+3} = sqrt(-2 ln u0) (cos 2pi u1, sin 2pi u1), sqrt(-2 ln u2) (cos 2pi u3, sin 2pi u3).
    Equals :func:`far_sdk.maths.noise.philox_normals` to a few float32 ulps. Arguments as for
    :func:`philox_uint32_torch`; safe to capture in a CUDA graph and to compile.
    """
    start = _check(seeds, start, count)
    block0, nblocks, idx = _span(start, count)
    r = _philox_blocks(seeds, block0, nblocks, NORMAL_STREAM)  # 4 x (B, nb)
    u = [((w >> 9).to(torch.float32) + 0.5) * 2.0**-23 for w in r]  # exact, in (0, 1)
    rad_a = torch.sqrt(-2.0 * torch.log(u[0]))
    rad_b = torch.sqrt(-2.0 * torch.log(u[2]))
    theta_a, theta_b = u[1] * _TWO_PI, u[3] * _TWO_PI
    z = torch.stack(
        [
            rad_a * torch.cos(theta_a),
            rad_a * torch.sin(theta_a),
            rad_b * torch.cos(theta_b),
            rad_b * torch.sin(theta_b),
        ],
        dim=-1,
    )  # (B, nb, 4)
    return z.reshape(seeds.shape[0], 4 * nblocks).index_select(1, idx)  # (B, count)
