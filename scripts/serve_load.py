"""Load test of ``far serve``: requests/s and p50/p99 latency with batching on and off, in one run.

Starts a local Ray (--cpus), deploys the bundle once with batching (--max-batch, --batch-wait-ms) and
once without (max_batch 1), each as one replica, and sends the same --requests one-image requests
(seed i, class i mod 10) from --clients concurrent clients to each, after --warmup requests. Prints a
table and writes JSON (--json).

    PYTHONPATH=. .venv/bin/python scripts/serve_load.py --bundle engines/far-demo --requests 200 --clients 8 \\
        --steps 4 --inner-steps 4 --json docs/serve_load_demo_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from far_sdk.fileio import atomic_write_json  # noqa: E402
from far_sdk.scale.serve import ServeConfig, build_app  # noqa: E402


def post(url: str, body: dict) -> tuple[int, float, int]:
    """(status, seconds, images in the merged call)."""
    t0 = time.perf_counter()
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            r.read()
            return r.status, time.perf_counter() - t0, int(r.headers.get("X-Far-Batch-Images", 0))
    except urllib.error.HTTPError as e:
        return e.code, time.perf_counter() - t0, 0


def load(url: str, n: int, clients: int, settings: dict) -> dict:
    bodies = [{"class_labels": [i % 10], "seed": i, **settings} for i in range(n)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        res = list(pool.map(lambda b: post(url, b), bodies))
    wall = time.perf_counter() - t0
    ok = [r for r in res if r[0] == 200]
    lat = np.array([r[1] for r in ok]) * 1000
    sizes = np.array([r[2] for r in ok])
    return {
        "requests": n,
        "ok": len(ok),
        "wall_s": round(wall, 3),
        "requests_per_s": round(len(ok) / wall, 3),
        "p50_ms": round(float(np.percentile(lat, 50)), 1),
        "p99_ms": round(float(np.percentile(lat, 99)), 1),
        "mean_batch_images": round(float(sizes.mean()), 2),
        "max_batch_images": int(sizes.max()),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", default="engines/far-demo")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--warmup", type=int, default=16)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--batch-wait-ms", type=float, default=10.0)
    p.add_argument("--threads", type=int, default=2, help="onnxruntime threads of the one replica")
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--inner-steps", type=int, default=4)
    p.add_argument("--json", default=None)
    a = p.parse_args()

    import ray
    from ray import serve

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=a.cpus, include_dashboard=False, log_to_driver=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    settings = {"num_steps": a.steps, "inner_steps": a.inner_steps}
    results = {}
    try:
        for name, max_batch in (("batching on", a.max_batch), ("batching off", 1)):
            cfg = ServeConfig(
                bundle=str(Path(a.bundle).resolve()),
                backend="onnxruntime",
                backend_options={"threads": a.threads},
                max_batch=max_batch,
                batch_wait_ms=a.batch_wait_ms if max_batch > 1 else 0.0,
                max_ongoing_requests=max(2 * max_batch, a.clients),
                max_queued_requests=4 * a.requests,
                cpus_per_replica=float(a.cpus),
            )
            app = name.replace(" ", "-")
            serve.run(build_app(cfg), name=app, route_prefix=f"/{app}")
            url = f"http://127.0.0.1:{port}/{app}/generate"
            load(url, a.warmup, a.clients, settings)
            results[name] = load(url, a.requests, a.clients, settings)
            serve.delete(app)
    finally:
        serve.shutdown()
        ray.shutdown()
    out = {
        "bundle": a.bundle,
        "settings": settings,
        "clients": a.clients,
        "max_batch": a.max_batch,
        "batch_wait_ms": a.batch_wait_ms,
        "replica_threads": a.threads,
        "ray_cpus": a.cpus,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "command": " ".join(sys.argv),
        "results": results,
    }
    print(f"{'':14s} {'req/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s} {'mean batch':>11s}")
    for name, r in results.items():
        print(
            f"{name:14s} {r['requests_per_s']:8.2f} {r['p50_ms']:8.1f} {r['p99_ms']:8.1f} "
            f"{r['mean_batch_images']:11.2f}"
        )
    if a.json:
        atomic_write_json(Path(a.json), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
