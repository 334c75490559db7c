"""Statistics for the paper-claims study: intervals, paired tests, effect sizes and verdicts on
constructed data whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from DeepSSMLogic.analysis import stats
from DeepSSMLogic.errors import InputError


def _pairs(shift: float, noise: float = 0.05, seeds: int = 5, subjects: int = 12, rng_seed: int = 0):
    rng = np.random.default_rng(rng_seed)
    a = 1.0 + 0.3 * rng.standard_normal(seeds * subjects)
    b = a + shift + noise * rng.standard_normal(a.size)
    clusters = np.repeat(np.arange(seeds), subjects)
    return a, b, clusters


def test_mean_ci_matches_student_t():
    v = np.array([1.0, 2.0, 3.0, 4.0])
    ci = stats.mean_ci(v)
    # t(0.975, 3) = 3.182446; sd = 1.290994; half = 3.182446 * 1.290994 / 2 = 2.054
    assert ci.mean == pytest.approx(2.5)
    assert ci.hi - ci.mean == pytest.approx(3.182446 * 1.290994 / 2, rel=1e-5)
    assert ci.lo == pytest.approx(2 * ci.mean - ci.hi)
    one = stats.mean_ci([3.0])
    assert (one.lo, one.hi, one.n) == (3.0, 3.0, 1)


def test_identical_models_not_established():
    a, _, cl = _pairs(0.0)
    r = stats.paired_comparison(a, a.copy(), clusters=cl)
    assert r.verdict == stats.NOT_ESTABLISHED
    assert r.wilcoxon_p == 1.0 and r.mean_diff == 0.0
    assert r.cohen_dz == 0.0 and r.rank_biserial == 0.0
    assert r.ci_lo == 0.0 and r.ci_hi == 0.0


def test_pure_noise_difference_not_established():
    a, b, cl = _pairs(0.0, noise=0.2, rng_seed=3)
    r = stats.paired_comparison(a, b, clusters=cl)
    assert r.wilcoxon_p > 0.05
    assert r.ci_lo < 0 < r.ci_hi
    assert r.verdict == stats.NOT_ESTABLISHED


def test_consistent_improvement_established():
    a, b, cl = _pairs(-0.2)  # B lower (better) by 0.2 with noise 0.05
    r = stats.paired_comparison(a, b, clusters=cl)
    assert r.verdict == stats.ESTABLISHED
    assert r.wilcoxon_p < 1e-6
    assert r.ci_hi < 0 and r.mean_diff == pytest.approx(-0.2, abs=0.03)
    assert r.cohen_dz < -2 and r.rank_biserial == pytest.approx(-1.0)
    assert r.b_better_fraction > 0.95
    # "higher is better" reads the same data as a worsening
    assert stats.paired_comparison(a, b, clusters=cl, better="higher").verdict == stats.CONTRADICTED


def test_consistent_worsening_contradicted():
    a, b, cl = _pairs(+0.2)
    r = stats.paired_comparison(a, b, clusters=cl)
    assert r.verdict == stats.CONTRADICTED
    assert r.ci_lo > 0 and r.rank_biserial == pytest.approx(1.0)


def test_sign_alone_is_not_enough():
    # B is better on average (the old sign rule said "reproduced"), but inside the spread
    a, b, cl = _pairs(-0.01, noise=0.3, rng_seed=1)
    assert b.mean() < a.mean()
    assert stats.paired_comparison(a, b, clusters=cl).verdict == stats.NOT_ESTABLISHED


def test_two_stage_bootstrap_carries_seed_variance():
    # every subject improves a lot inside each seed, but the seeds disagree in sign: with the
    # seeds as clusters the interval must straddle 0; treated as independent units it would not
    rng = np.random.default_rng(0)
    seed_effect = np.array([-0.5, 0.45, -0.4, 0.5, -0.1])
    cl = np.repeat(np.arange(5), 20)
    a = 1.0 + 0.1 * rng.standard_normal(cl.size)
    b = a + seed_effect[cl] + 0.01 * rng.standard_normal(cl.size)
    clustered = stats.paired_comparison(a, b, clusters=cl)
    flat = stats.paired_comparison(a, b)
    assert clustered.ci_lo < 0 < clustered.ci_hi
    assert (flat.ci_hi - flat.ci_lo) < 0.5 * (clustered.ci_hi - clustered.ci_lo)


def test_equivalence_verdicts():
    gt = np.array([0.80, 0.85, 0.78, 0.82, 0.90])
    close = gt + np.array([0.01, -0.01, 0.0, 0.005, -0.005])
    far = gt - np.array([0.30, 0.28, 0.35, 0.32, 0.29])
    noisy = gt + np.array([0.2, -0.25, 0.15, -0.2, 0.1])
    assert stats.equivalence(gt, close, margin=0.05).verdict == stats.ESTABLISHED
    assert stats.equivalence(gt, far, margin=0.05).verdict == stats.CONTRADICTED
    assert stats.equivalence(gt, noisy, margin=0.05).verdict == stats.NOT_ESTABLISHED


def test_bad_input_named():
    with pytest.raises(InputError, match="same units"):
        stats.paired_comparison([1.0, 2.0], [1.0])
    with pytest.raises(InputError, match="finite"):
        stats.paired_comparison([1.0, np.nan], [1.0, 2.0])
    with pytest.raises(InputError, match="better"):
        stats.paired_comparison([1.0, 2.0, 3.0], [0.0, 1.0, 2.0], better="smaller")
    with pytest.raises(InputError, match="margin"):
        stats.equivalence([1.0, 2.0], [1.0, 2.0], margin=0.0)
