"""Start and stop ``far serve`` on Ray Serve, with quiet, truthful logs.

Ray Serve logs at INFO when it starts, when a second call connects to the running Serve instance ("Connecting to
existing Serve app ... will not be applied", which is about options nobody passed) and when apps come up; the CLI
says what happened in its own lines instead, so those calls run with the ``ray.serve`` logger at WARNING (warnings,
such as "the new HTTP config is ignored" when Serve already listens elsewhere, still show). Stopping deletes the app
(its replicas finish their requests), then stops the local Ray this process started; it never calls
``serve.shutdown()``, whose controller kill Ray reports as "graceful_shutdown failed". On a cluster it joined, Ray
Serve keeps running for the cluster's other apps.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

from far_sdk.bundle.bundle import Bundle
from far_sdk.errors import BackendUnavailableError, InvalidArgumentError
from far_sdk.scale.cluster import init_ray
from far_sdk.scale.serve.config import ServeConfig, deployment_options

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Running:
    """What :func:`start` did: the app, where it listens, and whether this process started Ray."""

    app_name: str
    url: str
    started_ray: bool
    gpus: float


def import_ray():
    try:
        import ray  # noqa: PLC0415 - far serve's optional dependency
        from ray import serve  # noqa: PLC0415 - far serve's optional dependency
    except ImportError as e:
        raise BackendUnavailableError(
            f"far serve needs Ray Serve ({e}); install it with: pip install 'far-sdk[serve]'"
        ) from e
    return ray, serve


@contextlib.contextmanager
def quiet_serve_logs():
    """Ray Serve's driver-side INFO lines off for the block (warnings and errors still show)."""
    logger = logging.getLogger("ray.serve")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def check_servable(bundle: str) -> Bundle:
    """The bundle's manifest, read without hashing its files (each replica verifies them when it loads); a text
    bundle without its text encoder is refused: HTTP clients can only send prompts."""
    b = Bundle.load(bundle, verify=False)
    if b.conditioning == "text" and not (b.text or {}).get("encoder"):
        raise InvalidArgumentError(
            f"bundle {b.name!r} is text-conditioned but carries no text encoder, so it cannot turn the prompts an "
            "HTTP client sends into text states; export it with --text-encoder (far-export onnx) to serve it"
        )
    return b


def build_app(cfg: ServeConfig, cluster_gpus: float = 0.0):
    """The Ray Serve application for ``cfg`` (pass it to ``serve.run``)."""
    _, serve = import_ray()
    check_servable(cfg.bundle)
    from far_sdk.scale.serve.app import FarServer  # noqa: PLC0415 - FastAPI and Ray load only when serving

    return serve.deployment(FarServer).options(**deployment_options(cfg, cluster_gpus)).bind(cfg)


def start(cfg: ServeConfig, *, address: str | None = None, num_cpus: int | None = None) -> Running:
    """Connect to Ray (``address``: a running cluster, "auto", or None for a local one) and deploy ``cfg``; returns
    when every replica is ready."""
    ray, serve = import_ray()
    check_servable(cfg.bundle)
    started = not ray.is_initialized()
    if started:
        init_ray(
            ray,
            address,
            num_cpus=num_cpus,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.WARNING,
        )
        started = address is None  # a local Ray of our own (one we joined stays up for its other users)
    gpus = float(ray.cluster_resources().get("GPU", 0.0))
    with quiet_serve_logs():
        serve.start(http_options={"host": cfg.host, "port": cfg.port})
        serve.run(build_app(cfg, gpus), name=cfg.app_name, route_prefix=cfg.route_prefix)
    url = f"http://{cfg.host}:{cfg.port}{cfg.route_prefix}"
    log.info("far serve: %s at %s", cfg.bundle, url)
    return Running(app_name=cfg.app_name, url=url, started_ray=started, gpus=gpus)


def stop(running: Running) -> None:
    """Delete the app (its replicas finish what they hold), then stop Ray if :func:`start` started it."""
    ray, serve = import_ray()
    if not ray.is_initialized():
        return
    with quiet_serve_logs():
        serve.delete(running.app_name)
    if running.started_ray:
        ray.shutdown()
