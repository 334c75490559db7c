"""Spearman rank correlation that never returns NaN (issue 13). numpy/scipy only.

One implementation for the training-time calibration (``trust_calibration``) and ``deepssm
evaluate`` (``analysis.calibration``, which re-exports it).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import InputError

MIN_PAIRS = 3


def spearman(a: Any, b: Any, what: tuple[str, str] = ("a", "b")) -> dict[str, Any]:
    """Spearman's ρ (mid-ranks for ties) of two paired 1-D samples, as
    ``{"rho", "p", "n", "reason"}``; ``rho``/``p`` are None, with ``reason`` saying why, when ρ is
    undefined (fewer than 3 pairs, or a sample with one distinct value). ``what`` names the
    samples in the reason. Raises InputError for unpaired or non-finite input."""
    from scipy import stats

    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise InputError(f"spearman: {what[0]} has {x.size} values, {what[1]} has {y.size}; they must pair")
    for name, v in zip(what, (x, y), strict=True):
        if not np.all(np.isfinite(v)):
            raise InputError(f"spearman: {name} contains NaN or Inf ({int((~np.isfinite(v)).sum())} values)")
    out: dict[str, Any] = {"rho": None, "p": None, "n": int(x.size), "reason": None}
    if x.size < MIN_PAIRS:
        out["reason"] = f"undefined: {x.size} pair(s), at least {MIN_PAIRS} needed"
        return out
    for name, v in zip(what, (x, y), strict=True):
        if np.ptp(v) == 0:
            out["reason"] = f"undefined: {name} is constant ({v[0]:.6g} for all {v.size})"
            return out
    r = stats.spearmanr(x, y)
    rho, p = float(r[0]), float(r[1])
    out["rho"] = rho if np.isfinite(rho) else None
    out["p"] = p if np.isfinite(p) else None
    if out["rho"] is None:  # pragma: no cover - excluded above; kept so NaN can never leak
        out["reason"] = "undefined: scipy returned NaN"
    return out
