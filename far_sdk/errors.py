"""Typed errors raised by far-sdk.

Every error is raised where bad input enters and says what was expected, what was
found and what to do. All derive from :class:`FarError`, so applications can catch
one class; each also derives from the closest builtin (``ValueError``,
``FileNotFoundError``, ...) so generic handlers keep working.
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import math
from collections.abc import Iterable, Iterator, Mapping

import numpy as np


class FarError(Exception):
    """Base class of every error raised by far-sdk."""


class InvalidArgumentError(FarError, ValueError):
    """An argument is outside its allowed values (class id, step count, cfg, ...)."""


class DataError(InvalidArgumentError):
    """An input data file or folder (cached latents, an image tree) is missing, unreadable or malformed."""


class CheckpointError(FarError, ValueError):
    """A checkpoint file is unreadable, truncated, unsafe or does not match the model."""


class ConfigError(FarError, ValueError):
    """A model configuration cannot be determined or is inconsistent."""


class BundleError(FarError, ValueError):
    """A bundle directory is incomplete, corrupted or was written by an incompatible version."""


class BundleNotFoundError(BundleError, FileNotFoundError):
    """The bundle directory or one of its files does not exist."""


class IntegrityError(BundleError):
    """A file's size or sha256 differs from the one recorded in the manifest."""


class IncompatibleBundleError(BundleError):
    """The bundle (or engine plan) was built for another format version, runtime or GPU."""


class MissingEncoderError(IncompatibleBundleError, InvalidArgumentError):
    """An image input (image-to-image) needs the bundle's optional ``vae_encoder`` graph, which it does not carry."""


class MissingGraphError(IncompatibleBundleError, InvalidArgumentError):
    """A sampling option needs an optional graph the bundle lacks (``preset="distilled"`` without
    ``denoiser_fewstep``): the bundle is fine, the request is not for it (``far serve``: HTTP 400)."""


class BackendUnavailableError(FarError, RuntimeError):
    """The requested backend's runtime (tensorrt, onnxruntime, torch, a GPU) is not installed or usable."""


class CompileError(BackendUnavailableError):
    """Compiling a stage failed (``torch.compile`` / Inductor): not a CUDA-graph capture failure. Retry with
    ``compile=False``, or install the compiler toolchain the error names."""


class EngineProfileError(FarError, ValueError):
    """A request lies outside what a built engine supports (e.g. a batch beyond its profile)."""


class ExportError(FarError, RuntimeError):
    """Exporting a model failed, or the exported graph disagrees with PyTorch beyond tolerance."""


class NumericalError(FarError, ArithmeticError):
    """An array that must be finite holds NaN or inf (noise, weights, latents after an outer step)."""

    def __init__(self, message: str, *, step: int | None = None):
        super().__init__(message)
        self.step = step


class DeviceOutOfMemoryError(FarError, MemoryError):
    """A backend ran out of host or device memory for the requested batch (lower max_batch or the batch size)."""


class HubError(FarError, OSError):
    """A file could not be fetched from the Hugging Face Hub (no connection and not cached, offline mode, a server
    error), or huggingface_hub is not installed. A repository, revision or file that does not exist is an
    :class:`InvalidArgumentError` naming it."""


class GeneratorClosedError(FarError, RuntimeError):
    """A :class:`~far_sdk.Generator` was used after :meth:`~far_sdk.Generator.close`."""


# ---- naming a parameter in a message ----------------------------------------------------------------
# One wording per rule, spelled for its reader: a Python caller reads ``inner_sampler='ddim'``, a command-line user
# ``--inner-sampler ddim``. A message names a parameter through arg(); the CLIs set the flags (spelled_as).

_FLAGS: contextvars.ContextVar[Mapping[str, str] | None] = contextvars.ContextVar("far_sdk_flags", default=None)
_ANY = object()


def arg(name: str, value: object = _ANY) -> str:
    """Parameter ``name`` (given ``value``) as an error message names it: ``name=value`` (``name`` alone without a
    value) for Python callers; inside :func:`spelled_as`, its command-line flag (``--inner-sampler ddim``)."""
    flags = _FLAGS.get()
    if flags is not None and name in flags:
        if value is _ANY:
            return flags[name]
        shown = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
        return f"{flags[name]} {shown}"
    return name if value is _ANY else f"{name}={value!r}"


@contextlib.contextmanager
def spelled_as(flags: Mapping[str, str]) -> Iterator[None]:
    """Within the block, :func:`arg` names the parameters in ``flags`` (name -> flag) by their flags."""
    token = _FLAGS.set(flags)
    try:
        yield
    finally:
        _FLAGS.reset(token)


def closest(name: object, choices: Iterable[str]) -> str | None:
    """The choice closest to ``name`` (difflib's ratio >= 0.6), or None."""
    close = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.6)
    return close[0] if close else None


def did_you_mean(name: object, choices: Iterable[str]) -> str:
    """`` (did you mean 'X'?)`` for the choice closest to ``name``, or ``""`` when none is close."""
    close = closest(name, choices)
    return f" (did you mean {close!r}?)" if close else ""


def check_finite(array, what: str, *, step: int | None = None) -> None:
    """Raise :class:`NumericalError` if ``array`` (NumPy or array-like) holds NaN or inf.

    ``what`` names the array in the message ("latents", "noise draw 3", ...); ``step`` is the
    0-based outer step, reported as "after outer step N". One pass over the array (a reduction
    of ``isfinite``), cheap next to a network call.
    """
    a = np.asarray(array)
    if a.dtype.kind not in "fc" or bool(np.isfinite(a).all()):
        return
    n_nan = int(np.isnan(a).sum())
    n_inf = int(a.size - n_nan - np.isfinite(a).sum())
    where = f" after outer step {step}" if step is not None else ""
    raise NumericalError(
        f"{what}{where} holds non-finite values ({n_nan} NaN, {n_inf} inf of {a.size}); the weights, noise or "
        "settings (cfg, temperature, x0_clip) produce a diverging sample",
        step=step,
    )


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices``; else :class:`InvalidArgumentError` naming them."""
    if not isinstance(value, str) or value not in choices:
        raise InvalidArgumentError(
            f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}{did_you_mean(value, choices)}"
        )
    return value


def check_range(
    name: str, value: object, lo: float | None, hi: float | None, *, lo_open: bool = False, integer: bool = False
) -> float | int:
    """``value`` if it is a finite number (an integer with ``integer``) in [lo, hi] ((lo, hi] with ``lo_open``)."""
    kinds = (int, np.integer) if integer else (int, float, np.integer, np.floating)
    ok = not isinstance(value, bool) and isinstance(value, kinds) and math.isfinite(value)
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value <= hi
    if not ok:
        if integer and lo is not None and hi is not None:
            want = f"an integer in {lo:g}..{hi:g}"
        elif lo is not None and hi is not None:
            want = f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}]"
        else:
            bound = "" if lo is None else (f" > {lo:g}" if lo_open else f" >= {lo:g}")
            bound += "" if hi is None else f"{' and' if bound else ''} <= {hi:g}"
            want = ("an integer" if integer else "a finite number") + bound
        raise InvalidArgumentError(f"{name} must be {want}, got {value!r}")
    return value


# ---- exit codes ------------------------------------------------------------------------------------
# One table for the three commands (far, far-export, far-train): the same kind of failure ends every
# command with the same status, and prints one line on stderr.

EXIT_OK = 0
EXIT_INTERNAL = 1  #: a bug: an exception far-sdk did not expect (one line; FAR_TRACEBACK=1 shows the traceback)
EXIT_USAGE = 2  #: bad arguments or options, including output paths that cannot be written
EXIT_INPUT = 3  #: a bad input file: bundle, checkpoint, data, engine plan
EXIT_RUNTIME = (
    4  #: a failure while running: backend unavailable, export/validation failed, non-finite values, I/O error
)
EXIT_INTERRUPTED = 130  #: Ctrl-C (SIGINT)

#: exception class -> exit status; the first class in this order that matches wins.
EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (DataError, EXIT_INPUT),
    (InvalidArgumentError, EXIT_USAGE),
    (EngineProfileError, EXIT_USAGE),
    (BundleError, EXIT_INPUT),
    (CheckpointError, EXIT_INPUT),
    (ConfigError, EXIT_INPUT),
    (BackendUnavailableError, EXIT_RUNTIME),
    (ExportError, EXIT_RUNTIME),
    (NumericalError, EXIT_RUNTIME),
    (DeviceOutOfMemoryError, EXIT_RUNTIME),
    (GeneratorClosedError, EXIT_RUNTIME),
    (FarError, EXIT_RUNTIME),
    (OSError, EXIT_RUNTIME),
)


def exit_code_for(exc: BaseException) -> int:
    """The documented exit status for ``exc`` (see :data:`EXIT_CODES`)."""
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    for cls, code in EXIT_CODES:
        if isinstance(exc, cls):
            return code
    return EXIT_INTERNAL
