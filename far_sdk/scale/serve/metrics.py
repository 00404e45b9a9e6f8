"""``GET /metrics``: Ray Serve's Prometheus metrics plus far-sdk's, recorded through ``ray.serve.metrics``.

far-sdk's metrics are recorded in every replica with Ray's own metric types, so Ray's metrics agent on each node
aggregates and exports them beside Ray Serve's (``ray_serve_*``: requests, latencies, queue lengths); Ray prefixes
every name with ``ray_``. ``GET /metrics`` reads each live node's exporter and answers the ``ray_serve_*`` and
``ray_far_*`` families, one family block each. Ray exports on an interval (about 10 s), so a count shows up there
that long after the request.
"""

from __future__ import annotations

import logging
import urllib.request
from collections.abc import Iterable

log = logging.getLogger(__name__)

PREFIXES = ("ray_serve_", "ray_far_")
STAGE_BOUNDARIES = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0]
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256]


class ServeMetrics:
    """far-sdk's metrics of one replica (Ray tags them with the application, deployment and replica)."""

    def __init__(self):
        from ray.serve import metrics  # noqa: PLC0415 - far serve's optional dependency, in the replica only

        self.images = metrics.Counter("far_images_generated_total", description="images generated (far serve)")
        self.requests = metrics.Counter(
            "far_requests_total",
            description="generate requests by route and outcome (ok, bad_request, error, disconnected)",
            tag_keys=("route", "outcome"),
        )
        self.batch_images = metrics.Histogram(
            "far_batch_images",
            description="images per merged generate call",
            boundaries=BATCH_BOUNDARIES,
        )
        self.batch_requests = metrics.Histogram(
            "far_batch_requests",
            description="requests per merged generate call",
            boundaries=BATCH_BOUNDARIES,
        )
        self.stage_seconds = metrics.Histogram(
            "far_stage_seconds",
            description="seconds per stage of each generate call (transformer, denoise, filter, vae_decode, preview, "
            "generate) and per request (queue, total)",
            boundaries=STAGE_BOUNDARIES,
            tag_keys=("stage",),
        )

    def call(self, images: int, requests: int, timings: dict[str, float]) -> None:
        self.images.inc(images)
        self.batch_images.observe(images)
        self.batch_requests.observe(requests)
        for stage, seconds in timings.items():
            self.stage_seconds.observe(seconds, tags={"stage": stage})

    def request(self, route: str, outcome: str, timings: dict[str, float] | None = None) -> None:
        self.requests.inc(tags={"route": route, "outcome": outcome})
        for stage in ("queue", "total"):
            if timings and stage in timings:
                self.stage_seconds.observe(timings[stage], tags={"stage": stage})


def exporter_urls() -> list[str]:
    import ray  # noqa: PLC0415 - far serve's optional dependency, in the replica only

    return [
        f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics"
        for n in ray.nodes()
        if n.get("Alive") and n.get("MetricsExportPort")
    ]


def family(line: str) -> str:
    """The metric family a Prometheus text line belongs to (histogram samples: their base name)."""
    if line.startswith("# "):
        parts = line.split(" ", 3)
        return parts[2] if len(parts) > 2 else ""
    name = line.split("{", 1)[0].split(" ", 1)[0]
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def merge(texts: Iterable[str], prefixes: tuple[str, ...] = PREFIXES) -> str:
    """The families of ``prefixes`` from several exporters' texts, each family's HELP/TYPE once, then its samples."""
    header: dict[str, list[str]] = {}
    samples: dict[str, list[str]] = {}
    for text in texts:
        for line in text.splitlines():
            name = family(line)
            if not name.startswith(prefixes):
                continue
            if line.startswith("#"):
                if len(header.setdefault(name, [])) < 2 and line not in header[name]:
                    header[name].append(line)
            elif line.strip():
                samples.setdefault(name, []).append(line)
    out = []
    for name in sorted(set(header) | set(samples)):
        out += header.get(name, []) + samples.get(name, [])
    return "\n".join(out) + "\n"


def scrape(timeout: float = 5.0) -> str:
    """Every live node's ``ray_serve_*`` and ``ray_far_*`` metrics (a node that does not answer is left out, with a
    comment line saying so)."""
    texts, notes = [], []
    for url in exporter_urls():
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - Ray's own exporter on a node
                texts.append(r.read().decode("utf-8", "replace"))
        except OSError as e:
            notes.append(f"# far serve: metrics exporter {url} did not answer ({e})")
            log.warning("metrics exporter %s did not answer: %s", url, e)
    return "\n".join(notes) + ("\n" if notes else "") + merge(texts)
