"""far-sdk: fast, verifiable inference for FAR image generation.

``import far_sdk`` is light: NumPy only. A backend imports its runtime (onnxruntime, tensorrt,
torch) only when it is chosen.
"""

from far_sdk import errors
from far_sdk.bundle.bundle import Bundle
from far_sdk.errors import FarError
from far_sdk.images import make_image_grid
from far_sdk.maths.noise import ReplayNoise, SeededNoise
from far_sdk.options import SamplingOptions
from far_sdk.pipeline import GenerationOutput, Generator, StepInfo

__version__ = "0.1.0"

__all__ = [
    "Bundle",
    "FarError",
    "GenerationOutput",
    "Generator",
    "ReplayNoise",
    "SamplingOptions",
    "SeededNoise",
    "StepInfo",
    "errors",
    "make_image_grid",
    "__version__",
]
