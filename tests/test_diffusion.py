"""far_sdk.maths.diffusion against an independent float64 computation and the official code's arrays."""

import math

import numpy as np
import pytest

from far_sdk.errors import InvalidArgumentError
from far_sdk.maths import diffusion as D
from far_sdk.maths.diffusion import Step as S


def _alpha_bar_reference(T=1000):
    """alpha_bar from the closed form of the cosine schedule, step by step in Python floats."""
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    ab, out = 1.0, []
    for i in range(T):
        beta = min(1 - f((i + 1) / T) / f(i / T), 0.999)
        ab *= 1 - beta
        out.append(ab)
    return out


def test_cosine_alpha_bar_matches_closed_form_and_spec_values():
    tab = D.diffusion_tables(None)
    ref = _alpha_bar_reference()
    np.testing.assert_allclose(tab.alphas_cumprod, ref, rtol=1e-12, atol=0)
    assert tab.alphas_cumprod[0] == pytest.approx(0.99995872, abs=1e-8)
    assert tab.alphas_cumprod[-1] == pytest.approx(2.43e-9, rel=1e-2)
    assert (tab.betas[:-1] < 0.999).all() and tab.betas[-1] == 0.999  # only i = 999 is clipped


@pytest.mark.parametrize("n", [1, 2, 10, 25, 40, 50, 70, 100, 333, 1000])
def test_respacing_official_rule(n):
    kept = D.respaced_timesteps(n)
    stride = 999 / (n - 1) if n > 1 else 1.0
    expected, cur = [], 0.0
    for _ in range(n):
        expected.append(round(cur))
        cur += stride
    assert kept.tolist() == expected
    assert kept[0] == 0 and (n == 1 or kept[-1] == 999)


def test_respacing_known_values():
    assert D.respaced_timesteps(10).tolist() == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    k100 = D.respaced_timesteps(100)
    assert k100[:8].tolist() == [0, 10, 20, 30, 40, 50, 61, 71] and k100[-2:].tolist() == [989, 999]
    assert D.respaced_timesteps(25)[4] == 166  # round half to even (166.5 -> 166)


@pytest.mark.parametrize("bad", [0, -1, 1001, 2.5, True, "10"])
def test_respacing_rejects_bad_counts(bad):
    with pytest.raises(InvalidArgumentError):
        D.respaced_timesteps(bad)


@pytest.mark.parametrize("key,n", [("t1000", None), ("s100", 100), ("s50", 50), ("sused", 10)])
def test_tables_equal_official_arrays(official_ref, key, n):
    tab = D.diffusion_tables(n)
    np.testing.assert_array_equal(tab.timesteps, official_ref[f"sched_{key}_timestep_map"])
    for name in (
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
    ):
        np.testing.assert_allclose(
            getattr(tab, name), official_ref[f"sched_{key}_{name}"], rtol=1e-12, atol=1e-300, err_msg=name
        )


@pytest.mark.parametrize("n", [7, 40, 100])
def test_respaced_posterior_against_float64_formulas(n):
    """Recompute the respaced posterior from alpha_bar alone, entry by entry."""
    ab_full = _alpha_bar_reference()
    kept = D.respaced_timesteps(n).tolist()
    tab = D.diffusion_tables(n)
    prev = 1.0
    for k, t in enumerate(kept):
        ab = ab_full[t]
        beta = 1 - ab / prev
        var = beta * (1 - prev) / (1 - ab)
        assert tab.betas[k] == pytest.approx(beta, rel=1e-9)
        assert tab.posterior_mean_coef1[k] == pytest.approx(beta * math.sqrt(prev) / (1 - ab), rel=1e-9)
        assert tab.posterior_mean_coef2[k] == pytest.approx((1 - prev) * math.sqrt(1 - beta) / (1 - ab), rel=1e-9)
        assert tab.sqrt_recipm1_alphas_cumprod[k] == pytest.approx(math.sqrt(1 / ab - 1), rel=1e-9)
        if k > 0:
            assert tab.posterior_variance[k] == pytest.approx(var, rel=1e-9)
        prev = ab
    assert tab.posterior_log_variance_clipped[0] == tab.posterior_log_variance_clipped[1]


def _ddpm_update(x, eps_c, eps_u, v, row, noise):
    """training.graph_modules.ddpm_update (the one implementation of the step) on NumPy inputs, float32."""
    torch = pytest.importorskip("torch")
    from training.graph_modules import ddpm_update

    out = np.concatenate(
        [np.concatenate([eps_c, v], 1), np.concatenate([eps_u, np.zeros_like(v)], 1)]
    )  # [cond; uncond]
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
    return ddpm_update(t(out), t(x), t(noise), t(row)).numpy()


def test_ddpm_step_against_float64_gaussian_posterior():
    rng = np.random.default_rng(0)
    n, k, temp, cfg = 40, 17, 0.9, 2.5
    x, eps_c, eps_u, noise = (rng.standard_normal((64, 16)).astype(np.float32) for _ in range(4))
    v = rng.uniform(-1.2, 1.2, (64, 16)).astype(np.float32)
    row = D.denoise_step_table(n, cfg, temp)[n - 1 - k]
    out = _ddpm_update(x, eps_c, eps_u, v, row, noise)

    ab = _alpha_bar_reference()
    kept = D.respaced_timesteps(n).tolist()
    a, a_prev = ab[kept[k]], ab[kept[k - 1]]
    beta = 1 - a / a_prev
    x64, v64 = x.astype(np.float64), v.astype(np.float64)
    w = cfg - 1  # the paper's form: (1 + w) eps_c - w eps_u
    e64 = (1 + w) * eps_c.astype(np.float64) - w * eps_u.astype(np.float64)
    x0 = (x64 - math.sqrt(1 - a) * e64) / math.sqrt(a)
    mean = (math.sqrt(a_prev) * beta * x0 + math.sqrt(1 - beta) * (1 - a_prev) * x64) / (1 - a)
    frac = (v64 + 1) / 2
    log_var = frac * math.log(beta) + (1 - frac) * math.log(beta * (1 - a_prev) / (1 - a))
    ref = mean + np.exp(0.5 * log_var) * noise * temp
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5)


def test_ddpm_last_step_adds_no_noise():
    rng = np.random.default_rng(1)
    x, eps, v = (rng.standard_normal((8, 16)).astype(np.float32) for _ in range(3))
    row = D.denoise_step_table(10, 3.0, 1.0)[-1]  # k = 0
    a = _ddpm_update(x, eps, eps, v, row, rng.standard_normal((8, 16)).astype(np.float32))
    b = _ddpm_update(x, eps, eps, v, row, np.zeros((8, 16), np.float32))
    np.testing.assert_array_equal(a, b)


def test_denoise_step_table_rows_follow_execution_order():
    tab = D.diffusion_tables(12)
    rows = D.denoise_step_table(12, 2.5, 0.9)
    assert rows.shape == (12, len(S)) and rows.dtype == np.float32
    assert rows[0, S.timestep] == 999 and rows[-1, S.timestep] == 0
    k = 12 - 1 - 3
    for col, name in (
        (S.x0_coef_x, "sqrt_recip_alphas_cumprod"),
        (S.x0_coef_eps, "sqrt_recipm1_alphas_cumprod"),
        (S.mean_coef_x0, "posterior_mean_coef1"),
        (S.mean_coef_xt, "posterior_mean_coef2"),
        (S.min_log_var, "posterior_log_variance_clipped"),
        (S.max_log_var, "log_betas"),
    ):
        assert rows[3, col] == np.float32(getattr(tab, name)[k]), name
    assert (rows[:-1, S.noise_scale] == np.float32(0.9)).all() and rows[-1, S.noise_scale] == 0
    assert (rows[:, S.cfg_scale] == np.float32(2.5)).all()


def test_ddpm_step_x0_clip_against_float64():
    rng = np.random.default_rng(4)
    x, eps, noise = (rng.standard_normal((64, 16)).astype(np.float32) for _ in range(3))
    v = rng.uniform(-1, 1, (64, 16)).astype(np.float32)
    n, k, clip = 20, 19, 1.5  # the noisiest step: x0_hat is huge unclipped
    tab = D.diffusion_tables(n)
    out = _ddpm_update(x, eps, eps, v, D.denoise_step_table(n, 1.0, 1.0, x0_clip=clip)[n - 1 - k], noise)
    x64, e64 = x.astype(np.float64), eps.astype(np.float64)
    x0 = np.clip(tab.sqrt_recip_alphas_cumprod[k] * x64 - tab.sqrt_recipm1_alphas_cumprod[k] * e64, -clip, clip)
    mean = tab.posterior_mean_coef1[k] * x0 + tab.posterior_mean_coef2[k] * x64
    frac = (v + 1.0) / 2
    log_var = frac * tab.log_betas[k] + (1 - frac) * tab.posterior_log_variance_clipped[k]
    np.testing.assert_allclose(out, mean + np.exp(0.5 * log_var) * noise, rtol=1e-5, atol=1e-5)
    unclipped = _ddpm_update(x, eps, eps, v, D.denoise_step_table(n, 1.0, 1.0)[n - 1 - k], noise)
    assert np.abs(unclipped).max() > 100 * np.abs(out).max()


def test_step_table_x0_clip_column():
    assert np.isinf(D.denoise_step_table(5, 1.0, 1.0)[:, S.x0_clip]).all()
    assert (D.denoise_step_table(5, 1.0, 1.0, x0_clip=4.0)[:, S.x0_clip] == 4.0).all()
