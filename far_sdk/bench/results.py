"""``far bench``'s results: the statistics of a row's timed iterations (:func:`summarize`, the stage-sum check) and
the records a run returns and writes as JSON (:class:`RowResult`, :class:`BenchResult`); the protocol that fills
them is :mod:`far_sdk.bench.protocol`'s."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from far_sdk.errors import InvalidArgumentError
from far_sdk.pipeline import STAGES

#: A row's stages must add up to its end-to-end time within this share (else host overhead or a missing timer).
STAGE_SUM_TOLERANCE = 0.05

# ---- summaries -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Summary:
    median: float
    min: float
    max: float
    p90: float | None  # only when n >= 10
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

    name: str  # "onnxruntime/cpu", "torch/cpu", "eager-torch@100/cpu" (the torch-eager backend), ...
    kind: str  # "backend" | "baseline"
    baseline: str | None  # EAGER_OFFICIAL / EAGER_EQUAL for baseline rows
    describe: dict[str, Any]  # backend.describe()
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
    setting: str | None = None  # the setting's label when several are benchmarked in one run


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
    settings: dict[str, dict[str, Any]] | None = None  # label -> plan, when several settings were run

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self), default=_json_default))


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
