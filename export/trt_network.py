"""The TensorRT network and builder configuration of one graph: parse the bundle's ONNX file, set the
precision, the batch profile and the timing cache, build the serialized engine. Used by
:mod:`export.trt_build` (which decides what to build and validates it, :mod:`export.trt_validate`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from far_sdk.backends.tensorrt import cache as tc
from far_sdk.backends.tensorrt.engine import trt_logger
from far_sdk.bundle.bundle import Bundle
from far_sdk.errors import ExportError
from far_sdk.fileio import atomic_write_bytes

logger = logging.getLogger(__name__)


def build_plan(trt: Any, bundle: Bundle, key: tc.EngineKey, workspace_gb: float | None) -> Any:
    """Parse the graph's ONNX file and build the serialized engine (an IHostMemory) for ``key``."""
    spec, path = bundle.graph_spec(key.graph), bundle.graph_file(key.graph)
    tlog = trt_logger(trt)
    tlog.take_errors()
    builder = trt.Builder(tlog)
    # TensorRT 10: every network has an explicit batch axis (the old flag is gone), and without the
    # STRONGLY_TYPED flag the precision flags below decide which kernels may run in fp16/bf16.
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, tlog)
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
                *(tuple(tc.ROWS_PER_IMAGE[d] * n if isinstance(d, str) else d for d in t.shape) for n in key.profile),
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
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ExportError(
            f"TensorRT could not build the {key.graph} engine: {tlog.take_errors() or 'see the TensorRT log above'}"
        )
    atomic_write_bytes(cache_path, memoryview(config.get_timing_cache().serialize()))
    return plan


def set_precision(trt: Any, config: Any, precision: str) -> None:
    if precision == "fp32":
        if hasattr(trt.BuilderFlag, "TF32"):
            config.clear_flag(trt.BuilderFlag.TF32)  # fp32 means fp32: no TF32 matmuls/convolutions
        return
    flag = getattr(trt.BuilderFlag, precision.upper(), None)
    if flag is None:
        raise ExportError(
            f"TensorRT {trt.__version__} has no BuilderFlag.{precision.upper()}: TensorRT 11 builds strongly typed "
            "networks only "
            "(reduced precision must come from the ONNX types). Build with --precision fp32, or use TensorRT 10 for "
            f"{precision} engines."
        )
    config.set_flag(flag)


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
