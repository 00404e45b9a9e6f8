"""PyTorch backend: runs the bundle's weights through the same graph modules the ONNX graphs were
exported from. Imports torch and ``training`` only when chosen."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..bundle import Bundle
from ..errors import BackendUnavailableError, BundleError
from .base import Backend

_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _import_torch():
    try:
        import torch
    except ImportError as e:
        raise BackendUnavailableError("backend 'torch' needs PyTorch: pip install torch (and far-sdk's training package)") from e
    return torch


class TorchBackend(Backend):
    """``device``: "cpu", "cuda", "cuda:N" or "auto"; ``precision``: "fp32" | "bf16" | "fp16" (the VAE stays fp32)."""

    name = "torch"

    def __init__(self, bundle: Bundle, *, device: str = "auto", precision: str = "fp32", threads: int | None = None):
        super().__init__(bundle)
        torch = _import_torch()
        self._torch = torch
        from safetensors.torch import load_file

        from training.config import FARConfig
        from training.far import FAR
        from training.graph_modules import DenoiserGraph, TransformerGraph, VAEDecoderGraph
        from training.vae import AutoencoderKL, VAEConfig

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendUnavailableError("backend 'torch' with device 'cuda' needs a CUDA build of PyTorch and a GPU; use device='cpu'")
        if precision not in _DTYPES:
            raise BackendUnavailableError(f"precision must be one of {sorted(_DTYPES)}, got {precision!r}")
        if threads:
            torch.set_num_threads(int(threads))
        self._device = torch.device(device)
        self._precision = precision
        self._dtype = getattr(torch, _DTYPES[precision])

        m = bundle.manifest
        state = load_file(str(bundle.file("weights.safetensors")))
        far_sd = {k[4:]: v for k, v in state.items() if k.startswith("far.")}
        vae_sd = {k[4:]: v for k, v in state.items() if k.startswith("vae.")}
        with torch.device("meta"):
            far = FAR(FARConfig.from_dict(m["model"]))
            vae = AutoencoderKL(VAEConfig.from_dict(m["vae"]))
        try:
            far.load_state_dict(far_sd, strict=True, assign=True)
            missing, unexpected = vae.load_state_dict(vae_sd, strict=False, assign=True)
        except RuntimeError as e:
            raise BundleError(f"{bundle.path}/weights.safetensors does not match the manifest's model config: {str(e).splitlines()[0]}") from e
        bad = [k for k in missing if k.startswith(("decoder.", "post_quant_conv."))]
        if bad or unexpected:
            raise BundleError(f"{bundle.path}/weights.safetensors: VAE decoder keys missing {bad[:5]} / unexpected {unexpected[:5]}")
        far.eval()
        vae.eval()
        dev, dt = self._device, self._dtype
        self._graphs = {
            "transformer": TransformerGraph(far).to(dev, dt).eval(),
            "denoiser": DenoiserGraph(far.diffloss.net).to(dev, dt).eval(),
            # fp16 VAE decoders overflow in many projects: the decoder always runs in fp32.
            "vae_decoder": VAEDecoderGraph(vae, float(m["latent_scale"])).to(dev, torch.float32).eval(),
        }

    @property
    def device(self) -> str:
        return str(self._device)

    @property
    def precision(self) -> str:
        return self._precision

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["torch"] = self._torch.__version__
        return d

    def synchronize(self) -> None:
        if self._device.type == "cuda":
            self._torch.cuda.synchronize(self._device)

    def _t(self, a: np.ndarray, dtype=None):
        t = self._torch.from_numpy(np.ascontiguousarray(a)).to(self._device)
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        mod = self._graphs[graph]
        dt = torch.float32 if graph == "vae_decoder" else self._dtype
        with torch.inference_mode():
            # the step vector (timestep, coefficients) always stays fp32
            out = mod(*(self._t(feeds[n], torch.float32 if n == "step" else dt) for n in mod.input_names))
        name = mod.output_names[0]
        return {name: out.float().cpu().numpy()}

    # Keep cond and x on the device through the inner loop (one host copy in, one out).
    def transformer(self, tokens, class_ids, level):
        torch = self._torch
        with torch.inference_mode():
            lv = torch.tensor([float(level)], device=self._device, dtype=self._dtype)
            return self._graphs["transformer"](self._t(tokens, self._dtype), self._t(class_ids), lv)

    def denoise(self, x, noises, cond, steps):
        torch = self._torch
        B = x.shape[0]
        mod = self._graphs["denoiser"]
        with torch.inference_mode():
            xt = self._t(x, self._dtype)
            nz = self._t(noises, self._dtype)
            st = self._t(steps, torch.float32)  # timestep and coefficients stay fp32
            c2 = cond.reshape(2, B, *cond.shape[1:])
            for i in range(st.shape[0]):
                xt = mod(xt, nz[i], c2, st[i])
            return xt.float().cpu().numpy()

    def close(self) -> None:
        self._graphs.clear()
