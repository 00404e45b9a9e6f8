"""PyTorch side of far-sdk: FAR models under the official parameter names, checkpoint loaders,
the reference sampler and training."""

from .checkpoint import load_official_checkpoint, save_official_checkpoint
from .config import FAR_CONFIGS, FARConfig, config_from_official_args, get_config
from .config_t2i import T2I_CONFIGS, T2IConfig, get_t2i_config
from .config_vae import VAE_CONFIGS, VAEConfig
from .far import FAR
from .far_t2i import FART2I
from .vae import AutoencoderKL, load_official_vae

__all__ = [
    "FAR",
    "FARConfig",
    "AutoencoderKL",
    "VAEConfig",
    "VAE_CONFIGS",
    "FAR_CONFIGS",
    "get_config",
    "config_from_official_args",
    "load_official_checkpoint",
    "load_official_vae",
    "save_official_checkpoint",
    "FART2I",
    "T2IConfig",
    "T2I_CONFIGS",
    "get_t2i_config",
]
