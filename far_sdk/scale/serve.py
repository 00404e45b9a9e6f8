"""``far serve``: a :class:`~far_sdk.Generator` behind HTTP, on Ray Serve.

One Generator per replica (one GPU per replica where the cluster has GPUs); ``@serve.batch`` collects
concurrent requests and every group of them that shares sampling settings becomes one
``Generator.generate`` call. Each image keeps its own seed stream (``noise=SeededNoise(seeds)``: image j
of a request with seed s draws the stream of seed s + j, as ``generate(labels, seed=s)`` does), so
merging requests never changes an image.

HTTP (all JSON except PNG output):

- ``POST /generate`` ``{"class_labels": [3, "7"], "seed": 0, "num_steps": 10, "cfg": 3.0,
  "inner_steps": 40, "inner_sampler": "ddpm", "eta": null, "temperature": 1.0, "preset": null,
  "output_format": "json" | "png"}``; only ``class_labels`` is required. "json" answers
  ``{"images": [base64 PNG, ...], "seeds", "class_labels", "batch_images", "batch_requests"}``;
  "png" answers the PNG of a one-image request. Headers ``X-Far-Batch-Images`` / ``X-Far-Batch-Requests``
  report the merged call the request rode in.
- ``GET /health``, ``GET /info`` (the bundle's summary and this replica's batch-size histogram).

Bad requests get 400 with the far_sdk error's message (404/405 for unknown paths and methods);
overload gets Ray Serve's 503 once ``max_queued_requests`` callers wait (a bounded queue). Ray and
Starlette are imported only when a deployment is built, so this module imports without them.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from far_sdk.conditioning import class_ids
from far_sdk.errors import BackendUnavailableError, FarError, InvalidArgumentError
from far_sdk.maths.noise import SeededNoise
from far_sdk.pipeline import Generator

log = logging.getLogger(__name__)

#: request field -> (JSON types allowed, what the message says). None is "the bundle's default".
SETTING_FIELDS: dict[str, tuple[tuple[type, ...], str]] = {
    "num_steps": ((int,), "an integer"),
    "cfg": ((int, float), "a number"),
    "temperature": ((int, float), "a number"),
    "inner_steps": ((int, str, list), "an integer, 'frequency-aware', 'official' or a list of integers"),
    "inner_sampler": ((str,), "'ddpm' or 'ddim'"),
    "eta": ((int, float), "a number"),
    "preset": ((str,), "a preset name"),
    "mode": ((str,), "'nomask' or 'mask' (one of the bundle's sampling_modes)"),
}
REQUEST_FIELDS = ("class_labels", "seed", "output_format", *SETTING_FIELDS)
OUTPUT_FORMATS = ("json", "png")
DEPLOYMENT_NAME = "FarGenerator"


class BadRequestError(InvalidArgumentError):
    """A request body that is not valid JSON or not a valid generate request (HTTP 400)."""


@dataclass(frozen=True)
class GenerateRequest:
    """A validated ``POST /generate`` body. ``settings`` (sorted, hashable) is the batching key."""

    class_ids: tuple[int, ...]
    seed: int
    settings: tuple[tuple[str, Any], ...]
    output_format: str = "json"

    @property
    def seeds(self) -> tuple[int, ...]:
        return tuple(self.seed + j for j in range(len(self.class_ids)))


@dataclass(frozen=True)
class ServeConfig:
    """How ``far serve`` deploys: the bundle, the batching and the replicas.

    max_batch: most requests merged into one generate call (1 turns batching off; a call holds up to
    max_batch x max_images_per_request images, split further only where an engine's profile demands);
    batch_wait_ms: how long a replica waits for more requests after the first. max_ongoing_requests: requests one
    replica
    holds at once (default 4 x max_batch); max_queued_requests: requests each caller (the HTTP proxy)
    queues before answering 503. num_replicas, or autoscaling between min_replicas and max_replicas
    at target_ongoing_requests per replica. gpus_per_replica None: 1 where the cluster has GPUs, else 0.
    """

    bundle: str
    backend: str = "auto"
    backend_options: dict[str, Any] = field(default_factory=dict)
    max_batch: int = 8
    batch_wait_ms: float = 10.0
    max_images_per_request: int = 16
    num_replicas: int = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: float = 4.0
    max_ongoing_requests: int | None = None
    max_queued_requests: int = 64
    gpus_per_replica: float | None = None
    cpus_per_replica: float = 1.0
    host: str = "127.0.0.1"
    port: int = 8000
    route_prefix: str = "/"
    app_name: str = "far"

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_images_per_request", "num_replicas", "max_queued_requests"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InvalidArgumentError(f"{name} must be a positive integer, got {v!r}")
        if not (isinstance(self.batch_wait_ms, (int, float)) and 0 <= self.batch_wait_ms <= 10_000):
            raise InvalidArgumentError(f"batch_wait_ms must be in 0..10000, got {self.batch_wait_ms!r}")
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise InvalidArgumentError("autoscaling needs both min_replicas and max_replicas")
        if self.min_replicas is not None and not 0 <= self.min_replicas <= self.max_replicas:
            raise InvalidArgumentError(
                f"need 0 <= min_replicas <= max_replicas, got {self.min_replicas}, {self.max_replicas}"
            )
        if self.max_ongoing_requests is not None and self.max_ongoing_requests < 1:
            raise InvalidArgumentError(f"max_ongoing_requests must be >= 1, got {self.max_ongoing_requests}")


def _check_type(name: str, value: Any, types: tuple[type, ...], what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, types):
        raise BadRequestError(f"{name} must be {what}, got {json.dumps(value)}")


def parse_request(body: bytes | str, gen, *, max_images: int = 16) -> GenerateRequest:
    """Validate a ``POST /generate`` body against ``gen``'s bundle: class ids or names, seed, settings.

    Raises :class:`BadRequestError` (malformed JSON, unknown fields, wrong types) or far_sdk's own
    :class:`InvalidArgumentError` (unknown class, settings out of range) with the message to show.
    """
    try:
        obj = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadRequestError(
            f'the request body is not valid JSON ({e}); send an object such as {{"class_labels": [3], "seed": 0}}'
        ) from None
    if not isinstance(obj, dict):
        raise BadRequestError(f"the request body must be a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(REQUEST_FIELDS))
    if unknown:
        raise BadRequestError(f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(REQUEST_FIELDS)}")
    if "class_labels" not in obj:
        raise BadRequestError("class_labels is required: a class id or name, or a list of them")
    labels = obj["class_labels"]
    labels = labels if isinstance(labels, list) else [labels]
    for lab in labels:
        _check_type("class_labels", lab, (int, str), "class ids (integers) or class names (strings)")
    ids = class_ids(gen.bundle, labels)
    if len(ids) > max_images:
        raise BadRequestError(f"{len(ids)} images requested; this server allows at most {max_images} per request")
    seed = obj.get("seed", 0)
    _check_type("seed", seed, (int,), "a non-negative integer")
    if not 0 <= seed <= 2**63 - 1 - len(ids):
        raise BadRequestError(f"seed must be in 0..2**63 - 1 - (images - 1), got {seed}")
    fmt = obj.get("output_format", "json")
    if fmt not in OUTPUT_FORMATS:
        raise BadRequestError(f"output_format must be one of {', '.join(OUTPUT_FORMATS)}, got {json.dumps(fmt)}")
    if fmt == "png" and len(ids) != 1:
        raise BadRequestError(f"output_format 'png' returns one image; this request asks for {len(ids)} (use 'json')")
    settings = {}
    for name, (types, what) in SETTING_FIELDS.items():
        v = obj.get(name)
        if v is None:
            continue
        _check_type(name, v, types, what)
        if isinstance(v, list):
            for x in v:
                _check_type(name, x, (int,), what)
            v = tuple(v)
        settings[name] = v
    gen.plan(**settings)  # far_sdk's own range checks (steps 1..16, cfg, eta with ddim, ...)
    return GenerateRequest(class_ids=ids, seed=seed, settings=tuple(sorted(settings.items())), output_format=fmt)


def group_by_settings(requests: list[GenerateRequest]) -> dict[tuple, list[int]]:
    """Indices of ``requests`` per distinct settings, in arrival order: each group is one generate call."""
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(requests):
        groups.setdefault(r.settings, []).append(i)
    return groups


def generate_group(gen, requests: list[GenerateRequest], max_images: int | None = None) -> list:
    """Run requests that share settings as few ``generate`` calls as the backend allows; returns one
    uint8 [B_i, H, W, 3] array per request. Image j of request i uses seed ``seed_i + j``."""

    settings = dict(requests[0].settings)
    labels = [c for r in requests for c in r.class_ids]
    seeds = [s for r in requests for s in r.seeds]
    limit = min(x for x in (gen.backend.max_batch, max_images, len(labels)) if x is not None)
    parts = []
    for a in range(
        0, len(labels), limit
    ):  # an engine's profile caps one call; a seed stream never depends on the split
        out = gen.generate(labels[a : a + limit], noise=SeededNoise(seeds[a : a + limit]), output_type="np", **settings)
        parts.append(out.images)

    images = np.concatenate(parts)
    bounds = [0]
    for r in requests:
        bounds.append(bounds[-1] + len(r.class_ids))
    return [images[bounds[i] : bounds[i + 1]] for i in range(len(requests))]


def encode_png(image) -> bytes:
    from PIL import Image  # noqa: PLC0415 - loaded on first image: `import far_sdk` stays light

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def bundle_summary(gen) -> dict[str, Any]:
    b = gen.bundle
    return {
        "name": b.manifest.get("name"),
        "path": str(b.path),
        "manifest_sha256": b.manifest.get("manifest_sha256"),
        "num_classes": b.num_classes,
        "id2label": {str(k): v for k, v in b.id2label.items()},
        "image_size": b.manifest.get("image_size"),
        "defaults": b.defaults.to_dict(),
        "backend": gen.backend.describe(),
    }


def _error_status(e: BaseException) -> int:
    return 400 if isinstance(e, InvalidArgumentError) else 500


def deployment_options(cfg: ServeConfig, cluster_gpus: float = 0.0) -> dict[str, Any]:
    """Ray Serve options for ``cfg``: replicas or autoscaling, per-replica resources, the bounded queue."""
    gpus = cfg.gpus_per_replica if cfg.gpus_per_replica is not None else (1.0 if cluster_gpus > 0 else 0.0)
    opts: dict[str, Any] = {
        "name": DEPLOYMENT_NAME,
        "ray_actor_options": {"num_cpus": cfg.cpus_per_replica, "num_gpus": gpus},
        "max_ongoing_requests": cfg.max_ongoing_requests or 4 * cfg.max_batch,
        "max_queued_requests": cfg.max_queued_requests,
        "health_check_period_s": 2.0,
        "health_check_timeout_s": 30.0,
    }
    if cfg.min_replicas is not None:
        opts["autoscaling_config"] = {
            "min_replicas": cfg.min_replicas,
            "max_replicas": cfg.max_replicas,
            "initial_replicas": max(cfg.min_replicas, 1),
            "target_ongoing_requests": cfg.target_ongoing_requests,
        }
    else:
        opts["num_replicas"] = cfg.num_replicas
    return opts


def _import_ray():
    try:
        import ray  # noqa: PLC0415 - far serve's optional dependency
        from ray import serve  # noqa: PLC0415 - far serve's optional dependency
    except ImportError as e:
        raise BackendUnavailableError(
            f"far serve needs Ray Serve ({e}); install it with: pip install 'far-sdk[serve]'"
        ) from e
    return ray, serve


def build_app(cfg: ServeConfig, cluster_gpus: float = 0.0):
    """The Ray Serve application for ``cfg`` (pass it to ``serve.run``)."""
    _, serve = _import_ray()
    from starlette.responses import JSONResponse, Response  # noqa: PLC0415 - far serve's optional dependency (comes with Ray Serve)

    class FarGenerator:
        def __init__(self, cfg: ServeConfig):

            self.cfg = cfg
            self.gen = Generator(cfg.bundle, backend=cfg.backend, **cfg.backend_options)
            self.batch_sizes: Counter[int] = Counter()  # images per generate call -> calls
            self._waiting: list = []  # (request, future) not yet generated
            self._busy = asyncio.Lock()  # one generate call at a time per replica
            self.generate_batch.set_max_batch_size(cfg.max_batch)
            self.generate_batch.set_batch_wait_timeout_s(cfg.batch_wait_ms / 1000.0)

        def check_health(self) -> None:  # Ray Serve restarts a replica whose check raises
            if self.gen._closed:
                raise RuntimeError("the replica's Generator is closed")

        # Ray Serve forms a batch as soon as its wait ends, even while the previous one still runs, so under
        # load it would queue many small batches. Up to 4 of them enter here at once; whichever holds the
        # Generator takes every waiting request (max_batch at a time), so they merge into the next call.
        @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01, max_concurrent_batches=4)  # sizes set in __init__
        async def generate_batch(self, reqs: list[GenerateRequest]) -> list:
            loop = asyncio.get_running_loop()
            futures = [loop.create_future() for _ in reqs]
            self._waiting.extend(zip(reqs, futures))
            async with self._busy:
                while not all(f.done() for f in futures):
                    take, self._waiting = self._waiting[: self.cfg.max_batch], self._waiting[self.cfg.max_batch :]
                    await self._run(take)
            return [f.result() for f in futures]

        async def _run(self, take: list) -> None:
            reqs = [r for r, _ in take]
            for idx in group_by_settings(reqs).values():
                group = [reqs[i] for i in idx]
                n = sum(len(r.class_ids) for r in group)
                try:  # the loop runs in a thread so this replica keeps answering /health and queuing
                    images = await asyncio.to_thread(generate_group, self.gen, group)
                    self.batch_sizes[n] += 1
                    for i, im in zip(idx, images):
                        take[i][1].set_result((im, n, len(group)))
                except Exception as e:  # noqa: BLE001 - one group's failure is its requests' answer, not the batch's
                    log.exception("generate failed for a group of %d requests", len(group))
                    for i in idx:
                        take[i][1].set_result(e)

        async def __call__(self, request):
            path = request.url.path.rstrip("/").rsplit("/", 1)[-1]
            if path == "health":
                return JSONResponse({"status": "ok"})
            if path == "info":
                return JSONResponse(
                    {
                        **bundle_summary(self.gen),
                        "max_batch": self.cfg.max_batch,
                        "batch_wait_ms": self.cfg.batch_wait_ms,
                        "max_images_per_request": self.cfg.max_images_per_request,
                        "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
                    }
                )
            if path != "generate":
                return JSONResponse(
                    {"error": f"no route {request.url.path}; use POST /generate, GET /health, GET /info"}, 404
                )
            if request.method != "POST":
                return JSONResponse({"error": "/generate takes POST with a JSON body"}, 405)
            try:
                req = parse_request(await request.body(), self.gen, max_images=self.cfg.max_images_per_request)
            except FarError as e:
                return JSONResponse({"error": str(e), "type": type(e).__name__}, _error_status(e))
            res = await self.generate_batch(req)
            if isinstance(res, BaseException):
                return JSONResponse({"error": str(res), "type": type(res).__name__}, _error_status(res))
            images, n, k = res
            headers = {"X-Far-Batch-Images": str(n), "X-Far-Batch-Requests": str(k)}
            if req.output_format == "png":
                return Response(encode_png(images[0]), media_type="image/png", headers=headers)
            return JSONResponse(
                {
                    "images": [base64.b64encode(encode_png(im)).decode() for im in images],
                    "seeds": list(req.seeds),
                    "class_labels": list(req.class_ids),
                    "batch_images": n,
                    "batch_requests": k,
                },
                headers=headers,
            )

    return serve.deployment(FarGenerator).options(**deployment_options(cfg, cluster_gpus)).bind(cfg)


def start(cfg: ServeConfig, *, address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to Ray (``address``: a running cluster, "auto", or None for a local one) and deploy ``cfg``."""
    ray, serve = _import_ray()
    if not ray.is_initialized():
        ray.init(address=address, num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    gpus = float(ray.cluster_resources().get("GPU", 0.0))
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build_app(cfg, gpus), name=cfg.app_name, route_prefix=cfg.route_prefix)
    log.info("far serve: %s at http://%s:%d%s", cfg.bundle, cfg.host, cfg.port, cfg.route_prefix)
