"""``far bench``: its command-line arguments and its terminal report (the ``bench`` entry of
far_sdk.cli.main.COMMANDS). The protocol and the numbers are :mod:`far_sdk.bench.protocol`'s."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from far_sdk.bench.protocol import BASELINES, EAGER_EQUAL, EAGER_OFFICIAL, BenchResult, run_benchmark
from far_sdk.bundle.bundle import Bundle
from far_sdk.cli.run import add_bundle_argument, check_writable_file
from far_sdk.cli.sampling import add_sampling_args, options_from_args
from far_sdk.errors import InvalidArgumentError
from far_sdk.fileio import atomic_write_bytes


def _csv(kind):
    def parse(v: str):
        try:
            return [kind(p.strip()) for p in v.split(",") if p.strip()]
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {v!r}") from e

    return parse


def add_bench_args(p: argparse.ArgumentParser) -> None:
    add_bundle_argument(p)  # a random-init bundle of any size: far-export onnx --random-init --model far_large ...
    p.add_argument(
        "--backend",
        type=_csv(str),
        default=["onnxruntime"],
        help="comma-separated: onnxruntime,torch,tensorrt,torch-eager (default: onnxruntime)",
    )
    p.add_argument("--batch", type=_csv(int), default=[1], help="comma-separated batch sizes (default: 1)")
    p.add_argument(
        "--prompt",
        dest="prompts",
        action="append",
        default=None,
        help="text (FAR-T2I) bundles: a prompt, repeatable; image i of a batch gets prompt i mod the count "
        "(default: four digit prompts)",
    )
    add_sampling_args(p, presets="list")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs first (compilation, caches)")
    p.add_argument("--iters", type=int, default=10, help="timed runs per backend and batch")
    p.add_argument(
        "--baseline",
        choices=BASELINES,
        default="none",
        help="none (the default), or eager-torch: the torch-eager backend (the official per-step work, fp32) at 100 "
        "inner steps and at the benchmarked plan",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="CPU threads of onnxruntime / torch (default: all usable cores)"
    )
    p.add_argument("--device", default=None, help="backend device (cpu, cuda, ...; default: each backend's auto)")
    p.add_argument(
        "--precision",
        choices=["fp32", "bf16", "fp16"],
        default=None,
        help="network precision of the torch backend (latents stay fp32; default fp32)",
    )
    p.add_argument(
        "--compile",
        choices=["auto", "on", "off"],
        default=None,
        help="torch backend: compile the denoiser step with torch.compile (auto: on CUDA only)",
    )
    p.add_argument(
        "--cuda-graphs",
        choices=["on", "off"],
        default=None,
        help="torch backend on CUDA: replay captured CUDA graphs (default on)",
    )
    p.add_argument(
        "--peak", action="store_true", help="measure the CPU fp32 matmul peak (2048^3, best of 5) for %%peak"
    )
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    p.add_argument("--json", default=None, help="write raw per-iteration numbers and summaries here")


def run_bench(a: argparse.Namespace) -> int:
    command = shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
    if a.json:
        check_writable_file(a.json, "--json", suffixes=(".json",))  # before any timing work
    if a.prompts and Bundle.load(a.bundle, verify=False).conditioning != "text":
        raise InvalidArgumentError(
            f"--prompt is for text-conditioned (FAR-T2I) bundles; {a.bundle} is class-conditional"
        )
    opts: dict[str, Any] = {}
    if a.precision is not None:
        opts["precision"] = a.precision
    if a.compile is not None:
        opts["compile"] = {"auto": "auto", "on": True, "off": False}[a.compile]
    if a.cuda_graphs is not None:
        opts["cuda_graphs"] = a.cuda_graphs == "on"
    res = run_benchmark(
        a.bundle,
        backends=a.backend,
        batches=a.batch,
        options=options_from_args(a),
        warmup=a.warmup,
        iters=a.iters,
        baseline=a.baseline,
        threads=a.threads,
        device=a.device,
        peak=a.peak,
        seed=a.seed,
        command=command,
        settings=[(n, n, None) for n in a.preset],
        backend_options=opts,
        prompts=a.prompts,
    )
    print(format_report(res))
    if a.json:
        atomic_write_bytes(Path(a.json), json.dumps(res.to_json(), indent=1).encode())
        print(f"wrote {a.json}")
    return 0


def _ms(s: float | None) -> str:
    return "n/a" if s is None else f"{s * 1e3:.1f}"


def _x(v: float | None, fmt: str = "{:.2f}x") -> str:
    return "n/a" if v is None else fmt.format(v)


def _plan_line(label: str | None, p: dict[str, Any]) -> str:
    inner = p["inner_steps"]
    sampler = p.get("inner_sampler", "ddpm") + (f" eta {p['eta']:g}" if p.get("inner_sampler") == "ddim" else "")
    return (
        f"plan      {f'[{label}] ' if label else ''}{p['num_steps']} outer steps, levels {list(p['levels'])}, "
        f"{sampler} inner steps "
        f"{list(inner)} (sum {sum(inner)}), filter {p['filter']}; eager@100 uses 100 DDPM inner steps per outer step"
    )


def format_report(res: BenchResult) -> str:
    """The terminal report: header, the per-stage table (medians, ms) and per-row details."""
    m, p, th = res.machine, res.plan, res.threads
    lines = [
        f"command   {res.command}",
        f"machine   {m['cpu']} ({m['usable_cpus']} usable / {m['logical_cpus']} logical CPUs); GPU: "
        f"{', '.join(m['gpus']) or 'none'}",
        "versions  " + ", ".join(f"{k} {v}" for k, v in res.versions.items()),
        f"bundle    {res.bundle['path']} ({res.bundle['name']}; source "
        f"{res.bundle['source'].get('kind') if res.bundle['source'] else 'n/a'})",
        *(_plan_line(label, q) for label, q in (res.settings or {None: p}).items()),
        f"threads   requested {th['requested'] or 'default'}; onnxruntime intra-op {th['onnxruntime_intra_op']}; "
        f"torch {th['torch'] or 'n/a'}",
        f"protocol  warmup {res.protocol['warmup']}, iters {res.protocol['iters']}, output np, seed "
        f"{res.protocol['seed']}; medians in ms",
    ]
    if res.peak:
        pk = res.peak
        lines.append(
            f"peak      fp32 matmul {pk['n']}^3 best of {pk['repeats']}: numpy {pk['numpy_gflops']:.1f} GFLOP/s "
            f"({pk['numpy_threads']} threads)"
            + (
                f", torch {pk['torch_gflops']:.1f} GFLOP/s ({pk['torch_threads']} threads)"
                if "torch_gflops" in pk
                else ""
            )
            + f" -> peak {pk['gflops']:.1f}"
        )
    else:
        lines.append("peak      not measured (--peak)")
    first = next(iter(res.settings)) if res.settings else None
    head = (
        "backend",
        *(("setting",) if first else ()),
        "batch",
        "transformer",
        "denoise",
        "filter",
        "vae",
        "overhead",
        "total",
        "img/s",
        "GFLOP/s",
        "%peak",
        "vs eager@100",
        "vs eager@equal",
        *((f"vs {first}",) if first else ()),
    )
    table = []
    for r in res.rows:
        s = r.summaries
        flag = "" if r.stage_sum.ok else " !"
        table.append(
            (
                r.name,
                *((r.setting or "-",) if first else ()),
                str(r.batch),
                _ms(s["transformer"].median),
                _ms(s["denoise"].median),
                _ms(s["filter"].median),
                _ms(s["vae_decode"].median),
                _ms(s["overhead"].median),
                _ms(s["total"].median) + flag,
                f"{r.images_per_s:.2f}",
                _x(r.gflops and r.gflops["total"], "{:.1f}"),
                _x(r.peak_fraction and 100 * r.peak_fraction, "{:.1f}%"),
                _x(r.speedup.get(EAGER_OFFICIAL)),
                _x(r.speedup.get(EAGER_EQUAL)),
                *((_x(r.speedup.get(f"vs {first}")),) if first else ()),
            )
        )
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(head)]
    fmt = lambda row: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))  # noqa: E731
    lines += ["", fmt(head), fmt(tuple("-" * w for w in widths))] + [fmt(row) for row in table] + [""]
    for r in res.rows:
        t, mem = r.summaries["total"], r.memory
        p90 = f", p90 {_ms(t.p90)}" if t.p90 is not None else ""
        g = r.gflops or {}
        cuda = (
            f", cuda max allocated {mem['cuda_max_allocated_mb']:.0f} MB"
            if mem.get("cuda_max_allocated_mb") is not None
            else ""
        )
        lines.append(
            f"{r.name}{f' [{r.setting}]' if r.setting else ''} x{r.batch}: load {r.load_s:.2f} s, first run "
            f"{r.first_run_s * 1e3:.1f} ms; total min {_ms(t.min)} / "
            f"median {_ms(t.median)} / max {_ms(t.max)}{p90} ms; GFLOP/s transformer "
            f"{_x(g.get('transformer'), '{:.1f}')}, "
            f"MLP {_x(g.get('diffusion_mlp'), '{:.1f}')}, VAE {_x(g.get('vae_decode'), '{:.1f}')}; "
            f"maxrss {mem['maxrss_mb']:.0f} MB (+{mem['maxrss_increase_mb']:.0f}), rss "
            f"{_x(mem['rss_now_mb'], '{:.0f}')} MB "
            f"(+{_x(mem['rss_increase_mb'], '{:.0f}')}){cuda}"
        )
        if not r.stage_sum.ok:
            lines.append(
                f"  ! stages sum to {100 * (1 - r.stage_sum.gap.median):.1f}% of the end-to-end time "
                f"(outside {100 * r.stage_sum.tolerance:.0f}%): host overhead is significant or a timer is missing"
            )
    flops = next((r.flops_per_image for r in res.rows if r.kind == "backend" and r.flops_per_image), None)
    if flops:
        lines.append(
            f"FLOPs/image (analytic, far_sdk.bench.flops): total {flops['total'] / 1e9:.2f} G (transformer "
            f"{flops['transformer'] / 1e9:.2f}, "
            f"MLP {flops['diffusion_mlp'] / 1e9:.2f}, VAE {flops['vae_decode'] / 1e9:.2f})"
        )
    elif res.rows and all(r.flops_per_image is None for r in res.rows):
        lines.append("FLOPs/image: n/a (no analytic count for this model)")
    return "\n".join(lines)
