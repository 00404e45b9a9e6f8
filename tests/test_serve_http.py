"""``far serve``'s HTTP surface on a real local Ray with the demo bundle: exact routes (raw paths, never normalised by
the client), the OpenAPI schema generated from far_sdk.options, far_sdk's own 4xx messages naming the field for bad
and hostile bodies (never a 500), answers with the plan and timings, and /metrics."""

from __future__ import annotations

import json
import re
import time

import pytest

pytest.importorskip("ray.serve")

from conftest import ROOT  # noqa: E402
from serve_helpers import decode_pngs, deployed, request  # noqa: E402

import far_sdk  # noqa: E402
from far_sdk.errors import InvalidArgumentError  # noqa: E402
from far_sdk.options import DEFAULTS, PRESETS, SPECS  # noqa: E402
from far_sdk.scale.serve import ServeConfig  # noqa: E402

pytestmark = pytest.mark.slow

BUNDLE = ROOT / "engines" / "far-demo"
CHEAP = {"num_steps": 2, "inner_steps": 2}


@pytest.fixture(scope="module")
def url(ray_local):
    cfg = ServeConfig(
        bundle=str(BUNDLE),
        backend="onnxruntime",
        backend_options={"threads": 1},
        cpus_per_replica=0.5,
        app_name="far-http",
        route_prefix="/",
    )
    with deployed(cfg) as base:
        yield base


@pytest.fixture(scope="module")
def reference():
    with far_sdk.Generator(BUNDLE, backend="onnxruntime", threads=1) as gen:
        yield gen


def _error(url: str, body, path: str = "/generate") -> tuple[int, dict]:
    code, _, payload = request(url, path, body)
    return code, json.loads(payload)


def test_only_the_documented_routes_answer_and_raw_dot_paths_are_404(url):
    assert request(url, "/health")[0] == 200
    assert request(url, "/info")[0] == 200
    assert request(url, "/")[2].startswith(b"<!doctype html>")
    for path in (
        "/etc/passwd/info",
        "/../../health",
        "/../../../health",
        "/%2e%2e/%2e%2e/health",
        "/health/",
        "//health",
        "/x/health",
        "/info/x",
        "/INFO",
        "/generate/stream/x",
        "/docs/../info",
    ):
        code, _, payload = request(url, path)
        assert code == 404, (path, code, payload)
        assert "no route" in json.loads(payload)["error"] if payload.startswith(b"{") else True
    for path in ("/x/../generate", "/x/../../generate", "/../generate", "/generate/", "/a/b/../../generate/stream"):
        code, _, payload = request(url, path, {"class_labels": [3], **CHEAP})
        assert code == 404, (path, code, payload)
    code, _, payload = request(url, "/generate", method="GET")
    assert code == 405 and "POST /generate" in json.loads(payload)["error"]
    assert request(url, "/health", b"{}", method="POST")[0] == 405


def test_openapi_lists_every_sampling_field_with_its_range_choices_and_the_bundles_default(url, reference):
    code, _, payload = request(url, "/openapi.json")
    doc = json.loads(payload)
    schemas = doc["components"]["schemas"]
    props = schemas["GenerateRequest"]["properties"]
    assert set(SPECS) <= set(props) and {"class_labels", "prompt", "negative_prompt", "seed", "preset"} <= set(props)
    assert schemas["GenerateRequest"]["additionalProperties"] is False
    for name, spec in SPECS.items():
        want = spec.json_schema()
        assert spec.doc.split(";")[0].split(".")[0][:30] in props[name]["description"] or spec.kind == "clip", name
        for key in ("minimum", "maximum", "exclusiveMinimum", "enum"):
            if key in want:
                assert props[name][key] == want[key], (name, key)
    defaults = reference.bundle.defaults.over(DEFAULTS)
    assert props["num_steps"]["default"] == defaults.num_steps == 10
    assert props["cfg"]["default"] == defaults.cfg and props["inner_sampler"]["default"] == defaults.inner_sampler
    assert props["preset"]["enum"] == list(PRESETS)
    assert props["num_steps"]["minimum"] == 1 and props["num_steps"]["maximum"] == 16
    for path in ("/generate", "/generate/stream"):
        op = doc["paths"][path]["post"]
        ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert ref == "#/components/schemas/GenerateRequest"
        assert "400" in op["responses"] and "422" not in op["responses"]
    assert {"/health", "/info", "/metrics"} <= set(doc["paths"]) and "StepEvent" in schemas
    code, _, html = request(url, "/docs")
    assert code == 200 and b"openapi.json" in html


def _far_message(gen, **kw) -> str:
    with pytest.raises(InvalidArgumentError) as e:
        gen.generate(output_type="np", **kw)
    return str(e.value)


def test_bad_requests_get_400_with_far_sdks_message_naming_the_field(url, reference):
    cases = [  # body, field named (None: the body as a whole), text the message holds
        ('{"class_labels": [3], "seed": ', None, "not valid JSON"),
        ("[3, 7]", None, "must be a JSON object"),
        ('{"seed": 1}', "class_labels", "class_labels is required"),
        ('{"class_labels": [3], "steps": 4}', "steps", "unknown field(s) steps (did you mean 'num_steps'?)"),
        ('{"class_labels": [3], "cfg": "high"}', "cfg", "cfg must be a number in [0, 1000], got 'high'"),
        ('{"class_labels": [3], "seed": -1}', "seed", "seed must be an integer in 0..2**63 - 1"),
        ('{"class_labels": [3, 4], "output_format": "png"}', "output_format", "returns one image"),
        ('{"class_labels": [3], "output_format": "gif"}', "output_format", "output_format must be one of"),
        ('{"class_labels": [12]}', "class_labels", _far_message(reference, class_labels=[12])),
        ('{"class_labels": ["cat"]}', "class_labels", _far_message(reference, class_labels=["cat"])),
        (
            '{"class_labels": [3], "num_steps": 99}',
            "num_steps",
            _far_message(reference, class_labels=[3], num_steps=99),
        ),
        ('{"class_labels": [3], "levels": 5}', "levels", _far_message(reference, class_labels=[3], levels=5)),
        ('{"class_labels": [3], "preset": ["fast"]}', "preset", "preset must be one of"),
        ('{"class_labels": [3], "inner_steps": [2, 0]}', "inner_steps", "each inner_steps count must be"),
        ('{"class_labels": [3], "filter": "gauss"}', "filter", "filter must be one of"),
        ('{"class_labels": [3], "x0_clip": -1}', "x0_clip", "x0_clip must be"),
        ('{"class_labels": [3], "prompt": "a cat"}', "prompt", "is class-conditional: send class_labels"),
        ('{"class_labels": [' + ",".join(["1"] * 17) + "]}", None, "at most 16 per request"),
        (
            '{"class_labels": [3], "inner_sampler": "ddpm", "eta": 0.5}',
            None,
            _far_message(reference, class_labels=[3], inner_sampler="ddpm", eta=0.5),
        ),
    ]
    for body, field, message in cases:
        code, err = _error(url, body)
        assert code == 400, (body, code, err)
        assert message in err["error"], (body, err)
        assert err["field"] == field, (body, err)


HOSTILE = [
    b"[" * 100_000,
    b'{"a":' * 100_000,
    '{"class_labels": ["³"]}'.encode(),
    '{"class_labels": ["٣"]}'.encode(),  # an Arabic-Indic digit: str.isdigit() is true, int() would take it
    b'{"class_labels": 1e400}',
    b'{"class_labels": [3], "seed": 1e400}',
    b'{"class_labels": [3], "num_steps": ' + b"9" * 5000 + b"}",
    b'{"class_labels": [3], "cfg": NaN}',
    b'{"class_labels": [3], "cfg": Infinity}',
    b'{"class_labels": [3], "cfg": 1e308}',
    b'{"class_labels": [3], "temperature": -0.0001}',
    b'{"class_labels": [3], "inner_steps": 10000000}',
    b'{"class_labels": [3], "inner_steps": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18]}',
    b'{"class_labels": [3], "levels": [0, 99]}',
    b'{"class_labels": [3], "levels": []}',
    b'{"class_labels": [3], "mode": {"$gt": ""}}',
    b'{"class_labels": {"0": 3}}',
    b'{"class_labels": []}',
    b'{"class_labels": [null]}',
    b'{"class_labels": [3], "seed": true}',
    b'{"class_labels": [3], "seed": "0"}',
    b'{"class_labels": [3, 4], "seed": 9223372036854775807}',
    b'{"class_labels": ' + json.dumps(list(range(10)) * 10_000).encode() + b"}",
    b'{"class_labels": ["' + b"7" * 100_000 + b'"]}',
    b'{"prompt": "\\ud800"}',
    b"\xff\xfe{}",
    b"",
    b"null",
    b"1",
    b'"class_labels"',
    b'{"class_labels": [3]}' + b" " * (1 << 20),
]


def test_hostile_bodies_get_4xx_never_500_and_the_server_keeps_answering(url, reference):
    for body in HOSTILE:
        code, _, payload = request(url, "/generate", body)
        assert 400 <= code < 500, (body[:60], code, payload[:200])
        err = json.loads(payload)
        assert err["error"] and err["type"], body[:60]
        code, _, payload = request(url, "/generate/stream", body)
        assert 400 <= code < 500, ("stream", body[:60], code, payload[:200])
    code, _, payload = request(url, "/generate", {"class_labels": ["7"], "seed": 3, **CHEAP})
    want = reference.generate([7], seed=3, output_type="np", **CHEAP).images
    assert code == 200
    assert (decode_pngs(json.loads(payload)["images"]) == want).all()


def test_an_answer_carries_the_resolved_plan_and_timings_and_png_output_is_the_image(url, reference):
    body = {"class_labels": [3, "5"], "seed": 11, "num_steps": 3, "preset": "fast", "x0_clip": False}
    code, headers, payload = request(url, "/generate", body)
    assert code == 200 and headers["x-far-batch-images"] == "2"
    answer = json.loads(payload)
    out = reference.generate([3, 5], seed=11, num_steps=3, preset="fast", x0_clip=False, output_type="np")
    assert (decode_pngs(answer["images"]) == out.images).all()
    assert answer["seeds"] == [11, 12] and answer["class_labels"] == [3, 5] and answer["prompts"] is None
    assert answer["plan"] == json.loads(json.dumps(out.plan.to_dict()))
    assert answer["plan"]["inner_steps"] == [PRESETS["fast"].inner_steps] * 3
    t = answer["timings"]
    assert {"queue", "transformer", "denoise", "vae_decode", "generate", "encode", "total"} <= set(t)
    assert all(v >= 0 for v in t.values()) and t["total"] >= t["generate"] > 0
    code, _, payload = request(url, "/generate", {"class_labels": [9], "seed": None, "output_format": None, **CHEAP})
    assert code == 200 and json.loads(payload)["seeds"] == [0]  # null is "not given": the defaults
    code, headers, png = request(url, "/generate", {"class_labels": [9], "seed": 4, "output_format": "png", **CHEAP})
    assert code == 200 and headers["content-type"] == "image/png"
    assert (
        decode_pngs([__import__("base64").b64encode(png).decode()])[0]
        == reference.generate([9], seed=4, output_type="np", **CHEAP).images[0]
    ).all()


def _sample(text: str, name: str, **labels) -> float | None:
    """The value of metric ``name`` whose labels include ``labels`` (summed over series), or None."""
    total, found = 0.0, False
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(\{{.*\}})? (\S+)$", line)
        if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
            total, found = total + float(m.group(2)), True
    return total if found else None


def test_metrics_export_ray_serves_and_far_sdks_counters_and_histograms(url):
    n = 0
    for i in range(3):
        code, _, _ = request(url, "/generate", {"class_labels": [i, i + 1], "seed": i, **CHEAP})
        assert code == 200
        n += 2
    deadline, text = time.monotonic() + 90, ""
    while time.monotonic() < deadline:  # Ray's metrics agent exports on an interval
        code, headers, payload = request(url, "/metrics")
        assert code == 200 and headers["content-type"].startswith("text/plain")
        text = payload.decode()
        images = _sample(text, "ray_far_images_generated_total", application="far-http")
        if images is not None and images >= n:
            break
        time.sleep(2)
    assert _sample(text, "ray_far_images_generated_total", application="far-http") >= n, text[-2000:]
    assert _sample(text, "ray_far_stage_seconds_count", application="far-http", stage="transformer") >= 3
    assert _sample(text, "ray_far_batch_images_count", application="far-http") >= 3
    assert _sample(text, "ray_far_requests_total", route="generate", outcome="ok") >= 3
    assert "# TYPE ray_far_stage_seconds histogram" in text
    assert re.search(r"^ray_serve_\w+", text, re.M), "Ray Serve's own metrics are missing"
    families = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
    assert len(families) == len(set(families)) and all(f.startswith(("ray_serve_", "ray_far_")) for f in families)
