"""Text encoders: the official Qwen2-VL prompt path on a tiny random Qwen2-VL built by transformers (no download)
against the official steps written out independently, missing-file errors, and the small demo encoder."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may reach the hub
transformers = pytest.importorskip("transformers", reason="text encoders need transformers (pip install far-sdk[t2i])")
pytest.importorskip("tokenizers")

from far_sdk.errors import CheckpointError, InvalidArgumentError  # noqa: E402
from training.text_encoder import (  # noqa: E402
    QWEN2VL_SYSTEM_PROMPT,
    Qwen2VLPromptEncoder,
    SmallTextEncoder,
    check_model_dir,
    train_bpe_tokenizer,
)

CORPUS = [
    "a photo of a dog",
    "a cat sleeping on a sunny windowsill",
    "an astronaut riding a horse",
    "a bird made of crystal",
    QWEN2VL_SYSTEM_PROMPT,
]


@pytest.fixture(scope="module")
def qwen2vl_dir(tmp_path_factory):
    """A tiny random Qwen2-VL (language model 2 x 32, a 1-block vision tower) and a byte-level BPE tokenizer,
    saved the way the hub's Qwen2-VL directory is (config.json, model.safetensors, tokenizer.json)."""
    tok = train_bpe_tokenizer(CORPUS, vocab_size=400)
    cfg = transformers.Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
            bos_token_id=None,
            eos_token_id=tok.pad_token_id,
            pad_token_id=tok.pad_token_id,
        ),
        vision_config=dict(
            depth=1,
            embed_dim=16,
            hidden_size=32,
            num_heads=2,
            mlp_ratio=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        bos_token_id=None,
        eos_token_id=tok.pad_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("qwen2vl")
    transformers.Qwen2VLForConditionalGeneration(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_system_prompt_is_the_official_text():
    """main_far_t2i.py's llm_system_prompt at 9b49a51 (726 characters, hashed from the official file)."""
    text = QWEN2VL_SYSTEM_PROMPT
    assert len(text) == 726 and text.endswith("User Prompt:\n") and text.count("\n") == 9
    assert (
        hashlib.sha256(text.encode()).hexdigest() == "0383c612a9c86a037cd9b1059062717e834b7f079b04ab3c9a236452dd83243d"
    )


@torch.no_grad()
def _official_steps(model, tok, prompt: str) -> torch.Tensor:
    """models/tools.encode_prompts for one prompt, by hand: ids padded right to 300 / cut at 300, the system ids
    (cut at 300) in front with mask 1, prompt mask = id != pad, last hidden state minus the system rows."""
    sys_ids = tok.encode(QWEN2VL_SYSTEM_PROMPT)[:300]
    ids = tok.encode(prompt)[:300]
    ids = ids + [tok.pad_token_id] * (300 - len(ids))
    mask = [1] * len(sys_ids) + [int(i != tok.pad_token_id) for i in ids]
    out = model(input_ids=torch.tensor([sys_ids + ids]), attention_mask=torch.tensor([mask]))
    return out.last_hidden_state[0, len(sys_ids) :]


def test_qwen2vl_prompt_path_matches_the_official_steps(qwen2vl_dir):
    enc = Qwen2VLPromptEncoder.from_pretrained(qwen2vl_dir)
    assert (enc.context_len, enc.hidden_size) == (300, 32)
    tok = enc.tokenizer
    short, long_ = "a photo of a dog", "a cat sleeping on a sunny windowsill " * 60
    n_sys, n_short, n_long = (len(tok.encode(s)) for s in (QWEN2VL_SYSTEM_PROMPT, short, long_))
    assert 0 < n_sys < 300 and 0 < n_short < 300 < n_long  # the padding and the truncation rule both act
    out = enc.encode([short, long_])
    assert out.shape == (2, 300, 32) and out.dtype == torch.float32
    for row, prompt in enumerate((short, long_)):
        torch.testing.assert_close(out[row], _official_steps(enc.model, tok, prompt), rtol=1e-5, atol=1e-5)
    # the system positions were in the input and are dropped: without them the prompt rows change
    bare = Qwen2VLPromptEncoder(enc.model, tok, system_prompt=None).encode([short])
    assert bare.shape == (1, 300, 32) and float((bare[0] - out[0]).abs().max()) > 1e-3


def test_missing_files_are_named(tmp_path, qwen2vl_dir):
    with pytest.raises(CheckpointError, match="does not exist"):
        Qwen2VLPromptEncoder.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match=r"config\.json.*weights.*tokenizer"):
        check_model_dir(tmp_path)
    (tmp_path / "config.json").write_text((qwen2vl_dir / "config.json").read_text())
    (tmp_path / "tokenizer.json").write_text((qwen2vl_dir / "tokenizer.json").read_text())
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {"a": "model-00001-of-00002.safetensors"}}')
    with pytest.raises(CheckpointError, match=r"weight shard model-00001-of-00002\.safetensors"):
        Qwen2VLPromptEncoder.from_pretrained(tmp_path)


def test_small_encoder_pads_truncates_and_round_trips(tmp_path):
    caps = ["a handwritten seven", "the digit 7", "number seven, thick strokes", "a handwritten three"]
    enc = SmallTextEncoder.build(caps, context_len=6, hidden_size=16, layers=1, heads=2, vocab_size=300, seed=1)
    tok = enc.tokenizer
    unseen = "please draw a 9 in blue ink"  # byte-level: unseen words still encode, no unk
    assert tok.decode(tok.encode(unseen)) == unseen and len(tok.encode(unseen)) > 6
    out = enc.encode(["the digit 7", unseen])
    assert out.shape == (2, 6, 16)
    # the official path without a system prompt, by hand: pad right to 6 / cut at 6, padding masked
    for row, prompt in enumerate(["the digit 7", unseen]):
        ids = tok.encode(prompt)[:6]
        ids = ids + [tok.pad_token_id] * (6 - len(ids))
        mask = torch.tensor([[int(i != tok.pad_token_id) for i in ids]])
        with torch.no_grad():
            ref = enc.model(input_ids=torch.tensor([ids]), attention_mask=mask).last_hidden_state[0]
        torch.testing.assert_close(out[row], ref, rtol=1e-5, atol=1e-5)
    enc.save_pretrained(tmp_path / "enc")
    again = SmallTextEncoder.from_pretrained(tmp_path / "enc")
    torch.testing.assert_close(again.encode(["the digit 7", unseen]), out, rtol=0, atol=0)
    with pytest.raises(InvalidArgumentError):
        enc.encode([])
