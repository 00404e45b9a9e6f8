"""Cost of the Philox noise (far_sdk.maths.noise, training.torch_noise) against the former per-image
PCG64 ``standard_normal``: milliseconds per image for one run's normals, (n + 1) * L * C per outer step,
700 * L * C in all at the paper's frequency-aware schedule.

    PYTHONPATH=. python scripts/bench_noise.py [--repeats 7] [--no-compile] [--device cpu|cuda] [--threads 1]
        [--check] [--no-numpy-rows] [--no-torch]

Rows: one call for all of an image's normals; the same normals drawn as a sampler draws them (700
draws of (B, L, C) through SeededNoise, per image at batch B); torch eager and torch.compile (Inductor).
Medians of --repeats runs after one warm-up; CUDA timings synchronise before each clock read.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np

from far_sdk.maths.noise import SeededNoise, philox_normals, philox_uint32

DRAWS = 700
SIZES = {"real model (L*C = 4096)": 4096, "demo (L*C = 1024)": 1024}


def _median_ms(fn: Callable[[], object], repeats: int, sync: Callable[[], None] = lambda: None) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _pcg64_draws(seeds, lc: int):
    """The former SeededNoise: one PCG64 generator per image, np.stack of per-image draws."""
    gens = [np.random.Generator(np.random.PCG64(s)) for s in seeds]
    for _ in range(DRAWS):
        np.stack([g.standard_normal((lc,), dtype=np.float32) for g in gens])


def _philox_draws(seeds, lc: int):
    src = SeededNoise(seeds)
    for _ in range(DRAWS):
        src((len(seeds), lc))


def _float64_normals(seeds, start: int, count: int):
    """float64 Box-Muller on the (exact) Philox words, and each normal's radius sqrt(-2 ln u)."""
    first = start - start % 4
    n = (start + count + 3) // 4 * 4 - first
    u = (np.floor(philox_uint32(seeds, first, n).astype(np.float64) / 512) + 0.5) * 2.0**-23
    u = u.reshape(len(seeds), -1, 4)
    rad = np.sqrt(-2 * np.log(u[..., 0::2]))
    theta = float(np.float32(2 * np.pi)) * u[..., 1::2]
    z = np.stack(
        [
            rad[..., 0] * np.cos(theta[..., 0]),
            rad[..., 0] * np.sin(theta[..., 0]),
            rad[..., 1] * np.cos(theta[..., 1]),
            rad[..., 1] * np.sin(theta[..., 1]),
        ],
        -1,
    ).reshape(len(seeds), -1)
    rad = np.repeat(rad, 2, axis=-1).reshape(len(seeds), -1)
    sl = slice(start - first, start - first + count)
    return z[:, sl], rad[:, sl]


def _accuracy(name: str, z: np.ndarray, ref: np.ndarray, rad: np.ndarray, numpy_z: np.ndarray) -> str:
    e64 = np.abs(z.astype(np.float64) - ref) / (2.0**-23 * rad)
    enp = np.abs(z.astype(np.float64) - numpy_z) / (2.0**-23 * rad)
    return (
        f"{name:40s} max |z - z64| = {e64.max():.2f} eps32*rad, max |z - numpy| = {enp.max():.2f} eps32*rad, "
        f"bitwise equal to numpy: {np.mean(z == numpy_z):.1%}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile rows")
    p.add_argument("--no-torch", action="store_true", help="NumPy rows only")
    p.add_argument("--device", default="cpu", help="torch rows' device")
    p.add_argument("--check", action="store_true", help="also report accuracy against float64 and NumPy (1e6 normals)")
    p.add_argument(
        "--numpy-rows", action=argparse.BooleanOptionalAction, default=True, help="time the NumPy/PCG64 rows"
    )
    p.add_argument("--torch-batches", default="1", help="comma-separated batch sizes for the torch rows")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (NumPy's rows use one core)")
    a = p.parse_args()
    rows = []
    for name, lc in SIZES.items() if a.numpy_rows else ():
        n = DRAWS * lc
        g = np.random.Generator(np.random.PCG64(0))
        rows.append(
            (
                name,
                "PCG64 standard_normal, one call",
                _median_ms(lambda: g.standard_normal(n, dtype=np.float32), a.repeats),
            )
        )
        rows.append((name, "philox_normals, one call", _median_ms(lambda: philox_normals([0], 0, n), a.repeats)))
        for B in (1, 8):
            seeds = list(range(B))
            rows.append(
                (
                    name,
                    f"former SeededNoise (PCG64), {DRAWS} draws, batch {B}, per image",
                    _median_ms(lambda: _pcg64_draws(seeds, lc), a.repeats) / B,
                )
            )
            rows.append(
                (
                    name,
                    f"SeededNoise (Philox), {DRAWS} draws, batch {B}, per image",
                    _median_ms(lambda: _philox_draws(seeds, lc), a.repeats) / B,
                )
            )
    if not a.no_torch:
        import torch

        from training.torch_noise import philox_normals_torch, philox_uint32_torch

        torch.set_num_threads(a.threads)
        dev = torch.device(a.device)
        sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
        start = torch.zeros((), dtype=torch.int64, device=dev)
        fns = {"eager": philox_normals_torch}
        if not a.no_compile:
            fns["torch.compile"] = torch.compile(philox_normals_torch, dynamic=False)
        where = f"{dev}" if dev.type == "cuda" else f"{dev}, threads {torch.get_num_threads()}"
        for B in (int(b) for b in a.torch_batches.split(",")):
            seeds = torch.arange(B, dtype=torch.int64, device=dev)
            for name, lc in SIZES.items():
                n = DRAWS * lc
                for kind, fn in fns.items():
                    t0 = time.perf_counter()
                    fn(seeds, start, n)
                    sync()
                    first = time.perf_counter() - t0
                    ms = _median_ms(lambda: fn(seeds, start, n), a.repeats, sync) / B
                    rows.append(
                        (
                            name,
                            f"philox_normals_torch {kind} ({where}), one call, batch {B}, per image; first call "
                            f"{first:.1f} s",
                            ms,
                        )
                    )
    checks = []
    if a.check:
        seeds_l, start_i, count = [7, 2**33 + 5, 2**63 - 1], 3, 1_000_001
        ref, rad = _float64_normals(seeds_l, start_i, count)
        zn = philox_normals(seeds_l, start_i, count)
        checks.append(_accuracy("numpy", zn, ref, rad, zn))
        if not a.no_torch:
            st = torch.tensor(start_i, device=dev)
            for kind, fn in fns.items():
                words_ok = bool(
                    (
                        philox_uint32_torch(torch.tensor(seeds_l, device=dev), st, count).cpu().numpy()
                        == philox_uint32(seeds_l, start_i, count).astype(np.int64)
                    ).all()
                )
                z = fn(torch.tensor(seeds_l, device=dev), st, count).cpu().numpy()
                checks.append(
                    _accuracy(f"torch {kind} on {dev}", z, ref, rad, zn) + f"; eager words == numpy words: {words_ok}"
                )
    width = max((len(r[1]) for r in rows), default=0)
    for name, what, ms in rows:
        print(f"{name:24s}  {what:{width}s}  {ms:9.2f} ms/image")
    for line in checks:
        print(line)


if __name__ == "__main__":
    main()
