"""far-export onnx: graph modules against the model and float64 maths, ONNX against PyTorch, bundle files, CLI,
atomicity."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx", reason="onnx not installed (pip install far-sdk[export])")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install far-sdk[export])")

from export import onnx_export, onnx_graphs  # noqa: E402
from export.onnx_export import export_bundle, random_init_source  # noqa: E402
from far_sdk.bundle.bundle import Bundle  # noqa: E402
from far_sdk.bundle.graphs import GRAPH_NAMES, graph_specs  # noqa: E402
from far_sdk.errors import ExportError  # noqa: E402
from far_sdk.maths.diffusion import Step, denoise_step_table, diffusion_tables  # noqa: E402
from training.config import get_config  # noqa: E402
from training.far import FAR  # noqa: E402
from training.graph_modules import DenoiserGraph, TransformerGraph, VAEDecoderGraph, randomize_for_export  # noqa: E402
from training.vae import AutoencoderKL  # noqa: E402

SCALE = 0.2325
LABELS = {i: f"class {i}" for i in range(10)}


def _rel(got: np.ndarray, ref: np.ndarray) -> float:
    """max |got - ref| / max |ref|: the error relative to the output's scale."""
    ref = np.asarray(ref, dtype=np.float64)
    return float(np.abs(np.asarray(got, dtype=np.float64) - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def models(tiny_models) -> tuple[FAR, AutoencoderKL]:
    return tiny_models


@pytest.fixture(scope="module")
def bundle(models, tmp_path_factory) -> Path:
    far, vae = models
    out = tmp_path_factory.mktemp("export") / "tiny"
    return export_bundle(far, vae, out, name="tiny", latent_scale=SCALE, id2label=LABELS, source=random_init_source(0))


@pytest.fixture(scope="module")
def manifest(bundle) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def _specs(far: FAR):
    c = far.config
    return graph_specs(
        seq_len=c.seq_len,
        token_channels=c.token_channels,
        mlp_width=c.diffloss_w,
        grid_size=c.grid_size,
        image_size=256,
    )


def _fresh_inputs(far: FAR, batch: int, seed: int) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    c = far.config
    L, C, W, G = c.seq_len, c.token_channels, c.diffloss_w, c.grid_size
    return {
        "transformer": {
            "tokens": rng.standard_normal((batch, L, C), dtype=np.float32),
            "class_ids": np.array([7, c.num_classes][:batch], dtype=np.int64),
            "level": np.array([6.0], dtype=np.float32),
        },
        "denoiser": {
            "x": rng.standard_normal((batch, L, C), dtype=np.float32),
            "noise": rng.standard_normal((batch, L, C), dtype=np.float32),
            "cond": rng.standard_normal((2, batch, L, W), dtype=np.float32),
            "step": denoise_step_table(12, 2.0, 0.8)[7].copy(),
        },
        "vae_decoder": {"latents": rng.standard_normal((batch, C, G, G), dtype=np.float32)},
    }


# ---- CLI ---------------------------------------------------------------------------------------------------------


# ---- bundle files and manifest ---------------------------------------------------------------------------------


def test_manifest_records_every_file_with_its_size_and_sha256(bundle, manifest):
    on_disk = {p.name for p in bundle.iterdir()} - {"manifest.json"}
    assert (
        on_disk
        == set(manifest["files"])
        == {"transformer.onnx", "denoiser.onnx", "vae_decoder.onnx", "weights.safetensors"}
        | {"vae_encoder.onnx", "vae_encoder.safetensors"}  # the optional encoder (image-to-image), on by default
    )
    for name, entry in manifest["files"].items():
        data = (bundle / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    Bundle.load(bundle)  # the runtime's own verification agrees


def test_manifest_describes_model_graphs_and_defaults(models, manifest):
    far, vae = models
    assert manifest["name"] == "tiny"
    assert manifest["model"] == far.config.to_dict() and manifest["vae"] == vae.config.to_dict()
    assert (manifest["latent_scale"], manifest["null_class_id"], manifest["mlp_width"], manifest["image_size"]) == (
        SCALE,
        10,
        128,
        256,
    )
    assert manifest["id2label"] == {str(k): v for k, v in LABELS.items()}
    assert manifest["defaults"] == {
        "num_steps": 10,
        "cfg": 3.0,
        "cfg_schedule": "linear",
        "temperature": 1.0,
        "temperature_schedule": "official",
        "inner_steps": "frequency-aware",
        "inner_sampler": "ddpm",
        "filter": "spatial",
        "x0_clip": None,
        "mode": "nomask",
    }
    assert manifest["sampling_modes"] == [
        "nomask",
        "mask",
    ]  # a mask=False model: both samplers (mask ignored, official)
    assert manifest["source"] == {"kind": "random-init", "seed": 0}
    assert set(manifest["created_by"]) == {"far_sdk", "torch", "onnx", "onnxruntime", "python"}
    for name, spec in _specs(far).items():
        g = manifest["graphs"][name]
        assert (g["file"], g["opset"], g["inputs"], g["outputs"]) == (f"{name}.onnx", 17, *spec.to_dict().values())
        assert "external_data" not in g  # tiny graphs stay single-file
        assert g["validation"]["batch_sizes"] == [1, 3]
        assert g["validation"]["max_rel"] <= 1e-4 and g["validation"]["max_abs"] <= 2e-3


def test_weights_hold_far_and_vae_decoder_under_prefixes(models, bundle):
    from safetensors.numpy import load_file

    far, vae = models
    got = load_file(str(bundle / "weights.safetensors"))
    want = {f"far.{k}": v for k, v in far.state_dict().items()}
    want |= {f"vae.{k}": v for k, v in vae.state_dict().items() if k.startswith(("decoder.", "post_quant_conv."))}
    assert set(got) == set(want)
    for k, v in want.items():
        np.testing.assert_array_equal(got[k], v.numpy(), err_msg=k)


@pytest.mark.parametrize("name", GRAPH_NAMES)
def test_graph_passes_the_checker_and_declares_the_spec_io(models, bundle, name):
    path = bundle / f"{name}.onnx"
    onnx.checker.check_model(str(path))
    model = onnx.load(str(path))
    spec = _specs(models[0])[name]
    dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    assert [(v.name, dims(v)) for v in model.graph.input] == [(t.name, list(t.shape)) for t in spec.inputs]
    assert [(v.name, dims(v)) for v in model.graph.output] == [(t.name, list(t.shape)) for t in spec.outputs]
    assert sum(n.op_type == "LayerNormalization" for n in model.graph.node) == (
        0 if name == "vae_decoder" else {"transformer": 11, "denoiser": 3}[name]
    )


# ---- ONNX against the torch modules -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", GRAPH_NAMES)
def test_onnx_graph_matches_its_torch_module_at_batch_2(models, bundle, name):
    far, vae = models
    module = {
        "transformer": TransformerGraph(far),
        "denoiser": DenoiserGraph(far.diffloss.net),
        "vae_decoder": VAEDecoderGraph(vae, SCALE),
    }[name]
    feeds = _fresh_inputs(far, 2, seed=11)[name]
    (got,) = ort.InferenceSession(str(bundle / f"{name}.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)
    with torch.no_grad():
        ref = module(*map(torch.from_numpy, feeds.values())).numpy()
    assert got.shape == ref.shape and np.isfinite(got).all()
    if name == "vae_decoder":
        assert np.abs(got - ref).max() < 1e-4
    else:
        assert _rel(got, ref) < 1e-5


# ---- graph modules against the model and the maths -----------------------------------------------------------------


def test_transformer_graph_is_far_condition_then_mlp_condition_with_null_id_as_fake_latent(models, bundle):
    far, _ = models
    net, D = far.diffloss.net, far.config.decoder_embed_dim
    rng = np.random.default_rng(5)
    tokens = torch.from_numpy(rng.standard_normal((3, 256, 16), dtype=np.float32))
    ids = torch.tensor([3, 10, 0])  # 10 = num_classes: the null class
    level = torch.tensor([4.0])
    with torch.no_grad():
        emb = torch.stack([far.class_emb.weight[3], far.fake_latent[0], far.class_emb.weight[0]])
        z = far.condition(tokens, emb).reshape(-1, D)  # (N L, D)
        ref = net.condition(z, level.expand(z.shape[0], 1)).reshape(3, 256, -1).numpy()
        got = TransformerGraph(far)(tokens, ids, level).numpy()
    assert _rel(got, ref) < 1e-6
    sess = ort.InferenceSession(str(bundle / "transformer.onnx"), providers=["CPUExecutionProvider"])
    (got_onnx,) = sess.run(None, {"tokens": tokens.numpy(), "class_ids": ids.numpy(), "level": level.numpy()})
    assert _rel(got_onnx, ref) < 1e-5


@pytest.mark.parametrize("k", [9, 4, 0])  # the noisiest step, a middle one, the last (no noise added)
def test_denoiser_graph_is_one_guided_ddpm_step_in_float64(models, bundle, k):
    far, _ = models
    net, B, L, C, W = far.diffloss.net, 2, 256, 16, 128
    n, cfg, temp = 10, 2.5, 0.9
    tab = diffusion_tables(n)
    step = denoise_step_table(n, cfg, temp)[n - 1 - k]  # rows run k = n-1 .. 0
    assert step[Step.timestep] == tab.timesteps[k]
    rng = np.random.default_rng(100 + k)
    x, noise = (rng.standard_normal((B, L, C), dtype=np.float32) for _ in range(2))
    cond = rng.standard_normal((2, B, L, W), dtype=np.float32)
    with torch.no_grad():  # the network's own output, every row with its own integer timestep
        xt = torch.from_numpy(x).reshape(B * L, C)
        t = torch.full((2 * B * L,), int(tab.timesteps[k]), dtype=torch.long)
        out = (
            net.forward_with_condition(torch.cat([xt, xt]), t, torch.from_numpy(cond).reshape(2 * B * L, W))
            .double()
            .numpy()
        )
        got = DenoiserGraph(net)(*map(torch.from_numpy, (x, noise, cond, step))).numpy()
    eps_c, eps_u, v = out[: B * L, :C], out[B * L :, :C], out[: B * L, C:]
    x64, z64 = x.reshape(B * L, C).astype(np.float64), noise.reshape(B * L, C).astype(np.float64)
    eps = eps_u + cfg * (eps_c - eps_u)
    x0 = tab.sqrt_recip_alphas_cumprod[k] * x64 - tab.sqrt_recipm1_alphas_cumprod[k] * eps
    mean = tab.posterior_mean_coef1[k] * x0 + tab.posterior_mean_coef2[k] * x64
    frac = (v + 1) / 2
    log_var = frac * tab.log_betas[k] + (1 - frac) * tab.posterior_log_variance_clipped[k]
    ref = (mean + (k != 0) * np.exp(0.5 * log_var) * z64 * temp).reshape(B, L, C)
    assert _rel(got, ref) < 1e-5
    sess = ort.InferenceSession(str(bundle / "denoiser.onnx"), providers=["CPUExecutionProvider"])
    (got_onnx,) = sess.run(None, {"x": x, "noise": noise, "cond": cond, "step": step})
    assert _rel(got_onnx, ref) < 1e-5


def test_graph_modules_name_their_inputs_and_outputs_as_the_spec(models):
    specs = _specs(models[0])
    for cls, name in ((TransformerGraph, "transformer"), (DenoiserGraph, "denoiser"), (VAEDecoderGraph, "vae_decoder")):
        assert (list(cls.input_names), list(cls.output_names)) == (specs[name].input_names, specs[name].output_names)
    masked = dataclasses.replace(models[0].config, mask=True)
    spec = graph_specs(seq_len=256, token_channels=16, mlp_width=128, grid_size=16, image_size=256, masked=True)[
        "transformer"
    ]
    assert (
        list(TransformerGraph(FAR(masked)).input_names) == spec.input_names == ["tokens", "class_ids", "level", "mask"]
    )


def test_denoiser_graph_runs_in_bfloat16_with_a_float32_step(models):
    far, _ = models
    net16 = FAR(far.config)
    net16.load_state_dict(far.state_dict())
    net16 = net16.diffloss.net.to(torch.bfloat16).eval()
    feeds = _fresh_inputs(far, 1, seed=4)["denoiser"]
    with torch.no_grad():
        ref = DenoiserGraph(far.diffloss.net)(*map(torch.from_numpy, feeds.values())).numpy()
        args = [torch.from_numpy(feeds[n]).to(torch.bfloat16) for n in ("x", "noise", "cond")]
        got = DenoiserGraph(net16)(*args, torch.from_numpy(feeds["step"]))
    assert got.dtype == torch.bfloat16
    assert _rel(got.float().numpy(), ref) < 0.05


def test_vae_decoder_graph_divides_by_the_latent_scale_before_decoding(models):
    _, vae = models
    z = torch.from_numpy(np.random.default_rng(2).standard_normal((1, 16, 16, 16), dtype=np.float32))
    with torch.no_grad():
        torch.testing.assert_close(VAEDecoderGraph(vae, SCALE)(z), vae.decode(z / SCALE), rtol=0, atol=0)


def test_randomize_for_export_makes_a_fresh_model_depend_on_every_input():
    torch.manual_seed(0)
    far = FAR(get_config("far_tiny")).eval()
    net = far.diffloss.net
    h, t, y = torch.randn(4, 16), torch.tensor([500.0]), torch.randn(4, 128)
    with torch.no_grad():
        assert not net.forward_with_condition(h, t, y).any()  # official init: the output layer is zero
        randomize_for_export(far, seed=0)
        assert all(p.any() for p in far.parameters())
        g = DenoiserGraph(net)
        x, noise, cond = torch.randn(1, 256, 16), torch.randn(1, 256, 16), torch.randn(2, 1, 256, 128)
        step = torch.from_numpy(denoise_step_table(10, 3.0, 1.0)[5])
        base = g(x, noise, cond, step)
        other = cond.clone()
        other[1] += 1.0  # only the unconditional half
        assert not torch.equal(g(x, noise, other, step), base)


def test_large_graphs_keep_their_weights_in_one_external_data_file(models, tmp_path, monkeypatch):
    far, _ = models
    monkeypatch.setattr(onnx_graphs, "EXTERNAL_DATA_THRESHOLD", 0)
    spec = _specs(far)["denoiser"]
    feeds = _fresh_inputs(far, 1, seed=3)["denoiser"]
    files = onnx_graphs.export_graph(DenoiserGraph(far.diffloss.net).eval(), spec, feeds, tmp_path, 17)
    assert files == ["denoiser.onnx", "denoiser.onnx.data"] and sorted(p.name for p in tmp_path.iterdir()) == files
    assert (tmp_path / "denoiser.onnx").stat().st_size < 100_000 < (tmp_path / "denoiser.onnx.data").stat().st_size
    onnx_graphs.check_graph(tmp_path / "denoiser.onnx", spec)
    (got,) = ort.InferenceSession(str(tmp_path / "denoiser.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)
    with torch.no_grad():
        ref = DenoiserGraph(far.diffloss.net)(*map(torch.from_numpy, feeds.values())).numpy()
    assert _rel(got, ref) < 1e-5


# ---- failures leave nothing half-written ---------------------------------------------------------------------------


def _failing_validation(*args, **kwargs):
    raise ExportError("injected validation failure")


def test_export_failing_midway_leaves_no_directory(models, tmp_path, monkeypatch):
    far, vae = models
    monkeypatch.setattr(onnx_export, "validate_graph", _failing_validation)
    with pytest.raises(ExportError, match="injected"):
        export_bundle(far, vae, tmp_path / "new", name="new")
    assert list(tmp_path.iterdir()) == []  # no bundle, no partial directory


def test_export_failing_over_an_existing_bundle_keeps_it(models, bundle, tmp_path, monkeypatch):
    far, vae = models
    old = tmp_path / "b"
    shutil.copytree(bundle, old)
    before = (old / "manifest.json").read_bytes()
    monkeypatch.setattr(onnx_export, "validate_graph", _failing_validation)
    with pytest.raises(ExportError):
        export_bundle(far, vae, old, name="b", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["b"]
    assert (old / "manifest.json").read_bytes() == before
    Bundle.load(old)
