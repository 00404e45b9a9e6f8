"""Text conditioning of FAR-T2I bundles (manifest ``conditioning: "text"``), torch-free.

A text bundle's transformer takes text hidden states ``context`` [N, T, D] and a per-row ``null`` flag (1 = the
unconditional CFG row: the graph uses its learned null context ``fake_latent``). The runtime gets the hidden
states either from the caller (``prompt_embeds`` [B, T, D] float32, diffusers' name) or from the bundle's own
text encoder (``text_encoder.onnx`` + ``tokenizer.json``, manifest ``text.encoder``), the prompt path of
``training.text_encoder.encode_prompts`` rebuilt with the ``tokenizers`` library (imported lazily):

- each prompt is tokenised on its own (the tokenizer's post-processing included, as transformers calls it), cut
  at T tokens (a warning says how many were cut: the official code cuts silently) and padded to T with the pad
  id on the manifest's padding side; its attention mask is ``id != pad``;
- kind "qwen2-vl" (the official FAR-T2I encoder): the manifest's system prompt, tokenised the same way and cut at
  T but not padded (``system_length`` ids), leads every row with mask 1; the graph returns the T prompt rows;
- kind "small" (absent kind: the first format): no system prompt.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from far_sdk.bundle.bundle import Bundle
from far_sdk.bundle.graphs import TEXT_ENCODER
from far_sdk.errors import BackendUnavailableError, BundleError, InvalidArgumentError


class TextEncoder:
    """The bundle's ONNX text encoder: ``encode(prompts)`` -> [B, T, D] float32 (sessions made on first use).

    ``run``: runs the graph instead of an ONNX Runtime CPU session (a backend's ``run("text_encoder", feeds)``,
    e.g. TensorRT's engine), on at most ``max_batch`` prompts per call."""

    def __init__(
        self,
        bundle: Bundle,
        *,
        run: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
        max_batch: int | None = None,
    ):
        enc = (bundle.text or {}).get("encoder")
        if enc is None:
            raise InvalidArgumentError(
                f"bundle {bundle.name!r} carries no text encoder: compute the prompts' text hidden states "
                "elsewhere and pass prompt_embeds= [B, T, D] (or export with far-export onnx --text-encoder)"
            )
        self.bundle, self._enc = bundle, enc
        self.kind = enc.get("kind", "small")
        self.max_length = int(bundle.text["max_length"])
        self.system_length = int(enc.get("system_length", 0))
        self._lock = threading.Lock()
        self._tok = self._sess = None
        self._run, self._max_batch = run, max_batch
        self._system_ids: list[int] = []

    def _load(self) -> None:
        try:
            import onnxruntime as ort  # noqa: PLC0415 - the backend's runtime: loaded when chosen
            from tokenizers import Tokenizer  # noqa: PLC0415 - text-encoder dependency: loaded when used
        except ImportError as e:
            raise BackendUnavailableError(
                f"prompt= needs the `tokenizers` and `onnxruntime` packages ({e}); pip install tokenizers "
                "onnxruntime, or pass prompt_embeds="
            ) from e
        files = [self._enc["file"], self._enc["tokenizer"]] + (
            [self._enc["external_data"]] if "external_data" in self._enc else []
        )
        self.bundle.verify(files)
        tok = Tokenizer.from_file(str(self.bundle.file(self._enc["tokenizer"])))
        tok.no_padding()
        tok.no_truncation()
        self._tok = tok
        self._system_ids = self._system_token_ids()
        if self._run is not None:
            return
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self._sess = ort.InferenceSession(
            str(self.bundle.file(self._enc["file"])), opts, providers=["CPUExecutionProvider"]
        )

    def _ids(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=True).ids

    def _system_token_ids(self) -> list[int]:
        system = self._enc.get("system_prompt")
        ids = [] if system is None else self._cut(self._ids(system))
        if len(ids) != self.system_length:
            raise BundleError(
                f"bundle {self.bundle.name!r}: its system prompt is {len(ids)} tokens with its tokenizer.json, the "
                f"text encoder was exported for {self.system_length}; re-export the bundle"
            )
        return ids

    def _cut(self, ids: list[int]) -> list[int]:
        T = self.max_length
        return ids[:T] if self._enc.get("truncation_side", "right") == "right" else ids[len(ids) - T :]

    def token_ids(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids [B, S + T] int64, attention_mask [B, S + T] int64): the S system ids (mask 1), then each
        prompt's ids cut at T and padded with the pad id (mask id != pad). Warns naming the tokens cut."""
        with self._lock:
            if self._tok is None:
                self._load()
        T, S, pad = self.max_length, self.system_length, int(self._enc["pad_token_id"])
        left = self._enc.get("padding_side", "right") == "left"
        ids = np.full((len(prompts), S + T), pad, dtype=np.int64)
        ids[:, :S] = self._system_ids
        for i, p in enumerate(prompts):
            row = self._ids(p)
            if len(row) > T:
                warnings.warn(
                    f"prompt {i} is {len(row)} tokens long; the text encoder reads {T}: the "
                    f"{'last' if self._enc.get('truncation_side', 'right') == 'right' else 'first'} {len(row) - T} "
                    f"tokens were cut (as the official FAR-T2I code does). Shorten the prompt to keep them",
                    UserWarning,
                    stacklevel=4,
                )
                row = self._cut(row)
            if left:
                ids[i, S + T - len(row) :] = row
            else:
                ids[i, S : S + len(row)] = row
        mask = (ids != pad).astype(np.int64)
        mask[:, :S] = 1
        return ids, mask

    def encode(self, prompts: list[str]) -> np.ndarray:
        ids, mask = self.token_ids(prompts)
        if self._run is None:
            out = self._sess.run(None, {"input_ids": ids, "attention_mask": mask})[0]
            return np.ascontiguousarray(out, dtype=np.float32)
        n = self._max_batch or len(prompts)
        parts = [
            self._run({"input_ids": ids[i : i + n], "attention_mask": mask[i : i + n]})["hidden_states"]
            for i in range(0, len(prompts), n)
        ]
        return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)


def text_encoder_of(bundle: Bundle, backend: Any) -> TextEncoder | None:
    """The bundle's text encoder (None without one), on the backend when it runs the graph (a TensorRT engine),
    else on ONNX Runtime (CPU)."""
    if not (bundle.text or {}).get("encoder"):
        return None
    if TEXT_ENCODER not in getattr(backend, "extra_graphs", ()):
        return TextEncoder(bundle)
    return TextEncoder(bundle, run=lambda feeds: backend.run(TEXT_ENCODER, feeds), max_batch=backend.max_batch)
