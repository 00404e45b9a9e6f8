"""``far generate-dataset``: N images as ADM-format ``.npz`` shards, in one process or over Ray workers.

Image i always has seed ``seed + i`` and label ``classes[(i * C) // N]`` (class-balanced, in blocks, as
the paper's 50k evaluation orders them; exactly N / C per class when C divides N), whatever the shard
size, the worker count or the batch size, so every way of running a job writes the same bytes.

Layout of ``--out DIR``: ``dataset.json`` (the job, checked on every rerun), ``shard-KKKKK-of-SSSSS.npz``
(images [start, stop) of shard K) and, once all shards exist, ``samples_NxHxWx3.npz``: the whole set as
ADM's ``sample.py`` writes it and its ``evaluator.py`` reads it (``arr_0`` uint8 [N, H, W, 3], ``arr_1`` int64
labels [N]). Every file is written atomically (temporary file + rename) with fixed zip timestamps, so a
shard exists complete or not at all, a rerun skips finished shards, and the same job gives the same bytes.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from far_sdk.bundle.bundle import Bundle
from far_sdk.errors import BackendUnavailableError, DataError, InvalidArgumentError
from far_sdk.fileio import atomic_write_json, atomic_writer
from far_sdk.options import FIELDS
from far_sdk.pipeline import Generator

log = logging.getLogger(__name__)

JOB_FILE = "dataset.json"
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed member timestamps: np.savez stamps "now", which breaks byte equality
#: Generator.generate keywords a job may set (None: the bundle's default)
SETTING_KEYS = ("preset", *FIELDS)


@dataclass(frozen=True)
class DatasetJob:
    """What to generate. ``settings`` are ``Generator.generate`` keywords; ``batch`` (images per
    generate call) and the worker count change only the speed, never an image."""

    bundle: str
    num_images: int
    seed: int = 0
    shard_size: int = 1000
    classes: tuple[int, ...] | None = None  # None: every class of the bundle
    settings: dict[str, Any] = field(default_factory=dict)
    batch: int = 16
    backend: str = "onnxruntime"
    backend_options: dict[str, Any] = field(default_factory=lambda: {"threads": 1})

    def __post_init__(self) -> None:
        for name in ("num_images", "shard_size", "batch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InvalidArgumentError(f"{name} must be a positive integer, got {v!r}")
        if (
            isinstance(self.seed, bool)
            or not isinstance(self.seed, int)
            or not 0 <= self.seed < 2**63 - self.num_images
        ):
            raise InvalidArgumentError(f"seed must be an integer in 0..2**63 - num_images, got {self.seed!r}")
        unknown = sorted(set(self.settings) - set(SETTING_KEYS))
        if unknown:
            raise InvalidArgumentError(f"unknown setting(s) {', '.join(unknown)}; allowed: {', '.join(SETTING_KEYS)}")

    @property
    def num_shards(self) -> int:
        return -(-self.num_images // self.shard_size)

    def shard_range(self, k: int) -> tuple[int, int]:
        return k * self.shard_size, min((k + 1) * self.shard_size, self.num_images)

    def identity(self, manifest_sha256: str, num_classes: int) -> dict[str, Any]:
        """What makes two runs the same job (written to dataset.json; batch and backend options excluded)."""
        d = asdict(self)
        for k in ("bundle", "batch", "backend_options"):
            d.pop(k)
        d["classes"] = list(self.classes) if self.classes is not None else list(range(num_classes))
        d["settings"] = {
            k: (list(v) if isinstance(v, tuple) else v) for k, v in sorted(self.settings.items()) if v is not None
        }
        return {"format": "far-dataset-v1", "bundle_manifest_sha256": manifest_sha256, **d}


def balanced_labels(num_images: int, classes: Iterable[int]) -> np.ndarray:
    """int64 [num_images]: image i gets ``classes[(i * C) // num_images]`` (blocks of N / C per class)."""
    cls = np.asarray(list(classes), dtype=np.int64)
    i = np.arange(num_images, dtype=np.int64)
    return cls[(i * len(cls)) // num_images]


def shard_path(out: Path, k: int, n: int) -> Path:
    return out / f"shard-{k:05d}-of-{n:05d}.npz"


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez`` layout (stored, no compression) written atomically with fixed member timestamps."""
    with atomic_writer(path) as f, zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, a in arrays.items():
            with zf.open(_member(name), "w", force_zip64=True) as w:
                np.lib.format.write_array(w, np.ascontiguousarray(a), allow_pickle=False)


def _member(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_TIME)
    info.external_attr = 0o644 << 16
    return info


def npz_shapes(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{array name: (shape, dtype)} from the .npy headers only (no data read). Raises DataError."""
    try:
        with zipfile.ZipFile(path) as zf:
            out = {}
            for info in zf.infolist():
                with zf.open(info) as f:
                    fmt = np.lib.format
                    read = fmt.read_array_header_1_0 if fmt.read_magic(f) == (1, 0) else fmt.read_array_header_2_0
                    shape, _, dtype = read(f)
                    out[info.filename.removesuffix(".npy")] = (tuple(shape), dtype)
            return out
    except (OSError, zipfile.BadZipFile, ValueError) as e:
        raise DataError(f"{path} is not a readable .npz file ({e})") from e


def _shard_ok(path: Path, n: int) -> bool:
    try:
        s = npz_shapes(path)
    except DataError:
        return False
    return (
        s.get("arr_0", ((), None))[0][:1] == (n,)
        and s["arr_0"][1] == np.uint8
        and s.get("arr_1", ((), None))[0] == (n,)
    )


def generate_shard(
    gen, job: DatasetJob, k: int, out: Path, labels: np.ndarray, on_images: Callable[[int], None] | None = None
) -> int:
    """Generate shard ``k`` (images start..stop-1, seeds seed + start ..) and write it atomically."""
    a, b = job.shard_range(k)
    parts = []
    for i in range(a, b, job.batch):
        j = min(i + job.batch, b)
        settings = {key: v for key, v in job.settings.items() if v is not None}
        parts.append(gen.generate(labels[i:j].tolist(), seed=job.seed + i, output_type="np", **settings).images)
        if on_images is not None:
            on_images(j - i)
    write_npz(shard_path(out, k, job.num_shards), {"arr_0": np.concatenate(parts), "arr_1": labels[a:b]})
    return b - a


class ShardWorker:
    """One Generator generating whole shards (a Ray actor in :func:`run_ray`; used directly in-process)."""

    def __init__(self, job: DatasetJob, out: str, labels: np.ndarray):

        self.job, self.out, self.labels = job, Path(out), labels
        self.gen = Generator(job.bundle, backend=job.backend, **job.backend_options)

    def shard(self, k: int, on_images: Callable[[int], None] | None = None) -> int:
        return generate_shard(self.gen, self.job, k, self.out, self.labels, on_images)


@dataclass(frozen=True)
class DatasetResult:
    out: Path
    generated: tuple[int, ...]  # shards written by this run
    skipped: tuple[int, ...]  # shards a previous run had finished
    samples: Path | None  # the merged ADM file (None with merge=False)


def prepare(job: DatasetJob, out: Path) -> tuple[np.ndarray, list[int], list[int]]:
    """Check or write ``dataset.json``, clear stale temporaries, and split shards into pending and done."""

    bundle = Bundle.load(job.bundle, verify=False)
    classes = job.classes if job.classes is not None else tuple(range(bundle.num_classes))
    for c in classes:
        if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < bundle.num_classes:
            raise InvalidArgumentError(f"class {c!r} is outside 0..{bundle.num_classes - 1}")
    if job.num_images % len(classes):
        n = job.num_images // len(classes)
        warnings.warn(
            f"{job.num_images} images over {len(classes)} classes is not class-balanced: some classes get {n} images, "
            f"others {n + 1} (give a multiple of {len(classes)})",
            UserWarning,
            stacklevel=3,
        )
    ident = job.identity(bundle.manifest["manifest_sha256"], bundle.num_classes)
    out.mkdir(parents=True, exist_ok=True)
    jf = out / JOB_FILE
    if jf.exists():
        try:
            old = json.loads(jf.read_text())
        except (OSError, ValueError) as e:
            raise DataError(f"{jf} is unreadable ({e}); remove it or use a new --out") from e
        diff = sorted(k for k in set(old) | set(ident) if old.get(k) != ident.get(k))
        if diff:
            raise InvalidArgumentError(
                f"{out} holds shards of another job ({', '.join(diff)} differ: "
                f"{', '.join(f'{k}={old.get(k)!r}' for k in diff)}); use a new --out or remove {out}"
            )
    else:
        atomic_write_json(jf, ident)
    for tmp in out.glob(".shard-*.npz.*.tmp"):  # left by a killed run: atomic_writer never renamed them
        tmp.unlink(missing_ok=True)
    done, pending = [], []
    for k in range(job.num_shards):
        a, b = job.shard_range(k)
        p = shard_path(out, k, job.num_shards)
        if p.exists() and _shard_ok(p, b - a):
            done.append(k)
        else:
            if p.exists():
                log.warning("%s is not a valid shard of this job: generating it again", p)
            pending.append(k)
    return balanced_labels(job.num_images, classes), done, pending


def merge_shards(job: DatasetJob, out: Path) -> Path:
    """Write ``samples_NxHxWx3.npz`` (ADM's name and layout) from the shards, one shard in memory at a time."""
    shards = [shard_path(out, k, job.num_shards) for k in range(job.num_shards)]
    shape0, _ = npz_shapes(shards[0])["arr_0"]
    shape = (job.num_images, *shape0[1:])
    dest = out / f"samples_{'x'.join(map(str, shape))}.npz"
    with atomic_writer(dest) as f, zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, dtype, full in (("arr_0", np.uint8, shape), ("arr_1", np.int64, (job.num_images,))):
            with zf.open(_member(name), "w", force_zip64=True) as w:
                header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": full}
                np.lib.format.write_array_header_1_0(w, header)  # what np.save writes for these headers
                for p in shards:
                    with np.load(p, allow_pickle=False) as z:
                        w.write(np.ascontiguousarray(z[name], dtype=dtype).tobytes())
    return dest


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm  # noqa: PLC0415 - loaded on first use: `import far_sdk` stays light

    return tqdm(total=total, initial=initial, desc="far generate-dataset", unit="img")


def generate_dataset(
    job: DatasetJob,
    out: str | os.PathLike,
    *,
    workers: int = 0,
    address: str | None = None,
    merge: bool = True,
    progress: bool = True,
) -> DatasetResult:
    """Generate the job's missing shards (``workers`` 0: in this process; N: N Ray actors) and merge."""
    out = Path(out)
    labels, done, pending = prepare(job, out)
    images_done = sum(job.shard_range(k)[1] - job.shard_range(k)[0] for k in done)
    bar = _progress(job.num_images, images_done, progress)
    try:
        if pending and workers == 0:
            worker = ShardWorker(job, str(out), labels)
            for k in pending:
                worker.shard(k, on_images=bar.update if bar is not None else None)
        elif pending:
            _run_ray(job, out, labels, pending, workers, address, bar)
    finally:
        if bar is not None:
            bar.close()
    samples = merge_shards(job, out) if merge else None
    return DatasetResult(out=out, generated=tuple(pending), skipped=tuple(done), samples=samples)


def _run_ray(job, out: Path, labels, pending: list[int], workers: int, address: str | None, bar) -> None:
    try:
        import ray  # noqa: PLC0415 - far serve's optional dependency
        from ray.util import ActorPool  # noqa: PLC0415 - far serve's optional dependency
    except ImportError as e:
        raise BackendUnavailableError(
            f"--workers needs Ray ({e}); install it with: pip install 'far-sdk[serve]', "
            "or use --workers 0 (one process)"
        ) from e
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    try:
        cpus = float(job.backend_options.get("threads", 1))
        actor = ray.remote(num_cpus=cpus)(ShardWorker)
        pool = ActorPool([actor.remote(job, str(out), labels) for _ in range(min(workers, len(pending)))])
        for n in pool.map_unordered(lambda w, k: w.shard.remote(k), pending):
            if bar is not None:
                bar.update(n)
    finally:
        if started:
            ray.shutdown()
