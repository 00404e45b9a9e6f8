"""Training: schedules against their formulas, a short run that learns, checkpoints and exact resume,
two-process DDP on CPU, VAE training, latent caches and the far-train CLI."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import textwrap
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from training_helpers import MODEL, ROOT, class_latents, read_checkpoint, train_config

from far_sdk.errors import ConfigError, InvalidArgumentError
from training import FAR, load_official_checkpoint
from training.filters import low_pass
from training.train import TrainConfig, train, validation_loss
from training.train_schedules import loss_weight, lr_at, mask_ratio_bounds, sample_mask
from training.trainer import param_groups

# ---- (a) schedules ------------------------------------------------------------------------------------


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: one intra-op thread is as fast, and immune to spin-waits on a busy shared CPU."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def dataset():
    lat, lab = class_latents(64, seed=1)
    return torch.utils.data.TensorDataset(lat, lab)


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
    assert len({tuple(r.nonzero().flatten().tolist()) for r in m}) == 6  # one permutation per row


@pytest.mark.parametrize("level", [0, 5, 10, 15])
def test_sample_mask_draws_ratio_within_level_bounds(level):
    g = torch.Generator().manual_seed(level)
    lo = math.ceil(256 * 0.7 * (15 - level) / 15)
    for _ in range(20):
        counts = sample_mask(4, 256, level, g).sum(1)
        assert (counts == counts[0]).all()  # equal per row: the encoder drops masked tokens
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
        ref = F.interpolate(
            F.interpolate(x, size=(k, k), mode="area"), size=(16, 16), mode="bicubic", align_corners=False
        )
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
        train_config(steps=1, use_mask=True)
    with pytest.raises(ConfigError, match="exactly one"):
        TrainConfig(model=MODEL)


# ---- (b) a short run, checkpoint, resume --------------------------------------------------------------


def _mean_validation_loss(model, latents, labels) -> float:
    """Fixed held-out batch, fixed t / noise per level (same generator seeds every call), averaged over levels."""
    return float(
        np.mean(
            [
                validation_loss(model, latents, labels, lvl, torch.Generator().manual_seed(lvl))
                for lvl in (0, 4, 8, 12, 15)
            ]
        )
    )


def test_forty_steps_lower_the_held_out_loss_and_write_a_loadable_checkpoint(dataset, tmp_path):
    val_x, val_y = class_latents(2, seed=99)
    torch.manual_seed(3)  # the trainer initialises right after manual_seed(seed)
    before = _mean_validation_loss(FAR(MODEL), val_x, val_y)
    result = train(train_config(steps=40, out_dir=str(tmp_path)), dataset)
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
    ref = train(train_config(steps=3), dataset)
    first = train(train_config(steps=2, out_dir=str(tmp_path / "a")), dataset)
    ckpt = read_checkpoint(first.checkpoint)
    assert ckpt["args"].far_sdk_step == 2 and set(ckpt["model_ema"]) == set(ckpt["model"])
    assert all(s["step"] == 2 for s in ckpt["optimizer"]["state"].values() if "step" in s)
    resumed = train(train_config(steps=3, resume=str(tmp_path / "a"), out_dir=str(tmp_path / "b")), dataset)
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
    train(train_config(steps=1, out_dir=str(tmp_path)), dataset)
    other = replace(MODEL, encoder_num_heads=2)
    with pytest.raises(ConfigError, match="encoder_num_heads"):
        train(train_config(model=other, steps=2, resume=str(tmp_path)), dataset)


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
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        str(script),
        str(out),
        str(dumps),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(dumps / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert (r0["wrote"], r1["wrote"]) == (True, False)
    for k in r0["model"]:
        torch.testing.assert_close(r0["model"][k], r1["model"][k], rtol=0, atol=1e-6)
    for k in r0["ema"]:
        torch.testing.assert_close(r0["ema"][k], r1["ema"][k], rtol=0, atol=1e-6)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-last.pth"]
    ckpt = read_checkpoint(out / "checkpoint-last.pth")
    assert not any(k.startswith("module.") for k in list(ckpt["model"]) + list(ckpt["model_ema"]))
    assert ckpt["args"].far_sdk_step == 3 and ckpt["args"].world_size == 2
    loaded = load_official_checkpoint(out / "checkpoint-last.pth", use_ema=False)
    for k, v in loaded.state_dict().items():
        torch.testing.assert_close(v, r0["model"][k], rtol=0, atol=0)
    # the ranks really trained (parameters moved away from the shared initialisation)
    torch.manual_seed(0)
    init = FAR(replace(MODEL, diffusion_batch_mul=1)).state_dict()
    assert (r0["model"]["z_proj.weight"] - init["z_proj.weight"]).abs().max() > 1e-5
