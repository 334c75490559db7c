"""Is the predicted uncertainty worth trusting? Calibration of per-particle uncertainty against the
actual error, and the out-of-distribution (OOD) flag rate, for ``deepssm evaluate`` (issue 13).

Pure numpy/scipy on arrays the caller supplies; no files. Every value is JSON-ready: a correlation
that is undefined (a constant sample, too few pairs) is ``None`` with a ``reason``, never NaN.

- :func:`spearman`: rank correlation of two paired samples (``DeepSSMLogic.rank_correlation``, shared
  with the training-time calibration).
- :func:`reliability_bins`: predicted uncertainty in quantile bins, mean actual error per bin.
- :func:`calibration_summary`: the ``"calibration"`` section of metrics.json.
- :func:`ood_summary`: the ``"ood"`` section of metrics.json.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import InputError
from ..rank_correlation import spearman

__all__ = ["calibration_summary", "no_uncertainty", "ood_summary", "reliability_bins", "spearman"]

ERROR_DEFINITION = "per-particle Euclidean distance |predicted - ground truth| (mm)"


def reliability_bins(predicted: Any, actual: Any, n_bins: int = 10) -> list[dict[str, float]]:
    """Predicted uncertainty cut into ``n_bins`` quantile bins (edges at its 0, 1/n, ..., 1
    quantiles); per bin ``lo``/``hi`` (the edges), ``count``, ``mean_predicted_mm`` and
    ``mean_actual_mm``. Equal values always share a bin (ties are never split), so bins whose
    edges coincide merge and fewer than ``n_bins`` may come back; a constant ``predicted`` gives
    one bin. For a calibrated model the bin means lie on the identity line."""
    p = np.asarray(predicted, dtype=np.float64).ravel()
    a = np.asarray(actual, dtype=np.float64).ravel()
    if p.shape != a.shape or p.size == 0:
        raise InputError(
            f"reliability_bins: {p.size} predicted and {a.size} actual values; need equal, non-zero counts"
        )
    if not (np.all(np.isfinite(p)) and np.all(np.isfinite(a))):
        raise InputError("reliability_bins: values contain NaN or Inf")
    if n_bins < 1:
        raise InputError(f"reliability_bins: n_bins must be at least 1, found {n_bins}")
    edges = np.unique(np.quantile(p, np.linspace(0.0, 1.0, n_bins + 1)))
    if edges.size == 1:
        idx = np.zeros(p.size, dtype=np.int64)
        edges = np.r_[edges, edges]
    else:
        # bin k holds edges[k] <= p < edges[k + 1]; the last bin also holds its upper edge
        idx = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, edges.size - 2)
    bins = []
    for k in range(edges.size - 1):
        sel = idx == k
        if not sel.any():
            continue
        bins.append(
            {
                "lo": float(edges[k]),
                "hi": float(edges[k + 1]),
                "count": int(sel.sum()),
                "mean_predicted_mm": float(p[sel].mean()),
                "mean_actual_mm": float(a[sel].mean()),
            }
        )
    return bins


def calibration_summary(
    ids: Sequence[str],
    uncertainty: Sequence[np.ndarray],
    error: Sequence[np.ndarray],
    rmse: Sequence[float],
    method: str | None = None,
    n_bins: int = 10,
) -> dict[str, Any]:
    """The ``"calibration"`` section: for subjects ``ids`` with per-particle predicted
    ``uncertainty`` ``(M,)`` and actual ``error`` ``(M,)`` (mm) and per-subject ``rmse``:

    - ``particle_spearman_pooled``: ρ(uncertainty, error) over every particle of every subject;
    - ``particle_spearman_per_subject``: ρ within each subject (``values`` by id, their ``median``
      over the subjects where ρ is defined);
    - ``subject_spearman_mean_uncertainty_vs_rmse``: ρ(per-subject mean uncertainty, RMSE);
    - ``reliability``: :func:`reliability_bins` of the pooled particles.
    """
    n = len(ids)
    if not (len(uncertainty) == len(error) == len(rmse) == n) or n == 0:
        raise InputError(
            f"calibration: {n} ids, {len(uncertainty)} uncertainty, {len(error)} error and "
            f"{len(rmse)} RMSE entries; need the same non-zero count"
        )
    unc = [np.asarray(u, dtype=np.float64).ravel() for u in uncertainty]
    err = [np.asarray(e, dtype=np.float64).ravel() for e in error]
    for sid, u, e in zip(ids, unc, err, strict=True):
        if u.shape != e.shape:
            raise InputError(f"subject {sid!r}: {u.size} per-particle uncertainties for {e.size} particles")
        if not np.all(np.isfinite(u)):
            raise InputError(f"subject {sid!r}: the predicted uncertainty contains NaN or Inf")
        if np.any(u < 0):
            raise InputError(f"subject {sid!r}: negative predicted uncertainty (min {u.min():.6g} mm)")
    names = ("predicted uncertainty", "actual error")
    per_subject = {sid: spearman(u, e, names) for sid, u, e in zip(ids, unc, err, strict=True)}
    defined = [r["rho"] for r in per_subject.values() if r["rho"] is not None]
    mean_unc = [float(u.mean()) for u in unc]
    pooled_u, pooled_e = np.concatenate(unc), np.concatenate(err)
    return {
        "available": True,
        "method": method,
        "error_definition": ERROR_DEFINITION,
        "n_subjects": n,
        "n_particles_pooled": int(pooled_u.size),
        "mean_uncertainty_mm": float(pooled_u.mean()),
        "mean_error_mm": float(pooled_e.mean()),
        "particle_spearman_pooled": spearman(pooled_u, pooled_e, names),
        "particle_spearman_per_subject": {
            "values": {sid: r["rho"] for sid, r in per_subject.items()},
            "reasons": {sid: r["reason"] for sid, r in per_subject.items() if r["reason"]},
            "median": float(np.median(defined)) if defined else None,
            "n_defined": len(defined),
        },
        "subject_spearman_mean_uncertainty_vs_rmse": spearman(
            mean_unc, rmse, ("per-subject mean uncertainty", "per-subject RMSE")
        ),
        "per_subject_mean_uncertainty_mm": dict(zip(ids, mean_unc, strict=True)),
        "reliability": {
            "binning": f"{n_bins} quantile bins of the pooled predicted uncertainty (ties share a bin)",
            "bins": reliability_bins(pooled_u, pooled_e, n_bins),
        },
    }


def no_uncertainty(reason: str) -> dict[str, Any]:
    """The ``"calibration"`` section for predictions without uncertainty."""
    return {"available": False, "reason": f"no uncertainty: {reason}"}


def finite_or_none(v: Any) -> float | None:
    """``float(v)`` when it is a finite number, else None (strict JSON: no NaN/Inf)."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if np.isfinite(f) else None


def ood_summary(ood_by_id: Mapping[str, Mapping[str, Any] | None]) -> dict[str, Any]:
    """The ``"ood"`` section from each image's OOD verdict (``{"score", "threshold", "flag",
    "reasons", ...}`` or None): how many were checked, how many flagged (count and fraction of the
    checked ones) and which, with score, threshold and reasons. ``available`` is False when no
    image carries a verdict."""
    checked = {sid: o for sid, o in ood_by_id.items() if o is not None}
    if not checked:
        return {"available": False, "reason": "no OOD scores: the model bundle has no OOD calibration"}
    flagged = []
    for sid, o in checked.items():
        if "flag" not in o:
            raise InputError(f"subject {sid!r}: the OOD verdict has no 'flag' (keys: {sorted(o)})")
        if bool(o["flag"]):
            flagged.append(
                {
                    "id": sid,
                    "score": finite_or_none(o.get("score")),
                    "threshold": finite_or_none(o.get("threshold")),
                    "reasons": [str(r) for r in (o.get("reasons") or [])],
                }
            )
    return {
        "available": True,
        "n_checked": len(checked),
        "n_unchecked": len(ood_by_id) - len(checked),
        "n_flagged": len(flagged),
        "flag_rate": len(flagged) / len(checked),
        "threshold": finite_or_none(next(iter(checked.values())).get("threshold")),
        "flagged": flagged,
    }
