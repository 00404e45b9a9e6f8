"""Image-to-image on the surfaces, with the committed demo bundle (its vae_encoder fitted to the frozen decoder):
``far generate --init-image``, the server's image / strength / start_level fields (request model, jobs, merged
calls; hostile input answered with far_sdk's message, never a 500; one HTTP round trip on Ray, marked slow), and the
demo's low frequencies kept from a high start level."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from conftest import ROOT
from hostile import one_line_error, run_cli

pytest.importorskip("onnxruntime")

import far_sdk  # noqa: E402
from far_sdk.maths.filters import low_pass  # noqa: E402

DEMO = ROOT / "engines" / "far-demo"
CHEAP = {"num_steps": 10, "inner_steps": 4}


@pytest.fixture(scope="module")
def gen():
    with far_sdk.Generator(DEMO, backend="onnxruntime", threads=1) as g:
        yield g


@pytest.fixture(scope="module")
def digits():
    """Three held-out demo digits (a 0, a 3 and a 7) as uint8 [3, 32, 32, 3] and their labels."""
    pytest.importorskip("sklearn")
    pytest.importorskip("torch")
    from training.demo_data import load_digits_images, split_indices

    x, y = load_digits_images(32)
    _, te = split_indices(y)
    pick = [te[y[te].numpy() == c][0] for c in (0, 3, 7)]
    u8 = np.clip(np.round((x[pick].numpy().transpose(0, 2, 3, 1) + 1) * 127.5), 0, 255).astype(np.uint8)
    return u8, [0, 3, 7]


def _png(u8: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(u8).save(buf, format="PNG")
    return buf.getvalue()


def test_demo_encoder_reconstructs_and_high_start_keeps_the_inputs_low_frequencies(gen, digits):
    u8, labels = digits
    z = gen.encode(u8)
    rec = gen.generate(labels, image=u8, start_level=10, output_type="np", **CHEAP).images  # no step: decode(z)
    assert np.abs(rec.astype(float) - u8).mean() / 255 < 0.02  # the fitted encoder: held-out L1 0.0055
    out = gen.generate(labels, seed=0, image=u8, start_level=8, output_type="latent", **CHEAP).latents
    scratch = gen.generate(labels, seed=0, output_type="latent", **CHEAP).latents
    level = gen.plan(**CHEAP).levels[8]
    kept = np.abs(low_pass(out, level) - low_pass(z, level)).mean()
    unrelated = np.abs(low_pass(scratch, level) - low_pass(z, level)).mean()
    assert kept < 0.5 * unrelated, (kept, unrelated)


def test_far_generate_init_image_equals_the_python_call(gen, digits, tmp_path):
    from PIL import Image

    from far_sdk.cli.main import main

    u8, _ = digits
    pic = tmp_path / "three.png"
    pic.write_bytes(_png(u8[1]))
    out = tmp_path / "out.png"
    argv = ["generate", str(DEMO), "--class", "8", "--seed", "4", "--steps", "10", "--inner-steps", "4"]
    argv += ["--backend", "onnxruntime", "--no-progress", "--init-image", str(pic), "--strength", "0.3"]
    rc, _, err = run_cli(main, [*argv, "--out", str(out), "--out-dir", str(tmp_path / "each")])
    assert rc == 0, err
    want = gen.generate([8], seed=4, image=u8[1], start_level=7, output_type="np", **CHEAP).images[0]
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), want)
    (one,) = (tmp_path / "each").iterdir()  # its settings name the start picture, which --from-image cannot repeat
    rc, _, err = run_cli(main, ["generate", "--from-image", str(one), "--out", str(tmp_path / "again.png")])
    assert rc != 0 and "made from a start picture" in err and one_line_error(err), err
    for extra, match in (
        (["--init-image", str(tmp_path / "none.png"), "--strength", "0.5"], "not a readable image"),
        (["--init-image", str(pic)], "needs --strength"),
        (["--start-level", "3"], "go with --init-image"),
        (["--init-image", str(pic), "--strength", "0.5", "--start-level", "2"], "not allowed with"),
    ):
        base = ["generate", str(DEMO), "--class", "1", "--backend", "onnxruntime", "--out", str(tmp_path / "x.png")]
        rc, _, err = run_cli(main, base + extra)
        assert rc != 0 and match in err and one_line_error(err), err


# ---- the server's fields, without Ray ----------------------------------------------------------------------------


def _job(gen, body: dict):
    pytest.importorskip("pydantic")
    from far_sdk.scale.serve.models import parse_body
    from far_sdk.scale.serve.requests import make_job

    req, bad = parse_body(json.dumps(body).encode())
    if bad is not None:
        return bad
    return make_job(req, gen, max_images=16)


def test_server_image_jobs_merge_and_equal_generate(gen, digits):
    from far_sdk.scale.serve.batching import group_by_settings, run_group

    u8, _ = digits
    bodies = [
        {"class_labels": [3, 5], "seed": 7, "image": base64.b64encode(_png(u8[1])).decode(), "start_level": 6},
        {"class_labels": [7], "seed": 9, "image": base64.b64encode(_png(u8[2])).decode(), "start_level": 6},
        {"class_labels": [7], "seed": 9, "image": base64.b64encode(_png(u8[2])).decode(), "strength": 0.4},
        {"class_labels": [7], "seed": 9},
    ]
    jobs = [_job(gen, {**b, **CHEAP}) for b in bodies]
    groups = list(group_by_settings(jobs).values())
    assert groups == [[0, 1], [2], [3]]  # same start: one call; strength 0.4 = level 6, but asked differently
    res = run_group(gen, [jobs[0], jobs[1]])
    a = gen.generate([3, 5], seed=7, image=u8[1], start_level=6, output_type="np", **CHEAP).images
    b = gen.generate([7], seed=9, image=u8[2], start_level=6, output_type="np", **CHEAP).images
    assert np.array_equal(res.images[0], a) and np.array_equal(res.images[1], b)
    assert np.array_equal(run_group(gen, [jobs[2]]).images[0], b)


def test_hostile_image_fields_get_far_sdks_400_message(gen, digits, tmp_path):
    from PIL import Image

    from far_sdk.errors import InvalidArgumentError
    from far_sdk.scale.serve.models import ErrorResponse

    u8, _ = digits
    ok = base64.b64encode(_png(u8[0])).decode()
    buf = io.BytesIO()
    Image.new("L", (5000, 8)).save(buf, format="PNG")  # tiny file, huge side
    huge = base64.b64encode(buf.getvalue()).decode()
    cases = [
        ({"image": "%%%not base64%%%", "start_level": 2}, "image", "not valid base64"),
        ({"image": base64.b64encode(b"GIF89a nonsense").decode(), "start_level": 2}, "image", "not a readable image"),
        ({"image": huge, "start_level": 2}, "image", "at most 4096"),
        ({"image": 12, "start_level": 2}, "image", "base64-encoded"),
        ({"image": ok, "start_level": 11}, "start_level", "0..10"),
        ({"image": ok, "strength": 2}, "strength", "[0, 1]"),
        ({"image": ok, "strength": True}, "strength", "[0, 1]"),
        ({"image": ok}, "image", "start_level"),
        ({"image": ok, "strength": 0.5, "start_level": 2}, "image", "one of start_level"),
        ({"start_level": 2}, "start_level", "goes with image"),
    ]
    for body, field, match in cases:
        try:
            got = _job(gen, {"class_labels": [1], **body})
        except InvalidArgumentError as e:  # the app answers these 400 with the message and field
            assert getattr(e, "field", None) == field and match in str(e), (body, e)
            continue
        assert isinstance(got, ErrorResponse) and got.field == field and match in got.error, (body, got)


def test_server_refuses_images_for_a_bundle_without_encoder(tmp_path, digits):
    import shutil

    from far_sdk.bundle.manifest import dump_manifest
    from far_sdk.errors import InvalidArgumentError

    b = tmp_path / "old"
    shutil.copytree(DEMO, b)
    m = json.loads((b / "manifest.json").read_text())
    del m["graphs"]["vae_encoder"]
    for f in ("vae_encoder.onnx", "vae_encoder.safetensors"):
        del m["files"][f]
    (b / "manifest.json").write_bytes(dump_manifest(m))
    with far_sdk.Generator(b, backend="onnxruntime", threads=1) as old:
        with pytest.raises(InvalidArgumentError, match="re-export") as e:
            _job(old, {"class_labels": [1], "image": base64.b64encode(_png(digits[0][0])).decode(), "strength": 0.5})
        assert e.value.field == "image"


@pytest.mark.slow
def test_http_generate_with_an_image_end_to_end(ray_local, gen, digits):
    from serve_helpers import decode_pngs, deployed, request

    from far_sdk.scale.serve import ServeConfig

    u8, _ = digits
    cfg = ServeConfig(
        bundle=str(DEMO),
        backend="onnxruntime",
        backend_options={"threads": 1},
        cpus_per_replica=0.5,
        app_name="far-img2img",
        route_prefix="/img2img",
    )
    body = {"class_labels": [3], "seed": 2, "image": base64.b64encode(_png(u8[1])).decode(), "start_level": 7}
    with deployed(cfg) as url:
        code, _, payload = request(url, "/generate", {**body, **CHEAP})
        assert code == 200, payload
        got = decode_pngs(json.loads(payload)["images"])
        bad, _, err = request(url, "/generate", {**body, "image": "@@"})
        assert bad == 400 and json.loads(err)["field"] == "image"
        assert json.loads(request(url, "/info")[2])["image_to_image"] is True
    want = gen.generate([3], seed=2, image=u8[1], start_level=7, output_type="np", **CHEAP).images
    assert np.array_equal(got, want)


def test_far_export_writes_the_encoder_by_default_and_no_vae_encoder_leaves_it_out(tmp_path):
    pytest.importorskip("torch")
    from export.cli import main

    out = tmp_path / "noenc"
    argv = ["onnx", "--random-init", "--model", "far_tiny", "--vae-config", "kl16-tiny", "--no-validate"]
    rc, _, err = run_cli(main, [*argv, "--no-vae-encoder", "--out", str(out)])
    assert rc == 0, err
    b = far_sdk.Bundle.load(out)
    assert "vae_encoder" not in b.manifest["graphs"] and not (out / "vae_encoder.onnx").exists()


def test_encoder_fit_reconstructs_and_only_the_cycle_term_pins_the_decoders_latents():
    torch = pytest.importorskip("torch")
    from training_helpers import MICRO_VAE, smooth_field

    from training.encoder_fit import cycle_error, fit_encoder, reconstruction_error
    from training.vae import AutoencoderKL

    got = {}
    for cycle in (False, True):  # the same start, data and seed; with and without the cycle term
        torch.manual_seed(0)
        vae = AutoencoderKL(MICRO_VAE).eval()
        decoder = {k: v.clone() for k, v in vae.state_dict().items() if k.startswith(("decoder.", "post_quant"))}
        lat = smooth_field(torch.Generator().manual_seed(1), (64, 4), 3, size=8)
        with torch.no_grad():
            images = vae.decode(lat).clamp(-1, 1)
        before = reconstruction_error(vae, images)["l1"]
        fit_encoder(vae, images, steps=40, lr=3e-3, batch_size=16, cycle=lat if cycle else None, cycle_weight=10)
        assert all(torch.equal(vae.state_dict()[k], v) for k, v in decoder.items())  # the decoder stays frozen
        got[cycle] = reconstruction_error(vae, images)["l1"], cycle_error(vae, lat, 1.0)
        assert got[cycle][0] < 0.8 * before, (before, got)
    # reconstruction alone drifts off the decoder's latents (the demo's 90 %); the cycle term pins them
    assert got[True][1] < 0.75 * got[False][1], got


def test_text_bundle_starts_from_an_image_in_mask_mode(digits):
    pytest.importorskip("tokenizers")
    u8, _ = digits
    with far_sdk.Generator(ROOT / "engines" / "far-t2i-demo", backend="onnxruntime", threads=1) as t2i:
        plan = t2i.plan(inner_steps=3)
        assert plan.mode == "mask"
        seen = []
        prompt = ["please draw a 3"]
        out = t2i.generate(prompt=prompt, seed=1, image=u8[1], start_level=6, inner_steps=3, on_step=seen.append)
        z = t2i.encode(u8[1])
        first = seen[0]
        assert [s.step for s in seen] == [5, 6, 7, 8, 9] and np.array_equal(first.latents, z)
        lp = low_pass(z, plan.filter_after[5])
        dropped = first.handed_on == 0  # mask mode: step 6's masked tokens are zeroed, the rest is the low-pass
        assert 0 < dropped.mean() < 1 and np.allclose(first.handed_on[~dropped], lp[~dropped], atol=1e-5)
        scratch = t2i.generate(prompt=prompt, seed=1, inner_steps=3, output_type="latent").latents
        again = t2i.generate(prompt=prompt, seed=1, image=u8[1], strength=1.0, inner_steps=3, output_type="latent")
        assert np.array_equal(again.latents, scratch) and not np.array_equal(out.latents, scratch)
