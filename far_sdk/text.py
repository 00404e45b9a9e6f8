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

import numpy as np

from far_sdk.bundle.bundle import Bundle
from far_sdk.errors import BackendUnavailableError, InvalidArgumentError


class TextEncoder:
    """The bundle's ONNX text encoder: ``encode(prompts)`` -> [B, T, D] float32 (sessions made on first use)."""

    def __init__(self, bundle: Bundle):
        enc = (bundle.text or {}).get("encoder")
        if enc is None:
            raise InvalidArgumentError(
                f"bundle {bundle.name!r} carries no text encoder: compute the prompts' text hidden states "
                "elsewhere and pass prompt_embeds= [B, T, D] (or export with far-export onnx --text-encoder)"
            )
        self.bundle, self._enc = bundle, enc
        self._lock = threading.Lock()
        self._tok = self._sess = None

    def _load(self) -> None:
        try:
            import onnxruntime as ort  # noqa: PLC0415 - the backend's runtime: loaded when chosen
            from tokenizers import Tokenizer  # noqa: PLC0415 - text-encoder dependency: loaded when used
        except ImportError as e:
            raise BackendUnavailableError(
                f"prompt= needs the `tokenizers` and `onnxruntime` packages ({e}); pip install tokenizers "
                "onnxruntime, or pass prompt_embeds="
            ) from e
        self.bundle.verify([self._enc["file"], self._enc["tokenizer"]])
        tok = Tokenizer.from_file(str(self.bundle.file(self._enc["tokenizer"])))
        tok.no_padding()
        tok.no_truncation()
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self._sess = ort.InferenceSession(
            str(self.bundle.file(self._enc["file"])), opts, providers=["CPUExecutionProvider"]
        )
        self._tok = tok

    def token_ids(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids [B, T] int64, attention_mask [B, T] int64): truncated at T, right-padded, mask = id != pad."""
        T, pad = self.bundle.text["max_length"], int(self._enc["pad_token_id"])
        ids = np.full((len(prompts), T), pad, dtype=np.int64)
        for i, p in enumerate(prompts):
            row = self._tok.encode(p, add_special_tokens=False).ids[:T]
            ids[i, : len(row)] = row
        return ids, (ids != pad).astype(np.int64)

    def encode(self, prompts: list[str]) -> np.ndarray:
        with self._lock:
            if self._sess is None:
                self._load()
        ids, mask = self.token_ids(prompts)
        return np.ascontiguousarray(
            self._sess.run(None, {"input_ids": ids, "attention_mask": mask})[0], dtype=np.float32
        )
