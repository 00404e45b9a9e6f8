"""``far bench``: per-stage timing of a bundle on one or more backends, against the eager PyTorch
reference sampler, with analytic FLOPs, achieved GFLOP/s and peak memory.

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
- FLOPs per image: :func:`training.flops.generation_flops` for the row's plan (``eager=True`` for the
  eager baseline, which recomputes the MLP condition every inner step); None when ``training`` /
  torch cannot be imported; GFLOP/s = FLOPs x batch / median time (total, and per stage:
  transformer, diffusion_mlp over the denoise time, vae_decode);
- peak_fraction = GFLOP/s (total) / the CPU matmul peak (:func:`matmul_peak`), CPU rows only. It
  can pass 100 % where a runtime computes convolutions with fewer multiplies (Winograd) than the
  direct-convolution count, as onnxruntime may for the VAE decoder's 3x3 convolutions;
- speedup[ref] = baseline per_image_s / row per_image_s, against the eager row of the same batch
  (refs "eager@100": official 100 inner steps, "eager@equal": the benchmarked plan);
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

import argparse
import contextlib
import dataclasses
import gc
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .bundle import Bundle
from .diffusion import INNER_SAMPLERS
from .errors import FarError, InvalidArgumentError
from .noise import SeededNoise
from .pipeline import STAGES, Generator, resolve_plan, to_uint8
from .schedules import PRESETS, InnerSteps, SamplingPlan, make_plan

log = logging.getLogger(__name__)

STAGE_SUM_TOLERANCE = 0.05
BASELINES = ("none", "eager-torch")
EAGER_OFFICIAL, EAGER_EQUAL = "eager@100", "eager@equal"


# ---- summaries -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Summary:
    median: float
    min: float
    max: float
    p90: float | None   # only when n >= 10
    n: int


def summarize(values: Sequence[float]) -> Summary:
    """median / min / max of ``values``; p90 (linear interpolation, numpy's default) when n >= 10."""
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        raise InvalidArgumentError("summarize needs at least one value")
    p90 = float(np.percentile(a, 90)) if a.size >= 10 else None
    return Summary(median=float(np.median(a)), min=float(a.min()), max=float(a.max()), p90=p90, n=int(a.size))


@dataclass(frozen=True)
class StageSumCheck:
    """Do the stages add up to the end-to-end time? gap_i = (total_i - sum_i stages) / total_i."""

    gap: Summary
    tolerance: float
    ok: bool


def check_stage_sum(iterations: Sequence[dict[str, float]], tolerance: float = STAGE_SUM_TOLERANCE) -> StageSumCheck:
    """``ok`` when |median gap| <= tolerance (the median keeps one preempted iteration from flagging a row)."""
    gaps = [(it["total"] - sum(it[k] for k in STAGES)) / it["total"] for it in iterations]
    g = summarize(gaps)
    return StageSumCheck(gap=g, tolerance=tolerance, ok=abs(g.median) <= tolerance)


def summarize_iterations(iterations: Sequence[dict[str, float]]) -> dict[str, Summary]:
    """One :class:`Summary` per stage, ``overhead`` (total - sum of stages) and ``total``."""
    out = {k: summarize([it[k] for it in iterations]) for k in STAGES}
    out["overhead"] = summarize([it["total"] - sum(it[k] for k in STAGES) for it in iterations])
    out["total"] = summarize([it["total"] for it in iterations])
    return out


# ---- results ---------------------------------------------------------------------------------------


@dataclass
class RowResult:
    """One backend (or baseline) at one batch size."""

    name: str                          # "onnxruntime/cpu", "torch/cpu", "eager-torch@100/cpu", ...
    kind: str                          # "backend" | "baseline"
    baseline: str | None               # EAGER_OFFICIAL / EAGER_EQUAL for baseline rows
    describe: dict[str, Any]           # backend.describe() (or the eager model's device/precision)
    device: str
    batch: int
    inner_steps: tuple[int, ...]
    load_s: float
    first_run_s: float
    warmup_s: list[float]
    iterations: list[dict[str, float]]  # raw, per timed iteration: the STAGES, "total", "pipeline_total"
    summaries: dict[str, Summary]
    stage_sum: StageSumCheck
    images_per_s: float
    per_image_s: float
    memory: dict[str, float | None]
    flops_per_image: dict[str, float] | None
    gflops: dict[str, float] | None
    peak_fraction: float | None = None
    speedup: dict[str, float | None] = field(default_factory=dict)
    setting: str | None = None         # the setting's label when several are benchmarked in one run


@dataclass
class BenchResult:
    command: str
    machine: dict[str, Any]
    versions: dict[str, str]
    bundle: dict[str, Any]
    plan: dict[str, Any]
    threads: dict[str, Any]
    protocol: dict[str, Any]
    peak: dict[str, Any] | None
    rows: list[RowResult]
    settings: dict[str, dict[str, Any]] | None = None   # label -> plan, when several settings were run

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self), default=_json_default))


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# ---- machine, memory, FLOPs ----------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "usable_cpus": cores, "gpus": _gpus(),
            "platform": platform.platform(), "python": platform.python_version()}


def _gpus() -> list[str]:
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10, check=True).stdout
            return [ln.strip() for ln in out.splitlines() if ln.strip()]
        except (OSError, subprocess.SubprocessError):
            pass
    torch = sys.modules.get("torch")  # only if already imported: never import torch just to look
    if torch is not None and torch.cuda.is_available():
        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return []


def versions() -> dict[str, str]:
    out = {"far_sdk": __version__, "python": platform.python_version()}
    for pkg in ("numpy", "onnxruntime", "onnxruntime-gpu", "torch", "tensorrt", "onnx"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _maxrss_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1 << 20) if sys.platform == "darwin" else r / 1024   # bytes on macOS, KiB on Linux


def _rss_now_mb() -> float | None:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / (1 << 20)


def _cuda_torch(device: str):
    """torch, when ``device`` is a CUDA device of an already imported torch; else None."""
    torch = sys.modules.get("torch")
    return torch if torch is not None and device.startswith("cuda") and torch.cuda.is_available() else None


def analytic_flops(manifest: dict[str, Any], plan: SamplingPlan, batch: int, *, eager: bool = False) -> dict[str, float] | None:
    """FLOPs per image by stage (training.flops.generation_flops), or None without torch/training."""
    try:
        from training.config import FARConfig
        from training.flops import generation_flops
        from training.vae import VAEConfig
    except ImportError as e:
        log.info("analytic FLOPs unavailable (%s)", e)
        return None
    return generation_flops(FARConfig.from_dict(manifest["model"]), VAEConfig.from_dict(manifest["vae"]), plan, batch, eager=eager)


def matmul_peak(n: int = 2048, repeats: int = 5, threads: int | None = None) -> dict[str, Any]:
    """Best-of-``repeats`` GFLOP/s of an n x n x n fp32 matmul (2 n^3 FLOPs) in NumPy and, if installed, torch.

    ``threads`` limits both (torch.set_num_threads; NumPy's BLAS through threadpoolctl when installed)
    so the peak matches the rows' thread count.
    """
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
    flops = 2.0 * n ** 3

    def best(fn) -> float:
        fn()  # warm-up (thread pool start, page faults)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return flops / min(times) / 1e9

    out: dict[str, Any] = {"n": n, "repeats": repeats, "dtype": "float32", "numpy_threads": "BLAS default"}
    limit = contextlib.nullcontext()
    if threads is not None and importlib.util.find_spec("threadpoolctl") is not None:
        from threadpoolctl import threadpool_limits

        limit, out["numpy_threads"] = threadpool_limits(limits=int(threads), user_api="blas"), int(threads)
    with limit:
        out["numpy_gflops"] = best(lambda: a @ b)
    if importlib.util.find_spec("torch") is not None:
        import torch

        if threads is not None:
            torch.set_num_threads(int(threads))
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        out["torch_gflops"] = best(lambda: torch.mm(ta, tb))
        out["torch_threads"] = torch.get_num_threads()
    out["gflops"] = max(v for k, v in out.items() if k.endswith("_gflops"))
    return out


# ---- plans and bundles ---------------------------------------------------------------------------


def bench_plan(bundle: Bundle, num_steps: int | None = None, inner_steps: InnerSteps | None = None, *, preset: str | None = None,
               inner_sampler: str | None = None, eta: float | None = None) -> SamplingPlan:
    """The plan ``Generator.generate(preset=..., num_steps=..., inner_steps=..., ...)`` resolves for this bundle."""
    return resolve_plan(bundle.defaults, preset=preset, num_steps=num_steps, inner_steps=inner_steps, inner_sampler=inner_sampler,
                        eta=eta)


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "far-sdk" / "bench"


def random_init_bundle(preset: str, vae_config: str = "kl16", *, cache_dir: str | os.PathLike | None = None, seed: int = 0,
                       validate: bool = True) -> Path:
    """A random-initialised bundle of ``preset`` (training.config.FAR_CONFIGS) + ``vae_config``, exported
    once to ``cache_dir/<preset>-<vae>/far_sdk-<version>`` and reused while its manifest matches.
    ``validate=False`` skips the exporter's onnxruntime-vs-PyTorch check (tests)."""
    import torch

    from export.onnx_export import export_bundle, random_init_source
    from training.config import get_config
    from training.far import FAR
    from training.graph_modules import randomize_for_export
    from training.vae import VAE_CONFIGS, AutoencoderKL

    cfg = get_config(preset)  # ConfigError naming the presets
    if vae_config not in VAE_CONFIGS:
        raise InvalidArgumentError(f"unknown VAE config {vae_config!r}; choose one of {sorted(VAE_CONFIGS)}")
    out = Path(cache_dir or default_cache_dir()) / f"{preset}-{vae_config}" / f"far_sdk-{__version__}"
    try:
        m = Bundle.load(out, verify=False).manifest
        if (m["source"] == random_init_source(seed) and m["model"] == cfg.to_dict()
                and m["vae"] == VAE_CONFIGS[vae_config].to_dict() and m["created_by"].get("far_sdk") == __version__):
            return out
    except FarError:
        pass
    log.info("exporting a random-init %s + %s bundle to %s", preset, vae_config, out)
    torch.manual_seed(seed)
    far = randomize_for_export(FAR(cfg), seed).eval()
    vae = randomize_for_export(AutoencoderKL(VAE_CONFIGS[vae_config]), seed + 1).eval()
    return export_bundle(far, vae, out, name=f"random-{preset}-{vae_config}", source=random_init_source(seed), overwrite=True,
                         validate=validate)


# ---- the timed runs --------------------------------------------------------------------------------


def _finish_row(row: dict[str, Any], *, manifest, plan, eager: bool, peak: dict | None) -> RowResult:
    its = row["iterations"]
    summaries = summarize_iterations(its)
    batch, med = row["batch"], summaries["total"].median
    flops = analytic_flops(manifest, plan, batch, eager=eager)
    gflops = None
    if flops is not None:
        per = {"total": "total", "transformer": "transformer", "diffusion_mlp": "denoise", "vae_decode": "vae_decode"}
        gflops = {k: flops[k] * batch / summaries[s].median / 1e9 if summaries[s].median > 0 else None for k, s in per.items()}
    frac = None
    if gflops is not None and peak and row["device"] == "cpu":
        frac = gflops["total"] / peak["gflops"]
    return RowResult(**row, summaries=summaries, stage_sum=check_stage_sum(its), images_per_s=batch / med,
                     per_image_s=med / batch, flops_per_image=flops, gflops=gflops, peak_fraction=frac)


def _timed(run, warmup: int, iters: int) -> tuple[float, list[float], list[dict[str, float]]]:
    """run() -> timings dict with "total". Returns (first run s, warm-up totals, timed iterations)."""
    warm = [run()["total"] for _ in range(warmup)]
    its = [run() for _ in range(iters)]
    return (warm[0] if warm else its[0]["total"]), warm, its


def bench_backend(bundle_path, backend: str, batch: int, plan: SamplingPlan, *, warmup: int, iters: int, seed: int = 0,
                  backend_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Time one backend at one batch size (raw fields of a :class:`RowResult`)."""
    gc.collect()
    rss0, now0 = _maxrss_mb(), _rss_now_mb()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    gen = Generator(bundle_path, backend=backend, **(backend_options or {}))
    load_s = time.perf_counter() - t0
    labels = [i % gen.bundle.num_classes for i in range(batch)]

    def run() -> dict[str, float]:
        t0 = time.perf_counter()
        out = gen.generate(labels, seed=seed, num_steps=plan.num_steps, inner_steps=list(plan.inner_steps), output_type="np",
                           inner_sampler=plan.inner_sampler, eta=plan.eta if plan.inner_sampler == "ddim" else None)
        total = time.perf_counter() - t0
        assert out.plan == plan, f"bench_plan drifted from Generator.plan: {out.plan} != {plan}"
        return {**{k: out.timings[k] for k in STAGES}, "total": total, "pipeline_total": out.timings["total"]}

    try:
        first, warm, its = _timed(run, warmup, iters)
        desc = gen.backend.describe()
        device = gen.backend.device
        # while the generator is alive; torch's allocator stats only describe the torch backend
        memory = _memory(rss0, now0, _cuda_torch(device) if desc["backend"] == "torch" else None)
    finally:
        gen.close()
    row = dict(name=f"{desc['backend']}/{device}", kind="backend", baseline=None, describe=desc, device=device, batch=batch,
               inner_steps=plan.inner_steps, load_s=load_s, first_run_s=first, warmup_s=warm, iterations=its, memory=memory)
    del gen
    gc.collect()
    return row


def _memory(rss0: float, now0: float | None, cuda_torch) -> dict[str, float | None]:
    """maxrss (high-water mark) and its increase over ``rss0``; current RSS and its increase over ``now0``
    (what the loaded model and its buffers hold, measured before they are released)."""
    rss1, now1 = _maxrss_mb(), _rss_now_mb()
    return {"maxrss_mb": rss1, "maxrss_increase_mb": rss1 - rss0, "rss_now_mb": now1,
            "rss_increase_mb": now1 - now0 if now1 is not None and now0 is not None else None,
            "cuda_max_allocated_mb": cuda_torch.cuda.max_memory_allocated() / (1 << 20) if cuda_torch is not None else None}


def load_eager(bundle: Bundle, device: str = "cpu"):
    """(FAR, VAEDecoderGraph) in fp32 eval mode on ``device`` from the bundle's weights.safetensors."""
    import torch

    from training.config import FARConfig
    from training.far import FAR
    from training.graph_modules import VAEDecoderGraph
    from training.vae import AutoencoderKL, VAEConfig

    m = bundle.manifest
    pre = m.get("weights", {}).get("prefixes", {"far": "far.", "vae": "vae."})
    state = bundle.load_torch_weights()
    with torch.device("meta"):
        far = FAR(FARConfig.from_dict(m["model"]))
        vae = AutoencoderKL(VAEConfig.from_dict(m["vae"]))
    far.load_state_dict({k[len(pre["far"]):]: v for k, v in state.items() if k.startswith(pre["far"])}, strict=True, assign=True)
    vae.load_state_dict({k[len(pre["vae"]):]: v for k, v in state.items() if k.startswith(pre["vae"])}, strict=False, assign=True)
    dec = VAEDecoderGraph(vae, bundle.latent_scale)
    return far.to(device).eval(), dec.to(device).eval()


def bench_eager(far, dec, batch: int, plan: SamplingPlan, *, warmup: int, iters: int, seed: int = 0) -> dict[str, Any]:
    """Time the reference sampler (training.sampler.iter_reference) + VAE decode: the eager baseline.

    ``far``, ``dec``: from :func:`load_eager`. Stages come from timing hooks on ``far.condition``
    (transformer) and ``training.sampler.low_pass_torch`` (filter), both removed afterwards;
    denoise = each outer step's time minus those two (the inner loop, with the MLP condition
    projection recomputed at every inner step, as the official code does).
    """
    import torch

    import training.sampler as ref

    dev = next(far.parameters()).device
    cuda = dev.type == "cuda"
    num_classes = far.config.num_classes
    labels = [i % num_classes for i in range(batch)]

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(dev)  # host-device sync before every clock read

    def run() -> dict[str, float]:
        t = dict.fromkeys(STAGES, 0.0)

        def hook(fn, key):
            def timed(*a, **kw):
                sync()
                t0 = time.perf_counter()
                out = fn(*a, **kw)
                sync()
                t[key] += time.perf_counter() - t0
                return out
            return timed

        t_start = time.perf_counter()
        low_pass = ref.low_pass_torch
        far.condition = hook(far.condition, "transformer")  # an instance attribute shadows the method
        ref.low_pass_torch = hook(low_pass, "filter")
        try:
            steps = ref.iter_reference(far, labels, plan=plan, noise=SeededNoise.from_seed(seed, batch))
            sampling, last = 0.0, None
            while True:
                t0 = time.perf_counter()
                try:
                    last = next(steps)
                except StopIteration:
                    break
                sync()
                sampling += time.perf_counter() - t0
        finally:
            ref.low_pass_torch = low_pass
            del far.condition
        t["denoise"] = sampling - t["transformer"] - t["filter"]
        t0 = time.perf_counter()
        with torch.inference_mode():
            rgb = dec(last.latents.float()).cpu().numpy()                    # .cpu() syncs
        t["vae_decode"] = time.perf_counter() - t0
        to_uint8(rgb)
        t["total"] = time.perf_counter() - t_start
        return t

    first, warm, its = _timed(run, warmup, iters)
    return dict(kind="baseline", describe={"backend": "eager-torch", "device": str(dev), "precision": "fp32",
                                           "torch": torch.__version__, "threads": torch.get_num_threads()},
                device=str(dev), batch=batch, inner_steps=plan.inner_steps, first_run_s=first, warmup_s=warm, iterations=its)


def run_benchmark(bundle_path: str | os.PathLike, *, backends: Sequence[str] = ("onnxruntime",), batches: Sequence[int] = (1,),
                  num_steps: int | None = None, inner_steps: InnerSteps | None = None, warmup: int = 2, iters: int = 10,
                  baseline: str = "none", threads: int | None = None, device: str | None = None, peak: bool = False,
                  seed: int = 0, command: str = "", inner_sampler: str | None = None, eta: float | None = None,
                  settings: Sequence[tuple[str, dict[str, Any]]] = (), backend_options: dict[str, Any] | None = None) -> BenchResult:
    """Benchmark ``backends`` x ``batches`` (and the eager baseline); see the module docstring.

    ``settings``: (label, options) pairs, each options a dict of :func:`bench_plan`'s keywords (preset,
    num_steps, inner_steps, inner_sampler, eta), benchmarked one after the other in this run; the
    options given directly (num_steps, ...) override every setting's. Empty: one plan from those options.
    ``backend_options`` go to every backend (e.g. precision, compile, cuda_graphs for the torch backend).
    """
    if baseline not in BASELINES:
        raise InvalidArgumentError(f"baseline must be one of {BASELINES}, got {baseline!r}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1 or isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise InvalidArgumentError(f"need iters >= 1 and warmup >= 0, got iters={iters!r}, warmup={warmup!r}")
    if not batches or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batches):
        raise InvalidArgumentError(f"batch sizes must be positive integers, got {list(batches)!r}")
    if not backends and baseline == "none":
        raise InvalidArgumentError("nothing to benchmark: pass at least one backend or a baseline")
    bundle = Bundle.load(bundle_path)
    given = {k: v for k, v in dict(num_steps=num_steps, inner_steps=inner_steps, inner_sampler=inner_sampler, eta=eta).items()
             if v is not None}
    labels = [label for label, _ in settings]
    if len(set(labels)) != len(labels):
        raise InvalidArgumentError(f"setting labels must be distinct, got {labels}")
    plans = [(label, bench_plan(bundle, **{**opts, **given})) for label, opts in settings] or [(None, bench_plan(bundle, **given))]
    plan = plans[0][1]
    peak_info = matmul_peak(threads=threads) if peak else None
    opts: dict[str, Any] = dict(backend_options or {})
    if threads is not None:
        opts["threads"] = threads
    if device is not None:
        opts["device"] = device
    rows: list[RowResult] = []
    finish = dict(manifest=bundle.manifest, peak=peak_info)
    for label, p in plans:
        for name in backends:
            for b in batches:
                log.info("bench %s batch %d%s", name, b, f" ({label})" if label else "")
                raw = bench_backend(bundle.path, name, b, p, warmup=warmup, iters=iters, seed=seed, backend_options=opts)
                rows.append(_finish_row(raw, plan=p, eager=False, **finish))
                rows[-1].setting = label
    if baseline == "eager-torch":
        rows += _eager_rows(bundle, plans, batches, warmup=warmup, iters=iters, seed=seed, threads=threads, device=device, finish=finish)
        _speedups(rows)
    if len(plans) > 1:
        _setting_speedups(rows, plans[0][0])
    return BenchResult(command=command, machine=machine_info(), versions=versions(),
                       bundle={"path": str(bundle.path), "name": bundle.name, "source": bundle.manifest.get("source"),
                               "model": bundle.model_config, "vae": bundle.manifest["vae"]},
                       plan=_plan_dict(plan),
                       threads=_threads(threads), protocol={"warmup": warmup, "iters": iters, "seed": seed, "output_type": "np",
                                                            "batches": list(batches), "stage_sum_tolerance": STAGE_SUM_TOLERANCE},
                       peak=peak_info, rows=rows,
                       settings={label: _plan_dict(p) for label, p in plans} if len(plans) > 1 else None)


def _plan_dict(plan: SamplingPlan) -> dict[str, Any]:
    return {**plan.to_dict(), "num_steps": plan.num_steps, "inner_steps_total": sum(plan.inner_steps)}


def _eager_rows(bundle, plans, batches, *, warmup, iters, seed, threads, device, finish) -> list[RowResult]:
    """eager@100 (official inner steps, DDPM) and eager@equal (each benchmarked plan; skipped when identical) per batch."""
    import torch

    if threads is not None:
        torch.set_num_threads(int(threads))
    # the backends' device names ("tensorrt" is an onnxruntime EP) -> a torch device for the same hardware
    dev = device if device not in (None, "auto", "tensorrt") else ("cuda" if torch.cuda.is_available() else "cpu")
    plan = plans[0][1]
    official = dataclasses.replace(plan, inner_steps=make_plan(levels=plan.levels, inner_steps="official").inner_steps,
                                   inner_sampler="ddpm", eta=0.0)
    variants = [(EAGER_OFFICIAL, official, None)] + [(EAGER_EQUAL, p, label) for label, p in plans if p != official]
    gc.collect()
    rss0, now0 = _maxrss_mb(), _rss_now_mb()
    if dev.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    far, dec = load_eager(bundle, dev)
    load_s = time.perf_counter() - t0
    rows = []
    for label, p, setting in variants:
        for b in batches:
            log.info("bench %s batch %d", label, b)
            raw = bench_eager(far, dec, b, p, warmup=warmup, iters=iters, seed=seed)
            raw.update(name=f"eager-torch@{label.split('@')[1]}/{raw['device']}", baseline=label, load_s=load_s,
                       memory=_memory(rss0, now0, torch if dev.startswith("cuda") else None))
            rows.append(_finish_row(raw, plan=p, eager=True, **finish))
            rows[-1].setting = setting
            rss0 = _maxrss_mb()
            if dev.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats(dev)
    return rows


def _speedups(rows: list[RowResult]) -> None:
    """speedup[ref] = baseline per-image time / row per-image time, same batch (eager@equal falls back
    to eager@100 when the plan already has 100 inner steps everywhere)."""
    base = {(r.baseline, r.setting if r.baseline == EAGER_EQUAL else None, r.batch): r for r in rows if r.kind == "baseline"}
    for r in rows:
        for ref in (EAGER_OFFICIAL, EAGER_EQUAL):
            b = base.get((ref, r.setting if ref == EAGER_EQUAL else None, r.batch))
            if b is None and ref == EAGER_EQUAL:
                b = base.get((EAGER_OFFICIAL, None, r.batch))
            r.speedup[ref] = b.per_image_s / r.per_image_s if b is not None else None


def _setting_speedups(rows: list[RowResult], first: str) -> None:
    """speedup["vs <first>"] = the first setting's per-image time (same row name and batch) / the row's."""
    base = {(r.name, r.batch): r for r in rows if r.setting == first}
    for r in rows:
        b = base.get((r.name, r.batch))
        if r.setting is not None:
            r.speedup[f"vs {first}"] = b.per_image_s / r.per_image_s if b is not None else None


def _threads(threads: int | None) -> dict[str, Any]:
    torch = sys.modules.get("torch")
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"requested": threads, "onnxruntime_intra_op": threads or usable,
            "torch": torch.get_num_threads() if torch is not None else None,
            "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS") if k in os.environ}}


# ---- CLI (the ``far bench`` entry of far_sdk.cli.COMMANDS) ----------------------------------------


def _csv(kind):
    def parse(v: str):
        try:
            return [kind(p.strip()) for p in v.split(",") if p.strip()]
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {v!r}") from e
    return parse


def _inner(v: str) -> InnerSteps:
    if v in ("frequency-aware", "official"):
        return v
    parts = [int(p) for p in v.split(",")]
    return parts[0] if len(parts) == 1 else parts


def add_bench_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--bundle", help="bundle directory (engines/NAME)")
    src.add_argument("--random-init", metavar="PRESET",
                     help="benchmark a random-init bundle of this preset (far_base, far_large, far_huge, ...), exported once and cached")
    p.add_argument("--vae-config", default="kl16", help="VAE preset for --random-init (default: kl16)")
    p.add_argument("--cache-dir", default=None, help=f"cache of --random-init bundles (default: {default_cache_dir()})")
    p.add_argument("--backend", type=_csv(str), default=["onnxruntime"], help="comma-separated: onnxruntime,torch,tensorrt (default: onnxruntime)")
    p.add_argument("--batch", type=_csv(int), default=[1], help="comma-separated batch sizes (default: 1)")
    p.add_argument("--steps", type=int, default=None, help="outer steps (default: the bundle's, 10)")
    p.add_argument("--inner-steps", type=_inner, default=None, help="'frequency-aware' (default), 'official', N or N1,N2,...")
    p.add_argument("--inner-sampler", choices=INNER_SAMPLERS, default=None, help="ddpm (official, default) or ddim")
    p.add_argument("--eta", type=float, default=None, help="DDIM noise level in [0, 1] (default 0)")
    p.add_argument("--preset", type=_csv(str), default=[], metavar="NAME[,NAME...]",
                   help=f"named settings ({', '.join(sorted(PRESETS))}), several = one after the other in this run with "
                        "speed-ups against the first (e.g. paper,fast); --inner-steps etc. override them")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--baseline", choices=BASELINES, default="none",
                   help="eager-torch: the PyTorch reference sampler at 100 inner steps and at the benchmarked plan")
    p.add_argument("--threads", type=int, default=None, help="CPU threads of onnxruntime / torch (default: all usable cores)")
    p.add_argument("--device", default=None, help="backend device (cpu, cuda, ...; default: each backend's auto)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None,
                   help="network precision of the torch backend (latents stay fp32; default fp32)")
    p.add_argument("--compile", choices=["auto", "on", "off"], default=None,
                   help="torch backend: compile the denoiser step with torch.compile (auto: on CUDA only)")
    p.add_argument("--cuda-graphs", choices=["on", "off"], default=None, help="torch backend on CUDA: replay captured CUDA graphs (default on)")
    p.add_argument("--peak", action="store_true", help="measure the CPU fp32 matmul peak (2048^3, best of 5) for %%peak")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write raw per-iteration numbers and summaries here")


def run_bench(a: argparse.Namespace) -> int:
    command = shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
    if a.json:
        from .clirun import check_writable_file

        check_writable_file(a.json, "--json", suffixes=(".json",))  # before any timing work
    path = a.bundle
    if a.random_init:
        print(f"random-init bundle {a.random_init} + {a.vae_config} (exported once, then cached) ...", file=sys.stderr)
        path = random_init_bundle(a.random_init, a.vae_config, cache_dir=a.cache_dir, seed=0)
    opts: dict[str, Any] = {}
    if a.precision is not None:
        opts["precision"] = a.precision
    if a.compile is not None:
        opts["compile"] = {"auto": "auto", "on": True, "off": False}[a.compile]
    if a.cuda_graphs is not None:
        opts["cuda_graphs"] = a.cuda_graphs == "on"
    res = run_benchmark(path, backends=a.backend, batches=a.batch, num_steps=a.steps, inner_steps=a.inner_steps, warmup=a.warmup,
                        iters=a.iters, baseline=a.baseline, threads=a.threads, device=a.device, peak=a.peak, seed=a.seed, command=command,
                        inner_sampler=a.inner_sampler, eta=a.eta, settings=[(n, {"preset": n}) for n in a.preset],
                        backend_options=opts)
    print(format_report(res))
    if a.json:
        from .fileio import atomic_write_bytes

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
    return (f"plan      {f'[{label}] ' if label else ''}{p['num_steps']} outer steps, levels {list(p['levels'])}, {sampler} inner steps "
            f"{list(inner)} (sum {sum(inner)}), filter {p['filter']}; eager@100 uses 100 DDPM inner steps per outer step")


def format_report(res: BenchResult) -> str:
    """The terminal report: header, the per-stage table (medians, ms) and per-row details."""
    m, p, th = res.machine, res.plan, res.threads
    lines = [
        f"command   {res.command}",
        f"machine   {m['cpu']} ({m['usable_cpus']} usable / {m['logical_cpus']} logical CPUs); GPU: {', '.join(m['gpus']) or 'none'}",
        "versions  " + ", ".join(f"{k} {v}" for k, v in res.versions.items()),
        f"bundle    {res.bundle['path']} ({res.bundle['name']}; source {res.bundle['source'].get('kind') if res.bundle['source'] else 'n/a'})",
        *(_plan_line(label, q) for label, q in (res.settings or {None: p}).items()),
        f"threads   requested {th['requested'] or 'default'}; onnxruntime intra-op {th['onnxruntime_intra_op']}; torch {th['torch'] or 'n/a'}",
        f"protocol  warmup {res.protocol['warmup']}, iters {res.protocol['iters']}, output np, seed {res.protocol['seed']}; medians in ms",
    ]
    if res.peak:
        pk = res.peak
        lines.append(f"peak      fp32 matmul {pk['n']}^3 best of {pk['repeats']}: numpy {pk['numpy_gflops']:.1f} GFLOP/s ({pk['numpy_threads']} threads)"
                     + (f", torch {pk['torch_gflops']:.1f} GFLOP/s ({pk['torch_threads']} threads)" if "torch_gflops" in pk else "") + f" -> peak {pk['gflops']:.1f}")
    else:
        lines.append("peak      not measured (--peak)")
    first = next(iter(res.settings)) if res.settings else None
    head = ("backend", *(("setting",) if first else ()), "batch", "transformer", "denoise", "filter", "vae", "overhead", "total", "img/s",
            "GFLOP/s", "%peak", "vs eager@100", "vs eager@equal", *((f"vs {first}",) if first else ()))
    table = []
    for r in res.rows:
        s = r.summaries
        flag = "" if r.stage_sum.ok else " !"
        table.append((r.name, *((r.setting or "-",) if first else ()), str(r.batch), _ms(s["transformer"].median), _ms(s["denoise"].median), _ms(s["filter"].median),
                      _ms(s["vae_decode"].median), _ms(s["overhead"].median), _ms(s["total"].median) + flag, f"{r.images_per_s:.2f}",
                      _x(r.gflops and r.gflops["total"], "{:.1f}"), _x(r.peak_fraction and 100 * r.peak_fraction, "{:.1f}%"),
                      _x(r.speedup.get(EAGER_OFFICIAL)), _x(r.speedup.get(EAGER_EQUAL)),
                      *((_x(r.speedup.get(f"vs {first}")),) if first else ())))
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(head)]
    fmt = lambda row: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))  # noqa: E731
    lines += ["", fmt(head), fmt(tuple("-" * w for w in widths))] + [fmt(row) for row in table] + [""]
    for r in res.rows:
        t, mem = r.summaries["total"], r.memory
        p90 = f", p90 {_ms(t.p90)}" if t.p90 is not None else ""
        g = r.gflops or {}
        cuda = f", cuda max allocated {mem['cuda_max_allocated_mb']:.0f} MB" if mem.get("cuda_max_allocated_mb") is not None else ""
        lines.append(f"{r.name}{f' [{r.setting}]' if r.setting else ''} x{r.batch}: load {r.load_s:.2f} s, first run {r.first_run_s * 1e3:.1f} ms; total min {_ms(t.min)} / "
                     f"median {_ms(t.median)} / max {_ms(t.max)}{p90} ms; GFLOP/s transformer {_x(g.get('transformer'), '{:.1f}')}, "
                     f"MLP {_x(g.get('diffusion_mlp'), '{:.1f}')}, VAE {_x(g.get('vae_decode'), '{:.1f}')}; "
                     f"maxrss {mem['maxrss_mb']:.0f} MB (+{mem['maxrss_increase_mb']:.0f}), rss {_x(mem['rss_now_mb'], '{:.0f}')} MB "
                     f"(+{_x(mem['rss_increase_mb'], '{:.0f}')}){cuda}")
        if not r.stage_sum.ok:
            lines.append(f"  ! stages sum to {100 * (1 - r.stage_sum.gap.median):.1f}% of the end-to-end time "
                         f"(outside {100 * r.stage_sum.tolerance:.0f}%): host overhead is significant or a timer is missing")
    flops = next((r.flops_per_image for r in res.rows if r.kind == "backend" and r.flops_per_image), None)
    if flops:
        lines.append(f"FLOPs/image (analytic, training.flops): total {flops['total'] / 1e9:.2f} G (transformer {flops['transformer'] / 1e9:.2f}, "
                     f"MLP {flops['diffusion_mlp'] / 1e9:.2f}, VAE {flops['vae_decode'] / 1e9:.2f})")
    elif res.rows and all(r.flops_per_image is None for r in res.rows):
        lines.append("FLOPs/image: n/a (training / torch not importable)")
    return "\n".join(lines)
