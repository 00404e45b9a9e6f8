"""The distilled few-step denoiser's preconditions (``inner_sampler="distilled"``, ``preset="distilled"``)."""

from __future__ import annotations

from far_sdk.backends.base import Backend
from far_sdk.bundle.bundle import Bundle
from far_sdk.bundle.graphs import DENOISER_FEWSTEP
from far_sdk.errors import BackendUnavailableError, MissingGraphError


def check_fewstep(bundle: Bundle, backend: Backend) -> None:
    """inner_sampler "distilled" needs the bundle's few-step graph and a backend that runs it."""
    if bundle.graph_entry(DENOISER_FEWSTEP) is None:
        raise MissingGraphError(
            f"bundle {bundle.name!r} has no distilled few-step denoiser (graph {DENOISER_FEWSTEP!r}): make "
            f"one with `far-train distill --bundle {bundle.path} --out RUN`, then `far-export fewstep "
            f"{bundle.path} --student RUN/student.safetensors`; or use preset 'fast'"
        )
    if not backend.runs_fewstep:
        raise BackendUnavailableError(
            f"the {backend.name} backend ({backend.device}) does not run the distilled few-step denoiser "
            f"(inner_sampler 'distilled', preset 'distilled'); use backend 'onnxruntime' or 'torch'"
        )
