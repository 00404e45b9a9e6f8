"""``far serve``, ``far generate-dataset`` and ``far eval``: the options and runners (far_sdk.cli.main lists them).

Ray, torch and torch-fidelity are imported by the runners, never when ``far`` starts.
"""

from __future__ import annotations

import argparse
import json
import signal
import threading
from pathlib import Path

from far_sdk.bundle.bundle import Bundle
from far_sdk.cli.run import add_bundle_argument, check_writable_dir, check_writable_file, non_negative_int, positive_int
from far_sdk.cli.sampling import add_sampling_args, options_from_args
from far_sdk.errors import InvalidArgumentError
from far_sdk.fileio import atomic_write_json
from far_sdk.scale import serve
from far_sdk.scale.captions import read_captions
from far_sdk.scale.dataset import DatasetJob, generate_dataset
from far_sdk.scale.evaluation import evaluate


def _backend_args(p: argparse.ArgumentParser, default_backend: str) -> None:
    add_bundle_argument(p)
    p.add_argument(
        "--backend", default=default_backend, choices=["auto", "tensorrt", "onnxruntime", "torch"], help="runtime"
    )
    p.add_argument("--device", default=None, help="backend device (cpu, cuda, ...)")
    p.add_argument(
        "--threads", type=positive_int, default=None, help="CPU threads per Generator (onnxruntime/torch on CPU)"
    )


def _backend_options(a: argparse.Namespace, default_threads: int | None = None) -> dict:
    opts = {}
    if a.device:
        opts["device"] = a.device
    threads = a.threads if a.threads is not None else default_threads
    if threads is not None and a.backend in ("onnxruntime", "torch"):
        opts["threads"] = threads
    return opts


def _sampling(a: argparse.Namespace) -> dict:
    """generate() keywords from far_sdk.options.add_sampling_args' flags (unset ones left out)."""
    return {**({"preset": a.preset} if a.preset else {}), **options_from_args(a).given()}


# ---- far serve -------------------------------------------------------------------------------------


def add_serve(p: argparse.ArgumentParser) -> None:
    _backend_args(p, "auto")
    p.add_argument("--host", default="127.0.0.1", help="HTTP address (0.0.0.0 to listen on every interface)")
    p.add_argument("--port", type=positive_int, default=8000, help="HTTP port")
    p.add_argument(
        "--max-batch", type=positive_int, default=8, help="most requests merged into one generate call (1: no batching)"
    )
    p.add_argument("--batch-wait-ms", type=float, default=10.0, help="how long a replica waits to fill a batch")
    p.add_argument("--max-images-per-request", type=positive_int, default=16, help="larger requests get 400")
    p.add_argument("--num-replicas", type=positive_int, default=1, help="Generators serving in parallel")
    p.add_argument(
        "--autoscale",
        default=None,
        metavar="MIN:MAX",
        help="autoscale between MIN and MAX replicas (instead of --num-replicas)",
    )
    p.add_argument("--target-ongoing-requests", type=float, default=4.0, help="autoscaling target per replica")
    p.add_argument(
        "--max-ongoing-requests",
        type=positive_int,
        default=None,
        help="requests one replica holds (default 4 x --max-batch)",
    )
    p.add_argument(
        "--max-queued-requests", type=positive_int, default=64, help="queued requests before 503 (a bounded queue)"
    )
    p.add_argument("--gpus-per-replica", type=float, default=None, help="default: 1 where the cluster has GPUs, else 0")
    p.add_argument("--cpus-per-replica", type=float, default=1.0, help="CPUs Ray reserves per replica")
    p.add_argument(
        "--address", default=None, help="Ray cluster to join ('auto', ray://HOST:10001); default: start a local one"
    )


def run_serve(a: argparse.Namespace) -> int:

    lo = hi = None
    if a.autoscale:
        try:
            lo, hi = (int(x) for x in a.autoscale.split(":"))
        except ValueError:
            raise InvalidArgumentError(f"--autoscale must be MIN:MAX (two integers), got {a.autoscale!r}") from None
    bundle = Path(a.bundle)
    if not bundle.is_dir():
        raise InvalidArgumentError(f"--bundle {bundle} is not a directory")
    cfg = serve.ServeConfig(
        bundle=str(bundle.resolve()),
        backend=a.backend,
        backend_options=_backend_options(a),
        max_batch=a.max_batch,
        batch_wait_ms=a.batch_wait_ms,
        max_images_per_request=a.max_images_per_request,
        num_replicas=a.num_replicas,
        min_replicas=lo,
        max_replicas=hi,
        target_ongoing_requests=a.target_ongoing_requests,
        max_ongoing_requests=a.max_ongoing_requests,
        max_queued_requests=a.max_queued_requests,
        gpus_per_replica=a.gpus_per_replica,
        cpus_per_replica=a.cpus_per_replica,
        host=a.host,
        port=a.port,
    )
    print(f"far serve: starting {a.bundle} ({a.backend}) ...", flush=True)
    running = serve.start(cfg, address=a.address)
    replicas = f"{lo}..{hi} replicas (autoscaling)" if a.autoscale else f"{a.num_replicas} replica(s)"
    print(
        f"far serve: ready at {running.url} (playground), {running.url}docs (API), {running.url}metrics; "
        f"{replicas}, batches of up to {a.max_batch} requests; Ctrl-C stops",
        flush=True,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass  # Ctrl-C is how a server is stopped: a clean stop, status 0
    print("far serve: stopping (requests in flight finish first) ...", flush=True)
    serve.stop(running)
    print(
        "far serve: stopped" + ("" if running.started_ray else "; Ray Serve keeps running on the cluster"), flush=True
    )
    return 0


# ---- far generate-dataset --------------------------------------------------------------------------


def add_dataset(p: argparse.ArgumentParser) -> None:
    _backend_args(p, "onnxruntime")
    p.add_argument("-n", "--num-images", type=positive_int, required=True, help="images in the dataset")
    p.add_argument("--out", required=True, help="output directory (shards, dataset.json, samples_NxHxWx3.npz)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="image i uses seed + i")
    p.add_argument(
        "--class",
        dest="classes",
        type=non_negative_int,
        action="append",
        default=None,
        help="restrict to these class ids (repeat); default: every class, balanced (class bundles)",
    )
    p.add_argument(
        "--captions",
        default=None,
        metavar="FILE",
        help="text bundles: the captions, one per line (UTF-8), or a .json list of strings; image i gets caption "
        "(i * M) // N of the M captions (M <= -n), recorded with the images",
    )
    p.add_argument("--shard-size", type=positive_int, default=1000, help="images per .npz shard")
    p.add_argument("--batch", type=positive_int, default=16, help="images per generate call (speed only)")
    p.add_argument("--workers", type=non_negative_int, default=0, help="Ray workers (0: this process)")
    p.add_argument("--address", default=None, help="Ray cluster to join (default: start a local one)")
    p.add_argument("--no-merge", action="store_true", help="keep the shards only (no samples_NxHxWx3.npz)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_sampling_args(p)


def run_dataset(a: argparse.Namespace) -> int:
    check_writable_dir(a.out, "--out")
    bundle = Bundle.load(a.bundle, verify=False)
    captions = _dataset_conditioning(a, bundle)
    job = DatasetJob(
        bundle=str(Path(a.bundle).resolve()),
        num_images=a.num_images,
        seed=a.seed,
        shard_size=a.shard_size,
        classes=tuple(a.classes) if a.classes else None,
        captions=captions,
        settings=_sampling(a),
        batch=a.batch,
        backend=a.backend,
        backend_options=_backend_options(a, default_threads=1),
    )
    r = generate_dataset(
        job, a.out, workers=a.workers, address=a.address, merge=not a.no_merge, progress=not a.no_progress
    )
    again = f" ({len(r.regenerated)} of them failed verification: regenerated)" if r.regenerated else ""
    print(
        f"far generate-dataset: {job.num_images} images in {job.num_shards} shard(s) under {r.out}: "
        f"{len(r.generated)} generated{again}, {len(r.skipped)} already done"
        + (f"; merged {r.samples}" if r.samples else "")
    )
    return 0


def _dataset_conditioning(a: argparse.Namespace, bundle: Bundle) -> tuple[str, ...] | None:
    """--class / --captions against the bundle's conditioning, in flag words; the captions read from their file."""
    if bundle.conditioning == "text":
        if a.classes:
            raise InvalidArgumentError(
                f"--class is for class-conditional bundles; {bundle.name!r} is text-conditioned (FAR-T2I): "
                "pass --captions FILE"
            )
        if a.captions is None:
            raise InvalidArgumentError(
                f"--bundle {bundle.name!r} is text-conditioned (FAR-T2I): pass --captions FILE (one caption per line, "
                "or a .json list of strings)"
            )
        captions = read_captions(a.captions)
        if len(captions) > a.num_images:
            raise InvalidArgumentError(
                f"--captions {a.captions} holds {len(captions)} captions but -n is {a.num_images}: every caption needs "
                f"an image (use -n {len(captions)} or more, or fewer captions)"
            )
        return captions
    if a.captions is not None:
        raise InvalidArgumentError(
            f"--captions is for text-conditioned (FAR-T2I) bundles; {bundle.name!r} is class-conditional: leave it "
            "out (every class, balanced) or pick classes with --class"
        )
    n = bundle.num_classes
    for c in a.classes or ():
        if c >= n:
            raise InvalidArgumentError(f"--class {c} is outside 0..{n - 1} (bundle {bundle.name!r} has {n} classes)")
        if a.classes.count(c) > 1:
            raise InvalidArgumentError(f"--class {c} is given twice; give each class once (images are balanced)")
    return None


# ---- far eval --------------------------------------------------------------------------------------


def add_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--samples", required=True, help="generated images: ADM .npz (arr_0 uint8 N x H x W x 3) or a folder"
    )
    p.add_argument(
        "--reference",
        required=True,
        help="reference images: ADM .npz (e.g. VIRTUAL_imagenet256_labeled.npz) or a folder",
    )
    p.add_argument(
        "--inception-weights",
        required=True,
        help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth (no download)",
    )
    p.add_argument("--batch", type=positive_int, default=64, help="images per Inception batch")
    p.add_argument("--device", default="cpu", help="torch device of the Inception network (cpu, cuda)")
    p.add_argument("--isc-splits", type=positive_int, default=10, help="Inception Score splits")
    p.add_argument("--prc-neighborhood", type=positive_int, default=3, help="precision/recall k-NN size")
    p.add_argument("--json", default=None, help="also write the results to this .json file")


def run_eval(a: argparse.Namespace) -> int:

    if a.json:
        check_writable_file(a.json, "--json", suffixes=(".json",))
    r = evaluate(
        a.samples,
        a.reference,
        a.inception_weights,
        batch_size=a.batch,
        device=a.device,
        isc_splits=a.isc_splits,
        prc_neighborhood=a.prc_neighborhood,
    )
    if a.json:
        atomic_write_json(Path(a.json), r)
    print(json.dumps(r))
    print(
        f"FID {r['fid']:.4f}  IS {r['inception_score_mean']:.3f} ± {r['inception_score_std']:.3f}  precision "
        f"{r['precision']:.4f}  recall {r['recall']:.4f}  ({r['num_samples']} samples vs {r['num_reference']} "
        "reference)"
    )
    return 0
