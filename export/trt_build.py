"""``far-export trt``: a bundle's ONNX graphs -> TensorRT plans for this GPU, cached in ``bundle/trt``.

    far-export trt --bundle engines/far_large --precision fp16 --batch 1:4:8

Per graph: verify the bundle (sha256 of every file), then, under a file lock on ``bundle/trt/.lock``,
reuse the plan whose sidecar matches the :class:`~far_sdk.backends.tensorrt.cache.EngineKey` (ONNX sha256,
precision, batch profile, optimisation level, TensorRT version, GPU) unless ``rebuild``, or build it:
TensorRT's ONNX parser on the verified file path (external weights resolve next to it), an
explicit-batch network, one optimisation profile over the batch axis (the transformer's holds the
2x CFG rows), precision flags, the shared timing cache ``bundle/trt/timing.cache``, then
``build_serialized_network``. Before anything is written the new engine runs once at the opt batch
on seeded inputs and is compared with onnxruntime (CPU); non-finite outputs or errors beyond the
precision's tolerance stop the build. Plans and sidecars are written atomically.

The VAE decoder is built in fp32 unless ``vae_precision`` says otherwise: fp16 VAE decoders
overflow. TensorRT 11 removed the fp16/bf16 builder flags (strongly typed networks only): there,
only fp32 engines can be built from the bundle's fp32 graphs.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import far_sdk
from far_sdk.backends.tensorrt import cache as tc
from far_sdk.backends.tensorrt.engine import device_env, import_runtime, run_plan_once, select_device, trt_logger
from far_sdk.bundle.bundle import Bundle
from far_sdk.bundle.graphs import GRAPH_NAMES, TEXT_ENCODER, GraphSpec
from far_sdk.errors import (
    BackendUnavailableError,
    ExportError,
    FarError,
    IncompatibleBundleError,
    InvalidArgumentError,
    exit_code_for,
)
from far_sdk.fileio import atomic_write_bytes
from far_sdk.maths.diffusion import denoise_step_table
from far_sdk.maths.masking import random_mask

logger = logging.getLogger(__name__)

#: Largest accepted max|engine - onnxruntime| / max|onnxruntime| per precision at build-time validation.
TOLERANCE_REL = {"fp32": 1e-3, "fp16": 3e-2, "bf16": 6e-2}
VALIDATION_SEED = 0
#: Every graph an engine can be built for: the three of each bundle, and a text bundle's encoder when it has one.
ALL_GRAPHS = (*GRAPH_NAMES, TEXT_ENCODER)
TRT_HELP = "build TensorRT engines of a bundle for this GPU (cached under BUNDLE/trt)"


@dataclass(frozen=True)
class BuildOptions:
    """Validated arguments of :func:`build_engines`."""

    precision: str = "fp16"
    vae_precision: str = "fp32"
    profile: tuple[int, int, int] = tc.DEFAULT_PROFILE
    opt_level: int = tc.DEFAULT_OPT_LEVEL
    workspace_gb: float | None = None
    graphs: tuple[str, ...] = ALL_GRAPHS
    rebuild: bool = False
    validate: bool = True

    def __post_init__(self) -> None:
        for label, p in (("precision", self.precision), ("vae_precision", self.vae_precision)):
            if p not in tc.PRECISIONS:
                raise InvalidArgumentError(f"{label} must be one of {tc.PRECISIONS}, got {p!r}")
        object.__setattr__(self, "profile", tc.parse_batch_profile(self.profile))
        if isinstance(self.opt_level, bool) or not isinstance(self.opt_level, int) or not 0 <= self.opt_level <= 5:
            raise InvalidArgumentError(f"opt_level must be an integer 0..5, got {self.opt_level!r}")
        w = self.workspace_gb
        if w is not None and (
            isinstance(w, bool) or not isinstance(w, (int, float)) or not (math.isfinite(w) and w > 0)
        ):
            raise InvalidArgumentError(f"workspace_gb must be a positive number of GiB or None, got {w!r}")
        graphs = tuple(self.graphs)
        bad = [g for g in graphs if g not in ALL_GRAPHS]
        if bad or not graphs:
            raise InvalidArgumentError(f"graphs must be a non-empty subset of {ALL_GRAPHS}, got {list(graphs)}")
        object.__setattr__(self, "graphs", tuple(g for g in ALL_GRAPHS if g in graphs))

    def precision_of(self, graph: str) -> str:
        return self.vae_precision if graph == "vae_decoder" else self.precision


@dataclass(frozen=True)
class BuildResult:
    graph: str
    key: tc.EngineKey
    plan: Path
    reused: bool
    seconds: float
    validation: dict[str, Any] | None


def require_tensorrt() -> tuple[Any, Any]:
    """(tensorrt, cuda.bindings.runtime), or BackendUnavailableError saying how to get them."""
    try:
        return import_runtime()
    except BackendUnavailableError as e:
        raise BackendUnavailableError(
            "far-export trt needs the tensorrt package and an NVIDIA GPU: pip install 'far-sdk[gpu]' "
            f"(tensorrt, cuda-python) on a machine with a CUDA GPU. {e}"
        ) from e


# ---- the build -------------------------------------------------------------------------------------


def build_engines(
    bundle_dir: str | Path,
    precision: str = "fp16",
    batch: Any = tc.DEFAULT_PROFILE,
    workspace_gb: float | None = None,
    opt_level: int = tc.DEFAULT_OPT_LEVEL,
    graphs: Sequence[str] | None = None,
    rebuild: bool = False,
    *,
    vae_precision: str = "fp32",
    validate: bool = True,
    device: int = 0,
    progress: Callable[[str], Any] | None = None,
) -> list[BuildResult]:
    """Build (or reuse) the TensorRT plan of each graph in ``graphs``; see the module docstring.

    ``batch``: images per call, (min, opt, max) or "MIN:OPT:MAX"; ``progress(message)`` receives
    per-graph progress (default: this module's logger). Raises BackendUnavailableError without
    tensorrt/cuda-python/GPU (before anything else), ExportError when parsing, building or
    validation fails (nothing is written for that graph).
    """
    trt, cudart = require_tensorrt()
    opts = BuildOptions(
        precision=precision,
        vae_precision=vae_precision,
        profile=batch,
        opt_level=opt_level,
        workspace_gb=workspace_gb,
        graphs=ALL_GRAPHS if graphs is None else tuple(graphs),
        rebuild=rebuild,
        validate=validate,
    )
    say = progress or (lambda msg: logger.info("%s", msg))
    env = device_env(trt, cudart, select_device(cudart, device))
    bundle = Bundle.load(bundle_dir)  # every file's sha256 is checked before TensorRT parses any
    say(
        f"TensorRT engines for {bundle.path} on {env.describe()}, batch {tc.format_profile(opts.profile)} images per "
        "call"
    )
    results = []
    for g in _graphs_of(bundle, opts.graphs, asked=graphs is not None):
        key = tc.key_for(
            bundle, g, precision=opts.precision_of(g), profile=opts.profile, opt_level=opts.opt_level, env=env
        )
        with tc.build_lock(bundle):  # a second builder waits here, then finds the plan built
            results.append(_build_one(trt, cudart, bundle, key, opts, say))
    return results


def _graphs_of(bundle: Bundle, graphs: tuple[str, ...], *, asked: bool) -> tuple[str, ...]:
    """``graphs`` this bundle has: the text encoder only where the manifest declares its graph (asked for by name
    and missing: an InvalidArgumentError)."""
    if bundle.graph_entry(TEXT_ENCODER) is not None:
        return graphs
    if asked and TEXT_ENCODER in graphs:
        raise InvalidArgumentError(
            f"bundle {bundle.name!r} has no text encoder graph to build (far-export onnx --text-encoder)"
        )
    return tuple(g for g in graphs if g != TEXT_ENCODER)


def _build_one(
    trt: Any, cudart: Any, bundle: Bundle, key: tc.EngineKey, opts: BuildOptions, say: Callable[[str], Any]
) -> BuildResult:
    g = key.graph
    if not opts.rebuild:
        try:
            plan = tc.check_plan(bundle, key)
            _, side = tc.read_sidecar(tc.sidecar_path(plan))
            say(f"{g}: reusing {plan.name} (built {side.get('built_at')} for this key; --rebuild to build anew)")
            return BuildResult(g, key, plan, True, 0.0, side.get("validation"))
        except tc.EngineNotBuiltError:
            pass
        except IncompatibleBundleError as e:  # a damaged plan: say so, then replace it
            say(f"{g}: {e}")
    rows = tc.format_profile(key.graph_profile)
    say(f"{g}: building a {key.precision} engine (batch rows {rows}, optimisation level {key.opt_level}) ...")
    t0 = time.perf_counter()
    plan = build_plan(trt, bundle, key, opts.workspace_gb)
    seconds = time.perf_counter() - t0
    validation = validate_plan(trt, cudart, bundle, key, plan) if opts.validate else None
    path = tc.record_plan(
        bundle, key, plan, build_seconds=seconds, validation=validation, far_sdk_version=far_sdk.__version__
    )
    check = (
        ""
        if validation is None
        else (
            f", validated at {validation['images']} images: max abs {validation['max_abs']:.2e}, max rel "
            f"{validation['max_rel']:.2e}"
            if validation.get("max_rel") is not None
            else ", outputs finite (onnxruntime not installed: not compared)"
        )
    )
    say(f"{g}: built in {seconds:.1f} s -> {path.name} ({path.stat().st_size / 1e6:.1f} MB){check}")
    return BuildResult(g, key, path, False, seconds, validation)


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


# ---- build-time validation ---------------------------------------------------------------------------


def sample_feeds(
    spec: GraphSpec, images: int, manifest: dict[str, Any], seed: int = VALIDATION_SEED
) -> dict[str, np.ndarray]:
    """Seeded inputs of ``spec`` for ``images`` images: N(0, 1) floats; class ids with the null class
    in the unconditional half; an integer level; a 0 / 1 mask (far_sdk.maths.masking.random_mask); a step row with
    non-zero noise (torch-free)."""
    rng = np.random.Generator(np.random.PCG64(seed))
    model = manifest["model"]
    num_classes, grid = int(model.get("num_classes", 1)), int(model["grid_size"])
    null = int(manifest.get("null_class_id", num_classes))
    feeds: dict[str, np.ndarray] = {}
    for t in spec.inputs:
        shape = tuple(tc.ROWS_PER_IMAGE[d] * images if isinstance(d, str) else d for d in t.shape)
        if t.name == "class_ids":
            ids = rng.integers(0, num_classes, size=shape, dtype=np.int64)
            ids[shape[0] // 2 :] = null
            feeds[t.name] = ids
        elif t.name == "level":
            feeds[t.name] = np.full(shape, rng.integers(0, grid), dtype=np.float32)
        elif t.name == "null":  # text bundles: the unconditional half uses fake_latent
            feeds[t.name] = (np.arange(shape[0]) >= shape[0] // 2).astype(np.float32)
        elif t.name == "mask":
            feeds[t.name] = random_mask(rng, shape)
        elif t.name == "step":
            table = denoise_step_table(10, 3.0, 1.0)
            feeds[t.name] = table[rng.integers(0, len(table) - 1)].copy()  # the last row has noise scale 0
        elif t.name in ("input_ids", "attention_mask"):  # the text encoder: ids below the pad id, padded tails
            feeds.update(_text_feeds(rng, shape, manifest))
        else:
            feeds[t.name] = rng.standard_normal(shape, dtype=np.float32)
    return feeds


def _text_feeds(rng: np.random.Generator, shape: tuple[int, ...], manifest: dict[str, Any]) -> dict[str, np.ndarray]:
    enc = manifest["text"]["encoder"]
    pad, S = int(enc["pad_token_id"]), int(enc.get("system_length", 0))
    ids = rng.integers(0, max(pad, 1), size=shape, dtype=np.int64)
    for row, n in enumerate(rng.integers(0, shape[1] - S, size=shape[0])):  # prompts of random lengths
        ids[row, S + n :] = pad
    return {"input_ids": ids, "attention_mask": (ids != pad).astype(np.int64) | (np.arange(shape[1]) < S)}


def onnxruntime_reference(bundle: Bundle, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
    try:
        import onnxruntime as ort  # noqa: PLC0415 - the backend's runtime: loaded when chosen
    except ImportError:
        logger.warning("onnxruntime is not installed: the %s engine is checked for finite outputs only", graph)
        return None
    spec = bundle.graph_spec(graph)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(bundle.graph_file(graph)), opts, providers=["CPUExecutionProvider"])
    return dict(zip(spec.output_names, session.run(spec.output_names, feeds)))


def compare_outputs(
    graph: str, precision: str, got: dict[str, np.ndarray], ref: dict[str, np.ndarray] | None
) -> dict[str, Any]:
    """Check an engine's outputs: all finite, and within :data:`TOLERANCE_REL` of ``ref`` (when given).

    ``max_abs = max |got - ref|``, ``max_rel = max_abs / max |ref|`` (worst over the outputs).
    """
    flag = "--vae-precision" if graph == "vae_decoder" else "--precision"
    for name, g in got.items():
        if not np.isfinite(g).all():
            if graph == "vae_decoder" and precision != "fp32":
                raise ExportError(
                    f"the VAE decoder overflows in {precision} ({name} has NaN/inf at build-time validation): "
                    "rebuild with --vae-precision fp32. Nothing was written."
                )
            raise ExportError(
                f"the {graph} engine ({precision}) produced NaN/inf in {name} at build-time validation: "
                f"rebuild with {flag} fp32. Nothing was written."
            )
    if ref is None:
        return {"max_abs": None, "max_rel": None, "reference": None}
    worst_abs = worst_rel = 0.0
    for name, g in got.items():
        r = np.asarray(ref[name], dtype=np.float64)
        if g.shape != r.shape:
            raise ExportError(f"the {graph} engine's {name} has shape {g.shape}, onnxruntime's {r.shape}")
        err = float(np.abs(g.astype(np.float64) - r).max(initial=0.0))
        scale = float(np.abs(r).max(initial=0.0))
        worst_abs = max(worst_abs, err)
        worst_rel = max(worst_rel, err / scale if scale > 0 else (0.0 if err == 0 else math.inf))
    tol = TOLERANCE_REL[precision]
    if not worst_rel <= tol:
        raise ExportError(
            f"the {graph} engine ({precision}) disagrees with onnxruntime (CPU): max abs {worst_abs:.3g}, max rel "
            f"{worst_rel:.3g} "
            f"> {tol:g}. Rebuild with {flag} fp32, or pass --no-validate to keep it anyway. Nothing was written."
        )
    return {"max_abs": worst_abs, "max_rel": worst_rel, "tolerance_rel": tol, "reference": "onnxruntime-cpu"}


def validate_plan(trt: Any, cudart: Any, bundle: Bundle, key: tc.EngineKey, plan: Any) -> dict[str, Any]:
    """Run the new plan once at the opt batch and compare with onnxruntime (CPU) on the same seeded inputs."""
    spec, images = bundle.graph_spec(key.graph), key.profile[1]
    feeds = sample_feeds(spec, images, bundle.manifest)
    got = run_plan_once(trt, cudart, plan, spec, images, feeds, what=f"the new {key.graph} engine")
    result = compare_outputs(key.graph, key.precision, got, onnxruntime_reference(bundle, key.graph, feeds))
    return {**result, "images": images, "seed": VALIDATION_SEED}


# ---- CLI ---------------------------------------------------------------------------------------------


def _profile_arg(text: str) -> tuple[int, int, int]:
    try:
        return tc.parse_batch_profile(text)
    except InvalidArgumentError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def add_trt_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", type=Path, required=True, help="bundle directory, e.g. engines/far_large")
    p.add_argument(
        "--precision", choices=tc.PRECISIONS, default="fp16", help="transformer and denoiser precision (default: fp16)"
    )
    p.add_argument(
        "--vae-precision",
        choices=tc.PRECISIONS,
        default="fp32",
        help="VAE decoder precision (default: fp32; fp16 VAE decoders overflow)",
    )
    p.add_argument(
        "--batch",
        type=_profile_arg,
        default=tc.DEFAULT_PROFILE,
        metavar="MIN:OPT:MAX",
        help="images per call (default: 1:1:8); one number builds a static batch, the fastest engine",
    )
    p.add_argument(
        "--workspace", type=float, metavar="GB", help="TensorRT workspace limit in GiB (default: TensorRT's)"
    )
    p.add_argument(
        "--opt-level",
        type=int,
        default=tc.DEFAULT_OPT_LEVEL,
        choices=range(6),
        metavar="0-5",
        help="builder optimisation level (default: 3; 5 builds slowest, may run fastest)",
    )
    p.add_argument(
        "--graphs",
        nargs="+",
        choices=ALL_GRAPHS,
        help="graphs to build (default: all the bundle has, its text encoder included)",
    )
    p.add_argument("--rebuild", action="store_true", help="build even when a matching plan exists")
    p.add_argument("--no-validate", action="store_true", help="skip the engine-vs-onnxruntime check (not recommended)")
    p.add_argument("--device", type=int, default=0, help="CUDA device index (default: 0)")


def add_trt_subcommand(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("trt", help=TRT_HELP, description=TRT_HELP)
    add_trt_args(p)
    p.set_defaults(run=run_trt)
    return p


def run_trt(args: argparse.Namespace) -> int:
    """``far-export trt``: build, print per-graph build times; on a far-sdk error, one line and its exit status
    (:data:`far_sdk.errors.EXIT_CODES`)."""
    try:
        results = build_engines(
            args.bundle,
            precision=args.precision,
            batch=args.batch,
            workspace_gb=args.workspace,
            opt_level=args.opt_level,
            graphs=args.graphs,
            rebuild=args.rebuild,
            vae_precision=args.vae_precision,
            validate=not args.no_validate,
            device=args.device,
            progress=print,
        )
    except FarError as e:
        print(f"far-export trt: error: {' '.join(str(e).split())}", file=sys.stderr)
        return exit_code_for(e)
    print(f"{'graph':<12} {'precision':<9} {'batch':<9} {'status':<7} {'seconds':>8} {'max rel':>9}  plan")
    for r in results:
        val = r.validation or {}
        rel = f"{val['max_rel']:>9.2e}" if val.get("max_rel") is not None else f"{'-':>9}"
        print(
            f"{r.graph:<12} {r.key.precision:<9} {tc.format_profile(r.key.profile):<9} "
            f"{'reused' if r.reused else 'built':<7} "
            f"{r.seconds:>8.1f} {rel}  {r.plan}"
        )
    return 0
