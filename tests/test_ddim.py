"""The DDIM inner sampler: its coefficients against an independent float64 computation, the eta = 1
identity with DDPM, the plan / preset options and their typed errors, and the ONNX Runtime and torch
backends against the PyTorch reference sampler (which writes DDIM in its textbook form)."""

import math

import numpy as np
import pytest
from conftest import plan_of

from far_sdk.errors import InvalidArgumentError
from far_sdk.maths import diffusion as D
from far_sdk.maths.diffusion import Step
from far_sdk.options import PRESETS, SamplingOptions, resolve_plan


def _alpha_bar_reference(T=1000):
    """alpha_bar of the cosine schedule, step by step in Python floats (as tests/test_diffusion.py)."""
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    ab, out = 1.0, []
    for i in range(T):
        ab *= 1 - min(1 - f((i + 1) / T) / f(i / T), 0.999)
        out.append(ab)
    return out


def _graph_step(row, x, eps, v, noise):
    """The denoiser graph's arithmetic (training/graph_modules.py DenoiserGraph) on one step row, float64."""
    r = row.astype(np.float64)
    x0 = r[Step.x0_coef_x] * x - r[Step.x0_coef_eps] * eps
    x0 = np.clip(x0, -r[Step.x0_clip], r[Step.x0_clip])
    mean = r[Step.mean_coef_x0] * x0 + r[Step.mean_coef_xt] * x
    frac = (v + 1) / 2
    log_var = frac * r[Step.max_log_var] + (1 - frac) * r[Step.min_log_var]
    return mean + np.exp(0.5 * log_var) * noise * r[Step.noise_scale]


# ---- the coefficients -------------------------------------------------------------------------------


def test_ddim_timesteps_trailing_spacing():
    assert D.ddim_timesteps(10).tolist() == [99, 199, 299, 399, 499, 599, 699, 799, 899, 999]
    assert D.ddim_timesteps(3).tolist() == [332, 666, 999]
    assert D.ddim_timesteps(1).tolist() == [999]
    np.testing.assert_array_equal(D.ddim_timesteps(1000), np.arange(1000))
    for n in (5, 7, 15, 40, 333):
        t = D.ddim_timesteps(n)
        assert t[-1] == 999 and len(set(t.tolist())) == n and (np.diff(t) > 0).all()


@pytest.mark.parametrize("bad", [0, 1001, 2.5, True])
def test_ddim_rejects_bad_step_counts(bad):
    with pytest.raises(InvalidArgumentError, match="inner step count"):
        D.ddim_tables(bad)


@pytest.mark.parametrize(
    "n,eta,clip", [(5, 0.0, None), (15, 0.0, 1.5), (15, 0.5, None), (50, 1.0, 2.0), (1, 0.3, None)]
)
def test_ddim_step_rows_against_float64_textbook_update(n, eta, clip):
    """Every row of the step table, run through the graph's arithmetic, equals Song et al.'s update
    x_prev = sqrt(ab') x0 + sqrt(1 - ab' - sigma^2) eps' + sigma z, eps' = (x - sqrt(ab) x0) / sqrt(1 - ab),
    computed here in float64 from alpha_bar alone (eps' re-derived from the clipped x0)."""
    rng = np.random.default_rng(n)
    x, eps, z = (rng.standard_normal((32, 16)) for _ in range(3))
    v = rng.uniform(-3, 3, (32, 16))  # DDIM ignores the learned variance
    temp = 0.9
    rows = D.denoise_step_table(n, 2.0, temp, clip, inner_sampler="ddim", eta=eta)
    ab_full = _alpha_bar_reference()
    kept = [round((k + 1) * 1000 / n) - 1 for k in range(n)]
    assert rows[:, Step.timestep].tolist() == kept[::-1]
    for i, k in enumerate(reversed(range(n))):
        ab = ab_full[kept[k]]
        ab_prev = ab_full[kept[k - 1]] if k > 0 else 1.0
        sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
        x0 = (x - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
        if clip is not None:
            x0 = np.clip(x0, -clip, clip)
        eps_x0 = (x - math.sqrt(ab) * x0) / math.sqrt(1 - ab)
        want = math.sqrt(ab_prev) * x0 + math.sqrt(max(1 - ab_prev - sigma**2, 0.0)) * eps_x0 + sigma * temp * z
        got = _graph_step(rows[i], x, eps, v, z)
        # float32 coefficients; at t = 999 x0 = 2e4 x - 2e4 eps amplifies their rounding (unclipped)
        tol = 1e-6 * max(1.0, float(np.abs(x0).max()))
        np.testing.assert_allclose(got, want, rtol=0, atol=tol, err_msg=f"step k={k} (t={kept[k]})")


def test_ddim_tables_against_float64_closed_form():
    n, eta = 17, 0.7
    tab = D.ddim_tables(n, eta)
    ab_full = _alpha_bar_reference()
    for k, t in enumerate(tab.timesteps.tolist()):
        ab = ab_full[t]
        ab_prev = ab_full[tab.timesteps[k - 1]] if k > 0 else 1.0
        sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
        d = math.sqrt(1 - ab_prev - sigma**2)
        assert tab.sigmas[k] == pytest.approx(sigma, rel=1e-9, abs=1e-300)
        assert tab.coef_x0[k] == pytest.approx(math.sqrt(ab_prev) - d * math.sqrt(ab / (1 - ab)), rel=1e-9, abs=1e-12)
        assert tab.coef_xt[k] == pytest.approx(d / math.sqrt(1 - ab), rel=1e-9, abs=1e-12)
        assert tab.sqrt_recipm1_alphas_cumprod[k] == pytest.approx(math.sqrt(1 / ab - 1), rel=1e-9)
    assert tab.sigmas[0] == 0 and tab.coef_x0[0] == 1 and tab.coef_xt[0] == 0  # last step: x_prev = x0


def test_ddim_eta1_full_respacing_equals_ddpm_posterior_mean():
    """The known identity: DDIM with eta = 1 on all 1000 timesteps is DDPM with the posterior variance.
    Coefficients agree to float64 rounding, so the float32 step tables (and the means) agree to float32 rounding."""
    ddim, ddpm = D.ddim_tables(1000, 1.0), D.diffusion_tables(1000)
    np.testing.assert_array_equal(ddim.timesteps, ddpm.timesteps)
    np.testing.assert_allclose(ddim.coef_x0, ddpm.posterior_mean_coef1, rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(ddim.coef_xt, ddpm.posterior_mean_coef2, rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(ddim.sigmas[1:] ** 2, ddpm.posterior_variance[1:], rtol=1e-10)
    a = D.denoise_step_table(1000, 3.0, 1.0, inner_sampler="ddim", eta=1.0)
    b = D.denoise_step_table(1000, 3.0, 1.0)
    cols = [Step.timestep, Step.x0_coef_x, Step.x0_coef_eps]
    np.testing.assert_array_equal(a[:, cols], b[:, cols])  # t, sqrt(1/ab), sqrt(1/ab - 1)
    cols = [Step.mean_coef_x0, Step.mean_coef_xt]
    np.testing.assert_allclose(a[:, cols], b[:, cols], rtol=2**-23, atol=0)  # c1, c2: at most 1 float32 ulp
    rng = np.random.default_rng(0)
    x, eps = (rng.standard_normal((64, 16)).astype(np.float32) for _ in range(2))
    for i in (0, 1, 500, 998, 999):  # execution order: t = 999 - i
        ra, rb = a[i], b[i]
        x0 = (ra[1] * x - ra[2] * eps).astype(np.float32)
        mean_ddim, mean_ddpm = ra[3] * x0 + ra[4] * x, rb[3] * x0 + rb[4] * x
        scale = np.float32(np.abs(x0).max() + np.abs(x).max())
        assert float(np.abs(mean_ddim - mean_ddpm).max()) <= 4 * np.finfo(np.float32).eps * scale


def test_ddim_eta1_equals_ddpm_with_posterior_variance_on_the_same_timesteps():
    """The identity holds for any respacing: DDPM tables built on DDIM's timesteps give DDIM eta = 1."""
    n = 12
    ddim = D.ddim_tables(n, 1.0)
    ac = np.cumprod(1 - D.cosine_betas())
    kept = ddim.timesteps
    ddpm = D.tables_from_betas(1 - ac[kept] / np.append(1.0, ac[kept[:-1]]), kept)
    np.testing.assert_allclose(ddim.coef_x0, ddpm.posterior_mean_coef1, rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(ddim.coef_xt, ddpm.posterior_mean_coef2, rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(ddim.sigmas[1:] ** 2, ddpm.posterior_variance[1:], rtol=1e-9)


def test_ddim_eta0_rows_add_no_noise_and_stay_finite():
    rows = D.denoise_step_table(10, 3.0, 1.0, x0_clip=4.0, inner_sampler="ddim", eta=0.0)
    assert np.isfinite(rows[:, : Step.x0_clip]).all() and (rows[:, Step.noise_scale] == 0).all()
    assert (rows[:, Step.min_log_var] == rows[:, Step.max_log_var]).all()
    rng = np.random.default_rng(3)
    x, eps, noise = (rng.standard_normal((8, 16)) for _ in range(3))
    v = rng.uniform(-50, 50, (8, 16))
    for r in rows:
        out = _graph_step(r, x, eps, v, noise)
        assert np.isfinite(out).all()
        np.testing.assert_array_equal(out, _graph_step(r, x, eps, v, 0 * noise))


def test_ddim_noise_scale_is_temperature_where_sigma_is_positive():
    rows = D.denoise_step_table(6, 1.0, 0.8, inner_sampler="ddim", eta=0.5)
    assert (rows[:-1, Step.noise_scale] == np.float32(0.8)).all() and rows[-1, Step.noise_scale] == 0
    tab = D.ddim_tables(6, 0.5)
    np.testing.assert_allclose(
        np.exp(0.5 * rows[:-1, Step.max_log_var].astype(np.float64)), tab.sigmas[::-1][:-1], rtol=1e-6
    )


# ---- plans, presets and errors -----------------------------------------------------------------------


def _official_respacing(n, T=1000):
    """The official respacing rule (shared/spec): stride (T - 1) / (n - 1), a running sum from 0, Python's round."""
    stride, cur, kept = (T - 1) / (n - 1) if n > 1 else 1.0, 0.0, []
    for _ in range(n):
        kept.append(round(cur))
        cur += stride
    return kept


def test_ddpm_plan_rows_follow_the_plan_schedules():
    """Each outer step's rows, against the schedules' formulas (not the code's own table builder): its inner-step
    count, the official respaced timesteps noisiest first with a = sqrt(1 / abar), b = sqrt(1 / abar - 1) of the
    cosine chain, the linear CFG ramp 1 + (cfg - 1) s / S, the official temperature ramp as the noise scale on every
    row but the last, and the x0 bound."""
    counts = [5, 10, 20, 40, 100, 3, 7, 9, 11, 1]
    plan = plan_of(x0_clip=4.0, cfg=3.0, inner_steps=counts)
    ab_full = _alpha_bar_reference()
    for s, n in enumerate(counts):
        rows = plan.step_table(s)
        t = _official_respacing(n)[::-1]
        assert rows.shape == (n, len(Step)) and rows.dtype == np.float32
        assert rows[:, Step.timestep].tolist() == t
        ab = np.array([ab_full[i] for i in t])
        np.testing.assert_allclose(rows[:, Step.x0_coef_x], np.sqrt(1 / ab), rtol=2e-6)
        np.testing.assert_allclose(rows[:, Step.x0_coef_eps], np.sqrt(1 / ab - 1), rtol=2e-6)
        assert (rows[:, Step.cfg_scale] == np.float32(1 + 2.0 * s / 10)).all()
        tau = np.float32(0.8 + 0.2 * (1 - math.cos(math.pi / 2 * (s + 1) / 10)))
        assert (rows[:-1, Step.noise_scale] == tau).all() and rows[-1, Step.noise_scale] == 0
        assert (rows[:, Step.x0_clip] == 4.0).all()


def test_ddim_plan_rows_use_trailing_timesteps_and_one_fixed_variance():
    """DDIM rows: trailing timesteps round((k + 1) 1000 / n) - 1, sigma^2 = eta^2 (1 - abar_prev) / (1 - abar)
    (1 - abar / abar_prev) in float64 at both ends of the variance range, temperature where sigma > 0."""
    plan = plan_of(inner_sampler="ddim", eta=0.25, inner_steps=[3, 4, 5, 6], num_steps=4, temperature=0.9)
    assert plan.eta == 0.25 and plan.to_dict()["eta"] == 0.25
    ab_full = _alpha_bar_reference()
    for s, n in enumerate([3, 4, 5, 6]):
        rows = plan.step_table(s)
        t = [round((k + 1) * 1000 / n) - 1 for k in range(n)]
        assert rows[:, Step.timestep].tolist() == t[::-1]
        ab = np.array([ab_full[i] for i in t])
        ab_prev = np.append(1.0, ab[:-1])
        var = 0.25**2 * (1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)
        noisy = var[::-1] > 0
        np.testing.assert_allclose(rows[noisy, Step.min_log_var], np.log(var[::-1][noisy]), rtol=1e-5)
        np.testing.assert_array_equal(rows[:, Step.min_log_var], rows[:, Step.max_log_var])
        tau = np.float32(0.9 * (0.8 + 0.2 * (1 - math.cos(math.pi / 2 * (s + 1) / 4))))
        assert (rows[noisy, Step.noise_scale] == tau).all() and (rows[~noisy, Step.noise_scale] == 0).all()
    assert plan_of(inner_sampler="ddim").eta == 0.0


@pytest.mark.parametrize("inner_steps", ["frequency-aware", "official", 7, [5, 6, 7, 8]])
def test_ddim_accepts_every_inner_step_form(inner_steps):
    plan = plan_of(num_steps=4, inner_sampler="ddim", inner_steps=inner_steps)
    assert [plan.step_table(s).shape[0] for s in range(4)] == list(plan.inner_steps)
    assert all(plan.step_table(s)[0, 0] == 999 for s in range(4))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(inner_sampler="dpm"), "inner_sampler must be one of"),
        (dict(inner_sampler="DDIM"), "inner_sampler must be one of"),
        (dict(eta=0.0), "applies only to inner_sampler='ddim'"),
        (dict(eta=0.5, inner_sampler="ddpm"), "applies only"),
        (dict(inner_sampler="ddim", eta=1.5), r"\[0, 1\]"),
        (dict(inner_sampler="ddim", eta=-0.1), r"\[0, 1\]"),
        (dict(inner_sampler="ddim", eta=float("nan")), r"\[0, 1\]"),
        (dict(inner_sampler="ddim", eta=True), r"\[0, 1\]"),
        (dict(inner_sampler="ddim", eta="0"), r"\[0, 1\]"),
        (dict(inner_sampler="ddim", inner_steps=0), r"inner_steps must be an integer in 1\.\.1000"),
    ],
)
def test_bad_sampler_options_raise_typed_errors(kwargs, match):
    with pytest.raises(InvalidArgumentError, match=match):
        plan_of(**kwargs)


def test_resolve_plan_precedence_defaults_preset_explicit(monkeypatch):
    bundle = {"num_steps": 10, "inner_steps": "frequency-aware", "x0_clip": 4.0}
    R = lambda defaults, preset=None, **given: resolve_plan(defaults, SamplingOptions(**given), preset_name=preset)  # noqa: E731
    assert R(bundle).inner_sampler == "ddpm"
    fast = R(bundle, "fast")
    want = PRESETS["fast"]
    assert (fast.inner_sampler, fast.inner_steps) == (want.inner_sampler, (want.inner_steps,) * 10)
    assert fast.x0_clip == 4.0  # a preset keeps the bundle's other defaults
    ddim = R(bundle, "fast", inner_sampler="ddim", eta=1.0, inner_steps=8)
    assert (ddim.inner_sampler, ddim.eta, ddim.inner_steps) == ("ddim", 1.0, (8,) * 10)
    assert R(bundle, "official").inner_steps == (100,) * 10
    assert R(bundle, x0_clip=False).x0_clip is None  # False: no clipping over a clipping default
    # a preset's eta applies to DDIM only: overriding its sampler drops it
    monkeypatch.setitem(PRESETS, "ddim-test", SamplingOptions(inner_sampler="ddim", eta=0.3, inner_steps=6))
    assert R(bundle, "ddim-test").eta == 0.3
    assert R(bundle, "ddim-test", eta=1.0).eta == 1.0
    assert R(bundle, "ddim-test", inner_sampler="ddpm").eta == 0.0
    # a bundle whose default is DDIM: its eta applies to DDIM only
    ddim_bundle = {**bundle, "inner_sampler": "ddim", "eta": 0.5, "inner_steps": 12}
    assert R(ddim_bundle).eta == 0.5
    assert R(ddim_bundle, inner_sampler="ddpm").eta == 0.0
    with pytest.raises(InvalidArgumentError, match="applies only"):
        R(bundle, eta=0.3)
    with pytest.raises(InvalidArgumentError, match="unknown preset 'turbo'.*fast"):
        R(bundle, "turbo")


def test_fast_preset_meets_the_step_budget():
    """The fast preset: >= 4x fewer inner steps than the paper schedule (700) at 10 outer steps."""
    fast, paper = resolve_plan({}, preset_name="fast"), resolve_plan({}, preset_name="paper")
    assert sum(paper.inner_steps) == 700 and 4 * sum(fast.inner_steps) <= sum(paper.inner_steps)


# ---- backends against the reference sampler ----------------------------------------------------------

FAST = dict(num_steps=4, inner_steps=[3, 4, 5, 6])


@pytest.fixture(scope="module")
def tiny(tiny_models, tiny_bundle):
    return tiny_models[0], tiny_bundle


def _reference(far, labels, seed, **plan):
    from far_sdk.maths.noise import SeededNoise
    from training.sampler import sample_reference

    return sample_reference(far, labels, noise=SeededNoise.from_seed(seed, len(labels)), **plan).numpy()


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
@pytest.mark.parametrize(
    "opts",
    [dict(eta=0.0), dict(eta=1.0), dict(eta=0.5, x0_clip=3.0), dict(eta=0.0, num_steps=2, inner_steps=[1, 2])],
    ids=["eta0", "eta1", "eta0.5-clip", "1-step"],
)
def test_backend_equals_reference_sampler_for_ddim(tiny, backend, opts):
    import far_sdk

    far, bundle = tiny
    opts = {**FAST, **opts}
    with far_sdk.Generator(
        bundle, backend=backend, **({"threads": 2} if backend == "onnxruntime" else {"device": "cpu"})
    ) as gen:
        out = gen.generate([1, 7], seed=3, output_type="latent", cfg=2.5, inner_sampler="ddim", **opts)
        ref = _reference(far, [1, 7], 3, cfg=2.5, inner_sampler="ddim", **opts)
        assert out.plan.inner_sampler == "ddim" and out.plan.eta == opts["eta"]
        assert np.isfinite(ref).all()
        # untrained model: at t = 999 x0 = 2e4 x - 2e4 eps, so unclipped latents grow to ~1e4 (relative bound,
        # as tests/test_runtime.py); clipped ones stay O(1) but carry that amplified float32 rounding where not
        # clipped, so there the exact answer (the reference in float64) decides: the runtime must be as close to
        # it as the float32 reference is (measured: 2.7e-3 vs 7.4e-3 for eta 0.5 with the Philox seed-3 draws)
        bound = 1e-3 if opts.get("x0_clip") else 1e-4 * max(1.0, float(np.abs(ref).max()))
        err = float(np.abs(out.latents - ref).max())
        if opts.get("x0_clip") and err > bound:
            ref64 = _reference(far.double(), [1, 7], 3, cfg=2.5, inner_sampler="ddim", **opts)
            far.float()
            err64, ref_err64 = float(np.abs(out.latents - ref64).max()), float(np.abs(ref - ref64).max())
            assert err64 <= max(bound, 2 * ref_err64), f"max abs vs float64 {err64} (float32 reference: {ref_err64})"
            return
        assert err <= bound, f"max abs {err} (bound {bound})"
        gen.close()


def test_ddim_differs_from_ddpm_and_eta0_ignores_noise_after_x_T(tiny):
    """eta = 0 is deterministic given x_T: only the first draw of each outer step matters."""
    import far_sdk
    from far_sdk.maths.noise import SeededNoise

    far, bundle = tiny
    with far_sdk.Generator(bundle, backend="onnxruntime", threads=2) as gen:
        opts = dict(output_type="latent", x0_clip=3.0, **FAST)  # unclipped, t = 999's huge x0 dominates both
        a = gen.generate([4], seed=0, inner_sampler="ddim", **opts).latents
        ddpm = gen.generate([4], seed=0, **opts).latents
        assert np.abs(a - ddpm).max() > 0.1

        class ZeroAfterFirst:
            """Replays seed 0's x_T draws but zeroes every per-step draw."""

            def __init__(self):
                self.src, self.i = SeededNoise.from_seed(0, 1), 0
                self.inner = list(FAST["inner_steps"])

            def __call__(self, shape):
                x = self.src(shape)
                pos, s = self.i, 0
                while pos > self.inner[s]:
                    pos -= self.inner[s] + 1
                    s += 1
                self.i += 1
                return x if pos == 0 else np.zeros_like(x)

        b = gen.generate([4], noise=ZeroAfterFirst(), inner_sampler="ddim", **opts).latents
        np.testing.assert_array_equal(a, b)
        gen.close()


def test_far_generate_cli_sampler_options(tiny, tmp_path, capsys):
    from far_sdk.cli.main import main

    _, bundle = tiny
    base = [
        "generate",
        "--bundle",
        str(bundle),
        "--class",
        "1",
        "--steps",
        "2",
        "--inner-steps",
        "3",
        "--backend",
        "onnxruntime",
        "--no-progress",
        "--out",
        str(tmp_path / "g.png"),
    ]
    assert main(base + ["--inner-sampler", "ddim", "--eta", "0.5"]) == 0
    assert "6 ddim eta 0.5 inner steps" in capsys.readouterr().out
    assert (
        main(
            base[:7]
            + ["--preset", "fast", "--backend", "onnxruntime", "--no-progress", "--out", str(tmp_path / "f.png")]
        )
        == 0
    )
    assert f"{2 * PRESETS['fast'].inner_steps} ddpm inner steps" in capsys.readouterr().out
    assert main(base + ["--eta", "0.5"]) == 2
    assert "--eta 0.5 applies only to --inner-sampler ddim" in capsys.readouterr().err


def test_bundle_defaults_can_choose_ddim(tiny, tmp_path):
    import json
    import shutil

    from hostile import reseal

    import far_sdk
    from far_sdk.errors import BundleError

    _, bundle = tiny
    b = tmp_path / "b"
    shutil.copytree(bundle, b)
    m = json.loads((b / "manifest.json").read_text())
    assert m["defaults"]["inner_sampler"] == "ddpm"  # exported bundles spell out the official sampler
    reseal(b, lambda m: m["defaults"].update(inner_sampler="ddim", eta=0.5, inner_steps=4, num_steps=2))
    with far_sdk.Generator(b, backend="onnxruntime", threads=2) as gen:
        plan = gen.generate([1], seed=0, output_type="latent").plan
        assert (plan.inner_sampler, plan.eta, plan.inner_steps) == ("ddim", 0.5, (4, 4))
        assert gen.generate([1], seed=0, output_type="latent", inner_sampler="ddpm").plan.eta == 0.0
        reseal(b, lambda m: m["defaults"].update(eta=2.0))  # the manifest schema bounds eta to [0, 1]
        with pytest.raises(BundleError, match=r"field defaults.eta"):
            far_sdk.Generator(b, backend="onnxruntime", threads=2)
