"""Reading ``weights.safetensors`` so that a malformed file is a typed error, never a library's raw one.

The format (https://github.com/huggingface/safetensors): 8 bytes little-endian ``N``, then ``N`` bytes of
UTF-8 JSON that begin with ``{`` (trailing spaces allowed as padding), then the data. The header maps
each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the data)
and may hold one ``"__metadata__"`` map of strings. The tensors' byte ranges must tile the data
exactly: sorted by offset, each begins where the previous one ends, the first at 0, the last at the
end of the file, and each is ``prod(shape) * itemsize`` long.

:func:`check_safetensors` checks all of that from the header alone (NumPy only, no torch), including
what the safetensors library lets through (leading whitespace, duplicate keys). :func:`load_torch_state`
then loads the checked file with safetensors and refuses NaN/inf weights, naming the tensor.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any

from far_sdk.bundle.manifest import no_duplicate_keys
from far_sdk.errors import BundleError, FarError

#: The safetensors library's own limit on the header.
MAX_HEADER_BYTES = 100_000_000
ITEMSIZE = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
_FLOATS = ("F16", "BF16", "F32", "F64")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_safetensors(path: str | os.PathLike, *, error: type[FarError] = BundleError) -> dict[str, dict[str, Any]]:
    """Check the header and layout of the safetensors file at ``path``; return its tensor entries.

    Raises ``error`` (default :class:`BundleError`) naming the file and what is wrong.
    """
    path = Path(path)

    def bad(why: str) -> FarError:
        return error(f"{path} is not a valid safetensors file: {why}. Re-export or re-copy it")

    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise bad(f"{size} bytes, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES:
                raise bad(f"its header claims {n} bytes (at most {MAX_HEADER_BYTES})")
            if n > size - 8:
                raise bad(f"its header claims {n} bytes but the file has {size - 8} after the length")
            raw = f.read(n)
    except OSError as e:
        raise error(f"cannot read {path}: {e.strerror or e}") from e
    if raw[:1] != b"{":
        raise bad("the header does not begin with '{' (leading bytes or whitespace are not allowed)")
    try:
        header = json.loads(
            raw.rstrip(b" ").decode("utf-8"),
            object_pairs_hook=no_duplicate_keys,
            parse_constant=lambda c: (_ for _ in ()).throw(ValueError(f"{c} in the header")),
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise bad(f"its header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise bad("__metadata__ is not a map of strings")
    data_len = size - 8 - n
    spans = []
    for name, t in header.items():
        if not isinstance(t, dict) or set(t) != {"dtype", "shape", "data_offsets"}:
            raise bad(f"tensor {name!r} must have exactly dtype, shape and data_offsets")
        dtype, shape, offs = t["dtype"], t["shape"], t["data_offsets"]
        if dtype not in ITEMSIZE:
            raise bad(f"tensor {name!r} has unknown dtype {str(dtype)[:20]!r}")
        if not isinstance(shape, list) or len(shape) > 16 or not all(_is_int(d) and 0 <= d < 2**62 for d in shape):
            raise bad(f"tensor {name!r} has an invalid shape {str(shape)[:60]}")
        if not (
            isinstance(offs, list) and len(offs) == 2 and all(_is_int(o) for o in offs) and 0 <= offs[0] <= offs[1]
        ):
            raise bad(f"tensor {name!r} has invalid data_offsets {str(offs)[:60]}")
        nbytes = math.prod(shape) * ITEMSIZE[dtype]
        if offs[1] - offs[0] != nbytes:
            raise bad(f"tensor {name!r} spans {offs[1] - offs[0]} bytes, its dtype and shape need {nbytes}")
        if offs[1] > data_len:
            raise bad(f"tensor {name!r} ends at byte {offs[1]} of a {data_len}-byte data section")
        spans.append((offs[0], offs[1], name))
    pos = 0
    for begin, end, name in sorted(spans):
        if begin != pos:
            raise bad(
                f"tensor {name!r} begins at byte {begin}, expected {pos} ("
                + ("overlapping tensors" if begin < pos else "a gap")
                + ")"
            )
        pos = end
    if pos != data_len:
        raise bad(f"its tensors cover {pos} of {data_len} data bytes ({data_len - pos} trailing bytes)")
    return header


def load_torch_state(
    path: str | os.PathLike, *, error: type[FarError] = BundleError, finite: bool = True
) -> dict[str, Any]:
    """:func:`check_safetensors`, then load the tensors on CPU with safetensors and (``finite``) refuse
    NaN/inf in floating-point tensors."""
    header = check_safetensors(path, error=error)
    from safetensors import SafetensorError  # noqa: PLC0415 - loaded when the weights are read
    from safetensors.torch import load_file  # noqa: PLC0415 - loaded when the weights are read

    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise error(f"{path} could not be read by safetensors: {' '.join(str(e).split())[:200]}") from e
    if not finite:
        return state
    import torch  # noqa: PLC0415 - PyTorch is optional for the runtime: loaded when used

    bad = [k for k, t in state.items() if header[k]["dtype"] in _FLOATS and not bool(torch.isfinite(t).all())]
    if bad:
        raise error(
            f"{path} has NaN or inf values in tensor {bad[0]!r}"
            + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")
            + ": the weights are corrupted or diverged. Re-export the bundle from a good checkpoint"
        )
    return state
