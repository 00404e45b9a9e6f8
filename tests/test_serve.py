"""``far serve`` on a real local Ray (2 CPUs) with the demo bundle: merged requests give the images
``Generator.generate`` gives, overload gets 503, a killed replica is replaced. (Bad requests, routes and the schema:
tests/test_serve_http.py; streaming: tests/test_serve_stream.py; text bundles: tests/test_serve_text.py.)

Every HTTP call carries a timeout, so a hang fails the test instead of stalling the suite."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from conftest import ROOT  # noqa: E402
from serve_helpers import TIMEOUT, decode_pngs, deployed, request, settings_of  # noqa: E402

import far_sdk  # noqa: E402
from far_sdk.scale.serve import DEPLOYMENT_NAME, ServeConfig  # noqa: E402

pytestmark = pytest.mark.slow

BUNDLE = ROOT / "engines" / "far-demo"
#: two cheap sampling settings, so a batch holds two groups
SETTINGS = [{"num_steps": 2, "inner_steps": 2}, {"num_steps": 3, "inner_steps": [2, 3, 2], "cfg": 2.0}]


def http(url: str, body: str | None = None, method: str | None = None, timeout: float = TIMEOUT):
    return request(url, "", body, method, timeout)


@pytest.fixture(scope="module")
def server(ray_local):
    cfg = ServeConfig(
        bundle=str(BUNDLE),
        backend="onnxruntime",
        backend_options={"threads": 1},
        max_batch=8,
        batch_wait_ms=20,
        num_replicas=2,
        cpus_per_replica=0.5,
        max_queued_requests=1000,
    )
    with deployed(cfg) as url:  # on the session's local Ray (2 CPUs)
        yield url


@pytest.fixture(scope="module")
def reference():
    with far_sdk.Generator(BUNDLE, backend="onnxruntime", threads=1) as gen:
        yield gen


def _requests(n: int) -> list[dict]:
    rng = np.random.default_rng(14)
    out = []
    for i in range(n):
        labels = [int(c) for c in rng.integers(0, 10, size=1 + i % 2)]
        if i % 5 == 0:
            labels[0] = str(labels[0])  # a class name ("0".."9" in the demo's id2label)
        out.append({"class_labels": labels, "seed": int(rng.integers(0, 2**40)), **SETTINGS[i % 2]})
    return out


def test_200_requests_from_8_clients_are_merged_and_equal_generate(server, reference):
    bodies = _requests(200)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda b: http(server + "/generate", json.dumps(b)), bodies))
    assert [a[0] for a in answers] == [200] * 200
    batch_images = [int(h["x-far-batch-images"]) for _, h, _ in answers]
    batch_requests = [int(h["x-far-batch-requests"]) for _, h, _ in answers]
    assert max(batch_requests) > 1, f"no request was merged with another: {sorted(set(batch_requests))}"
    assert max(batch_images) > 2
    for body, (_, _, payload) in zip(bodies, answers):
        got = decode_pngs(json.loads(payload)["images"])
        want = reference.generate(body["class_labels"], seed=body["seed"], output_type="np", **settings_of(body)).images
        assert got.shape == want.shape == (len(body["class_labels"]), 32, 32, 3)
        np.testing.assert_array_equal(got, want)
        assert json.loads(payload)["seeds"] == [body["seed"] + j for j in range(len(body["class_labels"]))]
    assert float(want.std()) > 1.0  # real images, not a constant
    # the replicas' own histograms (each /info hits one replica) count merged calls too
    info = json.loads(http(server + "/info")[2])
    assert info["num_classes"] == 10 and info["max_batch"] == 8 and info["batch_sizes"]


def test_overload_gets_503_from_the_bounded_queue_and_nothing_hangs(server):
    cfg = ServeConfig(
        bundle=str(BUNDLE),
        backend="onnxruntime",
        backend_options={"threads": 1},
        max_batch=1,
        max_ongoing_requests=1,
        max_queued_requests=2,
        cpus_per_replica=0.25,
        app_name="tight",
        route_prefix="/tight",
    )
    with deployed(cfg) as url:
        body = json.dumps({"class_labels": [1], "seed": 0, "num_steps": 10, "inner_steps": 20})  # ~0.5 s each
        with ThreadPoolExecutor(16) as pool:
            codes = [a[0] for a in pool.map(lambda _: http(url + "/generate", body), range(16))]
    assert set(codes) <= {200, 503}, codes
    assert codes.count(503) >= 1 and codes.count(200) >= 1, codes
    assert codes.count(200) <= 16 - 1


def _replicas() -> list[str]:
    return sorted(
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(f"SERVE_REPLICA::far#{DEPLOYMENT_NAME}#")
    )


def test_a_replica_killed_mid_load_is_replaced_and_no_request_hangs(server, reference):
    before = _replicas()
    assert len(before) == 2
    bodies = _requests(48)
    t0 = time.monotonic()

    def call(b):
        try:
            return http(server + "/generate", json.dumps(b), timeout=TIMEOUT)
        except OSError as e:  # a connection the dying replica's proxy path dropped: still an answer, not a hang
            return 0, {}, str(e).encode()

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(call, b) for b in bodies]
        while sum(f.done() for f in futures) < 8:
            time.sleep(0.02)
        victim = ray.get_actor(before[0], namespace="serve")
        ray.kill(victim, no_restart=True)
        answers = [f.result(timeout=2 * TIMEOUT) for f in futures]
    elapsed = time.monotonic() - t0
    assert elapsed < 2 * TIMEOUT
    for body, (code, _, payload) in zip(bodies, answers):
        assert code in (200, 500, 502, 503, 0), (code, payload)
        if code == 200:
            want = reference.generate(body["class_labels"], seed=body["seed"], output_type="np", **settings_of(body))
            np.testing.assert_array_equal(decode_pngs(json.loads(payload)["images"]), want.images)
        else:
            assert payload, "a failed request must say why"
    assert sum(a[0] == 200 for a in answers) >= len(bodies) // 2
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        now = _replicas()
        if len(now) == 2 and before[0] not in now:
            break
        time.sleep(0.5)
    now = _replicas()
    assert len(now) == 2 and before[0] not in now and before[1] in now, (before, now)
    # the replacement serves: every one of a fresh round succeeds
    fresh = _requests(16)
    with ThreadPoolExecutor(8) as pool:
        codes = [a[0] for a in pool.map(lambda b: http(server + "/generate", json.dumps(b)), fresh)]
    assert codes == [200] * 16
