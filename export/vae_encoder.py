"""Add the optional ``vae_encoder`` graph (image-to-image) to an existing bundle; every other file stays as it is.

``far-export onnx`` writes the encoder into new bundles (``--no-vae-encoder`` leaves it out). An older bundle, or
one whose weights keep only the decoder (the committed demos: their encoder was recovered by
:mod:`training.encoder_fit`), gets it here from an encoder weights file (``encoder.*``, ``quant_conv.*`` of the
bundle's VAE config): the graph is traced, checked and validated against PyTorch as ``far-export`` does
(:mod:`export.onnx_graphs`), written with its weights as ``vae_encoder.onnx`` + ``vae_encoder.safetensors``, and the
manifest gains the graph and the two files' sizes and sha256 (its other entries unchanged). Idempotent: a bundle
that already carries this very encoder is left as it is.

    python scripts/add_vae_encoder.py engines/far-demo --encoder build/vae_encoder.safetensors
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from far_sdk.bundle.bundle import MANIFEST_NAME, Bundle, file_entry, sha256_file
from far_sdk.bundle.graphs import VAE_ENCODER, VAE_ENCODER_WEIGHTS, graph_specs
from far_sdk.bundle.manifest import dump_manifest, read_manifest
from far_sdk.bundle.weights import load_torch_state
from far_sdk.errors import BundleError, CheckpointError
from far_sdk.fileio import atomic_write_bytes
from training.encoder_fit import ENCODER_PREFIXES, save_encoder
from training.from_bundle import load_bundle_models
from training.graph_modules import VAEEncoderGraph

from .onnx_graphs import EXPORT_BATCH, check_graph, export_graph, sample_inputs, validate_graph

log = logging.getLogger(__name__)


def encoder_spec(bundle: Bundle):
    """The bundle's ``vae_encoder`` graph spec (image size, latent channels and grid from its manifest)."""
    m = bundle.manifest
    model = m["model"]
    return graph_specs(
        seq_len=model["grid_size"] ** 2,
        token_channels=model["token_channels"],
        mlp_width=m["mlp_width"],
        grid_size=model["grid_size"],
        image_size=m["image_size"],
    )[VAE_ENCODER]


def add_vae_encoder(bundle_dir: str | os.PathLike, encoder_file: str | os.PathLike) -> dict[str, Any]:
    """Add (or replace) the bundle's ``vae_encoder`` graph built from ``encoder_file``; returns a summary
    ``{"changed": bool, "validation": {...}}``. Raises :class:`BundleError` / :class:`CheckpointError` for a bundle or
    an encoder file that does not fit (nothing is changed then)."""
    bundle = Bundle.load(bundle_dir)
    path = bundle.path
    state = load_torch_state(encoder_file, error=CheckpointError)
    enc = {k: v for k, v in state.items() if k.startswith(ENCODER_PREFIXES)}
    if not enc or len(enc) != len(state):
        raise CheckpointError(
            f"{encoder_file}: not an encoder weights file (want only {ENCODER_PREFIXES} tensors, as "
            "training/encoder_fit.py writes; got {sorted(state)[:5]})"
        )
    _, vae = load_bundle_models(bundle)
    try:
        missing, _ = vae.load_state_dict(enc, strict=False, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{encoder_file} does not fit the bundle's VAE config: {str(e).splitlines()[0]}") from e
    if [k for k in missing if k.startswith(ENCODER_PREFIXES)]:
        raise CheckpointError(f"{encoder_file} lacks encoder tensors {[k for k in missing if k.startswith('enc')][:5]}")
    vae = vae.float().eval()
    m = bundle.manifest
    entry = m["graphs"].get(VAE_ENCODER)
    if entry is not None and VAE_ENCODER_WEIGHTS in m["files"]:
        tmp_w = path / f".{VAE_ENCODER_WEIGHTS}.check"
        try:
            save_encoder(vae, tmp_w)
            same = sha256_file(tmp_w) == m["files"][VAE_ENCODER_WEIGHTS]["sha256"]
        finally:
            tmp_w.unlink(missing_ok=True)
        if same:
            log.info("%s already carries this encoder: unchanged", path)
            return {"changed": False, "validation": entry["validation"]}
    module = VAEEncoderGraph(vae, bundle.latent_scale).eval()
    spec = encoder_spec(bundle)
    opset = int(m["graphs"]["vae_decoder"]["opset"])
    dims = {"num_classes": 1, "grid_size": int(m["model"]["grid_size"])}
    scratch = path / f".{VAE_ENCODER}.new"
    scratch.mkdir(exist_ok=True)
    try:
        with torch.no_grad():
            files = export_graph(module, spec, sample_inputs(spec, EXPORT_BATCH, seed=1234, **dims), scratch, opset)
        if len(files) != 1:
            raise BundleError(f"the {VAE_ENCODER} graph came out with external data {files}; not supported here")
        onnx_path = scratch / files[0]
        check_graph(onnx_path, spec)
        validation = validate_graph(module, onnx_path, spec, **dims)
        save_encoder(vae, scratch / VAE_ENCODER_WEIGHTS)
        new = dict(m)
        new["graphs"] = {
            **m["graphs"],
            VAE_ENCODER: {"file": files[0], "opset": opset, **spec.to_dict(), "validation": validation},
        }
        listed = {
            **m["files"],
            files[0]: file_entry(onnx_path),
            VAE_ENCODER_WEIGHTS: file_entry(scratch / VAE_ENCODER_WEIGHTS),
        }
        new["files"] = dict(sorted(listed.items()))
        data = dump_manifest(new)
        read_manifest(data, str(path / MANIFEST_NAME))  # never write what the reader refuses
        for name in (files[0], VAE_ENCODER_WEIGHTS):
            os.replace(scratch / name, path / name)
        atomic_write_bytes(path / MANIFEST_NAME, data)
    finally:
        for p in scratch.glob("*"):
            p.unlink()
        scratch.rmdir()
    Bundle.load(path)  # every file's size and sha256 as recorded
    return {"changed": True, "validation": validation}
