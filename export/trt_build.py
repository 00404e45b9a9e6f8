"""``far-export trt``: a bundle's ONNX graphs -> TensorRT plans for this GPU, cached outside the bundle
(``far_sdk.backends.tensorrt.cache.trt_dir``: the user's far-sdk cache).

    far-export trt --bundle engines/far_large --precision fp16 --batch 1:4:8

Per graph: verify the bundle (sha256 of every file), then, under a file lock in the engine cache,
reuse the plan whose sidecar matches the :class:`~far_sdk.backends.tensorrt.cache.EngineKey` (ONNX sha256,
precision, batch profile, optimisation level, TensorRT version, GPU) unless ``rebuild``, or build it
(:mod:`export.trt_network`): a strongly typed network parsed from the verified ONNX file (fp32) or from its
mixed-precision copy (fp16 / bf16: the GEMM trunk reduced, fp32 islands -- the guided DDPM update, the latents,
the normalisation statistics -- kept fp32 by explicit Casts, :mod:`far_sdk.backends.mixed_precision`), one
optimisation profile over the batch axis (the transformer's holds the 2x CFG rows), the shared timing cache
``timing.cache`` of the engine cache, then ``build_serialized_network``. Before anything is written the new engine is
compared with onnxruntime (CPU, fp32) on seeded inputs at the opt batch (:mod:`export.trt_validate`; the denoiser
on the t = 999 row, the t = 0 row and a whole outer step); non-finite outputs or errors beyond the precision's
tolerance stop the build. Plans and sidecars are written atomically; ``backend="auto"`` takes a reduced-precision
plan only when its sidecar records that validation.

The VAE decoder is built in fp32 unless ``vae_precision`` says otherwise: fp16 VAE decoders overflow.
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

import far_sdk
from export.trt_network import build_plan, format_parser_error, set_precision
from export.trt_validate import TOLERANCE_REL, compare_outputs, validate_plan
from far_sdk.backends.tensorrt import cache as tc
from far_sdk.backends.tensorrt import cache_store as cs
from far_sdk.backends.tensorrt.engine import device_env, import_runtime, select_device
from far_sdk.backends.validation import VALIDATION_SEED, sample_feeds
from far_sdk.bundle.bundle import Bundle
from far_sdk.bundle.graphs import GRAPH_NAMES, TEXT_ENCODER
from far_sdk.errors import (
    BackendUnavailableError,
    FarError,
    IncompatibleBundleError,
    InvalidArgumentError,
    exit_code_for,
)

logger = logging.getLogger(__name__)

#: Re-exported: the builder's parts live in export.trt_network (the network) and export.trt_validate (the check).
__all__ = [
    "TOLERANCE_REL",
    "TRT_HELP",
    "VALIDATION_SEED",
    "BuildOptions",
    "BuildResult",
    "add_trt_args",
    "add_trt_subcommand",
    "build_engines",
    "build_plan",
    "compare_outputs",
    "format_parser_error",
    "require_tensorrt",
    "run_trt",
    "sample_feeds",
    "set_precision",
    "validate_plan",
]
TRT_HELP = "build TensorRT engines of a bundle for this GPU (cached in ~/.cache/far-sdk/engines, or $FAR_SDK_CACHE)"
#: Every graph an engine can be built for: the three of each bundle, and a text bundle's encoder when it has one.
ALL_GRAPHS = (*GRAPH_NAMES, TEXT_ENCODER)


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
        with cs.build_lock(bundle):  # a second builder waits here, then finds the plan built
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
    path = cs.record_plan(
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
