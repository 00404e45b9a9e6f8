"""The ``far`` command: generate images from a bundle, inspect it, benchmark it, serve it, evaluate it."""

from __future__ import annotations

import argparse
import logging
import sys

from far_sdk.cli.bench import add_bench_args, run_bench
from far_sdk.cli.generate import add_generate, add_info, run_generate, run_info
from far_sdk.cli.run import ArgumentParser, run_command
from far_sdk.cli.scale import add_dataset, add_eval, add_serve, run_dataset, run_eval, run_serve

COMMANDS = {
    "generate": (add_generate, run_generate, "generate images into a grid PNG (and a GIF of the steps)"),
    "info": (add_info, run_info, "print a bundle's manifest summary"),
    "bench": (
        add_bench_args,
        run_bench,
        "time each stage per backend and batch (vs the eager PyTorch sampler), FLOPs, memory",
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


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="far", description="FAR image generation from a far-sdk bundle")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add, _run, help_) in COMMANDS.items():
        add(sub.add_parser(name, help=help_, description=help_))
    return parser


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if a.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    return run_command(f"far {a.command}", lambda: COMMANDS[a.command][1](a))


if __name__ == "__main__":
    sys.exit(main())
