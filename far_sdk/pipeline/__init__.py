"""The FAR sampling loop and ``far_sdk.Generator`` (:mod:`far_sdk.pipeline.generator`), what it returns
(:mod:`far_sdk.pipeline.outputs`) and how it batches (:mod:`far_sdk.pipeline.batching`)."""

from far_sdk.pipeline.generator import Generator
from far_sdk.pipeline.outputs import OUTPUT_TYPES, PREVIEWS, STAGES, GenerationOutput, OutputType, StepInfo

__all__ = ["OUTPUT_TYPES", "PREVIEWS", "STAGES", "GenerationOutput", "Generator", "OutputType", "StepInfo"]
