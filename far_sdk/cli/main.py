"""The ``far`` command: generate images from a bundle, inspect it, benchmark it, serve it, evaluate it."""

from __future__ import annotations

import argparse
import logging
import platform
import sys

import far_sdk
from far_sdk.bundle.hub import locate_bundle
from far_sdk.cli.bench import add_bench_args, run_bench
from far_sdk.cli.generate import add_generate, run_generate
from far_sdk.cli.info import add_info, run_info
from far_sdk.cli.run import ArgumentParser, bundle_of, run_command
from far_sdk.cli.sampling import CLI_FLAGS
from far_sdk.cli.scale import add_dataset, add_eval, add_serve, run_dataset, run_eval, run_serve

COMMANDS = {
    "generate": (
        add_generate,
        run_generate,
        "generate images: a grid (--out), one PNG per image with its settings (--out-dir), a GIF of the steps",
    ),
    "info": (add_info, run_info, "what a bundle holds: model, sampling defaults, source, graphs, files"),
    "bench": (
        add_bench_args,
        run_bench,
        "time each stage per backend and batch (optionally vs the eager PyTorch sampler), FLOPs, memory",
    ),
    "serve": (
        add_serve,
        run_serve,
        "serve a bundle over HTTP on Ray Serve (dynamic batching, replicas, bounded queue)",
    ),
    "generate-dataset": (
        add_dataset,
        run_dataset,
        "generate N images as ADM-format .npz shards (resumable; Ray workers or one process)",
    ),
    "eval": (add_eval, run_eval, "FID, IS, precision/recall of samples vs a reference through torch-fidelity"),
}

VERSION = f"far-sdk {far_sdk.__version__} (python {platform.python_version()})"


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="far", description="FAR image generation from a far-sdk bundle")
    parser.add_argument("--version", action="version", version=VERSION)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the library does (INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (add, _run, help_) in COMMANDS.items():
        add(sub.add_parser(name, help=help_, description=help_))
    return parser


def _run(a: argparse.Namespace) -> int:
    if hasattr(a, "bundle_flag"):  # the bundle, given as an argument or by --bundle; a hub: name is fetched here
        a.bundle_spec = bundle_of(a, optional=getattr(a, "from_image", None) is not None)
        a.bundle = str(locate_bundle(a.bundle_spec)) if a.bundle_spec else None
    return COMMANDS[a.command][1](a)


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if a.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    return run_command(f"far {a.command}", lambda: _run(a), flags=CLI_FLAGS)


if __name__ == "__main__":
    sys.exit(main())
