"""What an image is conditioned on: class labels (:class:`ClassCondition`) or text (:class:`TextCondition`, FAR-T2I).

``Generator.generate`` turns what it was given (``class_labels``; ``prompt`` / ``prompt_embeds`` /
``negative_prompt`` / ``negative_prompt_embeds``) into one of these, checked where it enters
(:func:`condition_for`). The sampling loop only asks a condition for its length, a slice of it (batch splitting)
and :meth:`cfg_feeds`: the transformer's conditioning inputs for the classifier-free-guidance batch (conditional
rows first), by graph input name:

- a class bundle: ``{"class_ids": [2B] int64}`` = the labels, then B null ids (the learned ``fake_latent`` row);
- a text bundle: ``{"context": [2B, T, D] float32, "null": [2B] float32}``: the prompts' text hidden states, then
  the unconditional rows (null = 1: the graph's learned null context; or the negative prompts' states, null = 0).
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np

from far_sdk.bundle.bundle import Bundle
from far_sdk.errors import InvalidArgumentError, arg
from far_sdk.text import TextEncoder


@dataclass(frozen=True)
class ClassCondition:
    """The class ids of B images and the bundle's null class id (the unconditional CFG rows)."""

    ids: tuple[int, ...]
    null_id: int

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, sl: slice) -> ClassCondition:
        return ClassCondition(self.ids[sl], self.null_id)

    def cfg_feeds(self) -> dict[str, np.ndarray]:
        """``{"class_ids": [2B] int64}``: the labels, then B null ids."""
        return {"class_ids": np.array(list(self.ids) + [self.null_id] * len(self.ids), dtype=np.int64)}


def class_ids(bundle: Bundle, class_labels: Sequence[int | str] | int | str) -> tuple[int, ...]:
    """Class ids (ints, digit strings, or names from the bundle's ``id2label``) -> validated ids."""
    if isinstance(class_labels, (int, str, np.integer)):
        class_labels = [class_labels]
    if not isinstance(class_labels, (Sequence, np.ndarray)):
        raise InvalidArgumentError(
            f"class_labels must be a class id, a class name or a list of them, got {class_labels!r}"
        )
    names = {v.lower(): k for k, v in bundle.id2label.items()}
    n = bundle.num_classes
    ids = []
    for lab in class_labels:
        given = lab
        if isinstance(lab, str):
            key = lab.strip().lower()
            if key.isascii() and key.isdigit():
                lab = int(key) if len(key) <= 18 else n  # longer digit strings are out of range anyway
            elif key in names:
                lab = names[key]
            else:
                close = difflib.get_close_matches(key, list(names), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                known = ", ".join(sorted(names)[:10]) or "none: this bundle has no id2label table"
                raise InvalidArgumentError(f"unknown class name {lab!r}{hint} (known names include: {known})")
        if isinstance(lab, (bool, np.bool_)) or not isinstance(lab, (int, np.integer)):
            raise InvalidArgumentError(
                f"each class label must be an integer class id or a class name, got {type(lab).__name__} {lab!r:.40}"
            )
        if not 0 <= int(lab) < n:
            shown = str(given) if len(str(given)) <= 40 else f"{str(given)[:20]}... ({len(str(given))} characters)"
            raise InvalidArgumentError(f"class id {shown} is outside 0..{n - 1} (this bundle has {n} classes)")
        ids.append(int(lab))
    if not ids:
        raise InvalidArgumentError("class_labels is empty: give at least one class id")
    return tuple(ids)


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
        null = np.concatenate(
            [np.zeros(B, np.float32), np.full(B, 0.0 if self.negative is not None else 1.0, np.float32)]
        )
        return {"context": np.ascontiguousarray(np.concatenate([self.embeds, neg]), dtype=np.float32), "null": null}


def check_embeds(value: Any, bundle: Bundle, name: str, batch: int | None = None) -> np.ndarray:
    """``value`` as float32 [B, T, D] of this bundle's text shape, finite; else InvalidArgumentError saying the
    shape."""
    T, D = bundle.text["max_length"], bundle.text["hidden_size"]
    try:
        a = np.asarray(value)
    except (TypeError, ValueError):
        a = np.empty(0)
    if (
        a.ndim != 3
        or a.shape[1:] != (T, D)
        or a.shape[0] == 0
        or (batch is not None and a.shape[0] != batch)
        or a.dtype.kind != "f"
    ):
        want = f"[{batch if batch is not None else 'B'}, {T}, {D}]"
        raise InvalidArgumentError(
            f"{name} must be a float array {want} (text hidden states, padded/truncated to {T} tokens) "
            f"for bundle {bundle.name!r}, got {getattr(value, 'shape', type(value).__name__)} "
            f"{getattr(a, 'dtype', '')}"
        )
    a = np.ascontiguousarray(a, dtype=np.float32)
    if not np.isfinite(a).all():
        raise InvalidArgumentError(f"{name} holds NaN or inf values")
    return a


def check_prompts(prompt: Any) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise InvalidArgumentError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
    return list(prompts)


def negative_prompts(negative_prompt: Any, batch: int) -> list[str]:
    """``negative_prompt`` (one string for every image, or one per prompt) -> ``batch`` strings."""
    if isinstance(negative_prompt, str):
        return [negative_prompt] * batch
    if (
        not isinstance(negative_prompt, (list, tuple))
        or len(negative_prompt) != batch
        or not all(isinstance(p, str) for p in negative_prompt)
    ):
        got = f"{len(negative_prompt)} items" if isinstance(negative_prompt, (list, tuple)) else repr(negative_prompt)
        raise InvalidArgumentError(
            f"{arg('negative_prompt')} must be one string (used for every image) or a list of {batch} strings (one "
            f"per prompt), got {got}"
        )
    return list(negative_prompt)


def text_condition(
    bundle: Bundle,
    encoder: TextEncoder | None,
    class_labels: Any,
    prompt: Any,
    prompt_embeds: Any,
    negative_prompt_embeds: Any,
    negative_prompt: Any = None,
) -> TextCondition:
    """What a text bundle's ``generate`` was given -> its :class:`TextCondition` (typed errors saying what to pass).

    ``negative_prompt`` is encoded like the prompt (the bundle's text encoder) and, as ``negative_prompt_embeds``,
    takes the unconditional rows' place of the learned null context."""
    if class_labels is not None:
        raise InvalidArgumentError(
            f"bundle {bundle.name!r} is text-conditioned (FAR-T2I): give {arg('prompt')} (or prompt_embeds "
            f"[B, T, D] from Python), not {arg('class_labels')}"
        )
    if (prompt is None) == (prompt_embeds is None):
        raise InvalidArgumentError(
            "pass exactly one of prompt= (needs the bundle's text encoder) and prompt_embeds= [B, T, D]"
        )
    if prompt is not None:
        embeds = (encoder or TextEncoder(bundle)).encode(check_prompts(prompt))
    else:
        embeds = check_embeds(prompt_embeds, bundle, "prompt_embeds")
    neg = None
    if negative_prompt is not None and negative_prompt_embeds is not None:
        raise InvalidArgumentError("pass negative_prompt= (text) or negative_prompt_embeds= [B, T, D], not both")
    if negative_prompt is not None:
        neg = (encoder or TextEncoder(bundle)).encode(negative_prompts(negative_prompt, embeds.shape[0]))
    if negative_prompt_embeds is not None:
        neg = check_embeds(negative_prompt_embeds, bundle, "negative_prompt_embeds", batch=embeds.shape[0])
    return TextCondition(embeds, neg)


def refuse_text(
    bundle: Bundle, prompt: Any, prompt_embeds: Any, negative_prompt_embeds: Any, negative_prompt: Any = None
) -> None:
    """A class bundle given text conditioning: InvalidArgumentError saying to pass class labels."""
    text = {
        "prompt": prompt,
        "prompt_embeds": prompt_embeds,
        "negative_prompt": negative_prompt,
        "negative_prompt_embeds": negative_prompt_embeds,
    }
    given = [name for name, value in text.items() if value is not None]
    if given:
        raise InvalidArgumentError(
            f"bundle {bundle.name!r} is class-conditional: give {arg('class_labels')} (class ids or names), not "
            f"{arg(given[0])} (text needs a FAR-T2I bundle)"
        )


#: What a generation is conditioned on.
Condition = Union[ClassCondition, TextCondition]


def condition_for(
    bundle: Bundle,
    encoder: TextEncoder | None,
    class_labels: Any,
    prompt: Any,
    prompt_embeds: Any,
    negative_prompt_embeds: Any,
    negative_prompt: Any = None,
) -> Condition:
    """The :class:`Condition` of one ``generate`` call, by the bundle's conditioning; typed errors saying what to
    pass."""
    if bundle.conditioning == "text":
        return text_condition(
            bundle, encoder, class_labels, prompt, prompt_embeds, negative_prompt_embeds, negative_prompt
        )
    refuse_text(bundle, prompt, prompt_embeds, negative_prompt_embeds, negative_prompt)
    if class_labels is None:
        raise InvalidArgumentError(f"{arg('class_labels')} must be given: one class id or name per image")
    return ClassCondition(class_ids(bundle, class_labels), bundle.null_class_id)
