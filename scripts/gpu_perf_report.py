"""The markdown report of ``scripts/gpu_check.py --perf`` (scripts/gpu_perf.py): the machine, the smoke test, one
table row per model, batch size and setting with the issue's targets marked met or MISSED, and the eager
baselines with the speed-ups against them."""

from __future__ import annotations

from typing import Any

#: Issue 24's targets at batch 1, bf16 (ms per image): the paper schedule, and the ``fast`` preset.
TARGETS = {("far_large", None): 50.0, ("far_large", "fast"): 25.0, ("far_huge", None): 60.0}
#: Speed-ups at batch 1 over the official-way eager baseline (fp16 autocast, 100 inner steps) and over eager at
#: equal inner steps; the batch-64 share of the measured matmul peak; first call after warmup() / steady state.
SPEEDUP_OFFICIAL, SPEEDUP_EQUAL, PEAK_SHARE, WARM_RATIO = 25.0, 15.0, 0.65, 2.0
COLUMNS = (
    "model",
    "batch",
    "setting",
    "ms/image median (min-max)",
    "transformer",
    "denoise",
    "VAE",
    "img/s",
    "TFLOP/s",
    "% peak",
    "peak GPU GB",
    "first call cold s",
    "first after warmup / steady",
    "target",
)


def _met(ok: bool) -> str:
    return "met" if ok else "MISSED"


def model_rows(m: dict[str, Any], peak: float | None) -> list[str]:
    """One table line per timed row of a model stage (failed and skipped rows say so)."""
    lines = []
    for r in m.get("rows", []):
        setting = (r.get("settings") or {}).get("preset") or "paper"
        if "ms_per_image" not in r:
            why = f"{r.get('status')}: {r.get('error', r.get('reason', ''))[:80]}"
            lines.append("| " + " | ".join([str(m.get("model")), str(r.get("batch")), setting, why] + [""] * 10) + " |")
            continue
        s, sg = r["ms_per_image"], r["stages_ms_per_image"]
        tf = r.get("achieved_tflops")
        share = tf / peak if tf and peak else None
        targets = []
        limit = TARGETS.get((m.get("model"), (r.get("settings") or {}).get("preset")))
        if r["batch"] == 1 and limit is not None:
            targets.append(f"<= {limit:.0f} ms: {_met(s['median'] <= limit)}")
        if r["batch"] >= 64 and share is not None:
            targets.append(f">= {PEAK_SHARE:.0%} peak: {_met(share >= PEAK_SHARE)}")
        if r["batch"] == 1:
            targets.append(f"warm <= {WARM_RATIO:g}x: {_met(r['warm_ratio'] <= WARM_RATIO)}")
        mem = r.get("peak_memory_gb")
        cells = [
            str(m.get("model")),
            str(r["batch"]),
            setting,
            f"{s['median']:.1f} ({s['min']:.1f}-{s['max']:.1f})",
            f"{sg['transformer']:.1f}",
            f"{sg['denoise']:.1f}",
            f"{sg['vae_decode']:.1f}",
            f"{r['images_per_s']:.1f}",
            f"{tf or 0:.0f}",
            f"{(share or 0) * 100:.0f}%",
            "-" if mem is None else f"{mem:.2f}",
            f"{r['first_call_cold_s']:.1f}",
            f"{r['warm_ratio']:.2f}x",
            "; ".join(targets),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def speedup_lines(m: dict[str, Any]) -> list[str]:
    """The eager baselines at batch 1 and the fast path's speed-up over each (paper plan, batch 1)."""
    eager = m.get("eager") or {}
    paper_b1 = [r for r in m.get("rows", []) if r.get("batch") == 1 and not (r.get("settings") or {}).get("preset")]
    fast = next((r for r in paper_b1 if "ms_per_image" in r), None)
    lines = []
    for name, e in eager.items():
        ms = e["ms_per_image"]["median"]
        sp = ms / fast["ms_per_image"]["median"] if fast else None
        want = {"official": SPEEDUP_OFFICIAL, "equal": SPEEDUP_EQUAL}.get(name)
        verdict = "information" if want is None or sp is None else f">= {want:g}x: {_met(sp >= want)}"
        mem = e.get("peak_memory_gb")
        lines.append(
            f"| {m.get('model')} | eager {name} ({e.get('precision')}, {e['inner_steps_total']} inner steps) | "
            f"{ms:.1f} | {'-' if mem is None else f'{mem:.2f}'} | {'-' if sp is None else f'{sp:.1f}x'} | {verdict} |"
        )
    return lines


def markdown(data: dict[str, Any]) -> str:
    st = data.get("stages", {})
    lines = [f"# GPU perf ({data.get('command', '')})", ""]
    env = st.get("machine", {})
    if env:
        lines.append(
            "machine: "
            + ", ".join(f"{k}={env[k]}" for k in ("gpu", "capability", "torch", "torch_cuda", "triton") if k in env)
        )
        pk = env.get("peaks", {})
        if pk.get("matmul"):
            lines.append(
                f"measured matmul peak: {pk['matmul']['tflops_median']:.0f} TFLOP/s ({pk['matmul']['dtype']}, "
                f"n={pk['matmul']['n']}); copy {pk['copy']['tb_per_s_median']:.2f} TB/s"
            )
    sm = st.get("smoke")
    if sm:
        lines += ["", f"smoke: {sm.get('status')} {sm.get('error', '')}"]
        lines += [f"- {k}: {v:.3g}" for k, v in (sm.get("checks") or {}).items()]
        if sm.get("per_call"):
            lines.append(f"- per call {sm['per_call']}")
    peak = (env.get("peaks") or {}).get("matmul", {}).get("tflops_median")
    lines += ["", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    models = [m for name, m in st.items() if name.startswith("model ") and not name.endswith("(partial)")]
    models += [m for name, m in st.items() if name.endswith("(partial)") and name[: -len(" (partial)")] not in st]
    for m in models:
        lines += model_rows(m, peak)
    eager = [line for m in models for line in speedup_lines(m)]
    if eager:
        lines += ["", "| model | baseline (batch 1) | ms/image | peak GPU GB | fast path speed-up | target |"]
        lines += ["|---|---|---:|---:|---:|---|", *eager]
    for m in models:
        if m.get("per_call"):
            lines.append(f"\n{m.get('model')} per call (the timed compiled path vs eager fp32): {m['per_call']}")
    return "\n".join(lines) + "\n"
