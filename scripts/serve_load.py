"""Load test of ``far serve``: requests/s and p50/p99 latency with batching on and off, in one run.

Starts a local Ray (--cpus), deploys the bundle once with batching (--max-batch, --batch-wait-ms) and
once without (max_batch 1), each as one replica, and sends the same --requests one-image requests
(seed i, class i mod 10) from --clients concurrent clients to each, after --warmup requests. Every
--stream-every-th request goes to ``POST /generate/stream`` (Server-Sent Events; 0: none): its latency is
the time to the final event, and the time to its first preview is reported too. Every answer's status is
counted (a 5xx fails the run). Prints a table and writes JSON (--json).

    PYTHONPATH=. .venv/bin/python scripts/serve_load.py --bundle engines/far-demo --requests 200 --clients 8 \\
        --steps 4 --inner-steps 4 --stream-every 4 --json docs/serve_load_demo_cpu.json
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import socket
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from far_sdk.fileio import atomic_write_json  # noqa: E402
from far_sdk.scale.serve import ServeConfig, build_app  # noqa: E402
from far_sdk.scale.serve.deploy import quiet_serve_logs  # noqa: E402


def post(url: str, body: dict, stream: bool) -> dict:
    """One request: status, seconds to the answer (a stream: to its final event), to the first preview, and the
    images of the merged call it rode in."""
    u = urlsplit(url + ("/generate/stream" if stream else "/generate"))
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=300)
    try:
        conn.request("POST", u.path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        first = None
        if stream and r.status == 200:
            payload = b""
            while chunk := r.read1(65536):
                payload += chunk
                if first is None and b"event: step" in payload:
                    first = time.perf_counter() - t0
            result = [b for b in payload.decode().split("\n\n") if b.startswith("event: result")]
            ok = len(result) == 1
            answer = json.loads(result[0].split("data: ", 1)[1]) if ok else {}
            status = 200 if ok else 599  # a stream that ended without its result
        else:
            payload = r.read()
            status = r.status
            answer = json.loads(payload) if status == 200 else {}
        return {
            "status": status,
            "seconds": time.perf_counter() - t0,
            "first_preview": first,
            "batch_images": answer.get("batch_images", 0),
            "stream": stream,
        }
    finally:
        conn.close()


def load(url: str, n: int, clients: int, settings: dict, stream_every: int) -> dict:
    jobs = [
        ({"class_labels": [i % 10], "seed": i, **settings}, bool(stream_every) and i % stream_every == 0)
        for i in range(n)
    ]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        res = list(pool.map(lambda j: post(url, *j), jobs))
    wall = time.perf_counter() - t0
    ok = [r for r in res if r["status"] == 200]
    lat = np.array([r["seconds"] for r in ok]) * 1000
    sizes = np.array([r["batch_images"] for r in ok])
    streamed = [r for r in ok if r["stream"]]
    out = {
        "requests": n,
        "streamed": sum(s for _, s in jobs),
        "ok": len(ok),
        "statuses": dict(sorted(Counter(str(r["status"]) for r in res).items())),
        "wall_s": round(wall, 3),
        "requests_per_s": round(len(ok) / wall, 3),
        "p50_ms": round(float(np.percentile(lat, 50)), 1),
        "p99_ms": round(float(np.percentile(lat, 99)), 1),
        "mean_batch_images": round(float(sizes.mean()), 2),
        "max_batch_images": int(sizes.max()),
    }
    if streamed:
        s_lat = np.array([r["seconds"] for r in streamed]) * 1000
        first = np.array([r["first_preview"] for r in streamed]) * 1000
        out.update(
            stream_p50_ms=round(float(np.percentile(s_lat, 50)), 1),
            stream_p99_ms=round(float(np.percentile(s_lat, 99)), 1),
            first_preview_p50_ms=round(float(np.percentile(first, 50)), 1),
            first_preview_p99_ms=round(float(np.percentile(first, 99)), 1),
        )
    return out


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
    p.add_argument("--stream-every", type=int, default=4, help="every k-th request streamed (0: none)")
    p.add_argument("--json", default=None)
    a = p.parse_args()

    import ray
    from ray import serve

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=a.cpus, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with quiet_serve_logs():
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
            with quiet_serve_logs():
                serve.run(build_app(cfg), name=app, route_prefix=f"/{app}")
            url = f"http://127.0.0.1:{port}/{app}"
            load(url, a.warmup, a.clients, settings, a.stream_every)
            results[name] = load(url, a.requests, a.clients, settings, a.stream_every)
            with quiet_serve_logs():
                serve.delete(app)
    finally:
        ray.shutdown()  # the local Ray this script started, Serve with it
    out = {
        "bundle": a.bundle,
        "settings": settings,
        "clients": a.clients,
        "max_batch": a.max_batch,
        "batch_wait_ms": a.batch_wait_ms,
        "stream_every": a.stream_every,
        "replica_threads": a.threads,
        "ray_cpus": a.cpus,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "command": " ".join(sys.argv),
        "results": results,
    }
    print(
        f"{'':14s} {'req/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s} {'mean batch':>11s} {'1st preview p50':>16s}  statuses"
    )
    for name, r in results.items():
        print(
            f"{name:14s} {r['requests_per_s']:8.2f} {r['p50_ms']:8.1f} {r['p99_ms']:8.1f} "
            f"{r['mean_batch_images']:11.2f} {r.get('first_preview_p50_ms', float('nan')):16.1f}  {r['statuses']}"
        )
    if a.json:
        atomic_write_json(Path(a.json), out)
    server_errors = sum(n for r in results.values() for code, n in r["statuses"].items() if int(code) >= 500)
    return 1 if server_errors else 0


if __name__ == "__main__":
    sys.exit(main())
