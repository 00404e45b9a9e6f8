"""FAR + VAE -> a verified bundle directory (three ONNX graphs, weights, manifest).

:func:`export_bundle` traces the modules of :mod:`training.graph_modules` with the TorchScript
exporter (``dynamo=False``: no onnxscript dependency) under the names and dynamic axes of
:mod:`far_sdk.bundle.graphs`, checks every graph with ``onnx.checker``, runs it in onnxruntime (CPU) on
seeded random inputs at two batch sizes other than the traced one and compares with PyTorch.
Everything is written inside :func:`far_sdk.bundle.bundle.atomic_bundle_dir`: a failure at any point
leaves no directory behind and an existing bundle untouched.

Error measures (recorded per graph in the manifest): ``max_abs = max |onnx - torch|`` and
``max_rel = max_abs / max |torch|`` (relative to the output's scale; element-wise ratios are
meaningless near zero), each the worst over the validation batch sizes.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import platform
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

import far_sdk
from far_sdk.bundle.bundle import atomic_bundle_dir, sha256_file, write_manifest
from far_sdk.bundle.graphs import GRAPH_NAMES, VAE_ENCODER, VAE_ENCODER_WEIGHTS, graph_specs
from far_sdk.errors import ConfigError, ExportError, InvalidArgumentError
from far_sdk.maths.masking import sampling_modes
from far_sdk.options import DEFAULTS, T2I_DEFAULTS, SamplingOptions, resolve_plan, resolve_text_plan
from training.encoder_fit import save_encoder
from training.far import FAR
from training.far_t2i import FART2I
from training.vae import AutoencoderKL

from .onnx_graphs import (
    EXPORT_BATCH,
    MIN_OPSET,
    check_graph,
    export_graph,
    graph_modules,
    sample_inputs,
    validate_graph,
)
from .t2i_export import check_text_encoder, export_text_encoder, text_section

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "weights.safetensors"
FAR_PREFIX, VAE_PREFIX = "far.", "vae."
_VAE_DECODE_PREFIXES = ("decoder.", "post_quant_conv.")


# ---- sources -----------------------------------------------------------------------------------


def checkpoint_source(
    checkpoint: str | os.PathLike, *, use_ema: bool, vae: str | os.PathLike | None = None
) -> dict[str, Any]:
    """The manifest's ``source`` for weights read from files (names and sha256, no directories)."""
    src: dict[str, Any] = {
        "kind": "checkpoint",
        "file": Path(checkpoint).name,
        "sha256": sha256_file(checkpoint),
        "use_ema": bool(use_ema),
    }
    if vae is not None:
        src["vae"] = {"file": Path(vae).name, "sha256": sha256_file(vae)}
    return src


def random_init_source(seed: int) -> dict[str, Any]:
    return {"kind": "random-init", "seed": int(seed)}


# ---- weights and manifest --------------------------------------------------------------------------


def write_weights(far: FAR, vae: AutoencoderKL, path: Path) -> int:
    """FAR's state dict under ``far.`` (official names) and the VAE's decode half under ``vae.``."""
    from safetensors.torch import save_file  # noqa: PLC0415 - loaded when the weights are read

    tensors = {FAR_PREFIX + k: v for k, v in far.state_dict().items()}
    tensors.update({VAE_PREFIX + k: v for k, v in vae.state_dict().items() if k.startswith(_VAE_DECODE_PREFIXES)})
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    save_file(tensors, str(path), metadata={"format": "pt", "far_sdk": far_sdk.__version__})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)  # safetensors creates the file 0600; the graphs are plain 0666 & ~umask
    return len(tensors)


def _versions() -> dict[str, str]:
    import onnx  # noqa: PLC0415 - export-time dependency
    import onnxruntime  # noqa: PLC0415 - the backend's runtime: loaded when chosen

    return {
        "far_sdk": far_sdk.__version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
    }


def _check_inputs(
    far: FAR, vae: AutoencoderKL, latent_scale: float, id2label: Mapping | None, opset: int, name: str
) -> dict[str, str] | None:
    cfg = far.config
    for label, module in (("far", far), ("vae", vae)):
        bad = {(p.dtype, p.device.type) for p in module.parameters()} - {(torch.float32, "cpu")}
        if bad:
            raise ExportError(
                f"{label} has parameters of {sorted(map(str, bad))}; export needs float32 on CPU (call .float().cpu())"
            )
    if vae.config.embed_dim != cfg.token_channels:
        raise ConfigError(
            f"the VAE has {vae.config.embed_dim} latent channels but the FAR model expects {cfg.token_channels}"
        )
    if not isinstance(name, str) or not name:
        raise InvalidArgumentError(f"bundle name must be a non-empty string, got {name!r}")
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise InvalidArgumentError(f"opset must be an integer >= {MIN_OPSET} (LayerNormalization), got {opset!r}")
    if (
        isinstance(latent_scale, bool)
        or not isinstance(latent_scale, (int, float))
        or not (math.isfinite(latent_scale) and latent_scale > 0)
    ):
        raise InvalidArgumentError(f"latent_scale must be a positive finite number, got {latent_scale!r}")
    if id2label is None:
        return None
    if isinstance(far, FART2I):
        raise InvalidArgumentError("a FAR-T2I model is text-conditioned: it has no classes, so no id2label")
    labels: dict[str, str] = {}
    for k, v in id2label.items():
        try:
            i = int(k)
        except (TypeError, ValueError):
            i = -1
        if not 0 <= i < cfg.num_classes or str(i) != str(k).strip() or not isinstance(v, str):
            raise InvalidArgumentError(
                f"id2label entries must map class ids 0..{cfg.num_classes - 1} to strings, got {k!r}: {v!r}"
            )
        labels[str(i)] = v
    return dict(sorted(labels.items(), key=lambda kv: int(kv[0])))


def export_bundle(
    far: FAR,
    vae: AutoencoderKL,
    out_dir: str | os.PathLike,
    *,
    name: str,
    latent_scale: float = 0.2325,
    id2label: Mapping[int | str, str] | None = None,
    opset: int = 17,
    overwrite: bool = False,
    source: Mapping[str, Any] | None = None,
    validate: bool = True,
    defaults: SamplingOptions | Mapping[str, Any] | None = None,
    text_encoder: Any = None,
    text_encoder_options: Mapping[str, Any] | None = None,
    vae_encoder: bool = True,
) -> Path:
    """Write the bundle for ``far`` + ``vae`` to ``out_dir`` atomically; returns its path.

    Puts both modules in eval mode. The manifest's ``sampling_modes`` follow ``far.config.mask``
    (:func:`far_sdk.maths.masking.sampling_modes`); the default mode is the first of them. Raises
    :class:`ExportError` (export, checker or validation
    failure), :class:`~far_sdk.errors.BundleError` (``out_dir`` not empty and not ``overwrite``),
    :class:`ConfigError` / :class:`InvalidArgumentError` (inconsistent arguments); in every case
    nothing is written. ``defaults``: the bundle's sampling defaults, put over far_sdk.options.DEFAULTS
    (a misspelt option or a bad value is an InvalidArgumentError here, before any work).
    A FAR-T2I model (:class:`training.far_t2i.FART2I`) gives a text-conditioned bundle (export.t2i_export):
    its defaults go over the official T2I sampler's (far_sdk.options.T2I_DEFAULTS); ``text_encoder`` (a
    :class:`training.text_encoder.SmallTextEncoder`, or the official Qwen2VLPromptEncoder) is bundled as
    ``text_encoder.onnx`` + ``tokenizer.json``; ``text_encoder_options`` (a Qwen2-VL encoder's weight_dtype,
    external_data_threshold) go to :func:`export.qwen_export.export_qwen2vl_encoder`.
    ``vae_encoder``: also write the optional ``vae_encoder`` graph (image-to-image, far_sdk.bundle.graphs) and its
    weights ``vae_encoder.safetensors`` (``vae``'s encode half; the decode half stays in weights.safetensors).
    """

    t2i = isinstance(far, FART2I)
    check_text_encoder(far, text_encoder)
    labels = _check_inputs(far, vae, latent_scale, id2label, opset, name)
    given = (
        defaults
        if isinstance(defaults, SamplingOptions)
        else SamplingOptions.from_dict(defaults or {}, what="defaults")
    )
    base = T2I_DEFAULTS if t2i else dataclasses.replace(DEFAULTS, mode=sampling_modes(far.config.mask)[0])
    sampling_defaults = given.over(base)
    (resolve_text_plan if t2i else resolve_plan)(
        sampling_defaults
    )  # a valid plan, or a typed error naming the bad value
    cfg = far.config
    image_size = cfg.grid_size * vae.config.downsample_factor
    specs = graph_specs(
        seq_len=cfg.seq_len,
        token_channels=cfg.token_channels,
        mlp_width=cfg.diffloss_w,
        grid_size=cfg.grid_size,
        image_size=image_size,
        masked=cfg.mask,
        text=(cfg.context_len, cfg.context_dim) if t2i else None,
    )
    modules = graph_modules(far, vae, latent_scale)
    dims = {"num_classes": 1 if t2i else cfg.num_classes, "grid_size": cfg.grid_size}
    graphs: dict[str, Any] = {}
    with atomic_bundle_dir(out_dir, overwrite=overwrite) as tmp:
        for gname in GRAPH_NAMES + ((VAE_ENCODER,) if vae_encoder else ()):
            spec = specs[gname]
            logger.info("%s: exporting (opset %d)", gname, opset)
            t0 = time.perf_counter()
            example = sample_inputs(spec, EXPORT_BATCH, seed=1234, **dims)
            files = export_graph(modules[gname], spec, example, tmp, opset)
            check_graph(tmp / files[0], spec)
            size = sum((tmp / f).stat().st_size for f in files)
            logger.info(
                "%s: exported and checked in %.2f s (%s, %.1f MB)",
                gname,
                time.perf_counter() - t0,
                " + ".join(files),
                size / 1e6,
            )
            entry: dict[str, Any] = {"file": files[0], "opset": opset, **spec.to_dict()}
            if len(files) > 1:
                entry["external_data"] = files[1]
            if validate:
                t0 = time.perf_counter()
                entry["validation"] = val = validate_graph(modules[gname], tmp / files[0], spec, **dims)
                logger.info(
                    "%s: validated at batch %s in %.2f s: max abs %.3g, max rel %.3g",
                    gname,
                    ", ".join(map(str, val["batch_sizes"])),
                    time.perf_counter() - t0,
                    val["max_abs"],
                    val["max_rel"],
                )
            else:
                entry["validation"] = None
            graphs[gname] = entry
        t0 = time.perf_counter()
        encoder = None
        if text_encoder is not None:
            opts = dict(text_encoder_options or {})
            encoder = export_text_encoder(text_encoder, tmp, opset, validate=validate, **opts)
        n = write_weights(far, vae, tmp / WEIGHTS_FILE)
        if vae_encoder:
            save_encoder(vae, tmp / VAE_ENCODER_WEIGHTS, {"format": "pt", "far_sdk": far_sdk.__version__})
        logger.info("%s: %d tensors written in %.2f s", WEIGHTS_FILE, n, time.perf_counter() - t0)
        manifest: dict[str, Any] = {
            "name": name,
            "created_by": _versions(),
            "model": cfg.to_dict(),
            "vae": vae.config.to_dict(),
            "latent_scale": float(latent_scale),
            "mlp_width": cfg.diffloss_w,
            "image_size": image_size,
        }
        if t2i:
            manifest.update(conditioning="text", text=text_section(far, encoder))
        else:
            manifest["null_class_id"] = cfg.num_classes
        if labels is not None:
            manifest["id2label"] = labels
        modes = sampling_modes(cfg.mask)
        manifest.update(
            {
                "sampling_modes": list(modes),
                "defaults": sampling_defaults.to_dict(),
                "graphs": graphs,
                "weights": {"file": WEIGHTS_FILE, "prefixes": {"far": FAR_PREFIX, "vae": VAE_PREFIX}},
                "source": dict(source) if source is not None else {"kind": "unspecified"},
            }
        )
        write_manifest(tmp, manifest)
    out = Path(out_dir)
    logger.info("bundle %r written to %s", name, out)
    return out
