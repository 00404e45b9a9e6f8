"""The official-way eager baseline as an ordinary backend: ``Generator(bundle, backend="torch-eager")``.

It does, per outer step, the work the official sampler does, in eager PyTorch fp32, so ``far bench``
times it through the same pipeline, stage marks and timers as every other backend:

- transformer: ``far.condition`` on the CFG batch [tokens; tokens] (the encoder/decoder only: the
  diffusion MLP's condition projection is not hoisted out of the inner loop);
- denoise: per inner step the whole diffusion MLP on [x; x] — the condition projections
  (``cond_embed``, ``index_cond_embed``) and the timestep embedding recomputed on every row, as the
  official ``DiffLoss.sample`` does — then the guided step (:func:`training.graph_modules.ddpm_update`);
- filter: the low-pass as a matrix product on the device (the official code's ``F.interpolate`` pair
  computes the same filter; its cost is negligible beside the other two stages);
- vae_decode: the decoder in fp32.

Numerically it is the reference sampler (:func:`training.sampler.iter_reference`): same draws, same
order, same step; tests hold the two together. It is created through the torch backend's module
(``far_sdk.backends.torch.backend.eager_backend``), the only place ``far_sdk`` reaches into ``training``.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from far_sdk.backends.base import Backend, HostDraws, LoopState, Mark, SeededDraws, check_backend_options
from far_sdk.bundle.bundle import Bundle
from far_sdk.errors import InvalidArgumentError

from .filters import low_pass_tokens
from .from_bundle import load_bundle_decoder, load_bundle_models
from .graph_modules import ddpm_update
from .sampler import official_mlp_call

log = logging.getLogger(__name__)


class OfficialEagerBackend(Backend):
    """``device``: "cpu", "cuda", "cuda:N" or "auto"; ``threads``: CPU intra-op threads; ``precision``: "fp16"
    (the transformer and the diffusion MLP under ``torch.autocast(dtype=float16)``, as the official evaluation
    runs sampling under ``torch.cuda.amp.autocast()`` in ``engine_far.py``), "fp32", or "auto" (default: fp16 on
    CUDA, the official way; fp32 on the CPU)."""

    name = "torch-eager"

    def __init__(
        self, bundle: Bundle, *, device: str = "auto", threads: int | None = None, precision: str = "auto", **other: Any
    ):
        super().__init__(bundle)
        check_backend_options(self.name, ("device", "threads", "precision"), other, log)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            self._device = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise InvalidArgumentError(
                f"torch-eager backend device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}"
            ) from e
        if threads:
            torch.set_num_threads(int(threads))
        if precision not in ("auto", "fp32", "fp16"):
            raise InvalidArgumentError(f"torch-eager precision must be 'auto', 'fp32' or 'fp16', got {precision!r}")
        self._precision = ("fp16" if self._device.type == "cuda" else "fp32") if precision == "auto" else precision
        far, vae = load_bundle_models(bundle)
        self._far = far.to(self._device)
        self._decoder = load_bundle_decoder(bundle, vae).to(self._device)
        # [class_emb; fake_latent]: row num_classes is the null class (the pipeline's class ids)
        self._emb_table = torch.cat([self._far.class_emb.weight, self._far.fake_latent]).detach()

    @property
    def device(self) -> str:
        return str(self._device)

    @property
    def precision(self) -> str:
        return self._precision

    def _autocast(self):
        """The official evaluation's mixed precision (fp16 autocast), or nothing in fp32."""
        on = self._precision == "fp16"
        return torch.autocast(device_type=self._device.type, dtype=torch.float16, enabled=on)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "work": "official: MLP condition and timestep embedding recomputed on every row at every inner step",
            "autocast": "float16" if self._precision == "fp16" else None,
        }

    def synchronize(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise InvalidArgumentError(
            "the torch-eager backend runs whole outer steps (Generator.generate), not single graph calls"
        )

    def begin(self, conditioning: dict[str, np.ndarray], batch: int, seq_len: int, channels: int) -> LoopState:
        ids = torch.from_numpy(np.ascontiguousarray(conditioning["class_ids"], dtype=np.int64)).to(self._device)
        tokens = torch.zeros(batch, seq_len, channels, device=self._device)
        return LoopState(
            conditioning=conditioning, batch=batch, tokens=tokens, raw=tokens, buffers=self._emb_table[ids]
        )  # (2B, D)

    @torch.inference_mode()
    def outer_step(
        self,
        state: LoopState,
        *,
        level: int,
        steps: np.ndarray,
        filter_matrix: np.ndarray | None,
        draws: HostDraws | SeededDraws,
        mark: Mark,
    ) -> None:
        far, dev = self._far, self._device
        tokens = state.tokens
        B, L, C = tokens.shape
        with self._autocast():
            z = far.condition(torch.cat([tokens, tokens]), state.buffers).reshape(2 * B * L, -1)  # (2BL, D)
        mark("transformer")
        n = int(steps.shape[0])
        host = draws if isinstance(draws, HostDraws) else draws.materialize(n, L, C)
        lvl = torch.full((2 * B * L, 1), float(level), device=dev)
        x = torch.from_numpy(np.ascontiguousarray(host.x)).to(dev).reshape(B * L, C)  # (BL, C): x_T
        noises = torch.from_numpy(np.ascontiguousarray(host.noises)).to(dev)  # (n, B, L, C)
        for i, row in enumerate(torch.from_numpy(np.ascontiguousarray(steps)).to(dev)):
            with self._autocast():  # the official loop: the whole step under autocast
                out = official_mlp_call(far.diffloss.net, x, z, lvl, row)  # (2BL, 2C)
                x = ddpm_update(out, x, noises[i].reshape(B * L, C), row)
        raw = x.reshape(B, L, C)
        mark("denoise")
        if filter_matrix is not None:
            tokens = low_pass_tokens(
                raw, torch.from_numpy(np.ascontiguousarray(filter_matrix, dtype=np.float32)).to(dev)
            )
        else:
            tokens = raw
        mark("filter")
        state.raw, state.tokens = raw, tokens

    def fetch(self, array: Any) -> np.ndarray:
        return array.to("cpu", dtype=torch.float32).numpy()  # host sync

    def all_finite(self, array: Any) -> bool:
        return bool(torch.isfinite(array).all())  # host sync

    @torch.inference_mode()
    def decode(self, latents: np.ndarray) -> np.ndarray:
        return (
            self._decoder(torch.from_numpy(np.ascontiguousarray(latents, dtype=np.float32)).to(self._device))
            .cpu()
            .numpy()
        )

    def close(self) -> None:
        self._far = self._decoder = None
