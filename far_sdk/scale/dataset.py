"""``far generate-dataset``: N images as ADM-format ``.npz`` shards, in one process or over Ray workers.

Image i always has seed ``seed + i`` and, from a class bundle, label ``classes[(i * C) // N]`` (class-balanced, in
blocks, as the paper's 50k evaluation orders them; exactly N / C per class when C divides N); from a text bundle,
caption ``captions[(i * M) // N]`` (M <= N captions, each given N / M consecutive images), whatever the shard size,
the worker count or the batch size, so every way of running a job writes the same bytes.

Layout of ``--out DIR``: ``dataset.json`` (the job, checked on every rerun; a text job lists its captions there),
``shard-KKKKK-of-SSSSS.npz`` (images [start, stop) of shard K) with its integrity record
``shard-KKKKK-of-SSSSS.json`` (:mod:`far_sdk.scale.shards`) and, once all shards exist, ``samples_NxHxWx3.npz``: the
whole set as ADM's ``sample.py`` writes it and its ``evaluator.py`` reads it (``arr_0`` uint8 [N, H, W, 3], ``arr_1``
int64 [N]: labels, or caption indices plus ``captions`` for a text job). Every file is written atomically with fixed
zip timestamps; a rerun keeps a shard only if its record names this job and its sha256 still matches (any other is
generated again, and said so), and the merge checks each sha256 again. One run at a time holds ``--out``.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from far_sdk.bundle.bundle import Bundle
from far_sdk.errors import BackendUnavailableError, InvalidArgumentError, check_range
from far_sdk.maths.masking import check_mode
from far_sdk.options import FIELDS, SamplingOptions, preset, resolve_plan, resolve_text_plan
from far_sdk.pipeline import Generator
from far_sdk.scale.captions import check_captions
from far_sdk.scale.cluster import init_ray
from far_sdk.scale.dataset_dir import check_contents, clear_temporaries, exclusive, sync_job_file
from far_sdk.scale.npzfile import stream_array, write_array
from far_sdk.scale.shards import canonical_sha256, merge, shard_path, verify_shard, write_shard

log = logging.getLogger(__name__)

FORMAT = "far-dataset-v2"  # v2: per-shard integrity records; text jobs
#: Generator.generate keywords a job may set (None: the bundle's default)
SETTING_KEYS = ("preset", *FIELDS)
MAX_IMAGES = 1 << 40  # past any disk; keeps i * C (C <= 10^6 classes) inside int64
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


@dataclass(frozen=True)
class DatasetJob:
    """What to generate. ``settings`` are ``Generator.generate`` keywords; ``batch`` (images per
    generate call) and the worker count change only the speed, never an image. ``classes`` (class bundles; None:
    every class) or ``captions`` (text bundles, at most ``num_images``)."""

    bundle: str
    num_images: int
    seed: int = 0
    shard_size: int = 1000
    classes: tuple[int, ...] | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    batch: int = 16
    backend: str = "onnxruntime"
    backend_options: dict[str, Any] = field(default_factory=lambda: {"threads": 1})
    captions: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("num_images", "shard_size", "batch"):
            object.__setattr__(self, name, int(check_range(name, getattr(self, name), 1, None, integer=True)))
        if self.num_images > MAX_IMAGES:
            raise InvalidArgumentError(f"the number of images (-n) must be at most 2**40, got {self.num_images}")
        check_range(
            "seed (--seed; image i uses seed + i < 2**63)", self.seed, 0, 2**63 - 1 - self.num_images, integer=True
        )
        if not isinstance(self.settings, dict):
            raise InvalidArgumentError(f"settings must be a dict of generate() keywords, got {self.settings!r}")
        unknown = sorted(map(str, set(self.settings) - set(SETTING_KEYS)))
        if unknown:
            raise InvalidArgumentError(f"unknown setting(s) {', '.join(unknown)}; allowed: {', '.join(SETTING_KEYS)}")
        if self.settings.get("preset") is not None:
            preset(self.settings["preset"])
        SamplingOptions(**{k: v for k, v in self.settings.items() if k != "preset" and v is not None})
        if self.classes is not None:
            if isinstance(self.classes, (str, bytes)) or not isinstance(self.classes, Iterable):
                raise InvalidArgumentError(f"classes must be a list of class ids, got {self.classes!r}")
            ids = tuple(int(check_range("each class id", c, 0, None, integer=True)) for c in self.classes)
            twice = sorted({c for c in ids if ids.count(c) > 1})
            if not ids or twice:
                raise InvalidArgumentError(f"classes must be distinct class ids, got {list(self.classes)}")
            object.__setattr__(self, "classes", ids)
        if self.captions is not None:
            object.__setattr__(self, "captions", check_captions(self.captions))
            if self.classes is not None:
                raise InvalidArgumentError("give classes (a class bundle) or captions (a text bundle), not both")
            if len(self.captions) > self.num_images:
                raise InvalidArgumentError(
                    f"{len(self.captions)} captions for {self.num_images} images: every caption needs an image "
                    "(generate at least as many images as captions)"
                )

    @property
    def num_shards(self) -> int:
        return -(-self.num_images // self.shard_size)

    def shard_range(self, k: int) -> tuple[int, int]:
        return k * self.shard_size, min((k + 1) * self.shard_size, self.num_images)

    def identity(self, bundle: Bundle) -> dict[str, Any]:
        """What makes two runs the same job (``dataset.json``; batch and backend options excluded)."""
        d = {
            "format": FORMAT,
            "bundle_manifest_sha256": bundle.manifest["manifest_sha256"],
            "num_images": self.num_images,
            "seed": self.seed,
            "shard_size": self.shard_size,
            "settings": {
                k: (list(v) if isinstance(v, tuple) else v) for k, v in sorted(self.settings.items()) if v is not None
            },
            "backend": self.backend,
        }
        if bundle.conditioning == "text":
            return {**d, "captions": list(self.captions or ())}
        return {**d, "classes": list(self.classes) if self.classes is not None else list(range(bundle.num_classes))}


def balanced_labels(num_images: int, classes: Iterable[int], start: int = 0, stop: int | None = None) -> np.ndarray:
    """int64 [stop - start]: image i (start <= i < stop) gets ``classes[(i * C) // num_images]`` (blocks of N / C)."""
    cls = np.asarray(list(classes), dtype=np.int64)
    i = np.arange(start, num_images if stop is None else stop, dtype=np.int64)
    return cls[(i * len(cls)) // num_images]


@dataclass(frozen=True)
class ShardLayout:
    """What every shard of one job holds, and how image i is conditioned (shared by the workers)."""

    job: DatasetJob
    job_sha256: str
    image_size: int
    classes: tuple[int, ...] | None  # class jobs: arr_1 = labels
    captions: tuple[str, ...] | None  # text jobs: arr_1 = caption index, plus "captions"

    @property
    def caption_dtype(self) -> np.dtype:
        return np.dtype(f"<U{max([1, *map(len, self.captions or ())])}")

    def arrays(self, n: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """{name: (shape, dtype)} of a shard (or the merged file) of ``n`` images."""
        s = self.image_size
        out = {"arr_0": ((n, s, s, 3), np.dtype(np.uint8)), "arr_1": ((n,), np.dtype(np.int64))}
        return {**out, "captions": ((n,), self.caption_dtype)} if self.captions is not None else out

    def arr_1(self, a: int, b: int) -> np.ndarray:
        values = self.classes if self.captions is None else range(len(self.captions))
        return balanced_labels(self.job.num_images, values, a, b)

    def condition(self, arr_1: np.ndarray) -> dict[str, Any]:
        if self.captions is None:
            return {"class_labels": arr_1.tolist()}
        return {"prompt": [self.captions[j] for j in arr_1]}


def generate_shard(gen, layout: ShardLayout, k: int, out: Path, on_images: Callable[[int], None] | None = None):
    """Generate shard ``k`` (images a..b-1, seeds seed + a ..), streamed into its file, which is renamed into place
    after its record is written. Returns the record."""
    job = layout.job
    a, b = job.shard_range(k)
    arr_1 = layout.arr_1(a, b)
    settings = {key: v for key, v in job.settings.items() if v is not None}

    def fill(zf) -> None:
        shape, dtype = layout.arrays(b - a)["arr_0"]
        with stream_array(zf, "arr_0", dtype, shape) as put:
            for i in range(a, b, job.batch):
                j = min(i + job.batch, b)
                cond = layout.condition(arr_1[i - a : j - a])
                put(gen.generate(**cond, seed=job.seed + i, output_type="np", **settings).images)
                if on_images is not None:
                    on_images(j - i)
        write_array(zf, "arr_1", arr_1)
        if layout.captions is not None:
            write_array(zf, "captions", np.array([layout.captions[j] for j in arr_1], dtype=layout.caption_dtype))

    record = {"job_sha256": layout.job_sha256, "shard": k, "num_shards": job.num_shards, "images": [a, b]}
    return write_shard(shard_path(out, k, job.num_shards), record, fill)


class ShardWorker:
    """One Generator generating whole shards (a Ray actor in :func:`_run_ray`; used directly in-process)."""

    def __init__(self, layout: ShardLayout, out: str):
        self.layout, self.out = layout, Path(out)
        job = layout.job
        self.gen = Generator(job.bundle, backend=job.backend, **job.backend_options)

    def shard(self, k: int, on_images: Callable[[int], None] | None = None) -> dict[str, Any]:
        return generate_shard(self.gen, self.layout, k, self.out, on_images)


@dataclass(frozen=True)
class DatasetResult:
    out: Path
    generated: tuple[int, ...]  # shards written by this run
    skipped: tuple[int, ...]  # shards a previous run had finished (verified)
    samples: Path | None  # the merged ADM file (None with merge=False)
    regenerated: tuple[tuple[int, str], ...] = ()  # (shard, why) of shards found on disk that failed verification


@dataclass
class _Prepared:
    layout: ShardLayout
    records: dict[int, dict[str, Any]]  # verified shards
    pending: list[int]
    regenerated: list[tuple[int, str]]


def check_bundle(job: DatasetJob, bundle: Bundle) -> ShardLayout:
    """The job against its bundle (conditioning, class ids, sampling settings): every fault before any image."""
    text = bundle.conditioning == "text"
    if text and job.classes is not None:
        raise InvalidArgumentError(f"bundle {bundle.name!r} is text-conditioned (FAR-T2I): give captions, not classes")
    if text and job.captions is None:
        raise InvalidArgumentError(
            f"bundle {bundle.name!r} is text-conditioned (FAR-T2I): give captions (one per image or fewer)"
        )
    if not text and job.captions is not None:
        raise InvalidArgumentError(f"bundle {bundle.name!r} is class-conditional: captions need a text bundle")
    if text and not (bundle.text or {}).get("encoder"):
        raise InvalidArgumentError(
            f"bundle {bundle.name!r} carries no text encoder, so captions cannot be encoded; export it with "
            "far-export onnx --text-encoder"
        )
    classes = None
    if not text:
        n = bundle.num_classes
        classes = job.classes if job.classes is not None else tuple(range(n))
        bad = [c for c in classes if c >= n]
        if bad:
            raise InvalidArgumentError(f"class {bad[0]} is outside 0..{n - 1} (bundle {bundle.name!r} has {n} classes)")
        if job.num_images % len(classes):
            k = job.num_images // len(classes)
            warnings.warn(
                f"{job.num_images} images over {len(classes)} classes is not class-balanced: some classes get {k} "
                f"images, others {k + 1} (give a multiple of {len(classes)})",
                UserWarning,
                stacklevel=3,
            )
    given = SamplingOptions(**{k: v for k, v in job.settings.items() if k != "preset" and v is not None})
    plan = (resolve_text_plan if text else resolve_plan)(bundle.defaults, given, preset_name=job.settings.get("preset"))
    check_mode(plan.mode, bundle.sampling_modes, f"bundle {bundle.name!r}")
    sha = canonical_sha256(job.identity(bundle))
    return ShardLayout(job, sha, int(bundle.manifest["image_size"]), classes, job.captions)


def prepare(job: DatasetJob, out: Path, *, merge: bool = True) -> _Prepared:
    """Check the job, check or write ``dataset.json``, clear stale temporaries, verify the shards on disk."""
    bundle = Bundle.load(job.bundle, verify=False)
    layout = check_bundle(job, bundle)
    check_contents(out)
    sync_job_file(out, job.identity(bundle))
    clear_temporaries(out)
    records, pending, regenerated = {}, [], []
    present = set(os.listdir(out))  # one listing, not one stat per shard (a million shards stay quick)
    for k in range(job.num_shards):
        a, b = job.shard_range(k)
        path = shard_path(out, k, job.num_shards)
        if path.name not in present:
            pending.append(k)
            continue
        try:
            rec = verify_shard(
                path, job_sha256=layout.job_sha256, k=k, num_shards=job.num_shards, arrays=layout.arrays(b - a)
            )
        except FileNotFoundError:
            pending.append(k)
            continue
        if isinstance(rec, dict):
            records[k] = rec
        else:
            log.warning("%s is generated again: %s", path.name, rec)
            regenerated.append((k, rec))
            pending.append(k)
    _check_space(out, layout, pending, merge)
    return _Prepared(layout, records, pending, regenerated)


def _merged_name(layout: ShardLayout) -> str:
    shape = layout.arrays(layout.job.num_images)["arr_0"][0]
    return f"samples_{'x'.join(map(str, shape))}.npz"


def _check_space(out: Path, layout: ShardLayout, pending: list[int], merge: bool) -> None:
    """Refuse a job the free space cannot hold (the pending shards, plus the merged file) before any work."""
    job = layout.job
    per_image = sum(int(np.prod(s[1:], dtype=np.int64)) * d.itemsize for s, d in layout.arrays(1).values())
    images = sum(job.shard_range(k)[1] - job.shard_range(k)[0] for k in pending) + (job.num_images if merge else 0)
    try:
        free = shutil.disk_usage(out).free
    except OSError:
        return
    if images * per_image > free:
        raise InvalidArgumentError(
            f"{out} has {_size(free)} free but this job needs {_size(images * per_image)} more "
            f"({len(pending)} shard(s){' and the merged file' if merge else ''}); free space, lower -n"
            + (", or pass --no-merge" if merge else "")
        )


def _size(n: float) -> str:
    """Bytes for people: 37 kB, 1.2 GB."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 1e3:.0f} kB"


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
    """Generate the job's missing (or failed) shards (``workers`` 0: in this process; N: N Ray actors) and merge."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InvalidArgumentError(f"{out} is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    with exclusive(out):
        prep = prepare(job, out, merge=merge)
        layout, records = prep.layout, prep.records
        bar = _progress(job.num_images, sum(r["images"][1] - r["images"][0] for r in records.values()), progress)
        try:
            if prep.pending and workers == 0:
                worker = ShardWorker(layout, str(out))
                for k in prep.pending:
                    records[k] = worker.shard(k, on_images=bar.update if bar is not None else None)
            elif prep.pending:
                records.update(_run_ray(layout, out, prep.pending, workers, address, bar))
            samples = None
            if merge:
                samples = out / _merged_name(layout)
                shards = [(shard_path(out, k, job.num_shards), records[k]) for k in range(job.num_shards)]
                merge_shards(samples, shards, layout)
        except OSError as e:
            if e.errno not in _NO_SPACE:
                raise
            raise OSError(
                e.errno,
                f"{os.strerror(e.errno)} while writing into {out} (finished shards are kept): free space and run the "
                "same command again to resume",
            ) from e
        finally:
            if bar is not None:
                bar.close()
    done = tuple(k for k in range(job.num_shards) if k not in prep.pending)
    return DatasetResult(out, tuple(prep.pending), done, samples, tuple(prep.regenerated))


def merge_shards(dest: Path, shards: list[tuple[Path, dict[str, Any]]], layout: ShardLayout) -> Path:
    """``samples_NxHxWx3.npz`` (ADM's name and layout) from the verified shards."""
    merge(dest, shards, layout.arrays(layout.job.num_images))
    return dest


def _run_ray(layout: ShardLayout, out: Path, pending: list[int], workers: int, address: str | None, bar):
    try:
        import ray  # noqa: PLC0415 - far serve's optional dependency
        from ray.util import ActorPool  # noqa: PLC0415 - far serve's optional dependency
    except ImportError as e:
        msg = f"--workers needs Ray ({e}); install it with: pip install 'far-sdk[serve]', or use --workers 0"
        raise BackendUnavailableError(msg) from e
    started = not ray.is_initialized()
    if started:
        init_ray(ray, address, include_dashboard=False, log_to_driver=False)
    records = {}
    try:
        cpus = float(layout.job.backend_options.get("threads", 1))
        actor = ray.remote(num_cpus=cpus)(ShardWorker)
        pool = ActorPool([actor.remote(layout, str(out)) for _ in range(min(workers, len(pending)))])
        for rec in pool.map_unordered(lambda w, k: w.shard.remote(k), pending):
            records[rec["shard"]] = rec
            if bar is not None:
                bar.update(rec["images"][1] - rec["images"][0])
    finally:
        if started:
            ray.shutdown()
    return records
