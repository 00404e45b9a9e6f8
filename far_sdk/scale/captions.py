"""Captions for a text-to-image dataset job (``far generate-dataset --captions FILE``), read and checked where they
enter: a ``.json`` file holds a JSON list of strings, any other file one caption per line (UTF-8, an optional BOM,
``\\n`` or ``\\r\\n`` line ends, a final newline optional). Every caption is a non-empty string of valid Unicode of
at most :data:`MAX_CAPTION_CHARS` characters; a fault is a :class:`~far_sdk.errors.DataError` naming the file and
the line (or list index)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from far_sdk.errors import DataError, InvalidArgumentError

MAX_CAPTION_CHARS = 2000  # shards store each image's caption in a fixed-width array: keep that width bounded
MAX_CAPTIONS_BYTES = 16 << 20


def check_captions(captions: object, where: str = "captions") -> tuple[str, ...]:
    """``captions`` as a tuple of checked strings; else InvalidArgumentError saying which entry and why."""
    if isinstance(captions, str) or not isinstance(captions, Sequence) or len(captions) == 0:
        raise InvalidArgumentError(f"{where} must be a non-empty list of strings, got {type(captions).__name__}")
    for i, c in enumerate(captions):
        problem = _problem(c)
        if problem:
            raise InvalidArgumentError(f"{where}[{i}] {problem}")
    return tuple(captions)


def _problem(c: object) -> str | None:
    if not isinstance(c, str):
        return f"is a {type(c).__name__}, not a string"
    if not c.strip():
        return "is empty"
    if len(c) > MAX_CAPTION_CHARS:
        return f"has {len(c)} characters; at most {MAX_CAPTION_CHARS} are allowed"
    try:
        c.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"holds an invalid Unicode character ({c[e.start]!r}: a lone surrogate)"
    if "\x00" in c:
        return "holds a NUL character"
    return None


def read_captions(path: str | os.PathLike) -> tuple[str, ...]:
    """The captions of ``path`` (a ``.json`` list of strings, or one per line); DataError naming the file."""
    p = Path(path)
    try:
        with open(p, "rb") as f:  # a FIFO (--captions <(...)) is fine: read it once, up to the limit
            raw = f.read(MAX_CAPTIONS_BYTES + 1)
    except OSError as e:
        raise DataError(f"cannot read the captions file {p} ({e.strerror or e})") from e
    if len(raw) > MAX_CAPTIONS_BYTES:
        raise DataError(f"the captions file {p} is over {MAX_CAPTIONS_BYTES >> 20} MiB; split the job")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(
            f"the captions file {p} is not UTF-8 text (line {line}, byte {e.start}): save it as UTF-8"
        ) from e
    if p.suffix.lower() == ".json":
        try:
            captions = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise DataError(f"the captions file {p} is not valid JSON ({e}); give a JSON list of strings") from e
        if not isinstance(captions, list):
            raise DataError(f"the captions file {p} holds a JSON {type(captions).__name__}; give a list of strings")
        where = [f"entry {i}" for i in range(len(captions))]
    else:
        captions = text.split("\n")
        if captions and captions[-1] == "":
            captions.pop()  # the final newline
        captions = [c.removesuffix("\r") for c in captions]
        where = [f"line {i + 1}" for i in range(len(captions))]
    if not captions:
        raise DataError(f"the captions file {p} holds no captions")
    for w, c in zip(where, captions):
        problem = _problem(c)
        if problem:
            raise DataError(f"the captions file {p}: {w} {problem}")
    return tuple(captions)
