"""The text side of a FAR-T2I bundle: the manifest's ``text`` section and the optional bundled text encoder.

A small text encoder (:class:`training.text_encoder.SmallTextEncoder`: a transformers ``Qwen2Model`` and a
byte-level BPE ``tokenizer.json``) is exported as ``text_encoder.onnx`` (input_ids [B, T] int64,
attention_mask [B, T] int64 -> hidden_states [B, T, H], the last hidden state as ``encode_prompts`` takes it)
beside a copy of its ``tokenizer.json``; the runtime (far_sdk.text) tokenises with the ``tokenizers`` library,
pads / truncates to T with the pad id and masks ``id == pad``, as :func:`training.text_encoder.encode_prompts`.
The exported graph is validated against PyTorch on prompts of other batch sizes than the traced one.

The official encoder (:class:`training.text_encoder.Qwen2VLPromptEncoder`, Qwen2-VL's language model behind the
official system prompt) is exported by :mod:`export.qwen_export`; :func:`load_text_encoder` reads either kind
from a directory (``qwen2-vl:DIR``, ``small:DIR``, or ``DIR`` with the kind read from its files).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from far_sdk.bundle.graphs import text_encoder_spec
from far_sdk.bundle.schema import ENCODER_KINDS
from far_sdk.errors import CheckpointError, ExportError, InvalidArgumentError
from training.far_t2i import FART2I

from .qwen_export import export_qwen2vl_encoder, trace_text_encoder

TEXT_ENCODER_FILE = "text_encoder.onnx"
TOKENIZER_FILE = "tokenizer.json"
#: Largest accepted |onnx - torch| / max |torch| of the text encoder's hidden states.
TEXT_ENCODER_MAX_REL = 1e-4
_PROBE_PROMPTS = ("a handwritten seven", "the digit 2, thick strokes", "number nine", "", "a zero drawn small and neat")


class _LastHidden(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states[-1]


def check_text_encoder(far: Any, text_encoder: Any) -> None:
    if text_encoder is None:
        return
    if not isinstance(far, FART2I):
        raise InvalidArgumentError(
            "text_encoder= goes with a FAR-T2I model only; a class-conditional bundle has no text side"
        )
    if getattr(text_encoder, "kind", None) not in ENCODER_KINDS or not hasattr(text_encoder, "tokenizer"):
        raise InvalidArgumentError(
            "text_encoder must be a training.text_encoder.SmallTextEncoder or Qwen2VLPromptEncoder, got "
            f"{type(text_encoder).__name__}"
        )
    cfg = far.config
    if (text_encoder.context_len, text_encoder.hidden_size) != (cfg.context_len, cfg.context_dim):
        raise InvalidArgumentError(
            f"the text encoder gives [B, {text_encoder.context_len}, {text_encoder.hidden_size}] but the model "
            f"takes context [B, {cfg.context_len}, {cfg.context_dim}]"
        )


def _ids(text_encoder: Any, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    tok = text_encoder.tokenizer
    ids = tok(
        prompts, return_tensors="np", padding="max_length", max_length=text_encoder.context_len, truncation=True
    ).input_ids
    ids = ids.astype(np.int64)
    return ids, (ids != tok.pad_token_id).astype(np.int64)


def load_text_encoder(spec: str | Path) -> Any:
    """``qwen2-vl:DIR`` | ``small:DIR`` | ``DIR`` (the kind read from the directory: a ``far_text_encoder.json``
    is a small encoder, a config.json of model_type ``qwen2_vl`` the official one) -> the loaded encoder."""
    import json  # noqa: PLC0415 - only here

    from training.text_encoder import Qwen2VLPromptEncoder, SmallTextEncoder  # noqa: PLC0415 - needs transformers

    text = str(spec)
    kind, sep, rest = text.partition(":")
    if sep and kind in ENCODER_KINDS:
        path = Path(rest)
    else:
        kind, path = None, Path(text)
        if (path / "far_text_encoder.json").is_file():
            kind = "small"
        elif (path / "config.json").is_file():
            try:
                model_type = json.loads((path / "config.json").read_text()).get("model_type")
            except (OSError, ValueError, AttributeError) as e:
                raise CheckpointError(f"--text-encoder {path}: config.json is not a JSON object ({e})") from None
            # qwen2: Qwen2-VL's language model saved on its own (text-only positions are the same under M-RoPE)
            kind = "qwen2-vl" if model_type in ("qwen2_vl", "qwen2") else None
            if kind is None:
                raise InvalidArgumentError(
                    f"--text-encoder {path}: config.json's model_type is {model_type!r}; far-export bundles "
                    "Qwen2-VL (model_type qwen2_vl, the official FAR-T2I encoder) or a SmallTextEncoder directory"
                )
        elif not path.is_dir():
            raise CheckpointError(f"--text-encoder {path} does not exist: pass qwen2-vl:DIR or small:DIR")
        else:
            raise InvalidArgumentError(
                f"--text-encoder {path} holds neither config.json nor far_text_encoder.json: pass qwen2-vl:DIR "
                "(a Qwen2-VL-Instruct directory) or small:DIR (SmallTextEncoder.save_pretrained)"
            )
    if kind == "qwen2-vl":
        return Qwen2VLPromptEncoder.from_pretrained(path)
    return SmallTextEncoder.from_pretrained(path)


def export_text_encoder(
    text_encoder: Any, bundle_dir: Path, opset: int, *, validate: bool = True, **options: Any
) -> dict[str, Any]:
    """Write ``text_encoder.onnx`` and ``tokenizer.json`` into ``bundle_dir``, validated (a Qwen2-VL encoder: unless
    ``validate`` is false); returns the manifest's ``text.encoder`` entry. ``options`` (weight_dtype,
    external_data_threshold) go to the Qwen2-VL export."""
    if text_encoder.kind == "qwen2-vl":
        return export_qwen2vl_encoder(text_encoder, bundle_dir, opset, validate_graph=validate, **options)
    if options:
        raise InvalidArgumentError(f"{sorted(options)} apply to a Qwen2-VL text encoder only")
    import onnxruntime as ort  # noqa: PLC0415 - the backend's runtime: loaded when chosen

    model = _LastHidden(text_encoder.model.eval()).eval()
    ids, am = _ids(text_encoder, list(_PROBE_PROMPTS[:2]))
    path = bundle_dir / TEXT_ENCODER_FILE
    trace_text_encoder(model, ids, am, path, opset, "bundled")
    text_encoder.tokenizer.backend_tokenizer.save(str(bundle_dir / TOKENIZER_FILE))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (1, 3, 5):
        prompts = list(_PROBE_PROMPTS[:n])
        got = sess.run(None, dict(zip(("input_ids", "attention_mask"), _ids(text_encoder, prompts))))[0]
        want = text_encoder.encode(prompts).detach().numpy()
        rel = float(np.abs(got - want).max() / max(float(np.abs(want).max()), 1e-30))
        if not rel <= TEXT_ENCODER_MAX_REL:
            raise ExportError(
                f"the exported text encoder disagrees with PyTorch at batch {n} (max rel {rel:.3g}); nothing was "
                "written"
            )
    return {
        "kind": "small",
        "file": TEXT_ENCODER_FILE,
        "tokenizer": TOKENIZER_FILE,
        "pad_token_id": int(text_encoder.tokenizer.pad_token_id),
        **text_encoder_spec(text_encoder.context_len, text_encoder.hidden_size).to_dict(),
    }


def text_section(far: FART2I, encoder: dict[str, Any] | None) -> dict[str, Any]:
    """The manifest's ``text``: the context the transformer takes, and the bundled encoder if any."""
    out: dict[str, Any] = {"hidden_size": far.config.context_dim, "max_length": far.config.context_len}
    if encoder is not None:
        out["encoder"] = encoder
    return out
