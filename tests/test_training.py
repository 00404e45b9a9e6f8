"""Training: schedules against their formulas, a short run that learns, checkpoints and exact resume,
two-process DDP on CPU, VAE training, latent caches and the far-train CLI."""

from __future__ import annotations

import argparse
import math
import os
import socket
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from far_sdk.errors import ConfigError, InvalidArgumentError
from training import FAR, load_official_checkpoint, load_official_vae
from training.safe_load import safe_torch_load
from training.config import get_config
from training.data import ImageFolderLatents, LatentDataset, cache_latents, write_latents
from training.train_schedules import loss_weight, lr_at, mask_ratio_bounds, sample_mask
from training.filters import low_pass
from training.train import TrainConfig, train, validation_loss
from training.trainer import param_groups
from training.vae import AutoencoderKL, VAEConfig
from training.vae_train import train_vae

ROOT = Path(__file__).resolve().parents[1]
MODEL = replace(get_config("far_tiny"), num_classes=4)
# A VAE small enough to train for a few steps on CPU: 16 px images -> 4 x 8 x 8 latents.
MICRO_VAE = VAEConfig(embed_dim=4, z_channels=4, ch=8, ch_mult=(1, 2), num_res_blocks=1, resolution=16,
                      attn_resolutions=(), gn_groups=4)


def _smooth(g: torch.Generator, shape: tuple[int, ...], coarse: int, size: int = 16) -> torch.Tensor:
    """A smooth random field: N(0, 1) on a coarse grid, bicubic-upsampled to size x size."""
    return F.interpolate(torch.randn(*shape, coarse, coarse, generator=g), size=(size, size), mode="bicubic",
                         align_corners=False)


def _class_latents(per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """4 classes; each sample = its class's fixed smooth template + smaller smooth noise (templates fixed by seed 0)."""
    templates = _smooth(torch.Generator().manual_seed(0), (4, 16), 4)                    # (4, 16, 16, 16)
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(4).repeat_interleave(per_class)
    latents = templates[labels] + 0.3 * _smooth(g, (len(labels), 16), 8)
    return latents.float(), labels


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: one intra-op thread is as fast, and immune to spin-waits on a busy shared CPU."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def dataset():
    lat, lab = _class_latents(64, seed=1)
    return torch.utils.data.TensorDataset(lat, lab)


def _read(path: Path) -> dict:
    return safe_torch_load(path, allowed_globals=[argparse.Namespace])


def _cfg(**kw) -> TrainConfig:
    base = dict(model=MODEL, batch_size=8, lr=1e-3, warmup_steps=2, diffusion_batch_mul=1, seed=3,
                progress=False, log_every=1)
    return TrainConfig(**{**base, **kw})


# ---- (a) schedules ------------------------------------------------------------------------------------


@pytest.mark.parametrize("level, num_levels", [(0, 16), (1, 16), (7, 16), (15, 16), (0, 8), (3, 8), (7, 8)])
def test_mask_ratio_bound_falls_linearly_from_0_7_to_0(level, num_levels):
    expected = 0.7 - 0.7 * level / (num_levels - 1)
    assert mask_ratio_bounds(level, num_levels) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("level", [0, 1, 8, 15])
def test_loss_weight_is_paper_formula(level):
    assert loss_weight(level) == pytest.approx(1 + math.sin(math.pi / 2 * level / 16), abs=1e-12)
    assert loss_weight(8) == pytest.approx(1 + math.sqrt(0.5), abs=1e-12)


def test_lr_warms_up_linearly_then_holds_or_follows_half_cosine():
    base, warm, total = 8e-4, 10, 110
    assert lr_at(0, total, warm, base) == 0.0
    assert lr_at(5, total, warm, base) == pytest.approx(4e-4)
    assert lr_at(10, total, warm, base) == pytest.approx(base)
    assert lr_at(100, total, warm, base) == pytest.approx(base)
    # cosine: midpoint of the decay is (base + min) / 2, the end is min_lr
    assert lr_at(5, total, warm, base, "cosine", 1e-5) == pytest.approx(4e-4)
    assert lr_at(60, total, warm, base, "cosine", 1e-5) == pytest.approx((8e-4 + 1e-5) / 2)
    assert lr_at(35, total, warm, base, "cosine") == pytest.approx(8e-4 * (1 + math.cos(math.pi / 4)) / 2)
    assert lr_at(110, total, warm, base, "cosine", 1e-5) == pytest.approx(1e-5)
    with pytest.raises(InvalidArgumentError, match="cosine"):
        lr_at(0, total, warm, base, "linear")


def test_sample_mask_masks_exactly_ceil_of_ratio_per_row_in_random_order():
    g = torch.Generator().manual_seed(0)
    m = sample_mask(6, 256, 3, g, ratio=0.3)
    assert m.dtype == torch.float32 and m.shape == (6, 256)
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    assert m.sum(1).tolist() == [math.ceil(256 * 0.3)] * 6
    assert len({tuple(r.nonzero().flatten().tolist()) for r in m}) == 6   # one permutation per row


@pytest.mark.parametrize("level", [0, 5, 10, 15])
def test_sample_mask_draws_ratio_within_level_bounds(level):
    g = torch.Generator().manual_seed(level)
    lo = math.ceil(256 * 0.7 * (15 - level) / 15)
    for _ in range(20):
        counts = sample_mask(4, 256, level, g).sum(1)
        assert (counts == counts[0]).all()             # equal per row: the encoder drops masked tokens
        assert lo <= counts[0] <= 256


def test_schedules_reject_levels_out_of_range():
    for bad in (-1, 16, 2.0, True):
        with pytest.raises(InvalidArgumentError):
            mask_ratio_bounds(bad)
    with pytest.raises(InvalidArgumentError):
        loss_weight(16)


# ---- pieces of one step -----------------------------------------------------------------------------


def test_low_pass_equals_area_then_bicubic_interpolate():
    x = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for k in (1, 5, 10, 15):
        ref = F.interpolate(F.interpolate(x, size=(k, k), mode="area"), size=(16, 16), mode="bicubic", align_corners=False)
        torch.testing.assert_close(low_pass(x, k), ref, rtol=0, atol=1e-12)
    assert low_pass(x, 0).abs().max() == 0


def test_param_groups_follow_the_official_decay_rule():
    model = FAR(MODEL)
    no_decay, decay = param_groups(model, 0.02)
    names = {id(p): n for n, p in model.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    d = {names[id(p)] for p in decay["params"]}
    assert (no_decay["weight_decay"], decay["weight_decay"]) == (0.0, 0.02)
    assert nd | d == set(names.values()) and not nd & d
    assert {"fake_latent", "mask_token", "class_emb.weight", "encoder_pos_embed_learned", "z_proj.weight"} <= d
    assert not any("diffloss" in n for n in d)
    assert {"z_proj.bias", "z_proj_ln.weight", "diffloss.net.input_proj.weight"} <= nd


def test_use_mask_requires_a_model_built_for_masking():
    with pytest.raises(ConfigError, match="mask=True"):
        _cfg(steps=1, use_mask=True)
    with pytest.raises(ConfigError, match="exactly one"):
        TrainConfig(model=MODEL)


# ---- (b) a short run, checkpoint, resume --------------------------------------------------------------


def _mean_validation_loss(model, latents, labels) -> float:
    """Fixed held-out batch, fixed t / noise per level (same generator seeds every call), averaged over levels."""
    return float(np.mean([validation_loss(model, latents, labels, lvl, torch.Generator().manual_seed(lvl))
                          for lvl in (0, 4, 8, 12, 15)]))


def test_forty_steps_lower_the_held_out_loss_and_write_a_loadable_checkpoint(dataset, tmp_path):
    val_x, val_y = _class_latents(2, seed=99)
    torch.manual_seed(3)                      # the trainer initialises right after manual_seed(seed)
    before = _mean_validation_loss(FAR(MODEL), val_x, val_y)
    result = train(_cfg(steps=40, out_dir=str(tmp_path)), dataset)
    after = _mean_validation_loss(result.model, val_x, val_y)
    assert result.step == 40 and len(result.history) == 40
    assert after < 0.8 * before, (before, after)
    # the loaded checkpoint needs no config: args carries far_sdk_config
    path = tmp_path / "checkpoint-last.pth"
    assert result.checkpoint == path
    live = load_official_checkpoint(path, use_ema=False)
    ema = load_official_checkpoint(path)
    assert live.config == replace(MODEL, diffusion_batch_mul=1)
    for name, p in result.model.named_parameters():
        torch.testing.assert_close(live.state_dict()[name], p.detach(), rtol=0, atol=0)
        torch.testing.assert_close(ema.state_dict()[name], result.ema[name], rtol=0, atol=0)


def test_resume_continues_at_the_saved_step_like_an_uninterrupted_run(dataset, tmp_path):
    ref = train(_cfg(steps=3), dataset)
    first = train(_cfg(steps=2, out_dir=str(tmp_path / "a")), dataset)
    ckpt = _read(first.checkpoint)
    assert ckpt["args"].far_sdk_step == 2 and set(ckpt["model_ema"]) == set(ckpt["model"])
    assert all(s["step"] == 2 for s in ckpt["optimizer"]["state"].values() if "step" in s)
    resumed = train(_cfg(steps=3, resume=str(tmp_path / "a"), out_dir=str(tmp_path / "b")), dataset)
    assert resumed.step == 3 and [h[0] for h in resumed.history] == [3]
    assert resumed.history[0][1] == pytest.approx(ref.history[2][1], rel=1e-5)
    for name, p in ref.model.named_parameters():
        torch.testing.assert_close(dict(resumed.model.named_parameters())[name], p, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(resumed.ema[name], ref.ema[name], rtol=1e-5, atol=1e-7)
    a, b = ref.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert a.keys() == b.keys()
    for k in a:
        for key in ("exp_avg", "exp_avg_sq"):
            if key in a[k]:
                torch.testing.assert_close(b[k][key], a[k][key], rtol=1e-5, atol=1e-9)


def test_resume_refuses_another_architecture(dataset, tmp_path):
    train(_cfg(steps=1, out_dir=str(tmp_path)), dataset)
    other = replace(MODEL, encoder_num_heads=2)
    with pytest.raises(ConfigError, match="encoder_num_heads"):
        train(_cfg(model=other, steps=2, resume=str(tmp_path)), dataset)


# ---- (c) DDP -------------------------------------------------------------------------------------------

_DDP_SCRIPT = """
import os, sys, torch
from dataclasses import replace
sys.path.insert(0, {root!r})
from training.config import get_config
from training.train import TrainConfig, train
g = torch.Generator().manual_seed(0)
x, y = torch.randn(32, 16, 16, 16, generator=g), torch.arange(32) % 4
cfg = TrainConfig(model=replace(get_config("far_tiny"), num_classes=4), batch_size=4, steps=3, lr=1e-3,
                  diffusion_batch_mul=1, out_dir=sys.argv[1], progress=False, log_every=1)
r = train(cfg, torch.utils.data.TensorDataset(x, y))
torch.save({{"model": r.model.state_dict(), "ema": r.ema, "wrote": r.checkpoint is not None}},
           os.path.join(sys.argv[2], "rank%s.pt" % os.environ["RANK"]))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_ddp_on_cpu_keeps_ranks_identical_and_rank0_writes(tmp_path):
    script, out, dumps = tmp_path / "run.py", tmp_path / "out", tmp_path / "dumps"
    dumps.mkdir()
    script.write_text(textwrap.dedent(_DDP_SCRIPT.format(root=str(ROOT))))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(script), str(out), str(dumps)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(dumps / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert (r0["wrote"], r1["wrote"]) == (True, False)
    for k in r0["model"]:
        torch.testing.assert_close(r0["model"][k], r1["model"][k], rtol=0, atol=1e-6)
    for k in r0["ema"]:
        torch.testing.assert_close(r0["ema"][k], r1["ema"][k], rtol=0, atol=1e-6)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-last.pth"]
    ckpt = _read(out / "checkpoint-last.pth")
    assert not any(k.startswith("module.") for k in list(ckpt["model"]) + list(ckpt["model_ema"]))
    assert ckpt["args"].far_sdk_step == 3 and ckpt["args"].world_size == 2
    loaded = load_official_checkpoint(out / "checkpoint-last.pth", use_ema=False)
    for k, v in loaded.state_dict().items():
        torch.testing.assert_close(v, r0["model"][k], rtol=0, atol=0)
    # the ranks really trained (parameters moved away from the shared initialisation)
    torch.manual_seed(0)
    init = FAR(replace(MODEL, diffusion_batch_mul=1)).state_dict()
    assert (r0["model"]["z_proj.weight"] - init["z_proj.weight"]).abs().max() > 1e-5


# ---- (d) VAE, latent caches, CLI --------------------------------------------------------------------


def _images(n: int, seed: int) -> torch.Tensor:
    x = _smooth(torch.Generator().manual_seed(seed), (n, 3), 4)
    return (x / x.abs().max()).clamp(-1, 1)                                   # (n, 3, 16, 16) in [-1, 1]


def _reconstruction(vae: AutoencoderKL, x: torch.Tensor) -> float:
    with torch.no_grad():
        rec = vae.decode(vae.encode(x).mode())
    return float((x - rec).abs().mean() + (x - rec).pow(2).mean())


def test_train_vae_lowers_reconstruction_and_saves_a_loadable_file(tmp_path):
    imgs = _images(16, seed=5)
    torch.manual_seed(7)
    before = _reconstruction(AutoencoderKL(MICRO_VAE).eval(), imgs)
    scale = train_vae(MICRO_VAE, imgs, steps=40, lr=3e-3, batch_size=8, out=tmp_path / "vae.pth", seed=7, progress=False)
    vae = load_official_vae(tmp_path / "vae.pth", MICRO_VAE)
    after = _reconstruction(vae, imgs)
    assert after < 0.7 * before, (before, after)
    with torch.no_grad():
        z = vae.encode(imgs).sample(torch.Generator().manual_seed(7))
    assert scale == pytest.approx(1.0 / float(z.double().std()), rel=1e-5)


def _image_folder(root: Path, per_class: int = 3) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_cache_latents_writes_a_file_latent_dataset_reads(tmp_path, suffix):
    torch.manual_seed(0)
    vae = AutoencoderKL(MICRO_VAE).eval()
    root = _image_folder(tmp_path / "imgs")
    out = cache_latents(root, vae, tmp_path / f"lat{suffix}", scale=0.5, batch=4, progress=False)
    ds = LatentDataset(out)
    assert len(ds) == 6 and ds.latent_shape == (4, 8, 8) and ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    x, y = ds[4]
    assert x.dtype == torch.float32 and y.item() == 1
    # the cached sample = posterior mean * scale up to the posterior noise (std * scale)
    from PIL import Image

    from training.data import center_crop
    img = center_crop(Image.open(root / "dog" / "1.png").convert("RGB"), 16)
    t = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    with torch.no_grad():
        post = vae.encode(t)
    assert ((x - post.mean[0] * 0.5).abs() <= 6 * post.std[0] * 0.5 + 1e-6).all()
    on_the_fly = ImageFolderLatents(root, vae, scale=0.5, flip=False)
    assert on_the_fly.num_classes == 2 and on_the_fly[0][0].shape == (4, 8, 8)


def test_latent_dataset_rejects_malformed_files(tmp_path):
    np.savez(tmp_path / "bad.npz", latents=np.zeros((2, 16, 16), np.float32), labels=np.zeros(2, np.int64))
    with pytest.raises(InvalidArgumentError, match="float32"):
        LatentDataset(tmp_path / "bad.npz")
    np.savez(tmp_path / "nolabels.npz", latents=np.zeros((2, 4, 8, 8), np.float32))
    with pytest.raises(InvalidArgumentError, match="labels"):
        LatentDataset(tmp_path / "nolabels.npz")
    with pytest.raises(InvalidArgumentError, match="does not exist"):
        LatentDataset(tmp_path / "missing.npz")
    (tmp_path / "trunc.safetensors").write_bytes(b"\x10\x00\x00")
    with pytest.raises(InvalidArgumentError, match="unreadable"):
        LatentDataset(tmp_path / "trunc.safetensors")


def test_cli_trains_from_a_latents_file_and_reports_typed_errors(tmp_path, capsys):
    from training.cli import main

    lat, lab = _class_latents(4, seed=2)
    data = write_latents(tmp_path / "lat.npz", lat.numpy(), lab.numpy())
    rc = main(["-q", "train", "--data", str(data), "--model", "far_tiny", "--batch-size", "8", "--steps", "2",
               "--lr", "1e-3", "--diffusion-batch-mul", "1", "--out", str(tmp_path / "run"), "--no-progress"])
    assert rc == 0 and "checkpoint" in capsys.readouterr().out
    assert load_official_checkpoint(tmp_path / "run" / "checkpoint-last.pth").config.num_classes == 10
    rc = main(["-q", "train", "--data", str(tmp_path / "none.npz"), "--model", "far_tiny", "--steps", "1",
               "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert rc == 3 and err.count("\n") == 1 and "does not exist" in err  # a bad input file: EXIT_INPUT
    rc = main(["-q", "train", "--data", str(data), "--model", "far_tiny", "--num-classes", "2", "--steps", "1",
               "--batch-size", "8", "--out", str(tmp_path / "y")])
    assert rc == 2 and "classes" in capsys.readouterr().err


def test_masked_training_on_images_encoded_on_the_fly_trains_mask_token(tmp_path):
    torch.manual_seed(0)
    vae = AutoencoderKL(MICRO_VAE).eval()
    data = ImageFolderLatents(_image_folder(tmp_path / "imgs"), vae, scale=0.5)
    model = replace(MODEL, token_channels=4, grid_size=8, num_classes=2, mask=True)    # 4 x 8 x 8 latents
    # 4 steps: with the zero-initialised diffusion MLP the transformer gets no gradient in the first two
    result = train(_cfg(model=model, batch_size=3, steps=4, warmup_steps=0, use_mask=True), data)
    torch.manual_seed(3)
    init = FAR(model).mask_token
    assert result.step == 4 and (result.model.mask_token - init).abs().max() > 1e-4


def test_high_t_fraction_draws_the_noisiest_timesteps():
    from training.diffloss import DiffLoss

    dl = DiffLoss(4, 8, 1, 16)
    seen = []
    orig = dl.loss_terms
    dl.loss_terms = lambda x0, t, noise, c, level: seen.append(t) or orig(x0, t, noise, c, level)
    x, z = torch.randn(8000, 4), torch.randn(8000, 8)
    dl(x, z, generator=torch.Generator().manual_seed(0))
    uniform = torch.randint(0, 1000, (8000,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(seen[0], uniform), "fraction 0 keeps the official draws"
    dl.high_t_fraction = 0.5
    dl(x, z, generator=torch.Generator().manual_seed(0))
    share = float((seen[1] >= 950).float().mean())
    assert abs(share - (0.5 + 0.5 * 0.05)) < 0.02  # half the rows from [950, 1000), the rest uniform
