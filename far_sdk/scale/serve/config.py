"""How ``far serve`` deploys: :class:`ServeConfig` and the Ray Serve options derived from it (no Ray needed here)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from far_sdk.errors import InvalidArgumentError

DEPLOYMENT_NAME = "FarGenerator"


@dataclass(frozen=True)
class ServeConfig:
    """How ``far serve`` deploys: the bundle, the batching and the replicas.

    max_batch: most requests merged into one generate call (1 turns batching off; a call holds up to
    max_batch x max_images_per_request images, split further only where an engine's profile demands);
    batch_wait_ms: how long a replica waits for more requests after the first. max_ongoing_requests: requests one
    replica holds at once (default 4 x max_batch); max_queued_requests: requests each caller (the HTTP proxy)
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
