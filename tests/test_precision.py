"""Reduced-precision engines are right by construction (far_sdk.backends.mixed_precision): the denoiser graph run
the way an unconstrained fp16 / bf16 engine may run it (every node reduced, the guided update included) against
the mixed-precision graph our TensorRT builds parse (GEMM trunk reduced, fp32 islands), both against the fp32
graph, at the first step row t = 999 where x0 = a x - b eps with a = b ~ 20,291.

fp16 runs in ONNX Runtime's CPU kernels; bf16, which they lack, in ONNX's reference evaluator (NumPy with
ml_dtypes' bfloat16). The graph is engines/far-demo's exported denoiser (no export needed)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import ROOT

from far_sdk.maths.diffusion import Step, denoise_step_table

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from far_sdk.backends.mixed_precision import (  # noqa: E402
    FP32_OPS,
    GEMM_OPS,
    mixed_precision,
    reduced_nodes,
    summary,
    to_bfloat16_bits,
)

DENOISER = ROOT / "engines" / "far-demo" / "denoiser.onnx"


@pytest.fixture(scope="module")
def graph():
    return onnx.load(str(DENOISER))


def _feeds(row: int, images: int = 4) -> dict[str, np.ndarray]:
    """Pure noise x (4 images x 256 tokens x 4 channels: 4,096 values, as at t = 999), cond, noise, a step row."""
    rng = np.random.default_rng(0)
    f = {
        "x": rng.standard_normal((images, 256, 4), dtype=np.float32),
        "noise": rng.standard_normal((images, 256, 4), dtype=np.float32),
        "cond": rng.standard_normal((2, images, 256, 128), dtype=np.float32),
        "step": denoise_step_table(10, 3.0, 1.0)[row].copy(),
    }
    return f


def _ort(model, feeds):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _rel(a, b):
    return float(np.abs(a.astype(np.float64) - b).max() / np.abs(b).max())


def test_the_first_step_row_is_the_hard_case():
    f = _feeds(0)
    assert f["step"][Step.timestep] == 999 and f["step"][Step.x0_coef_x] > 2e4 and f["step"][Step.x0_coef_eps] > 2e4
    assert np.abs(f["x"]).max() > 65504 / 20291  # some a x overflows fp16


def test_fp16_everywhere_overflows_at_t999_and_the_mixed_graph_matches_fp32(graph):
    f = _feeds(0)
    ref = _ort(graph, f)
    unconstrained = _ort(mixed_precision(graph, "fp16", everything=True), f)
    assert not np.isfinite(unconstrained).all()  # a x > 65504: inf, then inf - inf
    ours = _ort(mixed_precision(graph, "fp16"), f)
    assert np.isfinite(ours).all() and _rel(ours, ref) < 3e-3


def test_fp16_mixed_graph_matches_fp32_at_t0(graph):
    f = _feeds(-1)
    assert f["step"][Step.timestep] == 0
    ref = _ort(graph, f)
    assert _rel(_ort(mixed_precision(graph, "fp16"), f), ref) < 3e-3


def test_bf16_everywhere_loses_the_update_and_the_mixed_graph_keeps_it(graph):
    from onnx.reference import ReferenceEvaluator

    f = _feeds(0, images=2)
    ref = _ort(graph, f)
    with np.errstate(all="ignore"):
        unconstrained = ReferenceEvaluator(mixed_precision(graph, "bf16", everything=True)).run(None, f)[0]
        ours = ReferenceEvaluator(mixed_precision(graph, "bf16")).run(None, f)[0]
    err_ours, err_all = _rel(ours, ref), _rel(unconstrained, ref)
    # ours: the bf16 network's own error (eps amplified by b / a at t = 999); everywhere: the update's rounding on top
    assert np.isfinite(ours).all() and err_ours < 3e-2
    assert err_all > 4 * err_ours, (err_all, err_ours)


def test_the_partition_is_the_gemm_trunk_without_normalisation(graph):
    g = graph.graph
    red = reduced_nodes(g)
    nodes = list(g.node)
    gemms = [i for i, n in enumerate(nodes) if n.op_type in GEMM_OPS]
    assert gemms and set(gemms) <= red
    assert not any(nodes[i].op_type in FP32_OPS for i in red)  # LayerNormalization stays fp32
    after = [n.op_type for n in nodes[gemms[-1] + 1 :]]
    assert {"Max", "Min", "Exp"} <= set(after)  # the guided update follows the last GEMM ...
    assert all(i not in red for i in range(gemms[-1] + 1, len(nodes)))  # ... and is fp32
    mixed = mixed_precision(graph, "fp16")
    onnx.checker.check_model(mixed)
    counts = summary(mixed)
    assert counts["fp16"] > 0 and counts["fp32"] > 0 and counts["casts"] > 0
    io = {v.name: v.type.tensor_type.elem_type for v in list(mixed.graph.input) + list(mixed.graph.output)}
    assert set(io.values()) == {onnx.TensorProto.FLOAT}  # the engine's I/O stays fp32


def test_bfloat16_rounding_matches_ml_dtypes():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    a = np.random.default_rng(1).standard_normal(10_000).astype(np.float32) * 1e3
    a[:4] = [0.0, -0.0, np.inf, 1.0 + 2**-8]  # a tie rounds to even
    assert np.array_equal(to_bfloat16_bits(a), a.astype(ml_dtypes.bfloat16).view(np.uint16))
