"""Outer levels, CFG, temperature and inner-step schedules against formulas and the official trace."""

import math

import numpy as np
import pytest
from conftest import plan_of

from far_sdk.errors import InvalidArgumentError
from far_sdk.maths import schedules as S


def test_official_plan_matches_official_trace(official_ref):
    plan = plan_of(inner_steps=100)
    assert plan.levels == tuple(int(v) for v in official_ref["levels"])
    np.testing.assert_allclose(plan.cfg, official_ref["cfgs"], rtol=0, atol=1e-15)
    np.testing.assert_allclose(plan.temperature, official_ref["temperatures"], rtol=0, atol=1e-15)
    assert plan.filter_after == (2, 3, 4, 5, 6, 7, 8, 9, 10, None)
    assert plan.inner_steps == (100,) * 10


def test_official_mask_plan_matches_official_trace(official_ref):
    plan = plan_of(inner_steps=100, mode="mask")
    assert plan.levels == tuple(int(v) for v in official_ref["mask_levels"])
    np.testing.assert_allclose(plan.cfg, official_ref["mask_cfgs"], atol=1e-15)
    np.testing.assert_allclose(plan.temperature, official_ref["mask_temperatures"], atol=1e-15)
    assert plan.filter_after[0] is None and plan.filter_after[-1] is None
    assert plan.filter_after[1:-1] == plan.levels[2:]


def test_mask_unmasked_counts():
    kept = S.mask_keep_counts(11)
    assert [256 - m for m in kept] == [3, 11, 24, 41, 63, 89, 118, 150, 184, 220, 256]


def test_frequency_aware_inner_steps_linear_40_to_100():
    for n in range(2, 17):
        sched = S.inner_step_schedule("frequency-aware", n)
        assert sched[0] == 40 and sched[-1] == 100
        assert sched == tuple(round(40 + 60 * s / (n - 1)) for s in range(n))
    assert S.inner_step_schedule("frequency-aware", 10) == (40, 47, 53, 60, 67, 73, 80, 87, 93, 100)
    assert sum(S.inner_step_schedule("frequency-aware", 10)) == 700  # the paper's average of 70
    assert S.inner_step_schedule("frequency-aware", 1) == (100,)


def test_inner_steps_int_and_list():
    assert S.inner_step_schedule(50, 3) == (50, 50, 50)
    assert S.inner_step_schedule([5, 6, 7], 3) == (5, 6, 7)
    with pytest.raises(InvalidArgumentError, match="one per outer step"):
        S.inner_step_schedule([5, 6], 3)
    with pytest.raises(InvalidArgumentError):
        S.inner_step_schedule(0, 3)
    with pytest.raises(InvalidArgumentError):
        S.inner_step_schedule("fast", 3)


@pytest.mark.parametrize("n", range(1, 17))
def test_outer_levels_every_count(n):
    lv = S.outer_levels(n)
    assert len(lv) == n and lv[0] == 0
    assert all(0 <= v <= 15 for v in lv)
    assert list(lv) == sorted(set(lv)), "levels rise strictly"
    if n >= 11:
        assert lv == tuple(range(n))


def test_outer_levels_official_ten():
    assert S.outer_levels(10) == S.OFFICIAL_LEVELS == (0, 2, 3, 4, 5, 6, 7, 8, 9, 10)


@pytest.mark.parametrize("bad", [0, 17, 2.5, None, True])
def test_outer_levels_reject(bad):
    with pytest.raises(InvalidArgumentError, match="1..16"):
        S.outer_levels(bad)


def test_cfg_schedules():
    np.testing.assert_allclose(S.cfg_schedule_values(4.0, 8, "linear"), [1 + 3.0 * s / 8 for s in range(8)])
    np.testing.assert_allclose(S.cfg_schedule_values(4.0, 8, "constant"), [4.0] * 8)
    for bad in (float("nan"), float("inf"), "3"):
        with pytest.raises(InvalidArgumentError):
            S.cfg_schedule_values(bad, 8)


def test_temperature_schedules():
    ramp = [0.8 + 0.2 * (1 - math.cos(math.pi / 2 * (s + 1) / 6)) for s in range(6)]
    np.testing.assert_allclose(S.temperature_schedule_values(1.0, 6), ramp, rtol=0, atol=0)
    np.testing.assert_allclose(S.temperature_schedule_values(0.5, 6), [0.5 * r for r in ramp], rtol=1e-15)
    np.testing.assert_allclose(S.temperature_schedule_values(0.7, 6, "constant"), [0.7] * 6)
    with pytest.raises(InvalidArgumentError):
        S.temperature_schedule_values(-1.0, 6)


def test_plan_with_explicit_levels_and_validation():
    plan = plan_of(levels=[0, 4, 8], inner_steps=20, cfg=2.0, cfg_schedule="constant", filter="fourier")
    assert plan.filter_after == (4, 8, None) and plan.cfg == (2.0, 2.0, 2.0) and plan.filter == "fourier"
    with pytest.raises(InvalidArgumentError):
        plan_of(levels=[0, 16])
    with pytest.raises(InvalidArgumentError):
        plan_of(num_steps=4, levels=[0, 4, 8])
    with pytest.raises(InvalidArgumentError, match="filter"):
        plan_of(filter="wavelet")


def test_plan_x0_clip_validation():
    assert plan_of().x0_clip is None
    assert plan_of(x0_clip=4).x0_clip == 4.0
    for bad in (0, -1.0, float("inf"), float("nan")):
        with pytest.raises(InvalidArgumentError, match="x0_clip"):
            plan_of(x0_clip=bad)
