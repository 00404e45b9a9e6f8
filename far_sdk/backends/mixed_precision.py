"""Mixed-precision ONNX for reduced-precision engines: the network's matrix products in fp16 / bf16, fp32 islands
everywhere else, made explicit with Cast nodes so a strongly typed TensorRT network (or ONNX Runtime's TensorRT
execution provider, which builds strongly typed networks when its fp16 flag is off) cannot run them otherwise.

Why islands. The denoiser graph ends in the guided DDPM update, x0 = a x - b eps with a = b ~ 20,291 at t = 999
(:func:`training.graph_modules.ddpm_update`): in fp16 a x overflows once |x| > 3.2, in bf16 (8 significant bits)
the O(1) difference of two ~2e4 terms is lost. A weakly typed fp16 build (the precision flags alone) lets
TensorRT pick reduced precision for those elementwise layers; a strongly typed build from this graph cannot.

The partition (:func:`reduced_nodes`), from the graph's structure only (node names carry no meaning):

- reduced: every GEMM-like node (Gemm, MatMul, Conv, ConvTranspose) and every node both downstream of one and
  upstream of one -- the trunk between the first and the last matrix product;
- fp32: everything else -- the inputs' preparation, the time-step features, the guided update after the last
  GEMM, the outputs -- and, inside the trunk, the normalisation statistics (LayerNormalization,
  GroupNormalization, InstanceNormalization, Reduce*/Pow/Sqrt/Exp/Log), whose sums of squares overflow fp16.

Float initializers read only by reduced nodes are stored in the reduced type; every other crossing gets a Cast.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from far_sdk.errors import InvalidArgumentError

#: Matrix products: the work that reduced precision speeds up.
GEMM_OPS = frozenset({"Gemm", "MatMul", "Conv", "ConvTranspose"})
#: Kept fp32 even inside the trunk: normalisation statistics and the ops that build them.
FP32_OPS = frozenset(
    {
        "LayerNormalization",
        "GroupNormalization",
        "InstanceNormalization",
        "BatchNormalization",
        "ReduceMean",
        "ReduceSum",
        "ReduceSumSquare",
        "ReduceL2",
        "Pow",
        "Sqrt",
        "Reciprocal",
        "Exp",
        "Log",
    }
)
#: Ops whose output type an attribute fixes (their float outputs stay fp32; a Cast follows where needed).
TYPED_BY_ATTRIBUTE = frozenset({"Constant", "ConstantOfShape", "RandomNormal", "RandomUniform", "EyeLike"})
#: Inputs the ONNX spec types as float32 whatever the data type (Resize's roi and scales).
FP32_INPUTS = {"Resize": frozenset({1, 2}), "Upsample": frozenset({1})}
REDUCED = ("fp16", "bf16")
FLOAT_TYPES = (1, 10, 16)  # TensorProto FLOAT, FLOAT16, BFLOAT16


def _onnx():
    import onnx  # noqa: PLC0415 - export-time dependency, loaded when a reduced-precision engine is built

    return onnx


def elem_type(precision: str) -> int:
    tp = _onnx().TensorProto
    return {"fp16": tp.FLOAT16, "bf16": tp.BFLOAT16, "fp32": tp.FLOAT}[precision]


def _without_weights(model: Any) -> Any:
    """``model`` with its float initializers turned into typed graph inputs: shape inference needs their types
    and shapes only, and a model with its weights inline may pass protobuf's 2 GiB limit (FAR-H)."""
    onnx = _onnx()
    g = model.graph
    weights = [t for t in g.initializer if t.data_type in FLOAT_TYPES]
    inputs = list(g.input) + [onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in weights]
    rest = [t for t in g.initializer if t.data_type not in FLOAT_TYPES]
    graph = onnx.helper.make_graph(list(g.node), g.name, inputs, list(g.output), rest, value_info=list(g.value_info))
    return onnx.helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)


def float_tensors(model: Any) -> set[str]:
    """Names of the graph's float32 tensors (inputs, initializers, node outputs), by ONNX shape inference."""
    onnx = _onnx()
    g = model.graph
    floats = {t.name for t in g.initializer if t.data_type == onnx.TensorProto.FLOAT}
    inferred = onnx.shape_inference.infer_shapes(_without_weights(model), strict_mode=False)
    g = inferred.graph
    floats |= {v.name for v in list(g.input) + list(g.output) + list(g.value_info) if v.type.tensor_type.elem_type == 1}
    for n in g.node:  # constants: shape inference may not list them
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value" and a.t.data_type == onnx.TensorProto.FLOAT:
                    floats.add(n.output[0])
    return floats


def reduced_nodes(graph: Any, everything: bool = False) -> set[int]:
    """Indices of the nodes of ``graph`` (topologically ordered) that run in reduced precision: see the module
    docstring. ``everything``: every node, as an unconstrained (weakly typed) reduced-precision engine may."""
    nodes = list(graph.node)
    if everything:
        return {i for i, n in enumerate(nodes) if n.op_type != "Constant"}
    producer = {o: i for i, n in enumerate(nodes) for o in n.output}
    down = [False] * len(nodes)  # downstream of (or is) a GEMM
    for i, n in enumerate(nodes):
        down[i] = n.op_type in GEMM_OPS or any(down[producer[t]] for t in n.input if t in producer)
    up = [False] * len(nodes)  # upstream of (or is) a GEMM
    consumers: dict[str, list[int]] = {}
    for i, n in enumerate(nodes):
        for t in n.input:
            consumers.setdefault(t, []).append(i)
    for i in range(len(nodes) - 1, -1, -1):
        n = nodes[i]
        up[i] = n.op_type in GEMM_OPS or any(up[j] for o in n.output for j in consumers.get(o, ()))
    return {i for i, n in enumerate(nodes) if down[i] and up[i] and n.op_type not in FP32_OPS | TYPED_BY_ATTRIBUTE}


def to_bfloat16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounded to nearest even (NaN stays NaN)."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    rounded = ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    return np.where(np.isnan(a), np.uint16(0x7FC0), rounded)


def _convert_initializer(t: Any, precision: str) -> None:
    onnx = _onnx()
    a = onnx.numpy_helper.to_array(t).astype(np.float32)
    if precision == "fp16":
        new = onnx.numpy_helper.from_array(a.astype(np.float16), t.name)
    else:
        new = onnx.TensorProto(name=t.name, data_type=onnx.TensorProto.BFLOAT16, dims=list(a.shape))
        new.raw_data = to_bfloat16_bits(a).tobytes()
    t.CopyFrom(new)


def mixed_precision(model: Any, precision: str, *, everything: bool = False) -> Any:
    """A copy of ``model`` (an fp32 ``onnx.ModelProto``) with :func:`reduced_nodes` in ``precision`` ("fp16" |
    "bf16") and explicit Casts at every crossing; graph inputs and outputs keep their fp32 types.
    ``everything``: no fp32 islands (the graph as an unconstrained engine may run it; for tests)."""
    onnx = _onnx()
    if precision not in REDUCED:
        raise InvalidArgumentError(f"precision must be one of {REDUCED}, got {precision!r}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    floats = float_tensors(out)
    red = reduced_nodes(g, everything)
    low, f32 = elem_type(precision), onnx.TensorProto.FLOAT
    nodes = list(g.node)

    def float_inputs(i: int) -> Iterable[tuple[int, str]]:
        keep = FP32_INPUTS.get(nodes[i].op_type, frozenset()) if i in red else frozenset()
        return ((k, t) for k, t in enumerate(nodes[i].input) if t in floats and k not in keep)

    # initializers read only as reduced inputs are stored reduced
    readers: dict[str, set[bool]] = {}
    for i in range(len(nodes)):
        for _, t in float_inputs(i):
            readers.setdefault(t, set()).add(i in red)
    for t in g.initializer:
        if t.data_type == f32 and readers.get(t.name) == {True}:
            _convert_initializer(t, precision)
    reduced = {t.name for t in g.initializer if t.data_type == low}
    reduced |= {o for i in red for o in nodes[i].output if o in floats}
    # graph outputs computed in reduced precision: the producer writes NAME__reduced, a Cast writes NAME
    outputs = {o.name for o in g.output}
    renamed = {o: f"{o}__reduced" for o in outputs & reduced}
    for n in nodes:
        n.input[:] = [renamed.get(t, t) for t in n.input]
        n.output[:] = [renamed.get(t, t) for t in n.output]
    reduced = {renamed.get(t, t) for t in reduced}
    floats |= set(renamed.values())

    casts: dict[tuple[str, int], str] = {}
    new_nodes = []

    def cast(t: str, to: int) -> str:
        key = (t, to)
        if key not in casts:
            casts[key] = f"{t}__to_{'fp32' if to == f32 else precision}"
            new_nodes.append(onnx.helper.make_node("Cast", [t], [casts[key]], name=f"{casts[key]}/Cast", to=to))
        return casts[key]

    for i, n in enumerate(nodes):
        is_red = i in red
        for k, t in float_inputs(i):
            if is_red and t not in reduced:
                n.input[k] = cast(t, low)
            elif not is_red and t in reduced:
                n.input[k] = cast(t, f32)
        if n.op_type == "Cast" and is_red:  # a cast inside the trunk keeps the trunk's type
            for a in n.attribute:
                if a.name == "to" and a.i == f32:
                    a.i = low
        new_nodes.append(n)
    for name, tmp in renamed.items():
        new_nodes.append(onnx.helper.make_node("Cast", [tmp], [name], name=f"{name}/Cast", to=f32))
    del g.node[:]
    g.node.extend(new_nodes)
    del g.value_info[:]  # stale types; TensorRT and ONNX Runtime infer them again
    return out


def summary(model: Any) -> dict[str, int]:
    """Node counts of a mixed-precision graph by type of output: {"fp32": ..., "fp16"|"bf16": ..., "casts": ...}."""
    onnx = _onnx()
    inferred = onnx.shape_inference.infer_shapes(_without_weights(model), strict_mode=True)
    types = {
        v.name: v.type.tensor_type.elem_type for v in list(inferred.graph.value_info) + list(inferred.graph.output)
    }
    names = {onnx.TensorProto.FLOAT: "fp32", onnx.TensorProto.FLOAT16: "fp16", onnx.TensorProto.BFLOAT16: "bf16"}
    counts: dict[str, int] = {"casts": 0}
    for n in inferred.graph.node:
        if n.op_type == "Cast":
            counts["casts"] += 1
            continue
        kind = names.get(types.get(n.output[0], 0)) if n.output else None
        if kind:
            counts[kind] = counts.get(kind, 0) + 1
    return counts
