"""Safe reading of PyTorch pickle checkpoints (``.pth``, ``.ckpt``).

Never unpickles arbitrary objects: ``torch.load(weights_only=True)`` with at most the
globals a caller names for that one call (the official FAR checkpoint needs
``argparse.Namespace`` for its ``args`` entry). A file that fails the safe load is
rejected; there is no unsafe fallback.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from far_sdk.errors import CheckpointError


def safe_torch_load(path: str | os.PathLike, allowed_globals: Iterable[type] = ()) -> Any:
    """Load a torch pickle with ``weights_only=True``, mapping tensors to CPU.

    Raises :class:`CheckpointError` naming the file for a missing, empty, truncated
    or corrupted file, or one that holds objects beyond ``allowed_globals``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a file")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): re-download or re-save it")
    if zipfile.is_zipfile(path):
        # torch.load does not check the zip members' CRCs: a flipped bit loads silently.
        try:
            with zipfile.ZipFile(path) as zf:
                bad = zf.testzip()
        except (zipfile.BadZipFile, OSError) as e:
            raise CheckpointError(
                f"checkpoint {path} is not a readable zip archive ({e}): it is probably truncated"
            ) from e
        if bad is not None:
            raise CheckpointError(f"checkpoint {path} is corrupted: member {bad!r} fails its CRC check")
    allowed = list(allowed_globals)
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except EOFError as e:
        raise CheckpointError(f"checkpoint {path} ends early ({size} bytes): it is truncated") from e
    except RuntimeError as e:
        msg = str(e)
        if "central directory" in msg or "PytorchStreamReader" in msg:
            raise CheckpointError(
                f"checkpoint {path} is truncated or not a torch checkpoint: {msg.splitlines()[0]}"
            ) from e
        raise CheckpointError(f"checkpoint {path} could not be read: {msg.splitlines()[0]}") from e
    except Exception as e:  # pickle.UnpicklingError for disallowed globals, among others
        first = _unsafe_reason(e)
        raise CheckpointError(
            f"checkpoint {path} could not be loaded safely (weights_only=True): {first}. "
            "far-sdk never unpickles arbitrary objects; re-save the file with plain tensors and dicts."
        ) from e


def _unsafe_reason(e: BaseException) -> str:
    """What torch's weights-only unpickler refused, without its advice to retry with ``weights_only=False``
    (which would run the file's code: never suggest it)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith("WeightsUnpickler error:"):
            reason = ln.removeprefix("WeightsUnpickler error:").strip()
            return (
                reason.split(". ")[0].rstrip(".") if "weights_only" in reason.split(". ", 1)[-1] else reason.rstrip(".")
            )
    safe = [ln for ln in lines if "weights_only" not in ln and "trust" not in ln.lower()]
    return (safe[0] if safe else type(e).__name__).rstrip(".")


def check_finite_state(state: Mapping[str, Any], *, source: str) -> None:
    """Refuse NaN or inf in any floating-point tensor of ``state`` (a corrupted or diverged checkpoint)."""
    nonfinite = [
        k
        for k, v in state.items()
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())
    ]
    if nonfinite:
        raise CheckpointError(
            f"{source} has NaN or inf values in {_short(nonfinite)}: the file is corrupted or the run diverged; "
            "use an earlier checkpoint or re-download it"
        )


def check_state_dict(
    state: Mapping[str, Any],
    expected: Mapping[str, torch.Size | tuple[int, ...]],
    *,
    source: str,
    ignore_unexpected: Iterable[str] = (),
) -> None:
    """Check names and shapes of ``state`` against ``expected`` before anything is built.

    Raises :class:`CheckpointError` listing the missing keys, the unexpected keys (those
    not starting with one of ``ignore_unexpected``) and the shape mismatches.
    """
    ignore = tuple(ignore_unexpected)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected and not (ignore and k.startswith(ignore))]
    shape_bad = []
    not_tensor = []
    for k, shape in expected.items():
        if k not in state:
            continue
        v = state[k]
        if not isinstance(v, torch.Tensor) or v.layout != torch.strided or not v.is_floating_point():
            not_tensor.append(k)
        elif tuple(v.shape) != tuple(shape):
            shape_bad.append(f"{k}: file {tuple(v.shape)} vs model {tuple(shape)}")
    if missing or unexpected or shape_bad or not_tensor:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_short(unexpected)}")
        if shape_bad:
            parts.append(f"shape mismatches ({len(shape_bad)}): {_short(shape_bad)}")
        if not_tensor:
            parts.append(f"not dense float tensors: {_short(not_tensor)}")
        raise CheckpointError(
            f"{source} does not match the model: "
            + "; ".join(parts)
            + ". Check that the file and the model config (or preset name) belong together."
        )


def _short(items: list[str], n: int = 8) -> str:
    shown = ", ".join(items[:n])
    return shown + (f", ... (+{len(items) - n} more)" if len(items) > n else "")
