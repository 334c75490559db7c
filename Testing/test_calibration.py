"""Uncertainty calibration and OOD flag rate (DeepSSMLogic/analysis/calibration.py) on inputs whose
answers are known by construction (issue 13)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from DeepSSMLogic.analysis import calibration as cal
from DeepSSMLogic.errors import InputError


def _strict_json(obj) -> str:
    return json.dumps(obj, allow_nan=False)  # raises on NaN/Inf


def test_perfectly_calibrated_uncertainty_has_rho_one_everywhere():
    rng = np.random.default_rng(0)
    scale = np.array([0.5, 1.0, 2.0, 4.0])  # subject difficulty
    err = [s * rng.uniform(0.1, 1.0, 50) for s in scale]
    unc = [0.5 * e for e in err]  # a monotone function of the error: perfect ranking
    rmse = [float(np.sqrt(np.mean(e**2))) for e in err]
    out = cal.calibration_summary(["a", "b", "c", "d"], unc, err, rmse, method="ensemble", n_bins=5)
    assert out["available"] and out["method"] == "ensemble"
    assert out["particle_spearman_pooled"]["rho"] == pytest.approx(1.0)
    assert out["particle_spearman_pooled"]["n"] == 200
    assert out["particle_spearman_per_subject"]["values"] == pytest.approx(
        {"a": 1.0, "b": 1.0, "c": 1.0, "d": 1.0}
    )
    assert out["particle_spearman_per_subject"]["median"] == pytest.approx(1.0)
    assert out["subject_spearman_mean_uncertainty_vs_rmse"]["rho"] == pytest.approx(1.0)
    assert out["per_subject_mean_uncertainty_mm"]["c"] == pytest.approx(unc[2].mean())
    # error = 2 x uncertainty in every bin
    for b in out["reliability"]["bins"]:
        assert b["mean_actual_mm"] == pytest.approx(2.0 * b["mean_predicted_mm"])
    assert sum(b["count"] for b in out["reliability"]["bins"]) == 200
    _strict_json(out)


def test_anti_calibrated_uncertainty_has_rho_minus_one():
    err = [np.linspace(0.1, 0.9, 20), np.linspace(1.0, 2.9, 20), np.linspace(3.0, 5.0, 20)]
    unc = [10.0 - e for e in err]  # larger where the error is smaller, and for the easier subjects
    rmse = [float(e.mean()) for e in err]
    out = cal.calibration_summary(["a", "b", "c"], unc, err, rmse)
    assert out["particle_spearman_pooled"]["rho"] == pytest.approx(-1.0)
    assert out["particle_spearman_per_subject"]["median"] == pytest.approx(-1.0)
    assert out["subject_spearman_mean_uncertainty_vs_rmse"]["rho"] == pytest.approx(-1.0)


def test_spearman_uses_mid_ranks_for_ties():
    x = [1.0, 2.0, 2.0, 3.0, 5.0]
    y = [2.0, 1.0, 4.0, 3.0, 5.0]
    rx = np.array([1.0, 2.5, 2.5, 4.0, 5.0])  # the two 2.0s share rank (2 + 3) / 2
    ry = np.array([2.0, 1.0, 4.0, 3.0, 5.0])
    expected = np.corrcoef(rx, ry)[0, 1]
    got = cal.spearman(x, y)
    assert got["rho"] == pytest.approx(expected) and got["reason"] is None and got["n"] == 5


def test_constant_uncertainty_gives_an_undefined_rho_with_a_reason_not_nan():
    err = [np.linspace(0.1, 1.0, 10), np.linspace(0.2, 2.0, 10), np.linspace(0.3, 3.0, 10)]
    unc = [np.full(10, 0.7)] * 3
    out = cal.calibration_summary(["a", "b", "c"], unc, err, [0.5, 1.0, 1.5])
    for r in (out["particle_spearman_pooled"], out["subject_spearman_mean_uncertainty_vs_rmse"]):
        assert r["rho"] is None and r["p"] is None
        assert "constant" in r["reason"]
    per = out["particle_spearman_per_subject"]
    assert per["values"] == {"a": None, "b": None, "c": None} and per["median"] is None
    assert (
        set(per["reasons"]) == {"a", "b", "c"} and "predicted uncertainty is constant" in per["reasons"]["a"]
    )
    assert len(out["reliability"]["bins"]) == 1 and out["reliability"]["bins"][0]["count"] == 30
    text = _strict_json(out)
    assert "NaN" not in text
    # too few pairs is undefined too
    assert cal.spearman([1.0, 2.0], [2.0, 1.0])["reason"].startswith("undefined: 2 pair(s)")


def test_reliability_bins_are_exact_on_constructed_data():
    # five uncertainty levels, 4 particles each; the actual error of level k is k + the offsets
    levels = np.repeat([0.5, 1.0, 1.5, 2.0, 2.5], 4)
    offsets = np.tile([-0.1, 0.0, 0.1, 0.2], 5)
    actual = levels + offsets
    bins = cal.reliability_bins(levels, actual, n_bins=5)
    assert [b["count"] for b in bins] == [4, 4, 4, 4, 4]
    assert [b["mean_predicted_mm"] for b in bins] == pytest.approx([0.5, 1.0, 1.5, 2.0, 2.5])
    assert [b["mean_actual_mm"] for b in bins] == pytest.approx([0.55, 1.05, 1.55, 2.05, 2.55])
    assert bins[0]["lo"] == 0.5 and bins[-1]["hi"] == 2.5
    # a value on an inner edge belongs to the bin above it: [1, 3) and [3, 5]
    bins = cal.reliability_bins([1.0, 2.0, 3.0, 4.0, 5.0], [10.0, 20.0, 30.0, 40.0, 50.0], n_bins=2)
    assert [(b["lo"], b["hi"], b["count"]) for b in bins] == [(1.0, 3.0, 2), (3.0, 5.0, 3)]
    assert [b["mean_actual_mm"] for b in bins] == [15.0, 40.0]


def test_reliability_bins_never_split_tied_values():
    # seven equal values straddle several quantile edges: they must all land in one bin
    p = np.array([1.0] * 7 + [2.0, 3.0, 4.0])
    a = np.arange(10, dtype=float)
    bins = cal.reliability_bins(p, a, n_bins=5)
    # quantile edges 1, 1, 1, 1, 2.2, 4 -> bins [1, 2.2) and [2.2, 4]: the 1.0s and the 2.0 together
    assert [v for b in bins for v in (b["lo"], b["hi"])] == pytest.approx([1.0, 2.2, 2.2, 4.0])
    assert [b["count"] for b in bins] == [8, 2]
    assert bins[0]["mean_predicted_mm"] == pytest.approx(9.0 / 8) and bins[0]["mean_actual_mm"] == 3.5
    assert sum(b["count"] for b in bins) == 10
    # every bin holds only values inside its edges
    for b in bins:
        sel = (p >= b["lo"]) & ((p < b["hi"]) | (b is bins[-1]))
        assert sel.sum() == b["count"]


def test_bad_uncertainty_is_rejected_naming_the_subject():
    err = [np.ones(4), np.ones(4), np.ones(4)]
    with pytest.raises(InputError, match=r"subject 'b'.*NaN"):
        cal.calibration_summary(
            ["a", "b", "c"], [np.ones(4), np.array([1, np.nan, 1, 1]), np.ones(4)], err, [1, 1, 1]
        )
    with pytest.raises(InputError, match="subject 'c': 3 per-particle uncertainties for 4 particles"):
        cal.calibration_summary(["a", "b", "c"], [np.ones(4), np.ones(4), np.ones(3)], err, [1, 1, 1])


def test_ood_summary_counts_the_flagged_images_with_their_reasons():
    verdicts = {
        "a": {"score": 1.0, "threshold": 3.0, "flag": False, "reasons": []},
        "b": {"score": 7.5, "threshold": 3.0, "flag": True, "reasons": ["descriptor far from training"]},
        "c": {
            "score": float("nan"),
            "threshold": 3.0,
            "flag": True,
            "reasons": ["intensity", "registration"],
        },
        "d": {"score": 0.2, "threshold": 3.0, "flag": False, "reasons": []},
    }
    out = cal.ood_summary(verdicts)
    assert out["available"] and out["n_checked"] == 4 and out["n_flagged"] == 2
    assert out["flag_rate"] == pytest.approx(0.5) and out["threshold"] == 3.0
    assert [f["id"] for f in out["flagged"]] == ["b", "c"]
    assert out["flagged"][1]["reasons"] == ["intensity", "registration"]
    assert out["flagged"][1]["score"] is None  # NaN never reaches the JSON
    _strict_json(out)
    none = cal.ood_summary({"a": None, "b": None})
    assert none["available"] is False and "no OOD" in none["reason"]
    with pytest.raises(InputError, match=r"subject 'x'.*no 'flag'"):
        cal.ood_summary({"x": {"score": 1.0}})
