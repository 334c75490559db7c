"""Correspondence and classification metrics (numpy/scipy only).

Particles are ``(..., M, 3)`` float, mm, LPS; the leading axes are subjects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

from ..errors import InputError


def _pair(pred: Any, gt: Any) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(pred, dtype=np.float64)
    g = np.asarray(gt, dtype=np.float64)
    if p.shape != g.shape or p.ndim < 2 or p.shape[-1] != 3:
        raise InputError(
            f"metrics: predicted and ground-truth particles must share a shape (..., M, 3); "
            f"found {p.shape} and {g.shape}"
        )
    if not (np.all(np.isfinite(p)) and np.all(np.isfinite(g))):
        raise InputError("metrics: particles contain NaN or Inf")
    return p, g


def rmse_per_axis(pred: Any, gt: Any) -> np.ndarray:
    """``RMSE_x, RMSE_y, RMSE_z`` ``(..., 3)`` mm: ``sqrt(||C_x - Ĉ_x||² / N)`` over the N points."""
    p, g = _pair(pred, gt)
    return np.sqrt(((p - g) ** 2).mean(axis=-2))


def rmse(pred: Any, gt: Any) -> np.ndarray | float:
    """Paper eq. 12: the mean of the per-axis RMSEs, ``(...,)`` mm (a float for one subject)."""
    r = rmse_per_axis(pred, gt).mean(axis=-1)
    return float(r) if np.ndim(r) == 0 else r


def per_point_rmse(pred: Any, gt: Any) -> np.ndarray:
    """Per-correspondence RMSE ``(..., M)`` mm: ``sqrt(((Δx)² + (Δy)² + (Δz)²) / 3)``."""
    p, g = _pair(pred, gt)
    return np.sqrt(((p - g) ** 2).mean(axis=-1))


def per_point_rmse_stats(pred: Any, gt: Any) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation ``(M,), (M,)`` mm of the per-point RMSE over a test set
    ``(N, M, 3)`` (population std, ddof=0) — the two heatmaps of the paper's Fig. 4."""
    r = per_point_rmse(pred, gt)
    if r.ndim != 2:
        raise InputError(
            f"per_point_rmse_stats: expected a test set of shape (N, M, 3), found {np.shape(pred)}"
        )
    return r.mean(axis=0), r.std(axis=0)


# -- scores against labels ----------------------------------------------------------------------
def _binary(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel()
    if s.shape != y.shape:
        raise InputError(f"scores and labels differ in length: {s.size} vs {y.size}")
    if not np.all(np.isfinite(s)):
        raise InputError("scores contain NaN or Inf")
    y = y.astype(bool) if y.dtype != bool else y
    if y.all() or not y.any():
        raise InputError(
            f"AUC needs both classes among the labels; found {int(y.sum())} positive of {y.size}"
        )
    return s, y


def auc(scores: Any, labels: Any) -> float:
    """Area under the ROC curve of ``scores`` (higher = positive) for binary ``labels``, from the
    Mann–Whitney U statistic with mid-ranks for ties: ``AUC = U / (n_pos · n_neg)``."""
    s, y = _binary(scores, labels)
    ranks = stats.rankdata(s)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def roc_curve(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)``, starting at (0, 0), one step per distinct score (descending)."""
    s, y = _binary(scores, labels)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    distinct = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    tp = np.cumsum(y)[distinct]
    fp = np.cumsum(~y)[distinct]
    tpr = np.r_[0.0, tp / y.sum()]
    fpr = np.r_[0.0, fp / (~y).sum()]
    return fpr, tpr, np.r_[np.inf, s[distinct]]


@dataclass
class Correlation:
    pearson: float
    pearson_p: float
    spearman: float
    spearman_p: float
    n: int

    def to_dict(self) -> dict[str, float]:
        return {
            "pearson": self.pearson,
            "pearson_p": self.pearson_p,
            "spearman": self.spearman,
            "spearman_p": self.spearman_p,
            "n": self.n,
        }


def correlation(a: Any, b: Any) -> Correlation:
    """Pearson and Spearman correlation (with two-sided p-values) of two paired samples."""
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    if x.shape != y.shape or x.size < 3:
        raise InputError(
            f"correlation needs two paired samples of at least 3 values; found {x.size} and {y.size}"
        )
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise InputError("correlation: values contain NaN or Inf")
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        raise InputError("correlation: one of the samples is constant")
    pr = stats.pearsonr(x, y)
    sr = stats.spearmanr(x, y)
    return Correlation(float(pr[0]), float(pr[1]), float(sr[0]), float(sr[1]), int(x.size))


def summarize(values: Any) -> dict[str, float]:
    """Mean, std, median, min, max of a 1-D sample (for metrics.json)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"n": 0}
    return {
        "n": int(v.size),
        "mean": float(v.mean()),
        "std": float(v.std()),
        "median": float(np.median(v)),
        "min": float(v.min()),
        "max": float(v.max()),
    }
