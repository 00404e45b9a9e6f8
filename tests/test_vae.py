"""The KL-16 tokenizer: official names and shapes, loading, shapes of encode/decode, numerics, ONNX export."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from far_sdk.errors import CheckpointError, ConfigError
from training.vae import (
    VAE_CONFIGS,
    AttnBlock,
    AutoencoderKL,
    DiagonalGaussian,
    Downsample,
    ResnetBlock,
    Upsample,
    VAEConfig,
    load_official_vae,
    vae_state_dict_shapes,
)

TSV = Path(__file__).parent / "fixtures" / "spec" / "official-far-state-dict.tsv"
TINY = VAE_CONFIGS["kl16-tiny"]


def _official_vae_shapes() -> dict[str, tuple[int, ...]]:
    """The AutoencoderKL block of the official listing: name -> shape."""
    shapes: dict[str, tuple[int, ...]] = {}
    inside = False
    for line in TSV.read_text().splitlines():
        if line.startswith("## "):
            inside = line.startswith("## AutoencoderKL")
            continue
        if inside and line.strip():
            name, shape, _dtype = line.split("\t")
            shapes[name] = tuple(json.loads(shape))
    return shapes


@pytest.fixture(scope="module")
def tiny_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    model = AutoencoderKL(TINY).eval()
    # Perturb the GroupNorm affines so that they are not the identity.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


# ---- names, shapes and counts ---------------------------------------------------------------------------------


def test_kl16_state_dict_names_and_shapes_equal_the_official_listing():
    official = _official_vae_shapes()
    ours = vae_state_dict_shapes(VAE_CONFIGS["kl16"])
    assert len(official) == 312
    assert set(ours) - set(official) == set()
    assert set(official) - set(ours) == set()
    assert {k: ours[k] for k in official} == official


def test_kl16_parameter_counts_match_the_official_totals():
    with torch.device("meta"):
        model = AutoencoderKL(VAE_CONFIGS["kl16"])
    total = sum(p.numel() for p in model.parameters())
    decode_path = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("decoder.", "post_quant_conv.")))
    assert total == 66_456_019
    assert decode_path == 38_189_203
    assert not list(model.buffers())


def test_encoder_attention_sits_at_16x16_and_decoder_has_none_outside_mid():
    names = vae_state_dict_shapes(VAE_CONFIGS["kl16"])
    assert {n.split(".attn.")[0] for n in names if ".attn." in n} == {"encoder.down.4"}
    assert not any(n.startswith("decoder.") and "attn" in n and ".mid." not in n for n in names)


# ---- config ---------------------------------------------------------------------------------------------------


def test_config_round_trips_through_json():
    for cfg in VAE_CONFIGS.values():
        d = json.loads(json.dumps(cfg.to_dict()))
        assert d == cfg.to_dict()
        assert VAEConfig.from_dict(d) == cfg
    assert VAE_CONFIGS["kl16"].downsample_factor == 16 and VAE_CONFIGS["kl16"].latent_channels == 16


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"ch": 48}, "gn_groups"),  # 48 channels do not split into 32 groups
        ({"resolution": 200}, "divisible"),
        ({"ch_mult": ()}, "ch_mult"),
        ({"attn_resolutions": (24,)}, "attn_resolutions"),
        ({"dropout": 1.0}, "dropout"),
    ],
)
def test_config_rejects_inconsistent_values(kwargs, fragment):
    with pytest.raises(ConfigError, match=fragment):
        VAEConfig(**kwargs)


def test_config_from_dict_names_unknown_fields():
    with pytest.raises(ConfigError, match="double_z"):
        VAEConfig.from_dict({**TINY.to_dict(), "double_z": True})


def test_other_depths_and_resolutions_give_the_matching_latent_grid():
    # Three levels: 4x downsampling, attention at the 16x16 level of a 64x64 image.
    cfg = VAEConfig(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, resolution=64, gn_groups=8)
    model = AutoencoderKL(cfg).eval()
    assert any(n.startswith("encoder.down.2.attn.0.") for n in model.state_dict())
    with torch.no_grad():
        post = model.encode(torch.randn(1, 3, 64, 64))
        assert post.mean.shape == (1, 16, 16, 16)
        assert model.decode(post.mean).shape == (1, 3, 64, 64)


# ---- encode / decode shapes -----------------------------------------------------------------------------------


def test_decode_maps_16x16_latents_to_256x256_images(tiny_vae):
    with torch.no_grad():
        out = tiny_vae.decode(torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(1)))
    assert out.shape == (2, 3, 256, 256)
    assert torch.isfinite(out).all()


def test_encode_maps_256x256_images_to_16x16_posteriors(tiny_vae):
    x = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        post = tiny_vae.encode(x)
        recon, post2 = tiny_vae(x, sample_posterior=False)
    assert post.mean.shape == post.logvar.shape == (2, 16, 16, 16)
    assert recon.shape == x.shape
    assert torch.equal(post2.mean, post.mean)


# ---- loading --------------------------------------------------------------------------------------------------


def _save_ldm_style(model: AutoencoderKL, path: Path, **extra_model_entries: torch.Tensor) -> None:
    state = dict(model.state_dict())
    state["loss.discriminator.main.0.weight"] = torch.randn(64, 3, 4, 4)
    state["loss.logvar"] = torch.zeros(())
    state.update(extra_model_entries)
    torch.save({"model": state}, path)


def _outputs(model: AutoencoderKL) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    z = torch.randn(1, 16, 2, 2, generator=g)
    x = torch.randn(1, 3, 32, 32, generator=g)
    with torch.no_grad():
        return model.decode(z), model.encode(x).mean


def test_official_layout_round_trips_and_drops_loss_entries(tiny_vae, tmp_path):
    path = tmp_path / "kl16.ckpt"
    _save_ldm_style(tiny_vae, path)
    loaded = load_official_vae(path, TINY)
    assert not loaded.training
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in loaded.parameters())
    for a, b in zip(_outputs(tiny_vae), _outputs(loaded)):
        assert torch.equal(a, b)


def test_bare_state_dict_and_safetensors_load_the_same_weights(tiny_vae, tmp_path):
    from safetensors.torch import save_file

    bare, st = tmp_path / "bare.pth", tmp_path / "vae.safetensors"
    torch.save(tiny_vae.state_dict(), bare)
    save_file({k: v.contiguous() for k, v in tiny_vae.state_dict().items()}, st)
    ref = _outputs(tiny_vae)
    for path in (bare, st):
        for a, b in zip(ref, _outputs(load_official_vae(path, TINY))):
            assert torch.equal(a, b)


def test_renamed_key_raises_checkpoint_error_naming_it(tiny_vae, tmp_path):
    state = dict(tiny_vae.state_dict())
    state["decoder.conv_out.weight_renamed"] = state.pop("decoder.conv_out.weight")
    path = tmp_path / "renamed.ckpt"
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError, match=r"decoder\.conv_out\.weight") as info:
        load_official_vae(path, TINY)
    assert "decoder.conv_out.weight_renamed" in str(info.value)


def test_unexpected_non_loss_key_is_rejected(tiny_vae, tmp_path):
    path = tmp_path / "extra.ckpt"
    _save_ldm_style(tiny_vae, path, **{"encoder.extra.weight": torch.ones(3)})
    with pytest.raises(CheckpointError, match=r"encoder\.extra\.weight"):
        load_official_vae(path, TINY)


def test_truncated_file_raises_checkpoint_error(tiny_vae, tmp_path):
    path = tmp_path / "full.ckpt"
    _save_ldm_style(tiny_vae, path)
    cut = tmp_path / "cut.ckpt"
    data = path.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.ckpt"):
        load_official_vae(cut, TINY)


def test_wrong_config_raises_checkpoint_error_with_shape_mismatch(tiny_vae, tmp_path):
    path = tmp_path / "kl16.ckpt"
    _save_ldm_style(tiny_vae, path)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_official_vae(path, VAEConfig(ch=64, num_res_blocks=1, gn_groups=8))


def test_nan_weights_are_rejected(tiny_vae, tmp_path):
    state = dict(tiny_vae.state_dict())
    state["post_quant_conv.bias"] = state["post_quant_conv.bias"].clone()
    state["post_quant_conv.bias"][0] = float("nan")
    path = tmp_path / "nan.ckpt"
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError, match=r"post_quant_conv\.bias"):
        load_official_vae(path, TINY)


# ---- numerics against independent float64 references ---------------------------------------------------------


def _group_norm64(x: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    b, c, h, w = x.shape
    g = x.reshape(b, groups, -1)
    mean = g.mean(dim=2, keepdim=True)
    var = ((g - mean) ** 2).mean(dim=2, keepdim=True)
    y = ((g - mean) / torch.sqrt(var + eps)).reshape(b, c, h, w)
    return y * weight.double()[None, :, None, None] + bias.double()[None, :, None, None]


def _conv1x1_64(x: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
    w = conv.weight.double()[:, :, 0, 0]  # (C_out, C_in)
    return torch.einsum("oc,bchw->bohw", w, x) + conv.bias.double()[None, :, None, None]


def _conv3x3_64(xp: torch.Tensor, conv: torch.nn.Conv2d, stride: int) -> torch.Tensor:
    """Valid 3x3 convolution of an already padded input, as a sum of nine shifted 1x1 products."""
    w = conv.weight.double()
    ho = (xp.shape[2] - 3) // stride + 1
    wo = (xp.shape[3] - 3) // stride + 1
    out = conv.bias.double()[None, :, None, None].expand(xp.shape[0], -1, ho, wo).clone()
    for di in range(3):
        for dj in range(3):
            patch = xp[:, :, di : di + stride * (ho - 1) + 1 : stride, dj : dj + stride * (wo - 1) + 1 : stride]
            out += torch.einsum("oc,bchw->bohw", w[:, :, di, dj], patch)
    return out


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Seeded non-trivial weights: conv kernels ~ N(0, 1/fan_in), vectors (norm affines, biases) ~ 1 + N(0, 0.3^2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            else:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))


def test_attention_block_matches_float64_softmax_attention():
    cfg = VAEConfig(ch=8, ch_mult=(1,), resolution=8, attn_resolutions=(), gn_groups=4)
    block = AttnBlock(8, cfg).eval()
    _randomise(block, 10)
    x = torch.randn(2, 8, 5, 6, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        got = block(x)
    x64 = x.double()
    h = _group_norm64(x64, 4, block.norm.weight, block.norm.bias, cfg.eps)
    q, k, v = (_conv1x1_64(h, c).reshape(2, 8, 30) for c in (block.q, block.k, block.v))  # (B, C, HW)
    attn = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(8), dim=-1)  # (B, HW_q, HW_k)
    out = (v @ attn.transpose(1, 2)).reshape(2, 8, 5, 6)
    ref = x64 + _conv1x1_64(out, block.proj_out)
    assert torch.allclose(got.double(), ref, atol=1e-5, rtol=1e-5)


def test_resnet_block_with_shortcut_matches_float64_reference():
    cfg = VAEConfig(ch=8, ch_mult=(1,), resolution=8, attn_resolutions=(), gn_groups=4)
    block = ResnetBlock(8, 12, cfg).eval()
    _randomise(block, 12)
    x = torch.randn(2, 8, 6, 5, generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        got = block(x)
    x64 = x.double()

    def swish64(t):
        return t / (1 + torch.exp(-t))

    h = swish64(_group_norm64(x64, 4, block.norm1.weight, block.norm1.bias, cfg.eps))
    h = _conv3x3_64(F.pad(h, (1, 1, 1, 1)), block.conv1, 1)
    h = swish64(_group_norm64(h, 4, block.norm2.weight, block.norm2.bias, cfg.eps))
    h = _conv3x3_64(F.pad(h, (1, 1, 1, 1)), block.conv2, 1)
    ref = _conv1x1_64(x64, block.nin_shortcut) + h
    assert torch.allclose(got.double(), ref, atol=1e-4, rtol=1e-5)


def test_downsample_pads_right_and_bottom_then_strides_by_two():
    down = Downsample(4)
    x = torch.randn(2, 4, 8, 6, generator=torch.Generator().manual_seed(14))
    with torch.no_grad():
        got = down(x)
    xp = torch.zeros(2, 4, 9, 7, dtype=torch.float64)
    xp[:, :, :8, :6] = x.double()  # one zero row at the bottom, one zero column at the right
    ref = _conv3x3_64(xp, down.conv, 2)
    assert got.shape == (2, 4, 4, 3)
    assert torch.allclose(got.double(), ref, atol=1e-5)


def test_upsample_repeats_pixels_then_convolves():
    up = Upsample(4)
    x = torch.randn(1, 4, 3, 5, generator=torch.Generator().manual_seed(15))
    with torch.no_grad():
        got = up(x)
    rep = x.double().repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # (1, 4, 6, 10)
    ref = _conv3x3_64(F.pad(rep, (1, 1, 1, 1)), up.conv, 1)
    assert torch.allclose(got.double(), ref, atol=1e-5)


def test_posterior_clamps_logvar_and_computes_kl_per_sample():
    g = torch.Generator().manual_seed(16)
    mean = torch.randn(3, 2, 2, 2, generator=g)
    logvar = torch.randn(3, 2, 2, 2, generator=g)
    logvar[0, 0, 0, 0] = 50.0
    logvar[1, 1, 1, 1] = -80.0
    post = DiagonalGaussian(torch.cat([mean, logvar], dim=1))
    lv = logvar.double().clamp(-30, 20)
    ref_kl = 0.5 * (mean.double() ** 2 + lv.exp() - 1 - lv).sum(dim=(1, 2, 3))
    assert post.logvar.max() == 20.0 and post.logvar.min() == -30.0
    assert torch.allclose(post.kl().double(), ref_kl, rtol=1e-6)
    assert torch.equal(post.mode(), mean)
    s1 = post.sample(torch.Generator().manual_seed(5))
    s2 = post.sample(torch.Generator().manual_seed(5))
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(5))
    assert torch.equal(s1, s2)
    assert torch.allclose(s1, mean + torch.exp(0.5 * post.logvar) * eps)


# ---- ONNX -----------------------------------------------------------------------------------------------------


class _Decode(torch.nn.Module):
    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_tiny_decoder_exports_to_onnx_and_matches_pytorch(tiny_vae, tmp_path):
    onnx = pytest.importorskip("onnx", reason="onnx not installed")
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed")
    path = tmp_path / "decoder.onnx"
    z_export = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(17))
    torch.onnx.export(
        _Decode(tiny_vae).eval(),
        (z_export,),
        str(path),
        input_names=["latents"],
        output_names=["image"],
        dynamic_axes={"latents": {0: "batch"}, "image": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    onnx.checker.check_model(onnx.load(str(path)))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    z = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(18))  # another batch size than exported
    (got,) = session.run(["image"], {"latents": z.numpy()})
    with torch.no_grad():
        ref = tiny_vae.decode(z).numpy()
    assert got.shape == (2, 3, 256, 256)
    assert abs(got - ref).max() < 1e-4
