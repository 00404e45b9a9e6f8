"""One ONNX graph of a bundle: traced from its module (:mod:`training.graph_modules`) under the names and dynamic
axes of :mod:`far_sdk.bundle.graphs`, checked with ``onnx.checker``, and validated in onnxruntime (CPU) against
PyTorch on seeded inputs at batch sizes other than the traced one (:func:`validate_graph`; the error measures are
the module docstring of :mod:`export.onnx_export`'s)."""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from far_sdk.bundle.graphs import DENOISER_FEWSTEP, GraphSpec
from far_sdk.errors import ExportError
from far_sdk.maths.diffusion import denoise_step_table
from far_sdk.maths.distilled import distilled_step_table
from far_sdk.maths.masking import random_mask
from training.far import FAR
from training.far_t2i import FART2I
from training.graph_modules import (
    DenoiserGraph,
    TextTransformerGraph,
    TransformerGraph,
    VAEDecoderGraph,
    VAEEncoderGraph,
)
from training.vae import AutoencoderKL

logger = logging.getLogger(__name__)

#: Graphs whose file would exceed this many bytes keep their weights in one ``NAME.onnx.data``
#: file beside them (protobuf cannot serialise 2 GiB; FAR-H's transformer is ~3.2 GB in fp32).
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
#: Traced at one batch size, validated at two others: proves the batch axis is dynamic.
EXPORT_BATCH = 2
VALIDATION_BATCH_SIZES = (1, 3)
MIN_OPSET = 17  # one LayerNormalization op per LayerNorm


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
    "denoiser_fewstep": Tolerance(max_rel=1e-4),
    "vae_decoder": Tolerance(max_abs=2e-3),
    "vae_encoder": Tolerance(max_rel=1e-4),  # posterior mean and std at the sampler scale
}


# ---- inputs and graphs -------------------------------------------------------------------------


def graph_modules(far: FAR, vae: AutoencoderKL, latent_scale: float) -> dict[str, nn.Module]:
    """The PyTorch module behind each graph, in eval mode."""
    return {
        "transformer": (TextTransformerGraph(far) if isinstance(far, FART2I) else TransformerGraph(far)).eval(),
        "denoiser": DenoiserGraph(far.diffloss.net).eval(),
        "vae_decoder": VAEDecoderGraph(vae, latent_scale).eval(),
        "vae_encoder": VAEEncoderGraph(vae, latent_scale).eval(),
    }


def sample_inputs(spec: GraphSpec, batch: int, *, num_classes: int, grid_size: int, seed: int) -> dict[str, np.ndarray]:
    """Seeded, non-trivial inputs for ``spec`` at batch size ``batch`` (dynamic axes set to it).

    Floats are N(0, 1); ``class_ids`` covers real classes and ends with the null id
    ``num_classes``; ``level`` is an integer level; ``mask`` (1 = dropped) drops a different number of
    tokens per row, the first row all of them (mask mode's first step); ``step`` is a row from the less noisy half
    of a 10-step, cfg 3 denoise table with a non-zero noise scale (at the noisiest steps x0_hat = 2e4 (x - eps)
    swamps the output of an untrained network; ``denoiser_fewstep``: a middle jump of the 4-step student).
    """
    rng = np.random.Generator(np.random.PCG64(seed))
    feeds: dict[str, np.ndarray] = {}
    for t in spec.inputs:
        shape = tuple(batch if isinstance(d, str) else d for d in t.shape)
        if t.name == "class_ids":
            ids = rng.integers(0, num_classes, size=shape, dtype=np.int64)
            ids[-1] = num_classes
            feeds[t.name] = ids
        elif t.name == "null":  # the last row unconditional (fake_latent), as the CFG batch's second half
            feeds[t.name] = (np.arange(shape[0]) == shape[0] - 1).astype(np.float32)
        elif t.name == "level":
            feeds[t.name] = np.full(shape, rng.integers(0, grid_size), dtype=np.float32)
        elif t.name == "mask":
            feeds[t.name] = random_mask(rng, shape)
        elif t.name == "step" and spec.name == DENOISER_FEWSTEP:  # a distilled student's own (middle) jump
            feeds[t.name] = distilled_step_table(4, 3.0, 1.0, None)[rng.integers(1, 3)].copy()
        elif t.name == "step":
            table = denoise_step_table(10, 3.0, 1.0)
            feeds[t.name] = table[rng.integers(len(table) // 2, len(table) - 1)].copy()  # last row: noise scale 0
        else:
            feeds[t.name] = rng.standard_normal(shape, dtype=np.float32)
    return feeds


def export_graph(
    module: nn.Module, spec: GraphSpec, example: dict[str, np.ndarray], bundle_dir: Path, opset: int
) -> list[str]:
    """Trace ``module`` to ``bundle_dir/NAME.onnx`` (+ ``NAME.onnx.data`` when large); returns the file names."""
    import onnx  # noqa: PLC0415 - export-time dependency

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
                    module,
                    args,
                    str(raw),
                    input_names=spec.input_names,
                    output_names=spec.output_names,
                    dynamic_axes=spec.dynamic_axes(),
                    opset_version=opset,
                    do_constant_folding=True,
                    dynamo=False,
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
        onnx.save_model(
            model,
            str(final),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data,
            size_threshold=1024,
        )
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
            raise ExportError(
                f"the exported {spec.name} graph has an input/output {v.name!r} the graph spec does not name"
            )
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
    import onnx  # noqa: PLC0415 - export-time dependency
    from onnx import helper  # noqa: PLC0415 - export-time dependency

    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as e:
        raise ExportError(f"{path.name} fails onnx.checker: {e}") from e
    model = onnx.load(str(path), load_external_data=False)
    init = {i.name for i in model.graph.initializer}
    for kind, declared, specs in (
        ("input", [i for i in model.graph.input if i.name not in init], spec.inputs),
        ("output", list(model.graph.output), spec.outputs),
    ):
        found = [
            (
                v.name,
                np.dtype(helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)).name,
                tuple(d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim),
            )
            for v in declared
        ]
        wanted = [(t.name, t.dtype, tuple(t.shape)) for t in specs]
        if found != wanted:
            raise ExportError(f"{path.name}: {kind}s are {found}, the graph spec says {wanted}")


def validate_graph(
    module: nn.Module,
    path: Path,
    spec: GraphSpec,
    *,
    num_classes: int,
    grid_size: int,
    batch_sizes: tuple[int, ...] = VALIDATION_BATCH_SIZES,
    seed: int = 0,
) -> dict[str, Any]:
    """Run ``path`` in onnxruntime (CPU) and ``module`` in PyTorch on the same seeded inputs.

    Returns ``{"max_abs", "max_rel", "batch_sizes", "tolerance"}``; raises :class:`ExportError`
    when an output is not finite, has the wrong shape, or an error exceeds :data:`TOLERANCES`.
    """
    import onnxruntime as ort  # noqa: PLC0415 - the backend's runtime: loaded when chosen

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
                raise ExportError(
                    f"{spec.name}.{out_spec.name} at batch {batch}: onnx shape {g.shape}, torch {r.shape}, spec {want}"
                )
            if not (np.isfinite(g).all() and np.isfinite(r).all()):
                raise ExportError(
                    f"{spec.name}.{out_spec.name} at batch {batch} has NaN or inf values (onnx or torch): the "
                    "weights are broken"
                )
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
