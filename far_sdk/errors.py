"""Typed errors raised by far-sdk.

Every error is raised where bad input enters and says what was expected, what was
found and what to do. All derive from :class:`FarError`, so applications can catch
one class; each also derives from the closest builtin (``ValueError``,
``FileNotFoundError``, ...) so generic handlers keep working.
"""

from __future__ import annotations


class FarError(Exception):
    """Base class of every error raised by far-sdk."""


class InvalidArgumentError(FarError, ValueError):
    """An argument is outside its allowed values (class id, step count, cfg, ...)."""


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


class BackendUnavailableError(FarError, RuntimeError):
    """The requested backend's runtime (tensorrt, onnxruntime, torch, a GPU) is not installed or usable."""


class EngineProfileError(FarError, ValueError):
    """A request lies outside what a built engine supports (e.g. a batch beyond its profile)."""


class ExportError(FarError, RuntimeError):
    """Exporting a model failed, or the exported graph disagrees with PyTorch beyond tolerance."""


class NumericalError(FarError, FloatingPointError):
    """A sampler produced non-finite values (NaN or infinity), e.g. from NaN noise or weights."""
