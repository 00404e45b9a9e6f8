"""Captions for the text-to-image demo on scikit-learn's digits (training/demo_data.py).

Every digit has several phrasings for training (:data:`TRAIN_TEMPLATES`) and a held-out set of paraphrases
(:data:`HELD_OUT_TEMPLATES`) that neither the tokenizer, the text encoder nor FAR ever see in training:
the demo's quality check asks whether those unseen prompts produce the right digit. Each template names the
digit as a word ("seven") or a numeral ("7"); both forms occur in training.
"""

from __future__ import annotations

import numpy as np

from far_sdk.errors import InvalidArgumentError

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

#: Training phrasings: {w} is the digit's word, {n} its numeral.
TRAIN_TEMPLATES = (
    "a handwritten {w}",
    "the digit {n}",
    "number {w}, thick strokes",
    "a picture of the number {n}",
    "{w}",
    "{n}",
    "digit {w}",
    "the number {w} written by hand",
    "a scanned handwritten {n}",
    "a drawing of the digit {w}",
    "handwritten number {n}",
    "the numeral {w}",
    "a {w} written with a pen",
    "an ink sketch of a {n}",
)

#: Held-out paraphrases: never used to train the tokenizer, the text encoder or the model.
HELD_OUT_TEMPLATES = (
    "an image of a handwritten {n}",
    "the digit {w}, drawn by hand",
    "a photo of the number {w}",
    "please draw a {n}",
    "a small {w} written in ink",
)


def captions_for(digit: int, templates: tuple[str, ...]) -> list[str]:
    if isinstance(digit, bool) or not isinstance(digit, (int, np.integer)) or not 0 <= digit <= 9:
        raise InvalidArgumentError(f"digit must be an int in 0..9, got {digit!r}")
    return [t.format(w=DIGIT_WORDS[digit], n=str(digit)) for t in templates]


def train_captions() -> tuple[list[str], np.ndarray]:
    """All training captions and their digit labels (digit-major: digit 0's phrasings first)."""
    caps = [c for d in range(10) for c in captions_for(d, TRAIN_TEMPLATES)]
    return caps, np.repeat(np.arange(10), len(TRAIN_TEMPLATES))


def held_out_captions() -> tuple[list[str], np.ndarray]:
    """The held-out paraphrases and their digit labels (digit-major)."""
    caps = [c for d in range(10) for c in captions_for(d, HELD_OUT_TEMPLATES)]
    return caps, np.repeat(np.arange(10), len(HELD_OUT_TEMPLATES))


def caption_pairs(labels: np.ndarray, caption_labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """For each image label, the index of a caption of the same digit, drawn uniformly (fixed by ``seed``)."""
    rng = np.random.default_rng(seed)
    by_digit = {d: np.flatnonzero(caption_labels == d) for d in np.unique(labels)}
    missing = [int(d) for d, idx in by_digit.items() if len(idx) == 0]
    if missing:
        raise InvalidArgumentError(f"no caption for digit(s) {missing}")
    return np.array([rng.choice(by_digit[d]) for d in labels], dtype=np.int64)
