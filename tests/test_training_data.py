"""Training data and tools: VAE training, latent caches, on-the-fly encoding and the far-train CLI."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from training_helpers import MICRO_VAE, MODEL, class_latents, smooth_field, train_config

from far_sdk.errors import InvalidArgumentError
from training import FAR, load_official_checkpoint, load_official_vae
from training.data import ImageFolderLatents, LatentDataset, cache_latents, write_latents
from training.train import train
from training.vae import AutoencoderKL
from training.vae_train import train_vae

# ---- (d) VAE, latent caches, CLI --------------------------------------------------------------------


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


def _images(n: int, seed: int) -> torch.Tensor:
    x = smooth_field(torch.Generator().manual_seed(seed), (n, 3), 4)
    return (x / x.abs().max()).clamp(-1, 1)  # (n, 3, 16, 16) in [-1, 1]


def _reconstruction(vae: AutoencoderKL, x: torch.Tensor) -> float:
    with torch.no_grad():
        rec = vae.decode(vae.encode(x).mode())
    return float((x - rec).abs().mean() + (x - rec).pow(2).mean())


def test_train_vae_lowers_reconstruction_and_saves_a_loadable_file(tmp_path):
    imgs = _images(16, seed=5)
    torch.manual_seed(7)
    before = _reconstruction(AutoencoderKL(MICRO_VAE).eval(), imgs)
    scale = train_vae(
        MICRO_VAE, imgs, steps=40, lr=3e-3, batch_size=8, out=tmp_path / "vae.pth", seed=7, progress=False
    )
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

    lat, lab = class_latents(4, seed=2)
    data = write_latents(tmp_path / "lat.npz", lat.numpy(), lab.numpy())
    rc = main(
        [
            "-q",
            "train",
            "--data",
            str(data),
            "--model",
            "far_tiny",
            "--batch-size",
            "8",
            "--steps",
            "2",
            "--lr",
            "1e-3",
            "--diffusion-batch-mul",
            "1",
            "--out",
            str(tmp_path / "run"),
            "--no-progress",
        ]
    )
    assert rc == 0 and "checkpoint" in capsys.readouterr().out
    assert load_official_checkpoint(tmp_path / "run" / "checkpoint-last.pth").config.num_classes == 10
    rc = main(
        [
            "-q",
            "train",
            "--data",
            str(tmp_path / "none.npz"),
            "--model",
            "far_tiny",
            "--steps",
            "1",
            "--out",
            str(tmp_path / "x"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 3 and err.count("\n") == 1 and "does not exist" in err  # a bad input file: EXIT_INPUT
    rc = main(
        [
            "-q",
            "train",
            "--data",
            str(data),
            "--model",
            "far_tiny",
            "--num-classes",
            "2",
            "--steps",
            "1",
            "--batch-size",
            "8",
            "--out",
            str(tmp_path / "y"),
        ]
    )
    assert rc == 2 and "classes" in capsys.readouterr().err


def test_masked_training_on_images_encoded_on_the_fly_trains_mask_token(tmp_path):
    torch.manual_seed(0)
    vae = AutoencoderKL(MICRO_VAE).eval()
    data = ImageFolderLatents(_image_folder(tmp_path / "imgs"), vae, scale=0.5)
    model = replace(MODEL, token_channels=4, grid_size=8, num_classes=2, mask=True)  # 4 x 8 x 8 latents
    # 4 steps: with the zero-initialised diffusion MLP the transformer gets no gradient in the first two
    result = train(train_config(model=model, batch_size=3, steps=4, warmup_steps=0, use_mask=True), data)
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
