"""far-sdk: fast, verifiable inference for FAR image generation.

``import far_sdk`` is light: NumPy only. A backend imports its runtime (onnxruntime, tensorrt,
torch) only when it is chosen.
"""

from . import errors
from .errors import FarError

__version__ = "0.1.0"

__all__ = ["FarError", "errors", "__version__"]
