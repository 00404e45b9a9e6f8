"""The torch backend's fast path, apart from its buffers (:mod:`~far_sdk.backends.torch.state`) and graphs
(:mod:`~far_sdk.backends.torch.graphs`): where it runs (:func:`resolve_device`) and the inner step as the loop
calls it, compiled by ``torch.compile`` (Inductor) into a few fused kernels when asked (:func:`step_functions`).
No torch or ``training`` import here: the backend passes its torch module and the modules in."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from far_sdk.errors import BackendUnavailableError, InvalidArgumentError


def resolve_device(torch: Any, device: Any) -> str:
    """ "auto" | "cpu" | "cuda" | "cuda:N" -> "cpu" or "cuda:N"; BackendUnavailableError when CUDA is asked for but
    absent (or the index is not visible)."""
    if not isinstance(device, str) or not (device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", device)):
        raise InvalidArgumentError(f"torch backend device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise BackendUnavailableError(
                f"backend 'torch' with device {device!r} needs a CUDA build of PyTorch and a GPU (this torch "
                f"{torch.__version__} sees none); use device='cpu'"
            )
        index = int(device[5:]) if ":" in device else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise BackendUnavailableError(
                f"backend 'torch': CUDA device {index} requested, {torch.cuda.device_count()} "
                "visible (check CUDA_VISIBLE_DEVICES)"
            )
        device = f"cuda:{index}"
    return device


def step_functions(
    torch: Any, fused: Any, draw: Callable, values_per_image: int, compiled: bool
) -> tuple[Callable, Callable, Callable]:
    """(step_seeded, step_host, draw): one inner step drawing its noise on the device, one taking uploaded noise,
    and the Philox draw itself (``training.torch_noise.philox_normals_torch``); each ``torch.compile``-d
    (fullgraph) when ``compiled``. ``fused`` is the :class:`training.graph_modules.FusedDenoiserStep`."""

    def step_seeded(x, cond, temb, step, seeds, pos):
        """One inner step whose noise is drawn on the device (positions pos.. of each seed's stream)."""
        noise = draw(seeds, pos, values_per_image).reshape(x.shape)  # (B, L, C) fp32
        return fused(x, noise, cond, temb, step)

    def step_host(x, noise, cond, temb, step):
        return fused(x, noise, cond, temb, step)

    if not compiled:
        return step_seeded, step_host, draw
    return (
        torch.compile(step_seeded, fullgraph=True),
        torch.compile(step_host, fullgraph=True),
        torch.compile(draw, fullgraph=True),  # x_T: one kernel instead of a few hundred
    )
