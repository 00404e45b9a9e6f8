"""A tiny random Qwen2-VL laid out like the hub's Qwen2-VL-2B-Instruct directory (no download): config.json +
model.safetensors from transformers' ``save_pretrained``, and a ``tokenizer.json`` built here with Qwen2's own
pipeline (NFC, its pre-tokenizer regex, byte-level BPE) and Qwen2-VL's special tokens, with a
``tokenizer_config.json`` naming ``Qwen2Tokenizer`` and carrying Qwen2-VL-Instruct's chat template as data.

transformers' ``AutoTokenizer`` rebuilds ``Qwen2Tokenizer`` from the vocabulary and merges with its own pipeline,
so its token ids are an independent reference for far_sdk's (``tokenizers`` reading tokenizer.json alone)."""

from __future__ import annotations

import json
from pathlib import Path

#: Qwen2's pre-tokenizer regex (transformers.models.qwen2.tokenization_qwen2.PRETOKENIZE_REGEX).
PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
#: Qwen2-VL's added tokens, in id order after the BPE vocabulary (151643.. in the real one).
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
#: Qwen2-VL-2B-Instruct's chat template (chat_template.json), as data.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)
CORPUS = (
    "a photo of a dog",
    "a cat sleeping on a sunny windowsill",
    "an astronaut riding a horse on the moon",
    "a bird made of crystal, highly detailed",
    "café crème brûlée on a wooden table",
    "一只在窗台上睡觉的猫",
    "a red fox 🦊 in the snow ❄️",
)


def build_qwen2_tokenizer(texts, vocab_size: int = 600):
    """A byte-level BPE with Qwen2's pipeline, trained on ``texts``; Qwen2-VL's special tokens added after it."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(list(texts), trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def save_tiny_qwen2vl(path: Path, *, corpus=CORPUS, extra_texts=(), seed: int = 0, hidden_size: int = 32) -> Path:
    """Write the tiny Qwen2-VL directory at ``path``: language model 2 x ``hidden_size``, a 1-block vision tower."""
    import torch
    import transformers

    tok = build_qwen2_tokenizer([*corpus, *extra_texts])
    vocab = tok.get_vocab()
    pad, eos = vocab["<|endoftext|>"], vocab["<|im_end|>"]
    cfg = transformers.Qwen2VLConfig(
        text_config=dict(
            vocab_size=tok.get_vocab_size(),
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
            bos_token_id=pad,
            eos_token_id=eos,
            pad_token_id=pad,
        ),
        vision_config=dict(
            depth=1,
            embed_dim=16,
            hidden_size=hidden_size,
            num_heads=2,
            mlp_ratio=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        bos_token_id=pad,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    torch.manual_seed(seed)
    path.mkdir(parents=True, exist_ok=True)
    transformers.Qwen2VLForConditionalGeneration(cfg).save_pretrained(path)
    tok.save(str(path / "tokenizer.json"))
    specials = {
        str(vocab[t]): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in SPECIAL_TOKENS
    }
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": specials,
        "additional_special_tokens": list(SPECIAL_TOKENS[1:]),
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "padding_side": "right",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    (path / "vocab.json").write_text(json.dumps({k: v for k, v in vocab.items() if k not in SPECIAL_TOKENS}))
    merges = json.loads(tok.to_str())["model"]["merges"]
    lines = [" ".join(m) if isinstance(m, list) else m for m in merges]
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines) + "\n")
    return path
