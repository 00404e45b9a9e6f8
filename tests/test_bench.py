"""``far bench``: summary statistics, the stage-sum check, the eager baseline and its speed-ups,
analytic FLOPs and the CLI, on one tiny random-init bundle (far_tiny + kl16-tiny, 2 outer steps)."""

import contextlib
import io
import json

import numpy as np
import pytest

from far_sdk.bench.results import check_stage_sum, summarize, summarize_iterations
from far_sdk.errors import InvalidArgumentError
from far_sdk.options import SamplingOptions
from far_sdk.pipeline import STAGES

INNER = [2, 3]
BATCHES = [1, 2]


# ---- summaries on synthetic numbers ------------------------------------------------------------------


def test_summarize_median_min_max_and_p90_from_ten_values():
    values = [7.0, 3.0, 10.0, 1.0, 5.0, 9.0, 2.0, 8.0, 6.0, 4.0]
    s = summarize(values)
    # sorted 1..10: median (5 + 6) / 2; p90 at rank 0.9 * 9 = 8.1 -> 9 + 0.1 * (10 - 9)
    assert (s.median, s.min, s.max, s.n) == (5.5, 1.0, 10.0, 10)
    assert s.p90 == pytest.approx(9.1, abs=1e-12)


def test_summarize_omits_p90_below_ten_values_and_rejects_empty():
    s = summarize([0.3, 0.1, 0.2])
    assert (s.median, s.min, s.max, s.p90) == (0.2, 0.1, 0.3, None)
    with pytest.raises(InvalidArgumentError):
        summarize([])


def _iteration(total, fractions=(0.4, 0.3, 0.06, 0.2)):
    it = dict(zip(STAGES, (f * total for f in fractions)))
    it["total"] = total
    return it


def test_stage_sum_check_passes_within_five_percent_and_flags_a_mismatch():
    close = [_iteration(t) for t in (1.0, 2.0, 4.0)]  # stages = 96 % of total
    assert check_stage_sum(close).ok
    assert check_stage_sum(close).gap.median == pytest.approx(0.04)
    far_off = [_iteration(t, (0.4, 0.3, 0.05, 0.15)) for t in (1.0, 2.0, 4.0)]  # 90 %: 10 % missing
    chk = check_stage_sum(far_off)
    assert not chk.ok and chk.gap.median == pytest.approx(0.10) and chk.tolerance == 0.05
    # one preempted iteration does not flag a row whose other iterations add up
    assert check_stage_sum(close + [_iteration(1.0, (0.1, 0.1, 0.1, 0.1))]).ok


def test_overhead_summary_is_total_minus_stage_sum():
    its = [
        _iteration(1.0, (0.5, 0.2, 0.1, 0.1)),
        _iteration(3.0, (0.5, 0.2, 0.1, 0.1)),
        _iteration(2.0, (0.5, 0.2, 0.1, 0.1)),
    ]
    s = summarize_iterations(its)
    assert s["overhead"].median == pytest.approx(0.2) and s["overhead"].max == pytest.approx(0.3)
    assert s["total"].median == 2.0 and s["transformer"].min == 0.5


# ---- one tiny end-to-end run through the CLI --------------------------------------------------------

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def bundle(tiny_bundle):
    return tiny_bundle


@pytest.fixture(scope="module")
def cli_run(bundle, tmp_path_factory):
    from far_sdk.cli.main import main

    out = tmp_path_factory.mktemp("bench") / "out.json"
    argv = [
        "bench",
        "--bundle",
        str(bundle),
        "--backend",
        "onnxruntime,torch",
        "--batch",
        ",".join(map(str, BATCHES)),
        "--steps",
        "2",
        "--inner-steps",
        ",".join(map(str, INNER)),
        "--warmup",
        "1",
        "--iters",
        "2",
        "--baseline",
        "eager-torch",
        "--threads",
        "1",
        "--json",
        str(out),
    ]
    buf = io.StringIO()
    threads = torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(buf):
            rc = main(argv)
    finally:
        torch.set_num_threads(threads)  # --threads 1 is process-wide for torch
    return rc, buf.getvalue(), json.loads(out.read_text())


def _rows(data, name_prefix):
    return [r for r in data["rows"] if r["name"].startswith(name_prefix)]


def test_cli_returns_0_and_prints_the_table(cli_run):
    rc, text, _ = cli_run
    assert rc == 0
    header = next(line for line in text.splitlines() if line.startswith("backend "))
    for col in (
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
    ):
        assert col in header
    for name in ("onnxruntime/cpu", "torch/cpu", "eager-torch@100/cpu", "eager-torch@equal/cpu"):
        rows = [f for f in (line.split() for line in text.splitlines()) if f and f[0] == name and f[1].isdigit()]
        assert [int(f[1]) for f in rows] == BATCHES  # one table row per batch: name, batch, stages...
    assert "machine " in text and "plan " in text and "command " in text


def test_json_has_the_documented_fields(cli_run):
    _, _, data = cli_run
    for key in ("command", "machine", "versions", "bundle", "plan", "threads", "protocol", "peak", "rows"):
        assert key in data
    assert data["plan"]["inner_steps"] == INNER and data["plan"]["levels"] == [0, 10]
    assert data["machine"]["cpu"] and data["versions"]["far_sdk"]
    assert len(data["rows"]) == 4 * len(BATCHES)
    for r in data["rows"]:
        assert len(r["iterations"]) == 2 and len(r["warmup_s"]) == 1 and r["first_run_s"] > 0 and r["load_s"] >= 0
        for it in r["iterations"]:
            assert set(STAGES) | {"total"} <= set(it) and it["total"] > 0
        for k in (*STAGES, "overhead", "total"):
            s = r["summaries"][k]
            assert (
                set(s) == {"median", "min", "max", "p90", "n"}
                and s["p90"] is None
                and s["min"] <= s["median"] <= s["max"]
            )
        assert set(r["stage_sum"]) == {"gap", "tolerance", "ok"}
        assert r["memory"]["maxrss_mb"] > 0 and "maxrss_increase_mb" in r["memory"]
        assert set(r["speedup"]) == {"eager@100", "eager@equal"}
        totals = [it["total"] for it in r["iterations"]]
        assert r["images_per_s"] == pytest.approx(r["batch"] / np.median(totals))


def test_stage_sum_check_in_json_is_recomputed_from_raw_iterations(cli_run):
    _, _, data = cli_run
    for r in data["rows"]:
        gaps = [(it["total"] - sum(it[k] for k in STAGES)) / it["total"] for it in r["iterations"]]
        assert r["stage_sum"]["gap"]["median"] == pytest.approx(float(np.median(gaps)))
        assert r["stage_sum"]["ok"] == (abs(float(np.median(gaps))) <= 0.05)


def test_eager_baseline_runs_official_and_equal_inner_steps(cli_run):
    _, _, data = cli_run
    official, equal = _rows(data, "eager-torch@100"), _rows(data, "eager-torch@equal")
    assert [r["inner_steps"] for r in official] == [[100, 100]] * len(BATCHES)
    assert [r["inner_steps"] for r in equal] == [INNER] * len(BATCHES)
    for r in official + equal:
        assert r["kind"] == "baseline" and r["summaries"]["denoise"]["median"] > 0


def test_speedups_are_baseline_per_image_over_backend_per_image(cli_run):
    _, _, data = cli_run
    per_image = {
        (r["name"], r["batch"]): np.median([it["total"] for it in r["iterations"]]) / r["batch"] for r in data["rows"]
    }
    for r in data["rows"]:
        mine = per_image[(r["name"], r["batch"])]
        for ref, name in (("eager@100", "eager-torch@100/cpu"), ("eager@equal", "eager-torch@equal/cpu")):
            assert r["speedup"][ref] == pytest.approx(per_image[(name, r["batch"])] / mine, rel=1e-9)


def _counted_flops_per_image(bundle, backend: str, batch: int, inner_steps) -> float:
    """FLOPs of one real generation, counted by torch's FlopCounterMode (2 per multiply-add of every
    mm / conv / attention product; CPU flash attention mapped to torch's own sdpa count), per image."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    import far_sdk

    with far_sdk.Generator(bundle, backend=backend, **({"compile": False} if backend == "torch" else {})) as gen:
        sdpa = {
            torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *a, out_shape=None, **kw: (
                sdpa_flop_count(q, k, v)
            )
        }
        with FlopCounterMode(display=False, custom_mapping=sdpa) as fc:
            gen.generate(list(range(batch)), seed=0, num_steps=2, inner_steps=list(inner_steps), output_type="np")
        return fc.get_total_flops() / batch


@pytest.mark.parametrize("row_name", ["torch", "eager-torch@equal"])
def test_flops_per_image_match_flops_counted_on_a_real_generation(cli_run, bundle, row_name):
    """The row's analytic FLOPs (plan, batch and the eager flag wired through) against FlopCounterMode
    around the same generation; the low-pass filter's small matmuls are counted there, not in the
    analytic figure (< 0.1 %)."""
    _, _, data = cli_run
    r = next(r for r in _rows(data, row_name) if r["batch"] == 2)
    backend = "torch" if row_name == "torch" else "torch-eager"
    counted = _counted_flops_per_image(bundle, backend, 2, r["inner_steps"])
    assert r["flops_per_image"]["total"] == pytest.approx(counted, rel=1e-3)
    assert r["gflops"]["total"] == pytest.approx(
        r["flops_per_image"]["total"] * 2 / r["summaries"]["total"]["median"] / 1e9
    )


def test_matmul_peak_reports_the_best_library():
    from far_sdk.bench.environment import matmul_peak

    threads = torch.get_num_threads()
    try:
        p = matmul_peak(n=128, repeats=2, threads=1)
    finally:
        torch.set_num_threads(threads)
    assert p["numpy_gflops"] > 0 and p["torch_gflops"] > 0 and p["torch_threads"] == 1
    assert p["gflops"] == max(p["numpy_gflops"], p["torch_gflops"])


def test_several_presets_in_one_run_with_speedups_against_the_first(bundle, tmp_path, capsys):
    from far_sdk.cli.main import main

    out = tmp_path / "presets.json"
    threads = torch.get_num_threads()
    try:
        assert (
            main(
                [
                    "bench",
                    "--bundle",
                    str(bundle),
                    "--backend",
                    "onnxruntime",
                    "--batch",
                    "1",
                    "--steps",
                    "2",
                    "--preset",
                    "paper,fast",
                    "--warmup",
                    "0",
                    "--iters",
                    "1",
                    "--threads",
                    "1",
                    "--json",
                    str(out),
                ]
            )
            == 0
        )
    finally:
        torch.set_num_threads(threads)
    text, data = capsys.readouterr().out, json.loads(out.read_text())
    assert "[paper] 2 outer steps" in text and "[fast] 2 outer steps" in text and "vs paper" in text
    assert set(data["settings"]) == {"paper", "fast"}
    from far_sdk.options import PRESETS

    fast_steps = PRESETS["fast"].inner_steps
    assert data["settings"]["fast"]["inner_steps"] == [fast_steps] * 2 and data["settings"]["paper"]["inner_steps"] == [
        40,
        100,
    ]
    assert data["settings"]["fast"]["inner_sampler"] == PRESETS["fast"].inner_sampler
    paper, fast = data["rows"]
    assert (paper["setting"], fast["setting"]) == ("paper", "fast") and fast["inner_steps"] == data["settings"]["fast"][
        "inner_steps"
    ]
    assert paper["speedup"]["vs paper"] == pytest.approx(1.0)
    assert fast["speedup"]["vs paper"] == pytest.approx(paper["per_image_s"] / fast["per_image_s"], rel=1e-9)


def test_bench_rejects_eta_with_ddpm(bundle):
    from far_sdk.bench.protocol import run_benchmark

    with pytest.raises(InvalidArgumentError, match="eta"):
        run_benchmark(bundle, options=SamplingOptions(eta=0.5), iters=1, warmup=0)


def test_bench_runs_ddim_on_the_backends_and_the_eager_reference(bundle):
    from far_sdk.bench.protocol import run_benchmark

    threads = torch.get_num_threads()
    try:
        res = run_benchmark(
            bundle,
            backends=["onnxruntime"],
            options=SamplingOptions(num_steps=2, inner_steps=3, inner_sampler="ddim", eta=0.5),
            iters=1,
            warmup=0,
            baseline="eager-torch",
            threads=1,
        )
    finally:
        torch.set_num_threads(threads)
    assert (res.plan["inner_sampler"], res.plan["eta"]) == ("ddim", 0.5)
    assert [r.baseline for r in res.rows] == [None, "eager@100", "eager@equal"]
    assert res.rows[2].inner_steps == (3, 3) and res.rows[0].speedup["eager@equal"] > 0
