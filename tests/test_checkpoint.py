"""Loading official-layout checkpoints: strict names, typed errors, no unsafe unpickling."""

import argparse
import re

import pytest
from conftest import FIXTURES, OFFICIAL_TINY

torch = pytest.importorskip("torch")

from far_sdk.errors import CheckpointError, ConfigError  # noqa: E402
from training import FAR, get_config, load_official_checkpoint, save_official_checkpoint  # noqa: E402
from training.config import config_from_official_args  # noqa: E402


def _tsv_blocks():
    """{block title: {name: shape}} from the official state-dict listing."""
    blocks, cur = {}, None
    for line in (FIXTURES / "spec" / "official-far-state-dict.tsv").read_text().splitlines():
        if line.startswith("## "):
            cur = blocks.setdefault(line[3:].split()[0], {})
        elif line and not line.startswith("#") and cur is not None:
            name, shape, _ = line.split("\t")
            cur[name] = tuple(int(v) for v in re.findall(r"\d+", shape))
    return blocks


@pytest.mark.parametrize(
    "name,count", [("far_base", 207_926_816), ("far_large", 426_359_840), ("far_huge", 811_722_272)]
)
def test_presets_have_official_names_shapes_and_order(name, count):
    expected = _tsv_blocks()[name]
    with torch.device("meta"):
        sd = FAR(get_config(name)).state_dict()
    assert list(sd) == list(expected), "names and their order equal the official state dict"
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    assert sum(v.numel() for v in sd.values()) == count


def test_official_tiny_checkpoint_needs_explicit_config():
    with pytest.raises(ConfigError, match="config="):
        load_official_checkpoint(OFFICIAL_TINY / "checkpoint-last.pth")


def test_official_tiny_checkpoint_loads_ema_strictly():
    ema = load_official_checkpoint(OFFICIAL_TINY / "checkpoint-last.pth", config="far_parity_tiny")
    live = load_official_checkpoint(OFFICIAL_TINY / "checkpoint-last.pth", use_ema=False, config="far_parity_tiny")
    assert not ema.training
    diffs = [k for k, v in ema.state_dict().items() if not torch.equal(v, live.state_dict()[k])]
    assert diffs, "EMA and live weights differ after 150 official training steps"
    assert torch.equal(ema.mask_token, torch.zeros_like(ema.mask_token)), "mask_token untouched without --mask"


def _official_args(**kw):
    base = dict(
        model="far_base",
        img_size=256,
        vae_stride=16,
        patch_size=1,
        vae_embed_dim=16,
        buffer_size=64,
        class_num=1000,
        diffloss_d=6,
        diffloss_w=1024,
        num_sampling_steps="100",
        mask=False,
        diffusion_batch_mul=4,
        label_drop_prob=0.1,
        attn_dropout=0.1,
        proj_dropout=0.1,
        cfg=3.0,
    )
    base.update(kw)
    return argparse.Namespace(**base)


def test_official_args_map_to_presets():
    cfg = config_from_official_args(_official_args(model="far_large", diffloss_d=3))
    assert cfg == get_config("far_large")
    assert config_from_official_args(_official_args()) == get_config("far_base")
    with pytest.raises(ConfigError, match="head count"):
        config_from_official_args(_official_args(model="far_xl"))


@pytest.fixture()
def small_model():
    torch.manual_seed(0)
    return FAR(get_config("far_tiny"))


def test_small_model_round_trips_through_official_layout(tmp_path, small_model):
    ema = {k: v + 0.01 for k, v in small_model.state_dict().items()}
    opt = torch.optim.AdamW(small_model.parameters(), lr=1e-4)
    path = save_official_checkpoint(
        tmp_path / "checkpoint-last.pth", small_model, ema_state=ema, optimizer=opt, epoch=3
    )
    loaded = load_official_checkpoint(path)  # architecture from the saved args
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, ema[k]), k
    live = load_official_checkpoint(path, use_ema=False, config=small_model.config)
    for k, v in live.state_dict().items():
        assert torch.equal(v, small_model.state_dict()[k]), k


def _save_raw(path, state, args=None):
    torch.save({"model": state, "model_ema": state, "epoch": 0, "args": args or _official_args()}, path)


def test_renamed_key_is_named_in_the_error(tmp_path, small_model):
    sd = dict(small_model.state_dict())
    sd["encoder_blocks.0.attn.qkv.kernel"] = sd.pop("encoder_blocks.0.attn.qkv.weight")
    _save_raw(tmp_path / "c.pth", sd)
    with pytest.raises(CheckpointError) as e:
        load_official_checkpoint(tmp_path / "c.pth", config="far_tiny")
    assert "encoder_blocks.0.attn.qkv.weight" in str(e.value) and "encoder_blocks.0.attn.qkv.kernel" in str(e.value)


def test_shape_mismatch_is_named(tmp_path, small_model):
    sd = dict(small_model.state_dict())
    sd["z_proj.weight"] = torch.zeros(64, 8)
    _save_raw(tmp_path / "c.pth", sd)
    with pytest.raises(CheckpointError, match=r"z_proj\.weight"):
        load_official_checkpoint(tmp_path / "c.pth", config="far_tiny")


@pytest.mark.parametrize("cut", [0, 100, 0.5])
def test_truncated_file_gives_typed_error(tmp_path, cut):
    data = (OFFICIAL_TINY / "checkpoint-last.pth").read_bytes()
    n = int(len(data) * cut) if isinstance(cut, float) else cut
    (tmp_path / "c.pth").write_bytes(data[:n])
    with pytest.raises(CheckpointError, match="c.pth"):
        load_official_checkpoint(tmp_path / "c.pth", config="far_parity_tiny")


def test_corrupted_member_is_detected(tmp_path):
    data = bytearray((OFFICIAL_TINY / "checkpoint-last.pth").read_bytes())
    data[len(data) // 2] ^= 0xFF  # flip bits inside a tensor record
    (tmp_path / "c.pth").write_bytes(bytes(data))
    with pytest.raises(CheckpointError):
        load_official_checkpoint(tmp_path / "c.pth", config="far_parity_tiny")


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_arbitrary_pickles_are_refused(tmp_path, small_model):
    torch.save(
        {"model": small_model.state_dict(), "model_ema": small_model.state_dict(), "args": Evil()}, tmp_path / "c.pth"
    )
    with pytest.raises(CheckpointError, match="weights_only"):
        load_official_checkpoint(tmp_path / "c.pth", config="far_tiny")


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_official_checkpoint(tmp_path / "nope.pth", config="far_tiny")
