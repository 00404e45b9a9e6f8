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
import shutil
import tempfile
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import far_sdk
from far_sdk.bundle.bundle import atomic_bundle_dir, sha256_file, write_manifest
from far_sdk.maths.diffusion import denoise_step_table
from far_sdk.errors import ConfigError, ExportError, InvalidArgumentError
from far_sdk.bundle.graphs import GRAPH_NAMES, GraphSpec, graph_specs
from far_sdk.options import DEFAULTS, T2I_DEFAULTS, SamplingOptions, resolve_plan, resolve_text_plan
from far_sdk.maths.masking import random_mask, sampling_modes
from training.far import FAR
from training.far_t2i import FART2I
from training.graph_modules import DenoiserGraph, TextTransformerGraph, TransformerGraph, VAEDecoderGraph
from training.vae import AutoencoderKL

logger = logging.getLogger(__name__)

#: Graphs whose file would exceed this many bytes keep their weights in one ``NAME.onnx.data``
#: file beside them (protobuf cannot serialise 2 GiB; FAR-H's transformer is ~3.2 GB in fp32).
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
#: Traced at one batch size, validated at two others: proves the batch axis is dynamic.
EXPORT_BATCH = 2
VALIDATION_BATCH_SIZES = (1, 3)
MIN_OPSET = 17  # one LayerNormalization op per LayerNorm
WEIGHTS_FILE = "weights.safetensors"
FAR_PREFIX, VAE_PREFIX = "far.", "vae."
_VAE_DECODE_PREFIXES = ("decoder.", "post_quant_conv.")



@dataclass(frozen=True)
class Tolerance:
    """Largest accepted ONNX-vs-PyTorch error of a graph; None: not bounded."""

    max_abs: float | None = None
    max_rel: float | None = None

    def exceeded_by(self, max_abs: float, max_rel: float) -> bool:
        return (self.max_abs is not None and not max_abs <= self.max_abs) or (
            self.max_rel is not None and not max_rel <= self.max_rel
        )


#: fp32 end to end: the transformer and denoiser agree to float32 rounding (relative to output
#: scale); the VAE decoder's ~30 convolutions use other algorithms in onnxruntime, so it gets
#: an absolute bound well under one 8-bit pixel step (2/255 on the [-1, 1] scale).
TOLERANCES: dict[str, Tolerance] = {
    "transformer": Tolerance(max_rel=1e-4),
    "denoiser": Tolerance(max_rel=1e-4),
    "vae_decoder": Tolerance(max_abs=2e-3),
}


# ---- sources -----------------------------------------------------------------------------------


def checkpoint_source(checkpoint: str | os.PathLike, *, use_ema: bool, vae: str | os.PathLike | None = None) -> dict[str, Any]:
    """The manifest's ``source`` for weights read from files (names and sha256, no directories)."""
    src: dict[str, Any] = {"kind": "checkpoint", "file": Path(checkpoint).name, "sha256": sha256_file(checkpoint), "use_ema": bool(use_ema)}
    if vae is not None:
        src["vae"] = {"file": Path(vae).name, "sha256": sha256_file(vae)}
    return src


def random_init_source(seed: int) -> dict[str, Any]:
    return {"kind": "random-init", "seed": int(seed)}


# ---- inputs and graphs -------------------------------------------------------------------------


def graph_modules(far: FAR, vae: AutoencoderKL, latent_scale: float) -> dict[str, nn.Module]:
    """The PyTorch module behind each graph, in eval mode."""
    return {
        "transformer": (TextTransformerGraph(far) if isinstance(far, FART2I) else TransformerGraph(far)).eval(),
        "denoiser": DenoiserGraph(far.diffloss.net).eval(),
        "vae_decoder": VAEDecoderGraph(vae, latent_scale).eval(),
    }


def sample_inputs(spec: GraphSpec, batch: int, *, num_classes: int, grid_size: int, seed: int) -> dict[str, np.ndarray]:
    """Seeded, non-trivial inputs for ``spec`` at batch size ``batch`` (dynamic axes set to it).

    Floats are N(0, 1); ``class_ids`` covers real classes and ends with the null id
    ``num_classes``; ``level`` is an integer level; ``mask`` (1 = dropped) drops a different number of
    tokens per row, the first row all of them (mask mode's first step); ``step`` is a row from the less noisy half
    of a 10-step, cfg 3 denoise table with a non-zero noise scale (at the noisiest steps
    x0_hat = 2e4 (x - eps) swamps the output of an untrained network).
    """
    rng = np.random.Generator(np.random.PCG64(seed))
    feeds: dict[str, np.ndarray] = {}
    for t in spec.inputs:
        shape = tuple(batch if isinstance(d, str) else d for d in t.shape)
        if t.name == "class_ids":
            ids = rng.integers(0, num_classes, size=shape, dtype=np.int64)
            ids[-1] = num_classes
            feeds[t.name] = ids
        elif t.name == "null":   # the last row unconditional (fake_latent), as the CFG batch's second half
            feeds[t.name] = (np.arange(shape[0]) == shape[0] - 1).astype(np.float32)
        elif t.name == "level":
            feeds[t.name] = np.full(shape, rng.integers(0, grid_size), dtype=np.float32)
        elif t.name == "mask":
            feeds[t.name] = random_mask(rng, shape)
        elif t.name == "step":
            table = denoise_step_table(10, 3.0, 1.0)
            feeds[t.name] = table[rng.integers(len(table) // 2, len(table) - 1)].copy()  # last row: noise scale 0
        else:
            feeds[t.name] = rng.standard_normal(shape, dtype=np.float32)
    return feeds


def export_graph(module: nn.Module, spec: GraphSpec, example: dict[str, np.ndarray], bundle_dir: Path, opset: int) -> list[str]:
    """Trace ``module`` to ``bundle_dir/NAME.onnx`` (+ ``NAME.onnx.data`` when large); returns the file names."""
    import onnx

    final = bundle_dir / f"{spec.name}.onnx"
    # torch writes graphs over 2 GiB as one file per tensor next to the model: export into a
    # scratch directory and re-save from there with a single data file.
    scratch = Path(tempfile.mkdtemp(prefix=f".{spec.name}.", dir=bundle_dir))
    try:
        raw = scratch / final.name
        args = tuple(torch.from_numpy(example[n]) for n in spec.input_names)
        try:
            with torch.no_grad(), warnings.catch_warnings():
                # The legacy-exporter notice: chosen on purpose (no onnxscript needed).
                warnings.simplefilter("ignore", DeprecationWarning)
                # GroupNorm's training-time batch-size check; ours keep their TracerWarnings.
                warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module="torch.nn.functional")
                torch.onnx.export(
                    module, args, str(raw), input_names=spec.input_names, output_names=spec.output_names,
                    dynamic_axes=spec.dynamic_axes(), opset_version=opset, do_constant_folding=True, dynamo=False,
                )
        except Exception as e:
            raise ExportError(f"torch.onnx.export of the {spec.name} graph failed: {type(e).__name__}: {e}") from e
        size = sum(p.stat().st_size for p in scratch.iterdir() if p.is_file())
        model = onnx.load(str(raw))  # also pulls in torch's per-tensor files of a > 2 GiB graph
        _declare_io(model, spec)
        if size <= EXTERNAL_DATA_THRESHOLD:
            onnx.save_model(model, str(final))
            return [final.name]
        data = final.name + ".data"
        logger.info("%s: %.2f GB of weights: writing them to %s", spec.name, size / 1e9, data)
        onnx.save_model(model, str(final), save_as_external_data=True, all_tensors_to_one_file=True, location=data, size_threshold=1024)
        return [final.name, data]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _declare_io(model: Any, spec: GraphSpec) -> None:
    """Give the graph's inputs and outputs exactly the spec's shapes.

    The tracer names output dims it cannot prove constant (e.g. ``Addcond_dim_1`` for L); the
    spec's fixed sizes are what every backend allocates, and validation proves them.
    """
    init = {i.name for i in model.graph.initializer}
    declared = [v for v in model.graph.input if v.name not in init] + list(model.graph.output)
    by_name = {t.name: t for t in spec.inputs + spec.outputs}
    for v in declared:
        t = by_name.get(v.name)
        if t is None:
            raise ExportError(f"the exported {spec.name} graph has an input/output {v.name!r} the graph spec does not name")
        dims = v.type.tensor_type.shape.dim
        del dims[:]
        for d in t.shape:
            dim = dims.add()
            if isinstance(d, str):
                dim.dim_param = d
            else:
                dim.dim_value = d


def check_graph(path: Path, spec: GraphSpec) -> None:
    """``onnx.checker`` on the file (path form: works with external data), then the I/O names, dtypes and shapes."""
    import onnx
    from onnx import helper

    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as e:
        raise ExportError(f"{path.name} fails onnx.checker: {e}") from e
    model = onnx.load(str(path), load_external_data=False)
    init = {i.name for i in model.graph.initializer}
    for kind, declared, specs in (("input", [i for i in model.graph.input if i.name not in init], spec.inputs),
                                  ("output", list(model.graph.output), spec.outputs)):
        found = [(v.name, np.dtype(helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)).name,
                  tuple(d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim)) for v in declared]
        wanted = [(t.name, t.dtype, tuple(t.shape)) for t in specs]
        if found != wanted:
            raise ExportError(f"{path.name}: {kind}s are {found}, the graph spec says {wanted}")


def validate_graph(module: nn.Module, path: Path, spec: GraphSpec, *, num_classes: int, grid_size: int,
                   batch_sizes: tuple[int, ...] = VALIDATION_BATCH_SIZES, seed: int = 0) -> dict[str, Any]:
    """Run ``path`` in onnxruntime (CPU) and ``module`` in PyTorch on the same seeded inputs.

    Returns ``{"max_abs", "max_rel", "batch_sizes", "tolerance"}``; raises :class:`ExportError`
    when an output is not finite, has the wrong shape, or an error exceeds :data:`TOLERANCES`.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's own exception classes
        raise ExportError(f"onnxruntime cannot load {path.name}: {e}") from e
    worst_abs = worst_rel = 0.0
    for i, batch in enumerate(batch_sizes):
        feeds = sample_inputs(spec, batch, num_classes=num_classes, grid_size=grid_size, seed=seed + i)
        try:
            got = session.run(spec.output_names, feeds)
        except Exception as e:
            raise ExportError(f"onnxruntime failed to run {path.name} at batch {batch}: {e}") from e
        with torch.no_grad():
            ref = module(*(torch.from_numpy(feeds[n]) for n in spec.input_names))
        refs = ref if isinstance(ref, (tuple, list)) else (ref,)
        for out_spec, g, r in zip(spec.outputs, got, refs):
            r = r.numpy()
            want = tuple(batch if isinstance(d, str) else d for d in out_spec.shape)
            if g.shape != want or r.shape != want:
                raise ExportError(f"{spec.name}.{out_spec.name} at batch {batch}: onnx shape {g.shape}, torch {r.shape}, spec {want}")
            if not (np.isfinite(g).all() and np.isfinite(r).all()):
                raise ExportError(f"{spec.name}.{out_spec.name} at batch {batch} has NaN or inf values (onnx or torch): the weights are broken")
            err = float(np.abs(g.astype(np.float64) - r).max())
            scale = float(np.abs(r).max())
            worst_abs = max(worst_abs, err)
            worst_rel = max(worst_rel, err / scale if scale > 0 else (0.0 if err == 0 else math.inf))
    tol = TOLERANCES[spec.name]
    if tol.exceeded_by(worst_abs, worst_rel):
        raise ExportError(
            f"{spec.name}: onnxruntime disagrees with PyTorch (max abs {worst_abs:.3g}, max rel {worst_rel:.3g}; "
            f"tolerance {asdict(tol)}). Nothing was written."
        )
    return {"max_abs": worst_abs, "max_rel": worst_rel, "batch_sizes": list(batch_sizes), "tolerance": asdict(tol)}


# ---- weights and manifest --------------------------------------------------------------------------


def write_weights(far: FAR, vae: AutoencoderKL, path: Path) -> int:
    """FAR's state dict under ``far.`` (official names) and the VAE's decode half under ``vae.``."""
    from safetensors.torch import save_file

    tensors = {FAR_PREFIX + k: v for k, v in far.state_dict().items()}
    tensors.update({VAE_PREFIX + k: v for k, v in vae.state_dict().items() if k.startswith(_VAE_DECODE_PREFIXES)})
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    save_file(tensors, str(path), metadata={"format": "pt", "far_sdk": far_sdk.__version__})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)  # safetensors creates the file 0600; the graphs are plain 0666 & ~umask
    return len(tensors)


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    return {"far_sdk": far_sdk.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}


def _check_inputs(far: FAR, vae: AutoencoderKL, latent_scale: float, id2label: Mapping | None, opset: int, name: str) -> dict[str, str] | None:
    cfg = far.config
    for label, module in (("far", far), ("vae", vae)):
        bad = {(p.dtype, p.device.type) for p in module.parameters()} - {(torch.float32, "cpu")}
        if bad:
            raise ExportError(f"{label} has parameters of {sorted(map(str, bad))}; export needs float32 on CPU (call .float().cpu())")
    if vae.config.embed_dim != cfg.token_channels:
        raise ConfigError(f"the VAE has {vae.config.embed_dim} latent channels but the FAR model expects {cfg.token_channels}")
    if not isinstance(name, str) or not name:
        raise InvalidArgumentError(f"bundle name must be a non-empty string, got {name!r}")
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise InvalidArgumentError(f"opset must be an integer >= {MIN_OPSET} (LayerNormalization), got {opset!r}")
    if isinstance(latent_scale, bool) or not isinstance(latent_scale, (int, float)) or not (math.isfinite(latent_scale) and latent_scale > 0):
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
            raise InvalidArgumentError(f"id2label entries must map class ids 0..{cfg.num_classes - 1} to strings, got {k!r}: {v!r}")
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
) -> Path:
    """Write the bundle for ``far`` + ``vae`` to ``out_dir`` atomically; returns its path.

    Puts both modules in eval mode. The manifest's ``sampling_modes`` follow ``far.config.mask``
    (:func:`far_sdk.maths.masking.sampling_modes`); the default mode is the first of them. Raises :class:`ExportError` (export, checker or validation
    failure), :class:`~far_sdk.errors.BundleError` (``out_dir`` not empty and not ``overwrite``),
    :class:`ConfigError` / :class:`InvalidArgumentError` (inconsistent arguments); in every case
    nothing is written. ``defaults``: the bundle's sampling defaults, put over far_sdk.options.DEFAULTS
    (a misspelt option or a bad value is an InvalidArgumentError here, before any work).
    A FAR-T2I model (:class:`training.far_t2i.FART2I`) gives a text-conditioned bundle (export.t2i_export):
    its defaults go over the official T2I sampler's (far_sdk.options.T2I_DEFAULTS); ``text_encoder`` (a
    :class:`training.text_encoder.SmallTextEncoder`) is bundled as ``text_encoder.onnx`` + ``tokenizer.json``.
    """
    from .t2i_export import check_text_encoder, export_text_encoder, text_section

    t2i = isinstance(far, FART2I)
    check_text_encoder(far, text_encoder)
    labels = _check_inputs(far, vae, latent_scale, id2label, opset, name)
    given = defaults if isinstance(defaults, SamplingOptions) else SamplingOptions.from_dict(defaults or {}, what="defaults")
    base = T2I_DEFAULTS if t2i else dataclasses.replace(DEFAULTS, mode=sampling_modes(far.config.mask)[0])
    sampling_defaults = given.over(base)
    (resolve_text_plan if t2i else resolve_plan)(sampling_defaults)   # a valid plan, or a typed error naming the bad value
    cfg = far.config
    image_size = cfg.grid_size * vae.config.downsample_factor
    specs = graph_specs(seq_len=cfg.seq_len, token_channels=cfg.token_channels, mlp_width=cfg.diffloss_w,
                        grid_size=cfg.grid_size, image_size=image_size, masked=cfg.mask,
                        text=(cfg.context_len, cfg.context_dim) if t2i else None)
    modules = graph_modules(far, vae, latent_scale)
    dims = {"num_classes": 1 if t2i else cfg.num_classes, "grid_size": cfg.grid_size}
    graphs: dict[str, Any] = {}
    with atomic_bundle_dir(out_dir, overwrite=overwrite) as tmp:
        for gname in GRAPH_NAMES:
            spec = specs[gname]
            logger.info("%s: exporting (opset %d)", gname, opset)
            t0 = time.perf_counter()
            example = sample_inputs(spec, EXPORT_BATCH, seed=1234, **dims)
            files = export_graph(modules[gname], spec, example, tmp, opset)
            check_graph(tmp / files[0], spec)
            size = sum((tmp / f).stat().st_size for f in files)
            logger.info("%s: exported and checked in %.2f s (%s, %.1f MB)", gname, time.perf_counter() - t0, " + ".join(files), size / 1e6)
            entry: dict[str, Any] = {"file": files[0], "opset": opset, **spec.to_dict()}
            if len(files) > 1:
                entry["external_data"] = files[1]
            if validate:
                t0 = time.perf_counter()
                entry["validation"] = val = validate_graph(modules[gname], tmp / files[0], spec, **dims)
                logger.info("%s: validated at batch %s in %.2f s: max abs %.3g, max rel %.3g", gname,
                            ", ".join(map(str, val["batch_sizes"])), time.perf_counter() - t0, val["max_abs"], val["max_rel"])
            else:
                entry["validation"] = None
            graphs[gname] = entry
        t0 = time.perf_counter()
        encoder = export_text_encoder(text_encoder, tmp, opset) if text_encoder is not None else None
        n = write_weights(far, vae, tmp / WEIGHTS_FILE)
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
        manifest.update({
            "sampling_modes": list(modes),
            "defaults": sampling_defaults.to_dict(),
            "graphs": graphs,
            "weights": {"file": WEIGHTS_FILE, "prefixes": {"far": FAR_PREFIX, "vae": VAE_PREFIX}},
            "source": dict(source) if source is not None else {"kind": "unspecified"},
        })
        write_manifest(tmp, manifest)
    out = Path(out_dir)
    logger.info("bundle %r written to %s", name, out)
    return out
