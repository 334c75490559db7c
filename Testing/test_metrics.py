"""Metrics against hand-computed values (paper eq. 12 and the per-point RMSE after it)."""

import numpy as np
import pytest
from scipy import stats

from DeepSSMLogic.analysis import metrics
from DeepSSMLogic.errors import InputError


def test_rmse_eq12_hand_computed():
    gt = np.zeros((2, 3))
    pred = np.array([[3.0, 0.0, 0.0], [1.0, 2.0, 0.0]])
    # RMSE_x = sqrt((9+1)/2), RMSE_y = sqrt((0+4)/2), RMSE_z = 0
    expected = (np.sqrt(5.0) + np.sqrt(2.0) + 0.0) / 3.0
    assert metrics.rmse(pred, gt) == pytest.approx(expected)
    np.testing.assert_allclose(metrics.rmse_per_axis(pred, gt), [np.sqrt(5.0), np.sqrt(2.0), 0.0])


def test_rmse_is_not_the_euclidean_rmse():
    gt = np.zeros((1, 3))
    pred = np.array([[1.0, 1.0, 1.0]])
    assert metrics.rmse(pred, gt) == pytest.approx(1.0)  # eq. 12, not sqrt(3)


def test_rmse_batched_per_subject():
    rng = np.random.default_rng(0)
    gt = rng.normal(size=(4, 10, 3))
    pred = gt + rng.normal(size=gt.shape)
    r = metrics.rmse(pred, gt)
    assert r.shape == (4,)
    for i in range(4):
        assert r[i] == pytest.approx(metrics.rmse(pred[i], gt[i]))


def test_per_point_rmse_and_stats():
    gt = np.zeros((2, 2, 3))
    pred = np.array([[[3.0, 0, 0], [1, 1, 1]], [[0, 0, 0], [2, 2, 2]]])
    ppr = metrics.per_point_rmse(pred, gt)
    np.testing.assert_allclose(ppr, [[np.sqrt(3.0), 1.0], [0.0, 2.0]])
    mean, std = metrics.per_point_rmse_stats(pred, gt)
    np.testing.assert_allclose(mean, [np.sqrt(3.0) / 2, 1.5])
    np.testing.assert_allclose(std, [np.sqrt(3.0) / 2, 0.5])


def test_metrics_reject_bad_shapes_and_nan():
    with pytest.raises(InputError, match="share a shape"):
        metrics.rmse(np.zeros((3, 3)), np.zeros((4, 3)))
    bad = np.zeros((3, 3))
    bad[1, 1] = np.nan
    with pytest.raises(InputError, match="NaN"):
        metrics.rmse(bad, np.zeros((3, 3)))


def test_auc_matches_mann_whitney_and_hand_values():
    assert metrics.auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert metrics.auc([1, 2, 3, 4], [0, 0, 1, 1]) == 1.0
    assert metrics.auc([4, 3, 2, 1], [0, 0, 1, 1]) == 0.0
    assert metrics.auc([1, 1, 1, 1], [0, 1, 0, 1]) == 0.5  # ties count half
    rng = np.random.default_rng(1)
    s = rng.normal(size=40)
    y = rng.random(40) > 0.5
    u = stats.mannwhitneyu(s[y], s[~y]).statistic
    assert metrics.auc(s, y) == pytest.approx(u / (y.sum() * (~y).sum()))
    with pytest.raises(InputError, match="both classes"):
        metrics.auc([1, 2], [1, 1])


def test_roc_curve_area_equals_auc():
    rng = np.random.default_rng(2)
    s = rng.normal(size=50)
    y = (s + rng.normal(size=50)) > 0
    fpr, tpr, thr = metrics.roc_curve(s, y)
    assert np.all(np.diff(thr) < 0)
    assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(metrics.auc(s, y))


def test_correlation_pearson_spearman():
    x = np.arange(10.0)
    c = metrics.correlation(x, x**3)
    assert c.spearman == pytest.approx(1.0)
    assert 0.9 < c.pearson < 1.0
    c2 = metrics.correlation(x, -2 * x + 1)
    assert c2.pearson == pytest.approx(-1.0)
    with pytest.raises(InputError, match="constant"):
        metrics.correlation(x, np.ones(10))
