"""far serve's pieces without Ray: the request model against far_sdk.options, how merged jobs are cut into
generate calls, and how several nodes' Prometheus texts merge."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

pytest.importorskip("pydantic")

from far_sdk.errors import InvalidArgumentError  # noqa: E402
from far_sdk.options import SPECS, SamplingOptions  # noqa: E402
from far_sdk.scale.serve.batching import chunk_bounds  # noqa: E402
from far_sdk.scale.serve.metrics import family, merge  # noqa: E402
from far_sdk.scale.serve.models import GenerateRequest, parse_body  # noqa: E402


def test_every_sampling_option_is_a_request_field_with_the_manifests_schema():
    props = GenerateRequest.model_json_schema()["properties"]
    for name, spec in SPECS.items():
        want = spec.json_schema()
        got = {k: v for k, v in props[name].items() if k not in ("description", "default", "title")}
        if spec.kind == "clip":  # over HTTP false means "never clip"; null means "not given"
            want = {"oneOf": [{"const": False}, want["oneOf"][1]]}
        assert got == want, name
        assert (
            props[name]["default"] is None and spec.doc.split(":")[0] in props[name]["description"] or name == "x0_clip"
        )


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("num_steps", 0),
        ("num_steps", 17),
        ("cfg", -1),
        ("cfg", "3"),
        ("eta", 1.5),
        ("levels", [0, 16]),
        ("inner_steps", "fastest"),
        ("inner_steps", 0),
        ("mode", "maskless"),
        ("filter", 3),
        ("x0_clip", 0),
        ("temperature", True),
        ("cfg_schedule", None),
    ],
)
def test_a_bad_value_gets_exactly_far_sdks_message_for_that_option(name, value):
    req, err = parse_body(json.dumps({"class_labels": [1], name: value}).encode())
    if value is None:  # null: not given
        assert err is None and getattr(req, name) is None
        return
    with pytest.raises(InvalidArgumentError) as e:
        SamplingOptions(**{name: value})
    assert req is None and err.field == name and err.error == str(e.value)


def test_good_values_come_out_as_sampling_options_normalise_them():
    body = {"class_labels": 3, "levels": [0, 4, 8], "inner_steps": [2, 3, 4], "cfg": 2, "x0_clip": False}
    req, err = parse_body(json.dumps(body).encode())
    assert err is None
    opts = SamplingOptions(levels=[0, 4, 8], inner_steps=[2, 3, 4], cfg=2, x0_clip=False)
    assert (req.levels, req.inner_steps, req.cfg, req.x0_clip) == (opts.levels, opts.inner_steps, 2.0, False)
    assert req.class_labels == [3] and req.seed == 0 and req.output_format == "json"


def _brute_force_ok(bounds, sizes, streamed, limit):
    """Contiguous cover of every image, each call within limit, no streamed job split."""
    total = sum(sizes)
    flat = [b for a in bounds for b in a]
    if flat[0] != 0 or flat[-1] != total or any(flat[i] != flat[i + 1] for i in range(1, len(flat) - 1, 2)):
        return False
    if any(b - a > limit or b <= a for a, b in bounds):
        return False
    starts = list(itertools.accumulate([0, *sizes]))
    cuts = {a for a, _ in bounds}
    return all(not (s and any(starts[i] < c < starts[i + 1] for c in cuts)) for i, s in enumerate(streamed))


def test_chunk_bounds_cover_every_image_within_the_limit_and_never_split_a_streamed_job():
    for sizes in itertools.product([1, 2, 3, 5], repeat=3):
        for streamed in itertools.product([False, True], repeat=3):
            for limit in (5, 6, 8):
                b = chunk_bounds(list(sizes), list(streamed), limit)
                assert _brute_force_ok(b, sizes, streamed, limit), (sizes, streamed, limit, b)
                assert len(b) <= -(-sum(sizes) // limit) + sum(streamed)  # no needless extra calls
    assert chunk_bounds([3, 4], [True, False], None) == [(0, 7)]


def test_merging_exporters_keeps_each_family_once_and_drops_other_families():
    node = (
        "# HELP ray_far_images_generated_total images\n# TYPE ray_far_images_generated_total counter\n"
        'ray_far_images_generated_total{{NodeAddress="{n}"}} 4.0\n'
        "# HELP ray_far_stage_seconds s\n# TYPE ray_far_stage_seconds histogram\n"
        'ray_far_stage_seconds_bucket{{le="0.1",NodeAddress="{n}"}} 1.0\n'
        'ray_far_stage_seconds_count{{NodeAddress="{n}"}} 1.0\n'
        "# HELP ray_grpc_server_x other\n# TYPE ray_grpc_server_x gauge\nray_grpc_server_x 3.0\n"
    )
    text = merge([node.format(n="a"), node.format(n="b")])
    lines = text.splitlines()
    assert lines.count("# TYPE ray_far_images_generated_total counter") == 1
    assert sum(line.startswith("ray_far_images_generated_total{") for line in lines) == 2
    assert (
        "ray_grpc_server_x" not in text and family('ray_far_stage_seconds_bucket{le="1"} 2') == "ray_far_stage_seconds"
    )
    types = [i for i, line in enumerate(lines) if line.startswith("# TYPE ray_far_stage_seconds")]
    assert all(line.startswith("ray_far_stage_seconds_") for line in lines[types[0] + 1 : types[0] + 5])


class _StubGenerator:
    """Records each generate call; image values encode (seed, row) so the test can check where each went."""

    class backend:  # noqa: N801 - stands in for Generator.backend
        max_batch = 3

    def __init__(self):
        self.calls = []

    def decode(self, latents):
        return np.zeros((len(latents), 3, 2, 2), np.float32)

    def generate(self, **kw):
        from types import SimpleNamespace

        from far_sdk.pipeline import STAGES

        self.calls.append(kw)
        seeds = kw["noise"].seeds
        images = np.stack([np.full((2, 2, 3), s % 251, np.uint8) for s in seeds])
        return SimpleNamespace(
            images=images, timings=dict.fromkeys((*STAGES, "total"), 0.0), plan=SimpleNamespace(to_dict=dict)
        )


def test_merged_text_jobs_keep_prompts_negatives_and_seeds_aligned_across_calls():
    from far_sdk.scale.serve.batching import Job, run_group

    jobs = [
        Job(seed=10, settings=(), prompts=("a", "b"), negative_prompts=("na", "nb")),
        Job(seed=50, settings=(), prompts=("c", "d"), negative_prompts=("nc", "nc"), preview=lambda *a: None),
        Job(seed=90, settings=(), prompts=("e",), negative_prompts=("ne",)),
    ]
    gen = _StubGenerator()
    res = run_group(gen, jobs)
    # max_batch 3: the streamed job (2 images) is not split, so the calls are [a, b], [c, d, e]
    assert [c["prompt"] for c in gen.calls] == [["a", "b"], ["c", "d", "e"]]
    assert [c["negative_prompt"] for c in gen.calls] == [["na", "nb"], ["nc", "nc", "ne"]]
    assert [list(c["noise"].seeds) for c in gen.calls] == [[10, 11], [50, 51, 90]]
    assert [r[:, 0, 0, 0].tolist() for r in res.images] == [[10, 11], [50, 51], [90]]
    assert res.batch_images == 5 and res.batch_requests == 3 and not res.stopped
