"""Training FAR-T2I: the masking rule and per-sample levels against their formulas, a short CPU run that learns,
exact resume, two-process DDP on CPU (gloo, torchrun) and the far-train CLI on a text-latents file."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from far_sdk.errors import DataError, InvalidArgumentError
from training import load_official_checkpoint
from training.far_t2i import FART2I
from training.filters import low_pass_per_sample
from training.train import TrainConfig, train
from training.train_schedules import sample_t2i_mask
from training.train_t2i import TextLatentDataset, write_text_latents

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_t2i_mask_share_is_the_truncated_normal_on_0_7_to_1():
    g = torch.Generator().manual_seed(0)
    ratios = []
    for _ in range(3000):
        mask, r = sample_t2i_mask(2, 64, g)
        assert mask.sum(1).tolist() == [math.ceil(64 * r)] * 2  # ceil(L m) per row
        ratios.append(r)
    r = np.array(ratios)
    assert 0.7 <= r.min() and r.max() <= 1.0 and r.min() < 0.71 and r.max() > 0.99
    # truncated normal(1, 0.25) on [0.7, 1]: mean = 1 + 0.25 (phi(a) - phi(0)) / (Phi(0) - Phi(a)), a = -1.2
    phi = lambda x: math.exp(-x * x / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    mean = 1 + 0.25 * (phi(-1.2) - phi(0.0)) / (0.5 - 0.5 * math.erfc(1.2 / math.sqrt(2)))
    assert abs(mean - 0.867018) < 1e-5 and abs(r.mean() - mean) < 0.006  # ~5 standard errors
    Phi = lambda x: 0.5 * math.erfc(-x / math.sqrt(2))  # noqa: E731
    p_low = (Phi(-0.8) - Phi(-1.2)) / (Phi(0.0) - Phi(-1.2))  # P(m < 0.8) = 0.2514
    assert abs(np.mean(r < 0.8) - p_low) < 0.03


def test_levels_are_per_sample_area_then_bicubic():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 4, 16, 16, generator=g, dtype=torch.float64)
    levels = torch.tensor([0, 3, 15, 3, 8])
    out = low_pass_per_sample(x, levels)
    for b, lv in enumerate(levels.tolist()):
        ref = (
            torch.zeros_like(x[b : b + 1])
            if lv == 0
            else F.interpolate(
                F.interpolate(x[b : b + 1], size=(lv, lv), mode="area"),
                size=(16, 16),
                mode="bicubic",
                align_corners=False,
            )
        )
        torch.testing.assert_close(out[b : b + 1], ref, rtol=1e-9, atol=1e-9)


def _data(tmp_path: Path, n: int = 32) -> Path:
    """4 'digits': a smooth latent template each (+ noise), captioned by one of two text embeddings per digit."""
    g = torch.Generator().manual_seed(0)
    templates = F.interpolate(torch.randn(4, 16, 4, 4, generator=g), size=(16, 16), mode="bicubic")
    labels = torch.arange(n) % 4
    latents = (templates[labels] + 0.2 * torch.randn(n, 16, 16, 16, generator=g)).numpy()
    contexts = torch.randn(8, 8, 32, generator=g).numpy()  # caption c belongs to digit c // 2
    index = (2 * labels + torch.arange(n) // 4 % 2).numpy()
    return write_text_latents(tmp_path / "text_latents.npz", latents, contexts, index)


def _cfg(tmp_path: Path, **kw) -> TrainConfig:
    base = dict(
        model="far_t2i_tiny",
        batch_size=8,
        lr=2e-3,
        warmup_steps=2,
        grad_clip=1.0,
        ema_rate=0.9,
        seed=3,
        progress=False,
        log_every=1,
    )
    return TrainConfig(**{**base, **kw})


@torch.no_grad()
def _loss(model: FART2I, ds: TextLatentDataset) -> float:
    """Deterministic loss over the data set: fixed levels, mask, t and noise; eval mode; no context drop."""
    was = model.training
    model.eval()
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    ctx = torch.stack([ds[i][1] for i in range(len(ds))])
    g = torch.Generator().manual_seed(7)
    levels = torch.randint(0, 16, (len(ds),), generator=g)
    mask, _ = sample_t2i_mask(len(ds), 256, g)
    torch.manual_seed(7)
    tok = lambda t: t.flatten(2).transpose(1, 2)  # noqa: E731
    loss = float(model(tok(low_pass_per_sample(x, levels)), ctx, tok(x), levels, mask=mask))
    model.train(was)
    return loss


def test_t2i_training_lowers_the_loss_and_resumes_like_an_uninterrupted_run(tmp_path):
    ds = TextLatentDataset(_data(tmp_path))
    torch.manual_seed(3)
    before = _loss(FART2I(_cfg(tmp_path, steps=1).model_config()), ds)
    run = train(_cfg(tmp_path, steps=20, out_dir=str(tmp_path / "a")), ds)
    after = _loss(run.model, ds)
    assert all(math.isfinite(loss) for _, loss, _ in run.history) and after < 0.8 * before, (before, after)
    loaded = load_official_checkpoint(tmp_path / "a" / "checkpoint-last.pth", use_ema=False)
    assert isinstance(loaded, FART2I)
    for k, v in loaded.state_dict().items():
        torch.testing.assert_close(v, run.model.state_dict()[k], rtol=0, atol=0)
    # 2 steps, stop, resume to 4 == 4 steps straight (model, EMA and optimiser restored; per-step seeds)
    straight = train(_cfg(tmp_path, steps=4, out_dir=str(tmp_path / "s")), ds)
    train(_cfg(tmp_path, steps=2, out_dir=str(tmp_path / "r")), ds)
    resumed = train(_cfg(tmp_path, steps=4, out_dir=str(tmp_path / "r"), resume=str(tmp_path / "r")), ds)
    assert resumed.step == 4
    for k, v in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[k], v, rtol=0, atol=0)
    for k, v in straight.ema.items():
        torch.testing.assert_close(resumed.ema[k], v, rtol=0, atol=0)


def test_t2i_data_of_the_wrong_shape_is_refused(tmp_path):
    bad = write_text_latents(
        tmp_path / "bad.npz",
        np.zeros((8, 16, 16, 16), np.float32),
        np.ones((2, 8, 31), np.float32),
        np.zeros(8, np.int64),
    )
    with pytest.raises(InvalidArgumentError, match=r"\[B, 8, 32\]"):
        train(_cfg(tmp_path, steps=1), TextLatentDataset(bad))
    with pytest.raises(DataError, match="context_index"):
        write_text_latents(tmp_path / "x.npz", np.zeros((2, 16, 16, 16)), np.ones((1, 8, 32)), np.array([0, 1]))


def test_cli_trains_t2i_from_a_text_latents_file(tmp_path, capsys):
    from training.cli import main

    data = _data(tmp_path, n=16)
    rc = main(
        [
            "-q",
            "train",
            "--data",
            str(data),
            "--model",
            "far_t2i_tiny",
            "--steps",
            "2",
            "--batch-size",
            "8",
            "--out",
            str(tmp_path / "cli"),
            "--no-progress",
        ]
    )
    assert rc == 0 and "trained 2 steps" in capsys.readouterr().out
    m = load_official_checkpoint(tmp_path / "cli" / "checkpoint-last.pth")
    assert isinstance(m, FART2I) and m.config.context_len == 8
    rc = main(
        [
            "-q",
            "train",
            "--data",
            str(data),
            "--model",
            "far_t2i_tiny",
            "--steps",
            "1",
            "--mask",
            "--out",
            str(tmp_path / "cli2"),
            "--no-progress",
        ]
    )
    assert rc != 0 and "FAR-T2I" in capsys.readouterr().err


_DDP_SCRIPT = """
import os, sys, torch
sys.path.insert(0, {root!r})
from training.train import TrainConfig, train
from training.train_t2i import TextLatentDataset
cfg = TrainConfig(model="far_t2i_tiny", batch_size=4, steps=3, lr=1e-3, grad_clip=1.0, out_dir=sys.argv[1],
                  progress=False, log_every=1)
r = train(cfg, TextLatentDataset(sys.argv[3]))
torch.save({{"model": r.model.state_dict(), "ema": r.ema, "wrote": r.checkpoint is not None}},
           os.path.join(sys.argv[2], "rank%s.pt" % os.environ["RANK"]))
"""


@pytest.mark.slow
def test_two_process_ddp_t2i_on_cpu_keeps_ranks_identical_and_rank0_writes(tmp_path):
    script, out, dumps = tmp_path / "run.py", tmp_path / "out", tmp_path / "dumps"
    dumps.mkdir()
    script.write_text(textwrap.dedent(_DDP_SCRIPT.format(root=str(ROOT))))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
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
        str(port),
        str(script),
        str(out),
        str(dumps),
        str(_data(tmp_path)),
    ]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(dumps / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert (r0["wrote"], r1["wrote"]) == (True, False)
    for k in r0["model"]:
        torch.testing.assert_close(r0["model"][k], r1["model"][k], rtol=0, atol=1e-6)
        torch.testing.assert_close(r0["ema"][k], r1["ema"][k], rtol=0, atol=1e-6)
    loaded = load_official_checkpoint(out / "checkpoint-last.pth", use_ema=False)
    assert isinstance(loaded, FART2I)
    for k, v in loaded.state_dict().items():
        torch.testing.assert_close(v, r0["model"][k], rtol=0, atol=0)
    torch.manual_seed(0)
    init = FART2I(loaded.config).state_dict()
    assert (r0["model"]["context_embed.weight"] - init["context_embed.weight"]).abs().max() > 1e-5
