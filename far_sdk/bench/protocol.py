"""``far bench``: per-stage timing of a bundle on one or more backends, against the eager PyTorch
baseline run the official way (the ``torch-eager`` backend), with analytic FLOPs, achieved GFLOP/s and
peak memory. The command line and the report are :mod:`far_sdk.cli.bench`'s; machine facts
:mod:`far_sdk.bench.environment`'s.

Protocol (TensorRT demo style). For each backend x batch size the :class:`~far_sdk.Generator` is
created once (``load_s``); ``warmup`` generations run untimed (the first one, which includes lazy
initialisation, is reported as ``first_run_s``); then ``iters`` timed generations with
``output_type="np"`` and fixed seeds (seed 0, class ids 0, 1, ... mod num_classes). Stage times are
the pipeline's device-synchronised ``timings`` (transformer, denoise = the inner loop, filter = the
host low-pass, vae_decode); ``total`` is the wall clock around ``generate()``; ``overhead`` =
total - sum(stages) (argument checks, noise set-up, uint8 conversion, Python).

Definitions (all per row, over the timed iterations):

- each stage and total: median, min, max, and p90 when iters >= 10 (:func:`summarize`);
- stage-sum check: per iteration gap = (total - sum(stages)) / total; ``ok`` when the median gap
  is within ``tolerance`` (5 %) (:func:`check_stage_sum`);
- images_per_s = batch / median(total); per_image_s = median(total) / batch;
- FLOPs per image: :func:`far_sdk.bench.flops.generation_flops` for the row's plan (``eager=True`` for the
  torch-eager baseline, which recomputes the MLP condition every inner step); GFLOP/s = FLOPs x batch / median time
  (total, and per stage:
  transformer, diffusion_mlp over the denoise time, vae_decode);
- peak_fraction = GFLOP/s (total) / the CPU matmul peak (:func:`matmul_peak`), CPU rows only. It
  can pass 100 % where a runtime computes convolutions with fewer multiplies (Winograd) than the
  direct-convolution count, as onnxruntime may for the VAE decoder's 3x3 convolutions;
- speedup[ref] = baseline per_image_s / row per_image_s, against the eager row of the same batch
  (refs "eager@100": official 100 inner steps, "eager@equal": the benchmarked plan; both the official way, fp16
  autocast on CUDA; "eager@100/fp32", on CUDA, an information row no speed-up is taken against);
- several settings in one run (``--preset paper,fast``; ``settings=``): every row is run per setting
  (``RowResult.setting``), eager@equal per setting, and speedup["vs <first setting>"] = the first
  setting's per_image_s on the same backend and batch / the row's;
- memory: ru_maxrss of the process (a high-water mark: it never goes down, so a row's
  ``maxrss_increase_mb`` is what it added over every earlier row's peak), the current RSS while
  the model is loaded and its increase over the RSS before loading (``rss_increase_mb``), and on
  CUDA torch.cuda.max_memory_allocated (reset per row).

The JSON (``BenchResult.to_json``) holds the header fields (command, machine, versions, bundle,
plan, threads, protocol, peak) and ``rows``: every :class:`RowResult` field, including the raw
per-iteration numbers (``iterations``) and ``summaries``.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from far_sdk.bench.baselines import (
    BASELINES,
    EAGER_EQUAL,
    EAGER_FP32,
    EAGER_OFFICIAL,
    setting_speedups,
    speedups,
    torch_cuda,
)
from far_sdk.bench.conditions import bench_condition, check_bench_bundle
from far_sdk.bench.environment import cuda_torch, machine_info, matmul_peak, maxrss_mb, rss_now_mb, versions
from far_sdk.bench.flops import generation_flops
from far_sdk.bench.results import (
    STAGE_SUM_TOLERANCE,
    BenchResult,
    RowResult,
    check_stage_sum,
    summarize_iterations,
)
from far_sdk.bundle.bundle import Bundle
from far_sdk.errors import InvalidArgumentError, check_range
from far_sdk.maths.schedules import SamplingPlan
from far_sdk.options import SamplingOptions, plan_options, resolve_plan, resolve_text_plan
from far_sdk.pipeline import STAGES, Generator

log = logging.getLogger(__name__)


# ---- machine, memory, FLOPs ----------------------------------------------------------------------


def analytic_flops(
    manifest: dict[str, Any], plan: SamplingPlan, batch: int, *, eager: bool = False
) -> dict[str, float] | None:
    """FLOPs per image by stage (:func:`far_sdk.bench.flops.generation_flops` on the manifest's configs)."""
    if manifest.get("conditioning") == "text":  # FAR-T2I's cross-attention transformer is not counted there
        return None
    return generation_flops(manifest["model"], manifest["vae"], plan, batch, eager=eager)


# ---- plans and bundles ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One sampling setting of a run: a preset and options over the bundle's defaults, and the plan they resolve to."""

    label: str | None
    preset: str | None
    options: SamplingOptions
    plan: SamplingPlan


def bench_plan(bundle: Bundle, options: SamplingOptions | None = None, *, preset: str | None = None) -> SamplingPlan:
    """The plan ``Generator.generate(preset=preset, options=options)`` resolves for this bundle."""
    resolve = resolve_text_plan if bundle.conditioning == "text" else resolve_plan  # as Generator.plan resolves
    return resolve(bundle.defaults, options, preset_name=preset)


def _setting(bundle: Bundle, label: str | None, preset: str | None, options: SamplingOptions | None) -> Setting:
    options = options or SamplingOptions()
    return Setting(label, preset, options, bench_plan(bundle, options, preset=preset))


# ---- the timed runs --------------------------------------------------------------------------------


def _finish_row(row: dict[str, Any], *, manifest, plan, eager: bool, peak: dict | None) -> RowResult:
    its = row["iterations"]
    summaries = summarize_iterations(its)
    batch, med = row["batch"], summaries["total"].median
    flops = analytic_flops(manifest, plan, batch, eager=eager)
    gflops = None
    if flops is not None:
        per = {"total": "total", "transformer": "transformer", "diffusion_mlp": "denoise", "vae_decode": "vae_decode"}
        gflops = {
            k: flops[k] * batch / summaries[s].median / 1e9 if summaries[s].median > 0 else None for k, s in per.items()
        }
    frac = None
    if gflops is not None and peak and row["device"] == "cpu":
        frac = gflops["total"] / peak["gflops"]
    return RowResult(
        **row,
        summaries=summaries,
        stage_sum=check_stage_sum(its),
        images_per_s=batch / med,
        per_image_s=med / batch,
        flops_per_image=flops,
        gflops=gflops,
        peak_fraction=frac,
    )


def _timed(run, warmup: int, iters: int) -> tuple[float, list[float], list[dict[str, float]]]:
    """run() -> timings dict with "total". Returns (first run s, warm-up totals, timed iterations)."""
    warm = [run()["total"] for _ in range(warmup)]
    its = [run() for _ in range(iters)]
    return (warm[0] if warm else its[0]["total"]), warm, its


def bench_backend(
    bundle_path,
    backend: str,
    batch: int,
    plan: SamplingPlan,
    *,
    warmup: int,
    iters: int,
    seed: int = 0,
    backend_options: dict[str, Any] | None = None,
    options: SamplingOptions | None = None,
    preset: str | None = None,
    prompts: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Time one backend at one batch size (raw fields of a :class:`RowResult`): ``generate(preset=preset,
    options=options)``, which must resolve to ``plan`` (``options`` None: far_sdk.options.plan_options(plan))."""
    options = plan_options(plan) if options is None else options
    gc.collect()
    rss0, now0 = maxrss_mb(), rss_now_mb()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    gen = Generator(bundle_path, backend=backend, **(backend_options or {}))
    load_s = time.perf_counter() - t0
    cond = bench_condition(gen.bundle, batch, prompts)  # class ids 0, 1, ... or a text bundle's prompts

    def run() -> dict[str, float]:
        t0 = time.perf_counter()
        out = gen.generate(**cond, seed=seed, preset=preset, options=options, output_type="np")
        total = time.perf_counter() - t0
        assert out.plan == plan, f"bench_plan drifted from Generator.plan: {out.plan} != {plan}"
        return {**{k: out.timings[k] for k in STAGES}, "total": total, "pipeline_total": out.timings["total"]}

    try:
        first, warm, its = _timed(run, warmup, iters)
        desc = gen.backend.describe()
        device = gen.backend.device
        # while the generator is alive; torch's allocator stats only describe the torch backend
        memory = _memory(rss0, now0, cuda_torch(device) if desc["backend"] in ("torch", "torch-eager") else None)
    finally:
        gen.close()
    return dict(
        name=f"{desc['backend']}/{device}",
        kind="backend",
        baseline=None,
        describe=desc,
        device=device,
        batch=batch,
        inner_steps=plan.inner_steps,
        load_s=load_s,
        first_run_s=first,
        warmup_s=warm,
        iterations=its,
        memory=memory,
    )


def _memory(rss0: float, now0: float | None, cuda_torch) -> dict[str, float | None]:
    """maxrss (high-water mark) and its increase over ``rss0``; current RSS and its increase over ``now0``
    (what the loaded model and its buffers hold, measured before they are released)."""
    rss1, now1 = maxrss_mb(), rss_now_mb()
    return {
        "maxrss_mb": rss1,
        "maxrss_increase_mb": rss1 - rss0,
        "rss_now_mb": now1,
        "rss_increase_mb": now1 - now0 if now1 is not None and now0 is not None else None,
        "cuda_max_allocated_mb": cuda_torch.cuda.max_memory_allocated() / (1 << 20) if cuda_torch is not None else None,
    }


def run_benchmark(
    bundle_path: str | os.PathLike,
    *,
    backends: Sequence[str] = ("onnxruntime",),
    batches: Sequence[int] = (1,),
    options: SamplingOptions | None = None,
    warmup: int = 2,
    iters: int = 10,
    baseline: str = "none",
    threads: int | None = None,
    device: str | None = None,
    peak: bool = False,
    seed: int = 0,
    command: str = "",
    settings: Sequence[tuple[str, str | None, SamplingOptions | None]] = (),
    backend_options: dict[str, Any] | None = None,
    prompts: Sequence[str] | None = None,
) -> BenchResult:
    """Benchmark ``backends`` x ``batches`` (and the eager baseline); see the module docstring.

    ``options``: the sampling options of every row (None: the bundle's defaults). ``settings``: (label,
    preset, options) triples benchmarked one after the other in this run, ``options`` (given fields)
    overriding each setting's. ``backend_options`` go to every backend (e.g. precision, compile, cuda_graphs
    for the torch backend). ``prompts``: a text bundle's (None: far_sdk.bench.conditions.DEFAULT_PROMPTS).
    """
    if baseline not in BASELINES:
        raise InvalidArgumentError(f"baseline must be one of {BASELINES}, got {baseline!r}")
    check_range("iters", iters, 1, None, integer=True)
    check_range("warmup", warmup, 0, None, integer=True)
    if not batches or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batches):
        raise InvalidArgumentError(f"batch sizes must be positive integers, got {list(batches)!r}")
    if not backends and baseline == "none":
        raise InvalidArgumentError("nothing to benchmark: pass at least one backend or a baseline")
    bundle = Bundle.load(bundle_path)
    check_bench_bundle(bundle, prompts, backends, baseline)  # prompts only for a text bundle, no eager rows there
    given = options or SamplingOptions()
    labels = [label for label, _, _ in settings]
    if len(set(labels)) != len(labels):
        raise InvalidArgumentError(f"setting labels must be distinct, got {labels}")
    plans = [
        _setting(bundle, label, preset, given.over(opts or SamplingOptions())) for label, preset, opts in settings
    ] or [_setting(bundle, None, None, given)]
    plan = plans[0].plan
    peak_info = matmul_peak(threads=threads) if peak else None
    opts: dict[str, Any] = dict(backend_options or {})
    if threads is not None:
        opts["threads"] = threads
    if device is not None:
        opts["device"] = device
    rows: list[RowResult] = []
    finish = dict(manifest=bundle.manifest, peak=peak_info)
    for st in plans:
        for name in backends:
            for b in batches:
                log.info("bench %s batch %d%s", name, b, f" ({st.label})" if st.label else "")
                raw = bench_backend(
                    bundle.path,
                    name,
                    b,
                    st.plan,
                    warmup=warmup,
                    iters=iters,
                    seed=seed,
                    backend_options=opts,
                    options=st.options,
                    preset=st.preset,
                    prompts=prompts,
                )
                rows.append(_finish_row(raw, plan=st.plan, eager=name == "torch-eager", **finish))
                rows[-1].setting = st.label
    if baseline == "eager-torch":
        eager = dict(warmup=warmup, iters=iters, seed=seed, threads=threads, device=device, prompts=prompts)
        rows += _eager_rows(bundle, plans, batches, finish=finish, **eager)
        speedups(rows)
    if len(plans) > 1:
        setting_speedups(rows, plans[0].label)
    return BenchResult(
        command=command,
        machine=machine_info(),
        versions=versions(),
        bundle={
            "path": str(bundle.path),
            "name": bundle.name,
            "source": bundle.manifest.get("source"),
            "model": bundle.model_config,
            "vae": bundle.manifest["vae"],
        },
        plan=_plan_dict(plan),
        threads=_threads(threads),
        protocol={
            "warmup": warmup,
            "iters": iters,
            "seed": seed,
            "output_type": "np",
            "batches": list(batches),
            "stage_sum_tolerance": STAGE_SUM_TOLERANCE,
        },
        peak=peak_info,
        rows=rows,
        settings={st.label: _plan_dict(st.plan) for st in plans} if len(plans) > 1 else None,
    )


def _plan_dict(plan: SamplingPlan) -> dict[str, Any]:
    return {**plan.to_dict(), "num_steps": plan.num_steps, "inner_steps_total": sum(plan.inner_steps)}


def _eager_rows(bundle, plans, batches, *, warmup, iters, seed, threads, device, finish, prompts) -> list[RowResult]:
    """eager@100 (official inner steps, DDPM) and eager@equal (each benchmarked plan; skipped when identical)
    per batch: the ``torch-eager`` backend (the official per-step work) through :func:`bench_backend`, the official
    way (on CUDA fp16 autocast, as the official evaluation; fp32 on the CPU); on CUDA also eager@100 in fp32
    (:data:`EAGER_FP32`, an information row)."""
    # the backends' device names ("tensorrt" is an onnxruntime EP) -> the same hardware for torch ("auto": CUDA if any)
    opts: dict[str, Any] = {"device": device if device not in (None, "tensorrt") else "auto"}
    if threads is not None:
        opts["threads"] = threads
    first = plans[0]
    official = _setting(
        bundle,
        None,
        first.preset,
        dataclasses.replace(first.options, inner_steps="official", inner_sampler="ddpm", eta=None),
    )
    variants = [(EAGER_OFFICIAL, official, {})] + [(EAGER_EQUAL, st, {}) for st in plans if st.plan != official.plan]
    if torch_cuda(opts["device"]):
        variants.append((EAGER_FP32, official, {"precision": "fp32"}))
    rows = []
    for label, st, extra in variants:
        for b in batches:
            log.info("bench %s batch %d", label, b)
            raw = bench_backend(
                bundle.path,
                "torch-eager",
                b,
                st.plan,
                warmup=warmup,
                iters=iters,
                seed=seed,
                backend_options={**opts, **extra},
                options=st.options,
                preset=st.preset,
                prompts=prompts,
            )
            raw.update(name=f"eager-torch@{label.split('@')[1]}/{raw['device']}", kind="baseline", baseline=label)
            if label == EAGER_FP32:
                raw["name"] = f"eager-torch@100-fp32/{raw['device']}"
            rows.append(_finish_row(raw, plan=st.plan, eager=True, **finish))
            rows[-1].setting = st.label
    return rows


def _threads(threads: int | None) -> dict[str, Any]:
    torch = sys.modules.get("torch")
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "requested": threads,
        "onnxruntime_intra_op": threads or usable,
        "torch": torch.get_num_threads() if torch is not None else None,
        "env": {
            k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS") if k in os.environ
        },
    }
