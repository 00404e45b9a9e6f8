"""What ``far bench`` generates from: class ids 0, 1, ... for a class bundle, prompts for a text (FAR-T2I) bundle."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from far_sdk.bundle.bundle import Bundle
from far_sdk.errors import InvalidArgumentError

#: the prompts of a text bundle's rows when none are given (image i of a batch gets prompt i mod 4)
DEFAULT_PROMPTS = ("please draw a 5", "a small seven written in ink", "the digit three, drawn by hand", "a zero")


def bench_condition(bundle: Bundle, batch: int, prompts: Sequence[str] | None = None) -> dict[str, Any]:
    """``generate()``'s conditioning keywords for one timed batch: ``class_labels`` i mod the class count, or for a
    text bundle ``prompt``: ``prompts`` (None: :data:`DEFAULT_PROMPTS`) cycled. Prompts for a class bundle are an
    InvalidArgumentError."""
    if bundle.conditioning != "text":
        if prompts:
            raise InvalidArgumentError(
                f"bundle {bundle.name!r} is class-conditional: prompts need a text-conditioned (FAR-T2I) bundle"
            )
        return {"class_labels": [i % bundle.num_classes for i in range(batch)]}
    p = tuple(prompts or DEFAULT_PROMPTS)
    for i, s in enumerate(p):
        if not isinstance(s, str) or not s.strip() or not _valid_unicode(s):
            raise InvalidArgumentError(
                f"prompt {i + 1} ({s!r}) must be non-empty text of valid Unicode (a command-line argument that is not "
                "UTF-8 is not)"
            )
    return {"prompt": [p[i % len(p)] for i in range(batch)]}


def _valid_unicode(s: str) -> bool:
    try:
        s.encode("utf-8")  # lone surrogates (e.g. undecodable argv bytes) cannot be encoded
    except UnicodeEncodeError:
        return False
    return True


def check_bench_bundle(bundle: Bundle, prompts: Sequence[str] | None, backends: Sequence[str], baseline: str) -> None:
    """Before any timing: prompts only for a text bundle, and no eager rows for one (InvalidArgumentError)."""
    bench_condition(bundle, 1, prompts)
    if bundle.conditioning == "text" and ("torch-eager" in backends or baseline != "none"):
        raise InvalidArgumentError(
            f"bundle {bundle.name!r} is text-conditioned (FAR-T2I): the torch-eager backend and the eager-torch "
            "baseline run class bundles only (the official eager sampler has no text path); leave them out"
        )
