"""A text (FAR-T2I) bundle served: ``engines/far-t2i-demo`` on a real local Ray answers ``prompt`` requests with the
images ``Generator.generate(prompt=...)`` gives, streams them, merges prompts of equal settings, takes
``negative_prompt`` when this far_sdk's generate does, refuses class labels (and a class bundle refuses prompts) with
a 400 naming the field to send, and a text bundle without its text encoder is refused at start."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("ray.serve")
pytest.importorskip("tokenizers")

from conftest import ROOT  # noqa: E402
from serve_helpers import decode_pngs, deployed, events, request  # noqa: E402

import far_sdk  # noqa: E402
from far_sdk.errors import InvalidArgumentError  # noqa: E402
from far_sdk.scale.serve import ServeConfig, build_app  # noqa: E402
from far_sdk.scale.serve.requests import NEGATIVE_PROMPT  # noqa: E402

pytestmark = pytest.mark.slow

BUNDLE = ROOT / "engines" / "far-t2i-demo"
CHEAP = {"inner_steps": 3}


@pytest.fixture(scope="module")
def url(ray_local):
    cfg = ServeConfig(
        bundle=str(BUNDLE),
        backend="onnxruntime",
        backend_options={"threads": 1},
        cpus_per_replica=0.5,
        batch_wait_ms=300,
        app_name="far-t2i",
        route_prefix="/t2i",
    )
    with deployed(cfg) as base:
        yield base


@pytest.fixture(scope="module")
def reference():
    with far_sdk.Generator(BUNDLE, backend="onnxruntime", threads=1) as gen:
        yield gen


def test_a_prompt_request_returns_the_image_generate_gives(url, reference):
    code, _, payload = request(url, "/generate", {"prompt": ["please draw a 5"], "seed": 0})
    assert code == 200, payload[:300]
    answer = json.loads(payload)
    out = reference.generate(prompt=["please draw a 5"], seed=0, output_type="np")
    np.testing.assert_array_equal(decode_pngs(answer["images"]), out.images)
    assert answer["prompts"] == ["please draw a 5"] and answer["class_labels"] is None
    assert answer["plan"]["mode"] == "mask" and answer["plan"]["levels"] == list(out.plan.levels)
    assert float(out.images.std()) > 1.0


def test_prompts_of_equal_settings_merge_and_stream_without_changing_an_image(url, reference):
    bodies = [
        {"prompt": "the digit three, drawn by hand", "seed": 7, **CHEAP},
        {"prompt": ["a small seven written in ink", "please draw a 1"], "seed": 30, **CHEAP},
    ]
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda ab: request(url, ab[0], ab[1]), zip(["/generate/stream", "/generate"], bodies)))
    evs = events(answers[0][2])
    n = reference.plan(**CHEAP).num_steps
    assert [e for e, _ in evs] == ["step"] * n + ["result"]
    results = [evs[-1][1], json.loads(answers[1][2])]
    for body, answer in zip(bodies, results):
        prompts = [body["prompt"]] if isinstance(body["prompt"], str) else body["prompt"]
        want = reference.generate(prompt=prompts, seed=body["seed"], output_type="np", **CHEAP).images
        np.testing.assert_array_equal(decode_pngs(answer["images"]), want)
    assert max(a["batch_requests"] for a in results) == 2, [a["batch_requests"] for a in results]


def test_the_wrong_conditioning_is_a_400_saying_which_field_to_send(url):
    for body, field, says in [
        ({"class_labels": [3]}, "class_labels", "send prompt"),
        ({"seed": 1}, None, "prompt is required"),
        ({"prompt": []}, "prompt", "non-empty list of strings"),
        ({"prompt": ["x" * 2001]}, "prompt", "at most 2000 characters"),
        ({"prompt": [3]}, "prompt", "list of strings"),
        ({"prompt": ["a", "b"], "negative_prompt": ["x", "y", "z"]}, "negative_prompt", None),
        ({"prompt": "a", "mode": "nomask"}, None, "mask mode only"),
    ]:
        code, _, payload = request(url, "/generate", body)
        err = json.loads(payload)
        assert code == 400, (body, err)
        assert err["field"] == field and (says is None or says in err["error"]), (body, err)
    code, _, payload = request(url, "/generate", b'{"prompt": "\\ud800"}')
    assert code == 400 and "not valid JSON" in json.loads(payload)["error"]
    info = json.loads(request(url, "/info")[2])
    assert info["conditioning"] == "text" and info["num_classes"] is None


@pytest.mark.skipif(not NEGATIVE_PROMPT, reason="this far_sdk's Generator.generate has no negative_prompt= keyword yet")
def test_negative_prompt_is_passed_to_generate(url, reference):
    body = {"prompt": ["please draw a 5", "please draw a 6"], "negative_prompt": "a blurry digit", "seed": 3, **CHEAP}
    code, _, payload = request(url, "/generate", body)
    assert code == 200, payload[:300]
    want = reference.generate(
        prompt=body["prompt"], negative_prompt=["a blurry digit"] * 2, seed=3, output_type="np", **CHEAP
    ).images
    plain = reference.generate(prompt=body["prompt"], seed=3, output_type="np", **CHEAP).images
    got = decode_pngs(json.loads(payload)["images"])
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(got, plain)


def test_a_text_bundle_without_its_encoder_is_refused_at_start(tmp_path):
    import hashlib

    b = tmp_path / "no-encoder"
    shutil.copytree(BUNDLE, b)
    m = json.loads((b / "manifest.json").read_text())
    m["text"].pop("encoder")
    for name in ("text_encoder.onnx", "tokenizer.json"):
        m["files"].pop(name, None)
        (b / name).unlink()
    m.pop("manifest_sha256")
    canon = json.dumps(m, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    m["manifest_sha256"] = hashlib.sha256(canon).hexdigest()
    (b / "manifest.json").write_text(json.dumps(m, indent=2) + "\n")
    with pytest.raises(InvalidArgumentError, match="carries no text encoder.*--text-encoder"):
        build_app(ServeConfig(bundle=str(b)))
