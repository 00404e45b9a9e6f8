"""What ``far generate`` writes that people keep: one PNG per image (``--out-dir``) named by its class or prompt and
its seed, carrying the full settings as PNG text, so that ``far generate --from-image IMAGE.png`` makes it again.

The settings (the text entry ``far-sdk``, JSON) record the generate call the image came from: the bundle (as given,
plus its manifest digest), backend and device, the call's class labels or prompts and base seed, the image's index
in that call, the preset and sampling options given, and the enlargement. Regenerating repeats that call on the
same backend (an image is bitwise the same only on the same backend and device) and keeps image ``index``.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from far_sdk.errors import InvalidArgumentError
from far_sdk.images import enlarge, png_text_chunks, read_png_text

#: The PNG text key of the settings, and the version of their layout.
SETTINGS_KEY = "far-sdk"
SETTINGS_VERSION = 1


@dataclass(frozen=True)
class Settings:
    """One image's generate call, as recorded in its PNG (see the module docstring)."""

    bundle: str
    manifest_sha256: str
    backend: str
    device: str | None
    conditioning: dict[str, list]  # {"class_labels": [...]} or {"prompt": [...]}: the whole call's
    seed: int  # the call's base seed: image i used seed + i
    index: int
    preset: str | None
    options: dict[str, Any]  # SamplingOptions.to_dict() of the options given
    scale: int = 1

    def to_json(self, extra: dict[str, Any]) -> str:
        return json.dumps({"version": SETTINGS_VERSION, **self.__dict__, **extra}, sort_keys=True)

    @classmethod
    def from_png(cls, path: str | Path) -> Settings:
        _, text = read_png_text(path)
        if SETTINGS_KEY not in text:
            raise InvalidArgumentError(
                f"--from-image {path} holds no far-sdk settings (write images with far generate --out-dir)"
            )
        try:
            d = json.loads(text[SETTINGS_KEY])
            if d.pop("version") != SETTINGS_VERSION:
                raise ValueError("unknown settings version")
            s = cls(**{k: d[k] for k in cls.__dataclass_fields__})
            cond = dict(s.conditioning)
            negative = cond.pop("negative_prompt", None)  # text bundles: one per image, beside "prompt"
            (kind, labels), *more = cond.items()
            bad_negative = negative is not None and (
                kind != "prompt" or not isinstance(negative, list) or len(negative) != len(labels)
            )
            if more or bad_negative or kind not in ("class_labels", "prompt") or not isinstance(labels, list):
                raise ValueError(f"conditioning {s.conditioning!r}")
            ints = (s.seed, s.index, s.scale)
            if not all(type(v) is int and v >= 0 for v in ints) or s.index >= len(labels) or s.scale < 1:
                raise ValueError(f"seed, index, scale {ints}")
            if not isinstance(s.options, dict) or not isinstance(s.bundle, str):
                raise ValueError("options or bundle")
            return s
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise InvalidArgumentError(f"--from-image {path}: unreadable far-sdk settings ({e})") from e


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-") or "x"


def image_name(settings: Settings, label: int | str, id2label: dict[int, str]) -> str:
    """``class207-golden-retriever_seed12.png`` (``class7_seed3.png`` when the name is the id) /
    ``prompt-please-draw-a-5_seed0.png``."""
    if "prompt" in settings.conditioning:
        stem = f"prompt-{_slug(str(label))}"
    else:
        name = id2label.get(label)
        stem = f"class{label}" + (f"-{_slug(name)}" if name and name != str(label) else "")
    return f"{stem}_seed{settings.seed + settings.index}.png"


def encode_png(image: Any, settings: Settings, extra: dict[str, Any]) -> bytes:
    """The PNG bytes of ``image`` (enlarged by ``settings.scale``) with the settings as text."""
    buf = io.BytesIO()
    enlarge(image, settings.scale).save(
        buf, format="PNG", pnginfo=png_text_chunks({SETTINGS_KEY: settings.to_json(extra), "Software": "far-sdk"})
    )
    return buf.getvalue()
