"""Text conditioning of FAR-T2I bundles (manifest ``conditioning: "text"``), torch-free.

A text bundle's transformer takes text hidden states ``context`` [N, T, D] and a per-row ``null`` flag (1 = the
unconditional CFG row: the graph uses its learned null context ``fake_latent``). The runtime gets the hidden
states either from the caller (``prompt_embeds`` [B, T, D] float32, diffusers' name) or from the bundle's own
small text encoder (``text_encoder.onnx`` + ``tokenizer.json``): each prompt is tokenised with the
``tokenizers`` library (imported lazily), truncated at T and right-padded with the pad id, the attention mask
is ``id != pad`` — the prompt path of ``training.text_encoder.encode_prompts`` without a system prompt.
``negative_prompt_embeds`` [B, T, D], when given, replaces ``fake_latent`` for the unconditional rows.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from .bundle import Bundle
from .errors import BackendUnavailableError, InvalidArgumentError


@dataclass(frozen=True)
class TextCondition:
    """The conditioning of B images: ``embeds`` [B, T, D] float32, ``negative`` [B, T, D] or None (fake_latent)."""

    embeds: np.ndarray
    negative: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.embeds.shape[0])

    def __getitem__(self, sl: slice) -> TextCondition:
        return TextCondition(self.embeds[sl], None if self.negative is None else self.negative[sl])

    def cfg_feeds(self) -> dict[str, np.ndarray]:
        """The CFG batch's transformer inputs: context [2B, T, D] (conditional rows first), null [2B]."""
        B = len(self)
        neg = self.negative if self.negative is not None else np.zeros_like(self.embeds)
        null = np.concatenate([np.zeros(B, np.float32), np.full(B, 0.0 if self.negative is not None else 1.0, np.float32)])
        return {"context": np.ascontiguousarray(np.concatenate([self.embeds, neg]), dtype=np.float32), "null": null}


def check_embeds(value: Any, bundle: Bundle, name: str, batch: int | None = None) -> np.ndarray:
    """``value`` as float32 [B, T, D] of this bundle's text shape, finite; else InvalidArgumentError saying the shape."""
    T, D = bundle.text["max_length"], bundle.text["hidden_size"]
    try:
        a = np.asarray(value)
    except (TypeError, ValueError):
        a = np.empty(0)
    if a.ndim != 3 or a.shape[1:] != (T, D) or a.shape[0] == 0 or (batch is not None and a.shape[0] != batch) \
            or a.dtype.kind != "f":
        want = f"[{batch if batch is not None else 'B'}, {T}, {D}]"
        raise InvalidArgumentError(f"{name} must be a float array {want} (text hidden states, padded/truncated to {T} tokens) "
                                   f"for bundle {bundle.name!r}, got {getattr(value, 'shape', type(value).__name__)} "
                                   f"{getattr(a, 'dtype', '')}")
    a = np.ascontiguousarray(a, dtype=np.float32)
    if not np.isfinite(a).all():
        raise InvalidArgumentError(f"{name} holds NaN or inf values")
    return a


class TextEncoder:
    """The bundle's ONNX text encoder: ``encode(prompts)`` -> [B, T, D] float32 (sessions made on first use)."""

    def __init__(self, bundle: Bundle):
        enc = (bundle.text or {}).get("encoder")
        if enc is None:
            raise InvalidArgumentError(f"bundle {bundle.name!r} carries no text encoder: compute the prompts' text hidden states "
                                       "elsewhere and pass prompt_embeds= [B, T, D] (or export with far-export onnx --text-encoder)")
        self.bundle, self._enc = bundle, enc
        self._lock = threading.Lock()
        self._tok = self._sess = None

    def _load(self) -> None:
        try:
            import onnxruntime as ort
            from tokenizers import Tokenizer
        except ImportError as e:
            raise BackendUnavailableError(f"prompt= needs the `tokenizers` and `onnxruntime` packages ({e}); pip install tokenizers "
                                          "onnxruntime, or pass prompt_embeds=") from e
        self.bundle.verify([self._enc["file"], self._enc["tokenizer"]])
        tok = Tokenizer.from_file(str(self.bundle.file(self._enc["tokenizer"])))
        tok.no_padding()
        tok.no_truncation()
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self._sess = ort.InferenceSession(str(self.bundle.file(self._enc["file"])), opts, providers=["CPUExecutionProvider"])
        self._tok = tok

    def token_ids(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids [B, T] int64, attention_mask [B, T] int64): truncated at T, right-padded, mask = id != pad."""
        T, pad = self.bundle.text["max_length"], int(self._enc["pad_token_id"])
        ids = np.full((len(prompts), T), pad, dtype=np.int64)
        for i, p in enumerate(prompts):
            row = self._tok.encode(p, add_special_tokens=False).ids[:T]
            ids[i, :len(row)] = row
        return ids, (ids != pad).astype(np.int64)

    def encode(self, prompts: list[str]) -> np.ndarray:
        with self._lock:
            if self._sess is None:
                self._load()
        ids, mask = self.token_ids(prompts)
        return np.ascontiguousarray(self._sess.run(None, {"input_ids": ids, "attention_mask": mask})[0], dtype=np.float32)


def check_prompts(prompt: Any) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise InvalidArgumentError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
    return list(prompts)


def text_condition(bundle: Bundle, encoder: TextEncoder | None, class_labels: Any, prompt: Any, prompt_embeds: Any,
                   negative_prompt_embeds: Any) -> TextCondition:
    """What a text bundle's ``generate`` was given -> its :class:`TextCondition` (typed errors saying what to pass)."""
    if class_labels is not None:
        raise InvalidArgumentError(f"bundle {bundle.name!r} is text-conditioned (FAR-T2I): pass prompt=[...] or "
                                   "prompt_embeds= [B, T, D], not class labels")
    if (prompt is None) == (prompt_embeds is None):
        raise InvalidArgumentError("pass exactly one of prompt= (needs the bundle's text encoder) and prompt_embeds= [B, T, D]")
    if prompt is not None:
        embeds = (encoder or TextEncoder(bundle)).encode(check_prompts(prompt))
    else:
        embeds = check_embeds(prompt_embeds, bundle, "prompt_embeds")
    neg = None
    if negative_prompt_embeds is not None:
        neg = check_embeds(negative_prompt_embeds, bundle, "negative_prompt_embeds", batch=embeds.shape[0])
    return TextCondition(embeds, neg)


def refuse_text(bundle: Bundle, prompt: Any, prompt_embeds: Any, negative_prompt_embeds: Any) -> None:
    """A class bundle given text conditioning: InvalidArgumentError saying to pass class labels."""
    if prompt is not None or prompt_embeds is not None or negative_prompt_embeds is not None:
        raise InvalidArgumentError(f"bundle {bundle.name!r} is class-conditional: pass class_labels=[...], not "
                                   "prompt / prompt_embeds / negative_prompt_embeds (those need a FAR-T2I bundle)")
