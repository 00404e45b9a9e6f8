"""FAR-T2I: official names and sizes (the spec's TSV), the transformer against a float64 re-implementation,
official-layout checkpoints, and the reference T2I sampler against a hand-written official loop."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from far_sdk.errors import ConfigError, InvalidArgumentError
from far_sdk.maths.noise import ReplayNoise
from training import load_official_checkpoint
from training.config_t2i import T2I_CONFIGS, T2IConfig, t2i_config_from_checkpoint
from training.far_t2i import FART2I
from training.sampler_t2i import sample_reference_t2i, t2i_plan

TSV = Path("/work/shared/spec/official-far-state-dict.tsv")
if not TSV.is_file():
    TSV = Path(__file__).resolve().parents[2] / "shared" / "spec" / "official-far-state-dict.tsv"
TINY = T2IConfig(
    encoder_embed_dim=32,
    encoder_depth=1,
    encoder_num_heads=2,
    decoder_embed_dim=32,
    decoder_depth=2,
    decoder_num_heads=2,
    attention_head_dim=16,
    token_channels=4,
    grid_size=16,
    context_dim=12,
    context_len=5,
    diffloss_d=1,
    diffloss_w=32,
)


def _tsv_section(name: str) -> list[tuple[str, list[int]]]:
    rows, take = [], False
    for line in TSV.read_text().splitlines():
        if line.startswith("## "):
            if take:
                break
            take = line.startswith(f"## {name} ")
        elif take and line.strip():
            key, shape, _ = line.split("\t")
            rows.append((key, [int(v) for v in shape.strip("[]").split(",")]))
    return rows


def _randomised(cfg: T2IConfig, seed: int) -> FART2I:
    """A model whose every parameter is random (the official init zeroes the MLP's output layers)."""
    torch.manual_seed(seed)
    m = FART2I(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


@pytest.mark.skipif(not TSV.is_file(), reason="the spec's state-dict TSV is not in this checkout's shared/")
def test_official_size_has_the_tsv_names_shapes_order_and_561_302_560_parameters():
    rows = _tsv_section("far_t2i")
    with torch.device("meta"):
        model = FART2I(T2I_CONFIGS["far_t2i"])
    got = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    assert len(rows) == 695 and got == rows
    assert sum(p.numel() for p in model.parameters()) == 561_302_560 == sum(math.prod(s) for _, s in rows)
    # every shape is in the weights: the official heads (width 64) come back from the state dict alone
    assert t2i_config_from_checkpoint(model.state_dict()) == T2I_CONFIGS["far_t2i"]


# ---- the transformer against float64 maths ---------------------------------------------------------------


def _ln(x, w=None, b=None, eps=1e-6):
    y = (x - x.mean(-1, keepdim=True)) / torch.sqrt(((x - x.mean(-1, keepdim=True)) ** 2).mean(-1, keepdim=True) + eps)
    return y if w is None else y * w + b


def _attn(sd, p, x, kv, heads):
    lin = lambda n, t: t @ sd[f"{p}{n}.weight"].T + sd[f"{p}{n}.bias"]  # noqa: E731
    q, k, v = lin("to_q", x), lin("to_k", kv), lin("to_v", kv)
    B, N, inner = q.shape
    hd = inner // heads
    split = lambda t: t.reshape(B, t.shape[1], heads, hd).permute(0, 2, 1, 3)  # noqa: E731
    s = split(q) @ split(k).transpose(-1, -2) / math.sqrt(hd)
    o = (torch.softmax(s, -1) @ split(v)).permute(0, 2, 1, 3).reshape(B, N, inner)
    return lin("to_out.0", o)


def _block(sd, p, x, ctx, heads):
    x = x + _attn(sd, p + "attn1.", _ln(x, eps=1e-5), _ln(x, eps=1e-5), heads)
    x = x + _attn(sd, p + "attn2.", _ln(x, eps=1e-5), ctx, heads)
    h = _ln(x, eps=1e-5) @ sd[p + "ff.net.0.proj.weight"].T + sd[p + "ff.net.0.proj.bias"]
    h = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
    return x + h @ sd[p + "ff.net.2.weight"].T + sd[p + "ff.net.2.bias"]


def _reference_condition(sd, cfg, tokens, ctx, mask):
    """z of the official FAR_T2I encoder/decoder, float64, from the state dict alone."""
    x = tokens @ sd["z_proj.weight"].T + sd["z_proj.bias"] + sd["encoder_pos_embed_learned"]
    x = _ln(x, sd["z_proj_ln.weight"], sd["z_proj_ln.bias"])
    keep = mask == 0
    x = torch.stack([x[b][keep[b]] for b in range(x.shape[0])])
    for i in range(cfg.encoder_depth):
        x = _block(sd, f"encoder_blocks.{i}.", x, ctx, cfg.encoder_num_heads)
    x = (
        _ln(x, sd["encoder_norm.weight"], sd["encoder_norm.bias"]) @ sd["decoder_embed.weight"].T
        + sd["decoder_embed.bias"]
    )
    full = sd["mask_token"].repeat(x.shape[0], mask.shape[1], 1)
    for b in range(x.shape[0]):
        full[b, keep[b]] = x[b]
    x = full + sd["decoder_pos_embed_learned"]
    for i in range(cfg.decoder_depth):
        x = _block(sd, f"decoder_blocks.{i}.", x, ctx, cfg.decoder_num_heads)
    return _ln(x, sd["decoder_norm.weight"], sd["decoder_norm.bias"]) + sd["diffusion_pos_embed_learned"]


@pytest.mark.parametrize("kept", [0, 7, 256])
def test_transformer_equals_float64_official_blocks_with_dropped_tokens(kept):
    model = _randomised(TINY, 0).double().requires_grad_(False)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    tokens = torch.randn(2, 256, 4, generator=g, dtype=torch.float64)
    text = torch.randn(2, 5, 12, generator=g, dtype=torch.float64)
    mask = torch.ones(2, 256, dtype=torch.float64)
    for b in range(2):
        mask[b, torch.randperm(256, generator=g)[:kept]] = 0
    ctx = model.context_embedding(text)
    torch.testing.assert_close(ctx, text @ sd["context_embed.weight"].T + sd["context_embed.bias"], rtol=0, atol=1e-12)
    z = model.condition(tokens, ctx, mask)
    ref = _reference_condition(sd, TINY, tokens, ctx, mask)
    assert z.shape == (2, 256, 32) and float(ref.abs().mean()) > 0.1
    torch.testing.assert_close(z, ref, rtol=1e-10, atol=1e-10)


# ---- checkpoints -------------------------------------------------------------------------------------------


def test_small_official_layout_t2i_checkpoint_loads_strictly_with_no_config(tmp_path):
    """Saved the official way: misc.save_model's dict with an argparse.Namespace of main_far_t2i.py flags."""
    cfg = T2IConfig(
        encoder_embed_dim=64,
        encoder_depth=2,
        encoder_num_heads=2,
        decoder_embed_dim=64,
        decoder_depth=1,
        decoder_num_heads=1,
        token_channels=16,
        context_dim=24,
        context_len=7,
        diffloss_d=2,
        diffloss_w=48,
    )
    torch.manual_seed(3)
    model = FART2I(cfg)
    ema = {k: v + 0.01 * torch.randn_like(v) for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    model(torch.randn(1, 256, 16), torch.randn(1, 7, 24), torch.randn(1, 256, 16), torch.tensor([3])).backward()
    opt.step()
    args = argparse.Namespace(
        model="far_t2i",
        img_size=256,
        vae_stride=16,
        patch_size=1,
        vae_embed_dim=16,
        buffer_size=0,
        diffloss_d=2,
        diffloss_w=48,
        num_sampling_steps="100",
        diffusion_batch_mul=1,
        mask_ratio_min=0.7,
        label_drop_prob=0.1,
        cfg=1.0,
        ema_rate=0.999,
        grad_clip=1.0,
    )
    path = tmp_path / "checkpoint-last.pth"
    torch.save(
        {
            "model": model.state_dict(),
            "model_ema": ema,
            "optimizer": opt.state_dict(),
            "epoch": 4,
            "scaler": {},
            "args": args,
        },
        path,
    )
    loaded = load_official_checkpoint(path)  # no config: read from the weights
    assert isinstance(loaded, FART2I) and loaded.config == cfg and not loaded.training
    for k, v in loaded.state_dict().items():
        torch.testing.assert_close(v, ema[k], rtol=0, atol=0)
    live = load_official_checkpoint(path, use_ema=False)
    torch.testing.assert_close(live.fake_latent, model.fake_latent.detach(), rtol=0, atol=0)
    with pytest.raises(ConfigError, match="FAR-T2I"):
        load_official_checkpoint(path, config="far_tiny")


# ---- the reference sampler against the official loop, written out ------------------------------------------


def _ddpm_tables(n: int) -> dict[str, np.ndarray]:
    """Respaced cosine-schedule coefficients (spec §6), float64, from the formulas."""
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    betas = np.array([min(1 - f((i + 1) / 1000) / f(i / 1000), 0.999) for i in range(1000)])
    abar_full = np.cumprod(1 - betas)
    tmap = [round(k * 999 / (n - 1)) for k in range(n)]
    b = 1 - abar_full[tmap] / np.concatenate([[1.0], abar_full[tmap][:-1]])
    abar = np.cumprod(1 - b)
    prev = np.concatenate([[1.0], abar[:-1]])
    pv = b * (1 - prev) / (1 - abar)
    return dict(
        t=np.array(tmap),
        sr=np.sqrt(1 / abar),
        srm1=np.sqrt(1 / abar - 1),
        c1=b * np.sqrt(prev) / (1 - abar),
        c2=(1 - prev) * np.sqrt(1 - b) / (1 - abar),
        minlog=np.log(np.append(pv[1], pv[1:])),
        maxlog=np.log(b),
    )


@torch.no_grad()
def _official_sample_tokens(model, text, draws, orders, cfg, n):
    """FAR_T2I.sample_tokens as published, with its two crashes fixed (no stray device argument, float level)."""
    levels = [0, 2, 3, 4, 5, 6, 7, 8, 10, 13]
    B, L, C = text.shape[0], 256, 4
    tab = {k: torch.tensor(v, dtype=torch.float32) for k, v in _ddpm_tables(n).items()}
    mask, tokens = torch.ones(B, L), torch.zeros(B, L, C)
    ctx = torch.cat([model.context_embed(text), model.fake_latent.repeat(B, 1, 1)])
    it = iter(draws)
    for step in range(10):
        cur = tokens.clone()
        z = model.condition(torch.cat([tokens, tokens]), ctx, torch.cat([mask, mask])).reshape(2 * B * L, -1)
        mask_len = math.floor(L * np.cos(math.pi / 2 * (step + 1) / 10))
        temp = 0.8 + (1 - np.cos(math.pi / 2 * (step + 1) / 10)) * (1 - 0.8)
        lvl = torch.full((2 * B * L, 1), float(levels[step]))
        x = torch.from_numpy(next(it)).reshape(B * L, C)
        x = torch.cat([x, x])
        for k in reversed(range(n)):
            half = x[: B * L]
            out = model.diffloss.net(torch.cat([half, half]), torch.full((2 * B * L,), int(tab["t"][k])), z, lvl)
            e_c, e_u = out[:, :C].chunk(2)
            eps = torch.cat([e_u + cfg * (e_c - e_u)] * 2)
            x0 = tab["sr"][k] * x - tab["srm1"][k] * eps
            mean = tab["c1"][k] * x0 + tab["c2"][k] * x
            frac = (out[:, C:] + 1) / 2
            logvar = frac * tab["maxlog"][k] + (1 - frac) * tab["minlog"][k]
            nz = torch.from_numpy(next(it)).reshape(B * L, C)
            x = mean + float(k != 0) * torch.exp(0.5 * logvar) * torch.cat([nz, nz]) * temp
        zz = x[: B * L]
        if step < 9:
            img = zz.reshape(B, L, C).transpose(1, 2).reshape(B, C, 16, 16)
            img = F.interpolate(
                F.interpolate(img, size=(levels[step + 1],) * 2, mode="area"), size=(16, 16), mode="bicubic"
            )
            zz = img.reshape(B, C, L).transpose(1, 2)
        sampled = zz.reshape(B, L, C)
        mask = torch.zeros(B, L).scatter(1, orders[:, :mask_len], 1.0)
        pred = ~mask.bool()
        cur[pred] = sampled[pred]
        tokens = cur
    return tokens.transpose(1, 2).reshape(B, C, 16, 16)


def test_t2i_plan_is_the_official_schedule():
    plan = t2i_plan(cfg=4.0)
    assert plan.mode == "mask" and plan.levels == (0, 2, 3, 4, 5, 6, 7, 8, 10, 13)
    assert plan.cfg == (4.0,) * 10 and plan.inner_steps == (100,) * 10
    assert plan.filter_after == (2, 3, 4, 5, 6, 7, 8, 10, 13, None)
    np.testing.assert_allclose(plan.temperature[:3], [0.80246233, 0.80978870, 0.82179870], rtol=1e-7)
    with pytest.raises(InvalidArgumentError):
        t2i_plan(mode="nomask")


def test_reference_t2i_sampler_equals_the_official_loop_on_replayed_noise():
    model = _randomised(TINY, 5)
    with torch.no_grad():  # keep x's scale moderate: shrink the variance head's input
        model.diffloss.net.final_layer.linear.weight.mul_(0.05)
    B, n = 2, 4
    rng = np.random.default_rng(0)
    draws = [rng.standard_normal((B, 256, 4)).astype(np.float32) for _ in range(10 * (n + 1))]
    orders = np.stack([rng.permutation(256) for _ in range(B)])
    text = torch.from_numpy(rng.standard_normal((B, 5, 12)).astype(np.float32))
    ours = sample_reference_t2i(model, text, noise=ReplayNoise(draws, orders), inner_steps=n, cfg=2.5)
    ref = _official_sample_tokens(model, text, draws, torch.from_numpy(orders), 2.5, n)
    assert ours.shape == (B, 4, 16, 16) and float(ref.abs().mean()) > 0.05
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_sampler_refuses_a_context_of_the_wrong_shape():
    with pytest.raises(InvalidArgumentError, match=r"\[B, 5, 12\]"):
        sample_reference_t2i(FART2I(TINY), torch.zeros(1, 6, 12), inner_steps=1)
