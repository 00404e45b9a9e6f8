"""``far-export fewstep BUNDLE --student FILE``: add a distilled few-step denoiser to an existing bundle.

The student (``far-train distill``'s ``student.safetensors``: the teacher's ``SimpleMLPAdaLN`` with trained
weights and JSON metadata) is traced as :class:`training.graph_modules.DenoiserGraph` under the name
``denoiser_fewstep`` (the denoiser's inputs and outputs), checked with ``onnx.checker``, validated against PyTorch
in onnxruntime like every graph, and added to the bundle with its weights (``denoiser_fewstep.safetensors``, read
by the torch backend) and a manifest ``fewstep`` section (step counts, teacher chain, how it was made). Every
existing file stays byte-identical; only ``manifest.json`` is rewritten (files, hashes and digest updated).
Idempotent: the same student again changes nothing; another student replaces the previous one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from far_sdk.bundle.bundle import Bundle, sha256_file, write_manifest
from far_sdk.bundle.graphs import DENOISER_FEWSTEP, GraphSpec
from far_sdk.bundle.schema import DIGEST_KEY
from far_sdk.errors import BundleError, CheckpointError
from far_sdk.maths.distilled import DISTILLED_STEPS, TEACHER_STEPS
from training.diffloss import SimpleMLPAdaLN
from training.distill.train import FROZEN_PREFIXES, STUDENT_METADATA_KEY
from training.from_bundle import load_bundle_models
from training.graph_modules import DenoiserGraph
from training.safe_load import check_state_dict

from .onnx_graphs import EXPORT_BATCH, MIN_OPSET, check_graph, export_graph, sample_inputs, validate_graph

logger = logging.getLogger(__name__)

STUDENT_FILE = f"{DENOISER_FEWSTEP}.safetensors"
MADE_BY = "far-train distill, then far-export fewstep"


def read_student(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, metadata) of a ``far-train distill`` student file; :class:`CheckpointError` otherwise."""
    from safetensors import safe_open  # noqa: PLC0415

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"student file {path} does not exist: make one with far-train distill (student.safetensors)"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except Exception as e:  # safetensors' own error classes
        raise CheckpointError(f"{path} is not a safetensors file: {str(e).splitlines()[0]}") from e
    if STUDENT_METADATA_KEY not in meta:
        raise CheckpointError(f"{path} is not a far-train distill student (no {STUDENT_METADATA_KEY!r} metadata)")
    info = json.loads(meta[STUDENT_METADATA_KEY])
    if tuple(info.get("steps", ())) != DISTILLED_STEPS or info.get("teacher_steps") != TEACHER_STEPS:
        raise CheckpointError(
            f"{path} was distilled for steps {info.get('steps')} on a {info.get('teacher_steps')}-step teacher chain; "
            f"this far-sdk runs students of steps {list(DISTILLED_STEPS)} on {TEACHER_STEPS}: re-run far-train distill"
        )
    return state, info


def student_module(bundle: Bundle, state: dict[str, torch.Tensor], source: str) -> DenoiserGraph:
    """The student as the denoiser graph module, checked against the bundle's teacher (same architecture, same
    frozen condition projections: the bundle's transformer graph computes ``cond`` with those)."""
    far, _vae = load_bundle_models(bundle)
    teacher: SimpleMLPAdaLN = far.diffloss.net
    check_state_dict(state, {k: v.shape for k, v in teacher.state_dict().items()}, source=source)
    for k, v in teacher.state_dict().items():
        if k.startswith(FROZEN_PREFIXES) and not torch.equal(v, state[k]):
            raise CheckpointError(
                f"{source} was distilled from another model than bundle {bundle.name!r} (its {k} differs): "
                f"run far-train distill --bundle {bundle.path}"
            )
    teacher.load_state_dict(state, strict=True)  # the bundle's copy becomes the student
    return DenoiserGraph(teacher).eval()


def add_fewstep(
    bundle_dir: str | os.PathLike, student: str | os.PathLike, *, validate: bool = True, opset: int = MIN_OPSET
) -> bool:
    """Add (or replace) the bundle's ``denoiser_fewstep`` graph from ``student``; False when the bundle already
    holds this very student (nothing written)."""
    bundle = Bundle.load(bundle_dir)
    if bundle.conditioning == "text":
        raise BundleError(f"bundle {bundle.name!r} is text-conditioned: far-export fewstep supports class bundles")
    student_sha = sha256_file(student)
    fs = bundle.manifest.get("fewstep")
    if fs is not None and fs["student"]["sha256"] == student_sha:
        logger.info("%s already holds this student (sha256 %s): nothing to do", bundle.path, student_sha[:12])
        return False
    state, info = read_student(student)
    module = student_module(bundle, state, str(student))
    den = bundle.graph_spec("denoiser")
    spec = GraphSpec(DENOISER_FEWSTEP, den.inputs, den.outputs)
    m = bundle.manifest
    dims = {"num_classes": int(m["model"]["num_classes"]), "grid_size": int(m["model"]["grid_size"])}
    path = Path(bundle.path)
    scratch = Path(tempfile.mkdtemp(prefix=".fewstep.", dir=path))
    try:
        example = sample_inputs(spec, EXPORT_BATCH, seed=1234, **dims)
        files = export_graph(module, spec, example, scratch, opset)
        check_graph(scratch / files[0], spec)
        entry: dict[str, Any] = {"file": files[0], "opset": opset, **spec.to_dict(), "validation": None}
        if validate:
            entry["validation"] = val = validate_graph(module, scratch / files[0], spec, **dims)
            logger.info("%s: validated: max abs %.3g, max rel %.3g", DENOISER_FEWSTEP, val["max_abs"], val["max_rel"])
        shutil.copyfile(student, scratch / STUDENT_FILE)
        for f in (*files, STUDENT_FILE):
            os.replace(scratch / f, path / f)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    manifest = {k: v for k, v in m.items() if k not in ("files", "format", "format_version", DIGEST_KEY)}
    manifest["graphs"] = {**m["graphs"], DENOISER_FEWSTEP: entry}
    manifest["fewstep"] = {
        "graph": DENOISER_FEWSTEP,
        "steps": list(DISTILLED_STEPS),
        "teacher_steps": TEACHER_STEPS,
        "method": str(info.get("method", "")),
        "made_by": MADE_BY,
        "student": {"file": STUDENT_FILE, "sha256": student_sha},
        "training": info,
    }
    write_manifest(path, manifest, names={*m["files"], *files, STUDENT_FILE})  # not other files beside them
    logger.info("added %s (steps %s) to %s", DENOISER_FEWSTEP, list(DISTILLED_STEPS), path)
    return True
