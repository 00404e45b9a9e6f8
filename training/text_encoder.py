"""Text encoders for FAR-T2I: prompts -> text hidden states [B, T, H] float32 (the model's ``context``).

Two encoders share one prompt path (:func:`encode_prompts`, the official ``models/tools.encode_prompts``):

- :class:`Qwen2VLPromptEncoder`: the official encoder, Qwen2-VL-1.5B-Instruct through transformers
  (``AutoModel``), loaded from a local directory the user names. Each prompt is tokenised on its own,
  padded to exactly 300 tokens and truncated there; the fixed "prompt-enhancer" system prompt of
  ``main_far_t2i.py`` (:data:`QWEN2VL_SYSTEM_PROMPT`) is tokenised (truncated at 300, not padded) and
  prepended to every row with an all-ones attention mask, the prompt tokens get the mask ``id != pad``;
  the last entry of ``hidden_states`` is taken and the system positions dropped -> [B, 300, 1536].
- :class:`SmallTextEncoder`: for demos, a transformers ``Qwen2Model`` (the official encoder's language
  architecture) from a small config, with a byte-level BPE tokenizer trained in code with ``tokenizers``;
  the same path without a system prompt.

Nothing is downloaded: every load is ``local_files_only`` and a directory missing a file raises
:class:`far_sdk.errors.CheckpointError` naming it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from far_sdk.errors import CheckpointError, ConfigError, InvalidArgumentError

#: The official system prompt (``llm_system_prompt`` in main_far_t2i.py at 9b49a51, 726 characters, its
#: source indentation included: it is part of what the encoder saw in training).
QWEN2VL_SYSTEM_PROMPT = (
    'Given a user prompt, generate an "Enhanced prompt" that provides detailed visual descriptions suitable for '
    "image generation.\n\n    Examples:\n    - User Prompt: A cat sleeping -> A small, fluffy white cat curled up in a "
    "round shape, sleeping peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.\n     - "
    "User Prompt: A busy city street -> A bustling city street scene at dusk, featuring glowing street lamps, a "
    "diverse "
    "crowd of people in colorful clothing, and a double-decker bus passing by towering glass skyscrapers.\n\n    "
    "Please "
    "generate only the enhanced description for the prompt below and DO NOT include any additional sentences. Start "
    'your response with "Enhanced Prompt:".\n\n    User Prompt:\n'
)
#: Tokens per prompt of the official encoder (``text_tokenizer_max_length``).
OFFICIAL_MAX_LENGTH = 300
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def _transformers():
    try:
        import transformers  # noqa: PLC0415 - text-encoder dependency: loaded when used
    except ImportError as e:
        raise ConfigError(
            "text encoders need transformers and tokenizers: pip install 'far-sdk[t2i]' "
            "(or pip install transformers tokenizers)"
        ) from e
    return transformers


def check_model_dir(path: str | os.PathLike, *, what: str = "text encoder") -> Path:
    """Check that ``path`` holds a transformers model and its tokenizer; CheckpointError naming what is missing."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(
            f"{what} directory {p} does not exist: download the model (e.g. Qwen2-VL-1.5B-Instruct) "
            "once and pass its local directory; far-sdk never downloads at run time"
        )
    missing = []
    if not (p / "config.json").is_file():
        missing.append("config.json (the model config)")
    weights = [f for f in _WEIGHT_FILES if (p / f).is_file()]
    if not weights:
        missing.append(f"the weights (one of {', '.join(_WEIGHT_FILES)})")
    elif weights[0].endswith(".index.json"):
        try:
            shards = sorted(set(json.loads((p / weights[0]).read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise CheckpointError(f"{what} directory {p}: {weights[0]} is not a valid shard index ({e})") from None
        missing += [f"weight shard {s} (listed in {weights[0]})" for s in shards if not (p / s).is_file()]
    if not ((p / "tokenizer.json").is_file() or ((p / "vocab.json").is_file() and (p / "merges.txt").is_file())):
        missing.append("the tokenizer (tokenizer.json, or vocab.json + merges.txt)")
    if missing:
        raise CheckpointError(
            f"{what} directory {p} is missing {'; '.join(missing)}. Copy the complete model "
            "directory (as saved by transformers' save_pretrained / the model hub) there."
        )
    return p


def _check_prompts(prompts: Sequence[str]) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts or not all(isinstance(s, str) for s in prompts):
        raise InvalidArgumentError(f"prompts must be a non-empty list of strings, got {prompts!r}")
    return prompts


def _token_ids(tokenizer: Any, text: str, max_length: int, padding: str) -> torch.Tensor:
    return tokenizer(text, return_tensors="pt", padding=padding, max_length=max_length, truncation=True).input_ids[0]


def prompt_inputs(
    tokenizer: Any, prompts: Sequence[str], max_length: int, system_prompt: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The official prompt path's model inputs: (ids [B, S + max_length] int64, mask [B, S + max_length] bool, S).

    ids_b = tokenizer(prompt_b) padded to / truncated at max_length (the tokenizer's padding and truncation sides);
    mask_b = ids_b != pad id. With a system prompt: its ids (truncated at max_length, unpadded), S of them, lead
    every row with mask 1; without one S = 0.
    """
    prompts = _check_prompts(prompts)
    if tokenizer.pad_token_id is None:
        raise ConfigError("the text tokenizer has no pad token; the prompt path pads every prompt to max_length")
    ids = torch.stack([_token_ids(tokenizer, s, max_length, "max_length") for s in prompts])  # (B, T)
    mask = ids != tokenizer.pad_token_id
    if system_prompt is None:
        return ids, mask, 0
    sys_ids = _token_ids(tokenizer, system_prompt, max_length, "longest")[None]  # (1, S)
    n_sys = sys_ids.shape[1]
    ids = torch.cat([sys_ids.expand(ids.shape[0], -1), ids], dim=1)  # (B, S + T)
    mask = torch.cat([torch.ones(ids.shape[0], n_sys, dtype=torch.bool), mask], dim=1)
    return ids, mask, n_sys


@torch.no_grad()
def encode_prompts(
    model: Any, tokenizer: Any, prompts: Sequence[str], max_length: int, system_prompt: str | None = None
) -> torch.Tensor:
    """The official prompt path -> float32 [B, max_length, hidden] (spec §11; ``models/tools.encode_prompts``).

    The model reads :func:`prompt_inputs` (the system ids, then each prompt's ids padded to max_length); the last
    hidden state is taken and its first S (system) positions dropped.
    """
    ids, mask, n_sys = prompt_inputs(tokenizer, prompts, max_length, system_prompt)
    device = next(model.parameters()).device
    out = model(ids.to(device), attention_mask=mask.long().to(device), output_hidden_states=True)
    return out.hidden_states[-1][:, n_sys:].float()  # (B, T, H)


class Qwen2VLPromptEncoder:
    """The official FAR-T2I text encoder: ``encode(prompts)`` -> [B, 300, hidden] float32."""

    kind = "qwen2-vl"  # the bundle manifest's text.encoder.kind

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_length: int = OFFICIAL_MAX_LENGTH,
        system_prompt: str | None = QWEN2VL_SYSTEM_PROMPT,
    ):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_length, self.system_prompt = int(max_length), system_prompt

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        **kwargs,
    ) -> Qwen2VLPromptEncoder:
        """Load Qwen2-VL (``AutoModel``: its language model, no LM head) and tokenizer from a local directory."""
        p = check_model_dir(path, what="Qwen2-VL text encoder")
        tf = _transformers()
        tokenizer = tf.AutoTokenizer.from_pretrained(p, local_files_only=True)
        model = tf.AutoModel.from_pretrained(p, local_files_only=True, dtype=dtype).to(device)
        return cls(model, tokenizer, **kwargs)

    @property
    def context_len(self) -> int:
        return self.max_length

    @property
    def hidden_size(self) -> int:
        c = self.model.config
        return int(getattr(c, "text_config", c).hidden_size)

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        return encode_prompts(self.model, self.tokenizer, prompts, self.max_length, self.system_prompt)


# ---- a small encoder for demos ----------------------------------------------------------------------------

#: The small tokenizer's only special token: padding (and end of text), as in Qwen2's tokenizer.
PAD_TOKEN = "<|endoftext|>"


def train_bpe_tokenizer(texts: Sequence[str], vocab_size: int = 512) -> Any:
    """A byte-level BPE tokenizer trained on ``texts`` with ``tokenizers`` (Qwen2's scheme: byte-level, no prefix
    space, pad = ``<|endoftext|>``, right padding), as a transformers fast tokenizer."""
    tf = _transformers()
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: PLC0415 - text-encoder dependency: loaded when used

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD_TOKEN],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(list(texts), trainer)
    return tf.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD_TOKEN, eos_token=PAD_TOKEN, padding_side="right"
    )


class SmallTextEncoder:
    """A transformers ``Qwen2Model`` + byte-level BPE tokenizer: ``encode(prompts)`` -> [B, context_len, hidden]
    (each prompt padded / truncated to ``context_len``, padding masked in the encoder, no system prompt)."""

    kind = "small"  # the bundle manifest's text.encoder.kind

    def __init__(self, model: Any, tokenizer: Any, context_len: int):
        self.model, self.tokenizer, self.context_len = model, tokenizer, int(context_len)

    @classmethod
    def build(
        cls,
        captions: Sequence[str],
        *,
        context_len: int = 16,
        hidden_size: int = 64,
        layers: int = 2,
        heads: int = 4,
        vocab_size: int = 512,
        seed: int = 0,
    ) -> SmallTextEncoder:
        """Train the tokenizer on ``captions`` and build a randomly initialised (seeded) Qwen2Model around it."""
        tf = _transformers()
        tokenizer = train_bpe_tokenizer(captions, vocab_size)
        config = tf.Qwen2Config(
            vocab_size=len(tokenizer),
            hidden_size=hidden_size,
            intermediate_size=4 * hidden_size,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            max_position_embeddings=max(64, context_len),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=None,
            eos_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
        )
        torch.manual_seed(seed)
        return cls(tf.Qwen2Model(config).eval(), tokenizer, context_len)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> SmallTextEncoder:
        p = check_model_dir(path, what="small text encoder")
        tf = _transformers()
        meta = p / "far_text_encoder.json"
        if not meta.is_file():
            raise CheckpointError(
                f"small text encoder directory {p} is missing far_text_encoder.json (its context "
                "length); save the encoder with SmallTextEncoder.save_pretrained"
            )
        context_len = int(json.loads(meta.read_text())["context_len"])
        # the saved tokenizer.json exactly (AutoTokenizer would pick Qwen2Tokenizer from config.json and
        # re-derive its pre-tokenizer, which splits differently from the one trained here)
        tokenizer = tf.PreTrainedTokenizerFast(
            tokenizer_file=str(p / "tokenizer.json"), pad_token=PAD_TOKEN, eos_token=PAD_TOKEN, padding_side="right"
        )
        return cls(tf.Qwen2Model.from_pretrained(p, local_files_only=True).eval(), tokenizer, context_len)

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        p = Path(path)
        self.model.save_pretrained(p)
        self.tokenizer.save_pretrained(p)
        (p / "far_text_encoder.json").write_text(json.dumps({"context_len": self.context_len}))
        return p

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        return encode_prompts(self.model.eval(), self.tokenizer, prompts, self.context_len)
