"""The torch backend's fast path, apart from its buffers (:mod:`~far_sdk.backends.torch.state`) and graphs
(:mod:`~far_sdk.backends.torch.graphs`): where it runs (:func:`resolve_device`) and the inner step as the loop
calls it, compiled by ``torch.compile`` (Inductor) into a few fused kernels when asked (:func:`step_functions`).
No torch or ``training`` import here: the backend passes its torch module and the modules in."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from far_sdk.backends.torch.graphs import compile_failure
from far_sdk.bundle.hub import cache_dir
from far_sdk.errors import BackendUnavailableError, InvalidArgumentError

log = logging.getLogger(__name__)


DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def check_options(precision: Any, max_cuda_graphs: Any, compile: Any) -> None:
    """The torch backend's own options, checked before any model is loaded (InvalidArgumentError)."""
    if precision not in DTYPES:
        raise InvalidArgumentError(f"precision must be one of {sorted(DTYPES)}, got {precision!r}")
    if isinstance(max_cuda_graphs, bool) or not isinstance(max_cuda_graphs, int) or max_cuda_graphs < 1:
        raise InvalidArgumentError(f"max_cuda_graphs must be a positive integer, got {max_cuda_graphs!r}")
    if compile not in (True, False, "auto"):
        raise InvalidArgumentError(f"compile must be True, False or 'auto', got {compile!r}")


def import_torch() -> Any:
    try:
        import torch  # noqa: PLC0415 - PyTorch is optional for the runtime: loaded when used
    except ImportError as e:
        raise BackendUnavailableError(
            "backend 'torch' needs PyTorch: pip install torch (and far-sdk's training package)"
        ) from e
    return torch


def compile_cache() -> Path:
    """Point Inductor's on-disk caches (FX graphs, autotuning, kernels) at ``<far-sdk cache>/inductor`` unless
    ``TORCHINDUCTOR_CACHE_DIR`` is set: its default lives in /tmp, which a reboot clears, so a server restarted
    later would compile again (9 to 22 s per batch size)."""
    path = Path(os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "inductor")))
    path.mkdir(parents=True, exist_ok=True)
    return path


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
    (fullgraph) when ``compiled``. ``fused`` is the :class:`training.graph_modules.FusedDenoiserStep`; a step takes
    its adaLN modulations (a row of ``fused.modulation_table``, computed before the loop: :func:`table_steps`)."""

    def step_seeded(x, mods, step, seeds, pos):
        """One inner step whose noise is drawn on the device (positions pos.. of each seed's stream)."""
        noise = draw(seeds, pos, values_per_image).reshape(x.shape)  # (B, L, C) fp32
        return fused.step_with_modulations(x, noise, mods, step)

    def step_host(x, noise, mods, step):
        return fused.step_with_modulations(x, noise, mods, step)

    if not compiled:
        return step_seeded, step_host, draw
    return (
        torch.compile(step_seeded, fullgraph=True),
        torch.compile(step_host, fullgraph=True),
        torch.compile(draw, fullgraph=True),  # x_T: one kernel instead of a few hundred
    )


#: Largest adaLN modulation table computed at once (bytes): a whole outer step's at small batches (FAR-L, batch 1:
#: 11.5 MB per step in bf16), one step at a time at batch 64.
TABLE_BYTES = 512 << 20


def table_steps(n: int, rows: int, width: int, itemsize: int) -> int:
    """Steps per modulation table: as many of the n as fit in :data:`TABLE_BYTES` (at least one)."""
    return max(1, min(n, TABLE_BYTES // max(1, rows * width * itemsize)))


class FastDecoder:
    """The VAE decoder as the fast path runs it on CUDA with bf16 networks: a bf16, channels-last copy compiled by
    ``torch.compile`` (bf16 has fp32's range, so it does not overflow as fp16 decoders do). ``__call__`` returns
    None when compiling it fails (logged once): the caller then decodes with its fp32 module."""

    def __init__(self, torch: Any, module: Any):
        import copy  # noqa: PLC0415 - only for this copy

        self._torch, self.failed = torch, False
        low = copy.deepcopy(module).to(dtype=torch.bfloat16, memory_format=torch.channels_last).eval()
        self._module = torch.compile(low, dynamic=False)

    def __call__(self, latents: Any) -> Any:
        if self.failed:
            return None
        torch = self._torch
        z = latents.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        try:
            return self._module(z).float()
        except Exception as e:
            if not compile_failure(e):
                raise
            log.warning("compiling the bf16 VAE decoder failed (%s); decoding in fp32", str(e).splitlines()[0])
            self.failed = True
            return None
