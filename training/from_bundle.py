"""A bundle's weights as PyTorch modules: the one loader from ``weights.safetensors`` + manifest to models.

Used by the torch backend, ``far bench``'s eager baseline, the GPU checks, the parity report and the tests,
so every one of them reads the manifest's own weight prefixes the same way and fails the same way.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from far_sdk.bundle.bundle import Bundle
from far_sdk.bundle.graphs import VAE_ENCODER, VAE_ENCODER_WEIGHTS
from far_sdk.bundle.weights import load_torch_state
from far_sdk.errors import BundleError

from .config import FARConfig
from .config_t2i import T2IConfig
from .config_vae import VAEConfig
from .diffloss import SimpleMLPAdaLN
from .far import FAR
from .far_t2i import FART2I
from .graph_modules import VAEDecoderGraph, VAEEncoderGraph
from .vae import AutoencoderKL


def load_bundle_models(bundle: Bundle) -> tuple[FAR, AutoencoderKL]:
    """(FAR, VAE) in eval mode on the CPU, fp32, built on the meta device and given the bundle's tensors
    (checked by :meth:`Bundle.load_torch_weights`: header, layout, finite values). The FAR must match
    strictly; the VAE needs only its decode half (``decoder.``, ``post_quant_conv.``): bundles carry no encoder."""
    m = bundle.manifest
    prefixes: dict[str, Any] = m.get("weights", {}).get("prefixes", {"far": "far.", "vae": "vae."})
    state = bundle.load_torch_weights()
    pf, pv = prefixes["far"], prefixes["vae"]
    far_sd = {k[len(pf) :]: v for k, v in state.items() if k.startswith(pf)}
    vae_sd = {k[len(pv) :]: v for k, v in state.items() if k.startswith(pv)}
    with torch.device("meta"):
        if m.get("conditioning") == "text":
            far = FART2I(T2IConfig.from_dict(m["model"]))
        else:
            far = FAR(FARConfig.from_dict(m["model"]))
        vae = AutoencoderKL(VAEConfig.from_dict(m["vae"]))
    try:
        far.load_state_dict(far_sd, strict=True, assign=True)
        missing, unexpected = vae.load_state_dict(vae_sd, strict=False, assign=True)
    except RuntimeError as e:
        raise BundleError(
            f"{bundle.path}/weights.safetensors does not match the manifest's model config: {str(e).splitlines()[0]}"
        ) from e
    bad = [k for k in missing if k.startswith(("decoder.", "post_quant_conv."))]
    if bad or unexpected:
        raise BundleError(
            f"{bundle.path}/weights.safetensors: VAE decoder keys missing {bad[:5]} / unexpected {unexpected[:5]}"
        )
    return far.eval(), vae.eval()


def load_bundle_student(bundle: Bundle, net: SimpleMLPAdaLN) -> SimpleMLPAdaLN | None:
    """The bundle's distilled few-step student (manifest ``fewstep``, far-export fewstep) as a copy of ``net`` (the
    teacher's diffusion MLP: same architecture) holding the student's weights; None when the bundle has none."""
    fs = bundle.manifest.get("fewstep")
    if fs is None:
        return None
    state = load_torch_state(bundle.file(fs["student"]["file"]))
    student = copy.deepcopy(net)
    try:
        student.load_state_dict(state)  # strict; copied into the net's dtype and device
    except RuntimeError as e:
        raise BundleError(f"{bundle.path}/{fs['student']['file']} does not fit the bundle's denoiser: {e}") from e
    return student.eval()


def load_bundle_decoder(bundle: Bundle, vae: AutoencoderKL) -> VAEDecoderGraph:
    """The bundle's decode graph module (sampler-scale latents -> RGB) around ``vae``."""
    return VAEDecoderGraph(vae, bundle.latent_scale).eval()


def encoder_graphs(bundle: Bundle, vae: AutoencoderKL) -> dict[str, VAEEncoderGraph]:
    """{"vae_encoder": the bundle's encode graph module} (image in [-1, 1] -> sampler-scale posterior mean, std) with
    ``vae``'s encoder given the bundle's ``vae_encoder.safetensors`` (checked like the other weights); {} for a bundle
    without the optional graph."""
    if bundle.graph_entry(VAE_ENCODER) is None:
        return {}
    state = load_torch_state(bundle.file(VAE_ENCODER_WEIGHTS))
    enc = {k: v for k, v in state.items() if k.startswith(("encoder.", "quant_conv."))}
    try:
        missing, unexpected = vae.load_state_dict(enc, strict=False, assign=True)
    except RuntimeError as e:
        raise BundleError(
            f"{bundle.path}/{VAE_ENCODER_WEIGHTS} does not match the manifest's VAE config: {str(e).splitlines()[0]}"
        ) from e
    bad = [k for k in missing if k.startswith(("encoder.", "quant_conv."))]
    if bad or len(enc) != len(state):
        raise BundleError(
            f"{bundle.path}/{VAE_ENCODER_WEIGHTS}: encoder keys missing {bad[:5]} / unexpected "
            f"{sorted(set(state) - set(enc))[:5]}; re-export the bundle"
        )
    return {VAE_ENCODER: VAEEncoderGraph(vae, bundle.latent_scale).eval()}
