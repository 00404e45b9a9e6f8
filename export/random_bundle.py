"""Random-initialised models and bundles: the one place that makes them.

Used by ``far-export onnx --random-init``, ``scripts/gpu_check.py``, ``scripts/gpu_perf.py``,
``scripts/parity_report.py``, ``examples/demo.py`` and the test fixtures, so that "a random FAR-L
bundle" means the same weights everywhere: the official initialisation, then every parameter that
the official initialisation leaves at zero (adaLN modulations, the final layer, ``mask_token``) given
small random values (:func:`training.graph_modules.randomize_for_export`) so that the exported graphs
depend on every input. The VAE uses ``seed + 1``.

    far, vae = random_models("far_large", "kl16", seed=0)
    path = random_bundle("/tmp/far-large", "far_large", "kl16", reuse=True)   # exported once, then reused
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from far_sdk import __version__
from far_sdk.bundle.bundle import Bundle
from far_sdk.errors import FarError, InvalidArgumentError
from training.config import FARConfig, get_config
from training.config_vae import VAE_CONFIGS, VAEConfig
from training.far import FAR
from training.graph_modules import randomize_for_export
from training.vae import AutoencoderKL

from .onnx_export import export_bundle, random_init_source

log = logging.getLogger(__name__)


def _configs(model: str | FARConfig, vae_config: str | VAEConfig) -> tuple[FARConfig, VAEConfig]:
    cfg = get_config(model) if isinstance(model, str) else model  # ConfigError naming the presets
    if isinstance(vae_config, str):
        if vae_config not in VAE_CONFIGS:
            raise InvalidArgumentError(f"unknown VAE config {vae_config!r}; choose one of {sorted(VAE_CONFIGS)}")
        vae_config = VAE_CONFIGS[vae_config]
    return cfg, vae_config


def random_models(
    model: str | FARConfig = "far_tiny", vae_config: str | VAEConfig = "kl16-tiny", *, seed: int = 0
) -> tuple[FAR, AutoencoderKL]:
    """(FAR, AutoencoderKL) in eval mode with random weights: ``model`` a preset name
    (training.config.FAR_CONFIGS) or a FARConfig, ``vae_config`` a name of VAE_CONFIGS or a VAEConfig."""
    cfg, vcfg = _configs(model, vae_config)
    torch.manual_seed(seed)
    far = randomize_for_export(FAR(cfg), seed).eval()
    vae = randomize_for_export(AutoencoderKL(vcfg), seed + 1).eval()
    return far, vae


def random_bundle(
    out: str | os.PathLike,
    model: str | FARConfig = "far_tiny",
    vae_config: str | VAEConfig = "kl16-tiny",
    *,
    seed: int = 0,
    name: str | None = None,
    reuse: bool = False,
    overwrite: bool = False,
    validate: bool = True,
    **export_options: Any,
) -> Path:
    """Export :func:`random_models` to a bundle at ``out`` and return its path.

    ``reuse=True`` returns an existing bundle at ``out`` unchanged when its manifest records the same
    source (random init, ``seed``), model and VAE configs and far_sdk version (a cache for benchmarks);
    otherwise it is replaced. ``validate=False`` skips the exporter's onnxruntime-vs-PyTorch check.
    Other keywords go to :func:`export.onnx_export.export_bundle` (latent_scale, id2label, defaults, ...).
    """
    cfg, vcfg = _configs(model, vae_config)
    out = Path(out)
    if reuse:
        try:
            m = Bundle.load(out, verify=False).manifest
            if (
                m["source"] == random_init_source(seed)
                and m["model"] == cfg.to_dict()
                and m["vae"] == vcfg.to_dict()
                and m["created_by"].get("far_sdk") == __version__
            ):
                log.info("reusing the random-init bundle at %s", out)
                return out
        except (FarError, KeyError):
            pass
        overwrite = True
    far, vae = random_models(cfg, vcfg, seed=seed)
    label = model if isinstance(model, str) else "custom"
    return export_bundle(
        far,
        vae,
        out,
        name=name or f"random-{label}",
        source=random_init_source(seed),
        overwrite=overwrite,
        validate=validate,
        **export_options,
    )
