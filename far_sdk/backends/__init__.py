"""Backends run a bundle's graphs; the sampling loop (:mod:`far_sdk.pipeline`) is written once against
:class:`~far_sdk.backends.base.Backend`. :mod:`~far_sdk.backends.create` picks one by name; each runtime has its
module (``onnxruntime``) or folder (``torch/``, ``tensorrt/``)."""

from far_sdk.backends.base import Backend
from far_sdk.backends.create import BACKEND_NAMES, BACKENDS, create_backend

__all__ = ["BACKENDS", "BACKEND_NAMES", "Backend", "create_backend"]
