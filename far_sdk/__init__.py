"""far-sdk: fast, verifiable inference for FAR image generation.

``import far_sdk`` is light: NumPy only. A backend imports its runtime (onnxruntime, tensorrt,
torch) only when it is chosen.
"""

from . import errors
from .bundle import Bundle
from .errors import FarError
from .noise import ReplayNoise, SeededNoise
from .options import SamplingOptions
from .pipeline import GenerationOutput, Generator, StepInfo

__version__ = "0.1.0"

__all__ = ["Bundle", "FarError", "GenerationOutput", "Generator", "ReplayNoise", "SamplingOptions", "SeededNoise", "StepInfo", "errors", "__version__"]
