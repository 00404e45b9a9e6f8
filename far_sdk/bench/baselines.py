"""The eager baselines of ``far bench`` (:mod:`far_sdk.bench.protocol` runs them): their labels, and the speed-ups
taken against them. Speed-ups are per image at the same batch size; the fp32 row on CUDA is information only."""

from __future__ import annotations

from far_sdk.bench.results import RowResult

BASELINES = ("none", "eager-torch")  # eager-torch: the torch-eager backend at the official and at the benchmarked plan
EAGER_OFFICIAL, EAGER_EQUAL = "eager@100", "eager@equal"
#: On CUDA, information only (no speed-up is taken against it): the official plan in fp32 eager.
EAGER_FP32 = "eager@100/fp32"


def torch_cuda(device: str) -> bool:
    """Whether the torch-eager rows run on CUDA (torch importable and a GPU there, device not "cpu")."""
    if device == "cpu":
        return False
    try:
        import torch  # noqa: PLC0415 - only asked when an eager baseline runs, which imports torch anyway
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def speedups(rows: list[RowResult]) -> None:
    """speedup[ref] = baseline per-image time / row per-image time, same batch (eager@equal falls back
    to eager@100 when the plan already has 100 inner steps everywhere)."""
    base = {
        (r.baseline, r.setting if r.baseline == EAGER_EQUAL else None, r.batch): r for r in rows if r.kind == "baseline"
    }
    for r in rows:
        for ref in (EAGER_OFFICIAL, EAGER_EQUAL):
            b = base.get((ref, r.setting if ref == EAGER_EQUAL else None, r.batch))
            if b is None and ref == EAGER_EQUAL:
                b = base.get((EAGER_OFFICIAL, None, r.batch))
            r.speedup[ref] = b.per_image_s / r.per_image_s if b is not None else None


def setting_speedups(rows: list[RowResult], first: str) -> None:
    """speedup["vs <first>"] = the first setting's per-image time (same row name and batch) / the row's."""
    base = {(r.name, r.batch): r for r in rows if r.setting == first}
    for r in rows:
        b = base.get((r.name, r.batch))
        if r.setting is not None:
            r.speedup[f"vs {first}"] = b.per_image_s / r.per_image_s if b is not None else None
