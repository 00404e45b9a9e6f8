"""The TensorRT network and builder configuration of one graph: parse the bundle's ONNX file (for fp16 / bf16 its
mixed-precision copy with fp32 islands) into a strongly typed network, set the batch profile and the timing cache,
build the serialized engine. Used by
:mod:`export.trt_build` (which decides what to build and validates it, :mod:`export.trt_validate`)."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from far_sdk.backends.mixed_precision import mixed_precision
from far_sdk.backends.mixed_precision import summary as mixed_summary
from far_sdk.backends.tensorrt import cache as tc
from far_sdk.backends.tensorrt.engine import trt_logger
from far_sdk.bundle.bundle import Bundle
from far_sdk.errors import ExportError
from far_sdk.fileio import atomic_write_bytes

logger = logging.getLogger(__name__)


def build_plan(trt: Any, bundle: Bundle, key: tc.EngineKey, workspace_gb: float | None) -> Any:
    """Parse the graph's ONNX file (reduced precision: its mixed-precision copy, :func:`engine_onnx`) into a
    strongly typed network and build the serialized engine (an IHostMemory) for ``key``."""
    spec = bundle.graph_spec(key.graph)
    tlog = trt_logger(trt)
    tlog.take_errors()
    builder = trt.Builder(tlog)
    network = create_network(trt, builder, key.precision)
    parser = trt.OnnxParser(network, tlog)
    with tempfile.TemporaryDirectory(prefix="far-mixed-", dir=tc.trt_dir(bundle)) as work:
        path = engine_onnx(bundle, key.graph, key.precision, Path(work))
        if not parser.parse_from_file(str(path)):  # from the path: external weights resolve beside it
            errors = [format_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
            raise ExportError(
                f"TensorRT {trt.__version__}'s ONNX parser rejected {path.name}:\n  "
                + "\n  ".join(errors or ["no error reported"])
            )
        config = builder.create_builder_config()
        if workspace_gb is not None:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
        config.builder_optimization_level = key.opt_level
        set_precision(trt, config, key.precision)
        profile = builder.create_optimization_profile()
        for t in spec.inputs:
            if any(isinstance(d, str) for d in t.shape):
                profile.set_shape(
                    t.name,
                    *(
                        tuple(tc.ROWS_PER_IMAGE[d] * n if isinstance(d, str) else d for d in t.shape)
                        for n in key.profile
                    ),
                )
        if config.add_optimization_profile(profile) < 0:
            raise ExportError(
                f"TensorRT rejected the batch profile {tc.format_profile(key.graph_profile)} of {key.graph}: "
                f"{tlog.take_errors()}"
            )
        cache_path = tc.trt_dir(bundle) / tc.TIMING_CACHE_NAME
        if not config.set_timing_cache(load_timing_cache(config, cache_path), False):
            logger.warning("the timing cache %s comes from another GPU or TensorRT: starting a fresh one", cache_path)
            config.set_timing_cache(config.create_timing_cache(b""), False)
        plan = builder.build_serialized_network(network, config)  # the parser (and its weights) still alive
    if plan is None:
        raise ExportError(
            f"TensorRT could not build the {key.graph} engine: {tlog.take_errors() or 'see the TensorRT log above'}"
        )
    atomic_write_bytes(cache_path, memoryview(config.get_timing_cache().serialize()))
    return plan


def create_network(trt: Any, builder: Any, precision: str) -> Any:
    """A strongly typed network: every tensor's type comes from the ONNX graph (its Casts), none from builder
    flags, so the fp32 islands of a mixed-precision graph stay fp32 (TensorRT 10: the STRONGLY_TYPED creation
    flag; TensorRT 11: always). Without the flag (TensorRT < 10) only fp32 engines are built."""
    flag = getattr(getattr(trt, "NetworkDefinitionCreationFlag", None), "STRONGLY_TYPED", None)
    if flag is None:
        if precision != "fp32":
            raise ExportError(
                f"TensorRT {trt.__version__} cannot build strongly typed networks, which {precision} engines need "
                "(their fp32 islands, e.g. the DDPM update at t = 999, must stay fp32): use TensorRT >= 10, or build "
                "with --precision fp32"
            )
        return builder.create_network(0)
    return builder.create_network(1 << int(flag))


def engine_onnx(bundle: Bundle, graph: str, precision: str, work: Path) -> Path:
    """The ONNX file TensorRT parses for ``graph`` in ``precision``: the bundle's own (verified) file for fp32;
    for fp16 / bf16 its mixed-precision copy (:func:`far_sdk.backends.mixed_precision.mixed_precision`), written
    into ``work`` with its weights beside it."""
    path = bundle.graph_file(graph)
    if precision == "fp32":
        return path
    import onnx  # noqa: PLC0415 - export-time dependency: only reduced-precision builds rewrite the graph

    model = mixed_precision(onnx.load(str(path)), precision)  # external weights load from beside the bundle file
    out = work / f"{graph}-{precision}.onnx"
    onnx.save_model(model, str(out), save_as_external_data=True, location=out.name + ".data", size_threshold=1024)
    logger.info("%s: %s graph %s", graph, precision, mixed_summary(model))
    return out


def set_precision(trt: Any, config: Any, precision: str) -> None:
    """Builder flags for ``precision``: none but TF32 off (fp32 means fp32). A strongly typed network takes its
    reduced precision from the graph's types; TensorRT rejects the FP16 / BF16 flags with it."""
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # no TF32 matmuls/convolutions


def load_timing_cache(config: Any, path: Path) -> Any:
    """The timing cache saved by earlier builds (a fresh one when absent or unreadable)."""
    data = b""
    if path.is_file():
        data = path.read_bytes()
    try:
        cache = config.create_timing_cache(data)
    except Exception as e:  # noqa: BLE001 - a corrupt cache file: TensorRT's own exception types
        logger.warning("ignoring the unreadable timing cache %s (%s)", path, e)
        cache = None
    return cache if cache is not None else config.create_timing_cache(b"")


def format_parser_error(err: Any) -> str:
    """One line for a TensorRT ONNX parser error: description, node index, name and operator."""

    def get(attr: str) -> Any:
        fn = getattr(err, attr, None)
        try:
            return fn() if callable(fn) else fn
        except Exception:  # noqa: BLE001 - accessors missing from older TensorRT versions
            return None

    text = str(get("desc") or err)
    node = get("node")
    if isinstance(node, int) and node >= 0:
        name, op = get("node_name"), get("node_operator")
        text += f" (node {node}{f' {name!r}' if name else ''}{f', {op}' if op else ''})"
    return text
