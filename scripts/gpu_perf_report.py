"""The markdown report of ``scripts/gpu_check.py --perf`` (scripts/gpu_perf.py): the machine, the smoke test, one
table row per model and batch size with the issue's targets marked met or MISSED."""

from __future__ import annotations

from typing import Any

#: Issue 10's targets (ms per image at batch 1, bf16, paper schedule), speed-up over eager, batch-64 share of peak.
TARGETS = {"far_large": 100.0, "far_huge": 120.0}
SPEEDUP_TARGET, PEAK_SHARE_TARGET = 12.0, 0.5


def markdown(data: dict[str, Any]) -> str:
    st = data.get("stages", {})
    lines = [f"# GPU perf ({data.get('command', '')})", ""]
    env = st.get("machine", {})
    if env:
        lines.append(
            "machine: " + ", ".join(f"{k}={env[k]}" for k in ("gpu", "torch", "torch_cuda", "triton") if k in env)
        )
        pk = env.get("peaks", {})
        if pk.get("matmul"):
            lines.append(
                f"measured matmul peak: {pk['matmul']['tflops_median']:.0f} TFLOP/s ({pk['matmul']['dtype']}, "
                f"n={pk['matmul']['n']}); "
                f"copy {pk['copy']['tb_per_s_median']:.2f} TB/s"
            )
    sm = st.get("smoke")
    if sm:
        lines += ["", f"smoke: {sm.get('status')} {sm.get('error', '')}"]
        for k, v in (sm.get("checks") or {}).items():
            lines.append(f"- {k}: {v:.3g}")
        if sm.get("per_call"):
            lines.append(f"- per call {sm['per_call']}")
    peak = (env.get("peaks") or {}).get("matmul", {}).get("tflops_median")
    lines += [
        "",
        "| model | batch | ms/image median (min-max) | transformer | denoise | VAE | img/s | TFLOP/s | % peak | "
        "target |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, m in st.items():
        if not name.startswith("model ") or "(partial)" in name and name.replace(" (partial)", "") in st:
            continue
        for r in m.get("rows", []):
            if "ms_per_image" not in r:
                lines.append(
                    f"| {m.get('model')} | {r.get('batch')} | {r.get('status')}: "
                    f"{r.get('error', r.get('reason', ''))[:80]} | | | | | | | |"
                )
                continue
            s, sg = r["ms_per_image"], r["stages_ms_per_image"]
            tf = r.get("achieved_tflops")
            share = tf / peak if tf and peak else None
            tgt = ""
            if r["batch"] == 1 and m.get("model") in TARGETS:
                tgt = f"<= {TARGETS[m['model']]:.0f} ms: {'met' if s['median'] <= TARGETS[m['model']] else 'MISSED'}"
            elif r["batch"] >= 64 and share is not None:
                tgt = f">= 50% peak: {'met' if share >= PEAK_SHARE_TARGET else 'MISSED'}"
            lines.append(
                f"| {m.get('model')} | {r['batch']} | {s['median']:.1f} ({s['min']:.1f}-{s['max']:.1f}) | "
                f"{sg['transformer']:.1f} | "
                f"{sg['denoise']:.1f} | {sg['vae_decode']:.1f} | {r['images_per_s']:.1f} | {tf or 0:.0f} | "
                f"{(share or 0) * 100:.0f}% | {tgt} |"
            )
        eb = m.get("eager_official_b1")
        if eb and m.get("rows") and "ms_per_image" in m["rows"][0]:
            sp = eb["ms_per_image"]["median"] / m["rows"][0]["ms_per_image"]["median"]
            lines.append(
                f"| {m.get('model')} eager official (fp32, 100 inner) | 1 | {eb['ms_per_image']['median']:.1f} | | | "
                "| | | | "
                f"speed-up {sp:.1f}x (>= 12x: {'met' if sp >= SPEEDUP_TARGET else 'MISSED'}) |"
            )
        if m.get("per_call"):
            lines.append(f"| {m.get('model')} per call {m['per_call']} | | | | | | | | | |")
    return "\n".join(lines) + "\n"
