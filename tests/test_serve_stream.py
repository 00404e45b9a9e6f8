"""``POST /generate/stream`` on a real local Ray with the demo bundle: one ``step`` event per outer step, in order,
each holding what that step hands on decoded (the previews ``generate(preview=True)`` makes), then one ``result``
event whose images equal ``generate()``'s bitwise (ONNX Runtime, same seed and settings); streamed requests merge
with plain ones of the same settings; a client that disconnects frees its slot and stops its generation."""

from __future__ import annotations

import http.client
import json
import socket
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import numpy as np
import pytest

pytest.importorskip("ray.serve")

from conftest import ROOT  # noqa: E402
from serve_helpers import decode_pngs, deployed, events, request, settings_of  # noqa: E402

import far_sdk  # noqa: E402
from far_sdk.scale.serve import ServeConfig  # noqa: E402

pytestmark = pytest.mark.slow

BUNDLE = ROOT / "engines" / "far-demo"


def _cfg(**kw) -> ServeConfig:
    return ServeConfig(
        bundle=str(BUNDLE), backend="onnxruntime", backend_options={"threads": 1}, cpus_per_replica=0.5, **kw
    )


@pytest.fixture(scope="module")
def url(ray_local):
    with deployed(_cfg(max_batch=8, batch_wait_ms=300, app_name="far-stream", route_prefix="/stream")) as base:
        yield base


@pytest.fixture(scope="module")
def reference():
    with far_sdk.Generator(BUNDLE, backend="onnxruntime", threads=1) as gen:
        yield gen


@pytest.mark.parametrize(
    "body",
    [
        {"class_labels": [3, "8"], "seed": 21, "num_steps": 5, "inner_steps": 4},
        {"class_labels": [6], "seed": 2, "mode": "mask", "inner_steps": 3},  # mask mode: its own 11 levels
    ],
)
def test_one_event_per_outer_step_in_order_then_the_images_generate_gives(url, reference, body):
    code, headers, payload = request(url, "/generate/stream", body)
    assert code == 200 and headers["content-type"].startswith("text/event-stream")
    evs = events(payload)
    labels = [int(c) for c in body["class_labels"]]
    previews = []
    out = reference.generate(
        labels, seed=body["seed"], output_type="np", preview=True, on_step=previews.append, **settings_of(body)
    )
    n = out.plan.num_steps
    assert [e for e, _ in evs] == ["step"] * n + ["result"]
    steps = [d for _, d in evs[:-1]]
    assert [d["step"] for d in steps] == list(range(n))
    assert [d["level"] for d in steps] == list(out.plan.levels) and {d["num_steps"] for d in steps} == {n}
    for d, info in zip(steps, previews):  # what each step hands on, decoded: generate(preview=True)'s previews
        want = np.stack([np.asarray(im) for im in info.preview])
        np.testing.assert_array_equal(decode_pngs(d["images"]), want)
    assert not np.array_equal(decode_pngs(steps[0]["images"]), decode_pngs(steps[-1]["images"]))
    result = evs[-1][1]
    np.testing.assert_array_equal(decode_pngs(result["images"]), out.images)
    assert result["seeds"] == [body["seed"] + j for j in range(len(labels))]
    assert result["plan"]["levels"] == list(out.plan.levels) and result["timings"]["preview"] > 0


def test_streamed_and_plain_requests_with_equal_settings_merge_without_changing_an_image(url, reference):
    settings = {"num_steps": 3, "inner_steps": 3}
    bodies = [{"class_labels": [k], "seed": 100 + k, **settings} for k in range(4)]
    paths = ["/generate/stream", "/generate", "/generate/stream", "/generate"]
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda a: request(url, a[0], a[1]), zip(paths, bodies)))
    merged = []
    for path, body, (code, _, payload) in zip(paths, bodies, answers):
        assert code == 200, payload[:200]
        if path.endswith("stream"):
            evs = events(payload)
            assert [e for e, _ in evs] == ["step"] * 3 + ["result"]
            answer = evs[-1][1]
        else:
            answer = json.loads(payload)
        want = reference.generate(body["class_labels"], seed=body["seed"], output_type="np", **settings).images
        np.testing.assert_array_equal(decode_pngs(answer["images"]), want)
        merged.append(answer["batch_requests"])
    assert max(merged) > 1, f"no streamed request was merged: {merged}"


def _open_stream(url: str, body: dict) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    conn.request("POST", u.path + "/generate/stream", body=json.dumps(body))
    return conn, conn.getresponse()


def test_a_client_that_disconnects_frees_its_slot_and_stops_its_generation(ray_local, reference):
    # one replica that holds one request at a time: while the abandoned stream held its slot, nothing else would run
    cfg = _cfg(max_batch=1, max_ongoing_requests=1, max_queued_requests=8, app_name="far-leave", route_prefix="/leave")
    with deployed(cfg) as base:
        conn, resp = _open_stream(base, {"class_labels": [1], "seed": 0, "num_steps": 16, "inner_steps": 1000})
        assert resp.status == 200
        seen = b""
        while b"event: step" not in seen:  # the first outer step has run
            seen += resp.fp.read1(65536)
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        code, _, payload = request(
            base, "/generate", {"class_labels": [2], "seed": 5, "num_steps": 2, "inner_steps": 2}
        )
        assert code == 200
        want = reference.generate([2], seed=5, num_steps=2, inner_steps=2, output_type="np").images
        np.testing.assert_array_equal(decode_pngs(json.loads(payload)["images"]), want)
        info = json.loads(request(base, "/info")[2])
        assert info["requests"].get("disconnected") == 1, info["requests"]
        assert info["requests"].get("stopped_early") == 1, info["requests"]  # the 16 x 1000 steps were not all run
        assert info["requests"].get("ok") == 1


def test_a_streamed_request_that_is_bad_gets_400_before_the_stream_opens(url):
    code, headers, payload = request(url, "/generate/stream", {"class_labels": [3], "num_steps": 0})
    assert code == 400 and headers["content-type"] == "application/json"
    assert json.loads(payload)["field"] == "num_steps"
    code, _, payload = request(url, "/generate/stream", {"class_labels": [3], "output_format": "png"})
    assert code == 400 and "a stream answers in JSON events" in json.loads(payload)["error"]
