"""Exact parameter counts of the released sizes, and the analytic FLOP counts of far_sdk/flops.py
checked against torch's FlopCounterMode on the real modules.

FlopCounterMode counts 2 FLOPs per multiply-add for mm/addmm/bmm/convolution (biases ignored) and
the two attention products for sdpa — the convention of far_sdk/flops.py — so the counts must
agree exactly. Its one gap: on CPU, ``F.scaled_dot_product_attention`` dispatches to
``aten._scaled_dot_product_flash_attention_for_cpu``, for which torch has no formula (it would
count attention as 0); we map that op to torch's own ``sdpa_flop_count``. On the meta device
sdpa decomposes into two bmm calls, which are counted natively.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from conftest import plan_of
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from far_sdk.bench.flops import (
    denoiser_step_flops,
    generation_flops,
    transformer_flops,
    vae_decoder_flops,
)
from training.config import FAR_CONFIGS
from training.config_vae import VAE_CONFIGS
from training.far import FAR
from training.sampler import sample_reference
from training.vae import AutoencoderKL

ROOT = Path(__file__).resolve().parent.parent
aten = torch.ops.aten


def _cpu_sdpa(q, k, v, *args, out_shape=None, **kwargs):
    return sdpa_flop_count(q, k, v)


def counted(fn, *args, **kwargs) -> int:
    """Total FlopCounterMode FLOPs of fn(*args, **kwargs)."""
    with (
        torch.no_grad(),
        FlopCounterMode(
            display=False, custom_mapping={aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa}
        ) as fc,
    ):
        fn(*args, **kwargs)
    return fc.get_total_flops()


def _load_script():
    spec = importlib.util.spec_from_file_location("model_stats", ROOT / "scripts" / "model_stats.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---- parameter counts (meta device) -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,total,mlp",
    [
        ("far_base", 207_926_816, 35_751_968),
        ("far_large", 426_359_840, 20_263_968),
        ("far_huge", 811_722_272, 20_526_112),
    ],
)
def test_far_parameter_counts_are_exact(name, total, mlp):
    with torch.device("meta"):
        model = FAR(FAR_CONFIGS[name])
    got_total = sum(p.numel() for p in model.parameters())
    got_mlp = sum(p.numel() for p in model.diffloss.parameters())
    assert got_total == total
    assert got_mlp == mlp
    assert sum(p.numel() for n, p in model.named_parameters() if not n.startswith("diffloss.")) == total - mlp


def test_kl16_parameter_counts_are_exact():
    with torch.device("meta"):
        vae = AutoencoderKL(VAE_CONFIGS["kl16"])
    assert sum(p.numel() for p in vae.parameters()) == 66_456_019
    dec = sum(p.numel() for n, p in vae.named_parameters() if n.startswith(("decoder.", "post_quant_conv.")))
    assert dec == 38_189_203


def test_model_stats_script_reports_the_exact_counts(capsys):
    mod = _load_script()
    assert mod.main(["--markdown"]) == 0
    out = capsys.readouterr().out
    for n in (
        "207,926,816",
        "426,359,840",
        "811,722,272",
        "35,751,968",
        "20,263,968",
        "20,526,112",
        "66,456,019",
        "38,189,203",
    ):
        assert n in out
    assert "| FAR-L | frequency-aware" in out


# ---- FLOPs vs FlopCounterMode -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_far() -> FAR:
    torch.manual_seed(0)
    return FAR(FAR_CONFIGS["far_tiny"]).eval()


def _transformer_call(model: FAR, rows: int):
    cfg = model.config
    p = next(model.parameters())
    tokens = torch.randn(rows, cfg.seq_len, cfg.token_channels, device=p.device)
    emb = torch.randn(rows, cfg.encoder_embed_dim, device=p.device)
    level = torch.full((1, 1), 3.0, device=p.device)

    def run():
        z = model.condition(tokens, emb)  # (rows, L, D)
        return model.diffloss.net.condition(z.reshape(-1, z.shape[-1]), level)  # cond_embed + index_cond_embed once

    return run


@pytest.mark.parametrize("batch", [1, 2])
def test_transformer_flops_match_flop_counter(tiny_far, batch):
    rows = 2 * batch
    assert counted(_transformer_call(tiny_far, rows)) == transformer_flops(tiny_far.config, rows)
    z_only = counted(lambda: tiny_far.condition(torch.zeros(rows, 256, 16), torch.zeros(rows, 64)))
    assert z_only == transformer_flops(tiny_far.config, rows, include_condition=False)


@pytest.mark.parametrize("batch", [1, 2])
def test_denoiser_step_flops_match_flop_counter(tiny_far, batch):
    cfg, net = tiny_far.config, tiny_far.diffloss.net
    n = 2 * batch * cfg.seq_len
    x = torch.randn(n, cfg.token_channels)
    c = torch.randn(n, cfg.decoder_embed_dim)
    cond = net.condition(c, torch.full((n, 1), 2.0))
    # Runtime: condition precomputed, timestep embedded on one row.
    got = counted(net.forward_with_condition, x, torch.tensor([500]), cond)
    assert got == denoiser_step_flops(cfg, batch)
    # Official (eager) CFG call: everything on every row.
    got = counted(net.forward_with_cfg, x, torch.full((n,), 500), c, torch.full((n, 1), 2.0), 3.0)
    assert got == denoiser_step_flops(cfg, batch, include_condition=True, time_embed_per_row=True)
    # Unguided: half the rows.
    got = counted(net.forward_with_condition, x[: n // 2], torch.tensor([500]), cond[: n // 2])
    assert got == denoiser_step_flops(cfg, batch, cfg_guidance=False)


def test_vae_decoder_flops_match_flop_counter():
    torch.manual_seed(0)
    vae = AutoencoderKL(VAE_CONFIGS["kl16-tiny"]).eval()
    z = torch.randn(2, 16, 8, 8)
    assert counted(vae.decode, z) == vae_decoder_flops(VAE_CONFIGS["kl16-tiny"], 2, latent_size=8)


def test_full_size_flops_match_flop_counter_on_meta():
    """far_large and kl16 at full size, shapes only (meta tensors: no memory, no arithmetic)."""
    with torch.device("meta"):
        model = FAR(FAR_CONFIGS["far_large"]).eval()
        vae = AutoencoderKL(VAE_CONFIGS["kl16"]).eval()
        z = torch.empty(1, 16, 16, 16)
        x = torch.empty(512, 16)
        c = torch.empty(512, 1024)
        lvl = torch.empty(512, 1)
        t = torch.zeros(512, dtype=torch.long)
    cfg = model.config
    assert counted(_transformer_call(model, 2)) == transformer_flops(cfg, 2)
    assert counted(model.diffloss.net.forward_with_cfg, x, t, c, lvl, 3.0) == denoiser_step_flops(
        cfg, 1, include_condition=True, time_embed_per_row=True
    )
    assert counted(vae.decode, z) == vae_decoder_flops(VAE_CONFIGS["kl16"], 1)


def test_generation_flops_equal_a_counted_reference_sample(tiny_far):
    """The whole eager reference sampler + decode, counted, equals generation_flops(eager=True)."""
    torch.manual_seed(0)
    vae_cfg = VAE_CONFIGS["kl16-tiny"]
    vae = AutoencoderKL(vae_cfg).eval()
    plan = plan_of(num_steps=2, inner_steps=[3, 4])
    batch = 2

    def run():
        lat = sample_reference(tiny_far, [1, 7], plan=plan, seed=0)
        vae.decode(lat / 0.2325)

    got = counted(run)
    f = generation_flops(tiny_far.config, vae_cfg, plan, batch=batch, eager=True)
    assert got == f["total"] * batch
    assert f["total"] == f["transformer"] + f["diffusion_mlp"] + f["vae_decode"]


def test_generation_flops_composition():
    cfg, vae_cfg = FAR_CONFIGS["far_large"], VAE_CONFIGS["kl16"]
    f = generation_flops(cfg, vae_cfg, (10, "official"))
    assert f["transformer"] == 10 * transformer_flops(cfg, 2)
    assert f["diffusion_mlp"] == 1000 * denoiser_step_flops(cfg, 1)
    assert f["vae_decode"] == vae_decoder_flops(vae_cfg, 1)
    fa = generation_flops(cfg, vae_cfg, plan_of(num_steps=10, inner_steps="frequency-aware"))
    assert fa["diffusion_mlp"] == 700 * denoiser_step_flops(cfg, 1)  # 40, 47, ..., 100 sum to 700
    assert fa["transformer"] == f["transformer"]
    # Per image at batch 4: the batch's FLOPs / 4. Everything scales with the batch except the one-row
    # index_cond_embed (transformer) and timestep embedding (denoiser).
    f4 = generation_flops(cfg, vae_cfg, (10, "official"), batch=4)
    assert f4["transformer"] == 10 * transformer_flops(cfg, 8) / 4
    assert f4["diffusion_mlp"] == 1000 * denoiser_step_flops(cfg, 4) / 4
    assert f4["vae_decode"] == f["vae_decode"]
    assert abs(f4["total"] / f["total"] - 1) < 1e-3
    assert generation_flops(cfg, None, (10, 100))["vae_decode"] == 0
