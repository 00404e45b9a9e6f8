"""Images in and out: decoded RGB to uint8 and PIL (as the official evaluation saves them), grids, and encoding
to the file formats the CLI writes. Pillow is imported on first use, so ``import far_sdk`` stays light."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from far_sdk.errors import InvalidArgumentError

#: File suffix -> Pillow format, for every image file far-sdk writes.
IMAGE_FORMATS = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".webp": "WEBP",
    ".bmp": "BMP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".gif": "GIF",
}
#: Still-image suffixes (every format but GIF, which the CLI keeps for the coarse-to-fine animation).
IMAGE_SUFFIXES = tuple(s for s in IMAGE_FORMATS if s != ".gif")


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3], as the official evaluation saves them
    (p = x/2 + 1/2; floor(clamp(255 p + 0.5, 0, 255)))."""
    p = images * 0.5 + 0.5
    return np.clip(255.0 * p + 0.5, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def to_pil(u8: np.ndarray) -> list:
    """uint8 [B, H, W, 3] -> a list of PIL images."""
    from PIL import Image  # noqa: PLC0415 - loaded on first image: `import far_sdk` stays light

    return [Image.fromarray(a) for a in u8]


def make_image_grid(images: Sequence[Any], cols: int | None = None, *, scale: int = 1) -> Any:
    """PIL images (all one size) pasted row by row into one RGB image on white, ``cols`` per row (default: up to 8),
    each enlarged ``scale`` times with nearest-neighbour sampling (small images stay crisp)."""
    from PIL import Image  # noqa: PLC0415 - loaded on first image: `import far_sdk` stays light

    images = list(images)
    if not images:
        raise InvalidArgumentError("make_image_grid needs at least one image")
    cols = cols or min(len(images), 8)
    images = [enlarge(im, scale) for im in images]
    w, h = images[0].size
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


def enlarge(image: Any, scale: int) -> Any:
    """``image`` ``scale`` times larger, nearest-neighbour (each pixel a scale x scale block: small images stay
    crisp); ``scale`` 1 returns it unchanged."""
    from PIL import Image  # noqa: PLC0415 - loaded on first image: `import far_sdk` stays light

    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise InvalidArgumentError(f"scale must be a positive integer, got {scale!r}")
    return image if scale == 1 else image.resize((image.width * scale, image.height * scale), Image.NEAREST)


def png_text_chunks(text: dict[str, str]) -> Any:
    """PNG text chunks (``encode_image(..., pnginfo=...)``): UTF-8 (iTXt) entries, read back by
    :func:`read_png_text`."""
    from PIL import PngImagePlugin  # noqa: PLC0415 - loaded on first image: `import far_sdk` stays light

    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        info.add_itxt(key, value)
    return info


def read_png_text(path: str | Path) -> tuple[Any, dict[str, str]]:
    """(the image, its PNG text entries) of a PNG file; InvalidArgumentError if it is not a readable PNG."""
    from PIL import Image, UnidentifiedImageError  # noqa: PLC0415 - loaded on first image: `import far_sdk` stays light

    try:
        with Image.open(path) as im:
            im.load()
            if im.format != "PNG":
                raise InvalidArgumentError(f"{path} is a {im.format} image; settings are stored in PNG files only")
            return im.copy(), dict(getattr(im, "text", {}))
    except (OSError, UnidentifiedImageError) as e:
        raise InvalidArgumentError(f"cannot read image {path}: {e}") from e


#: Largest side of an input image (image-to-image), checked from the header before any pixel is decoded.
MAX_IMAGE_SIDE = 4096


def read_image(source: str | Path | bytes, where: str) -> Any:
    """An input picture (a file path or the file's bytes: PNG, JPEG, WebP, ...) as an RGB PIL image;
    InvalidArgumentError naming ``where`` for anything unreadable or with a side over :data:`MAX_IMAGE_SIDE`."""
    import warnings  # noqa: PLC0415

    from PIL import Image  # noqa: PLC0415 - loaded on first image: `import far_sdk` stays light

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
                if max(im.size) > MAX_IMAGE_SIDE:
                    raise InvalidArgumentError(
                        f"{where}: an image of {im.size[0]} x {im.size[1]} pixels; at most {MAX_IMAGE_SIDE} a side"
                    )
                return im.convert("RGB")
    except InvalidArgumentError:
        raise
    except Exception as e:  # noqa: BLE001 - Pillow's decoders raise many types (OSError, SyntaxError, ...)
        raise InvalidArgumentError(f"{where}: not a readable image ({type(e).__name__}: {e})") from e


def encode_image(image: Any, path: str | Path, **save_options: Any) -> bytes:
    """The bytes of ``image`` in the format of ``path``'s suffix (write them atomically with far_sdk.fileio)."""
    fmt = IMAGE_FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise InvalidArgumentError(f"{path}: unsupported image type; use one of {', '.join(IMAGE_FORMATS)}")
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save_options)
    return buf.getvalue()
