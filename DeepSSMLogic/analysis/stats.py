"""Statistics for comparing models over seeds and test subjects (numpy/scipy only).

- :func:`mean_ci`: mean ± a Student-t 95 % confidence interval.
- :func:`paired_comparison`: two models on the same units (test subjects, grouped by seed): the
  Wilcoxon signed-rank test on the paired differences, a paired bootstrap of the mean difference
  (two-stage, resampling seeds then subjects within a seed, when ``clusters`` are given, so the
  interval carries the seed-to-seed variance and not only the subject spread), the paired Cohen's
  d_z and the matched-pairs rank-biserial correlation, and a verdict.
- :func:`equivalence`: "A is close to B" claims (two one-sided tests): established when the
  (1 − 2α) interval of the difference lies inside ±margin, contradicted when the 1 − α interval
  lies wholly outside it.

Verdicts follow from the tests at the stated α, never from the sign alone:

- difference claims ("B is better than A"): **established** when the Wilcoxon p < α *and* the
  bootstrap 1 − α interval of the mean difference excludes 0 on the claimed side; **contradicted**
  when both hold on the other side; otherwise **not established**.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..errors import InputError

ESTABLISHED = "established"
NOT_ESTABLISHED = "not established"
CONTRADICTED = "contradicted"


def _vector(values: Sequence[float] | np.ndarray, what: str) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        raise InputError(f"{what}: expected at least one value, found none")
    if not np.all(np.isfinite(v)):
        raise InputError(f"{what}: expected finite values, found {int((~np.isfinite(v)).sum())} NaN/inf")
    return v


@dataclass
class MeanCI:
    """Mean with a two-sided Student-t interval (``lo``/``hi``; equal to the mean when n = 1)."""

    mean: float
    sd: float
    n: int
    lo: float
    hi: float
    confidence: float
    method: str = "t"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def mean_ci(values: Sequence[float] | np.ndarray, confidence: float = 0.95) -> MeanCI:
    """Mean ± Student-t interval of independent values (sample sd, n − 1 degrees of freedom)."""
    from scipy import stats as st

    v = _vector(values, "mean_ci")
    n = v.size
    m = float(v.mean())
    if n < 2:
        return MeanCI(m, 0.0, n, m, m, confidence)
    sd = float(v.std(ddof=1))
    half = float(st.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return MeanCI(m, sd, n, m - half, m + half, confidence)


def wilcoxon_p(d: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p of the differences (zeros dropped; 1.0 when all are zero)."""
    from scipy import stats as st

    nz = d[d != 0]
    if nz.size == 0:
        return 1.0
    return float(st.wilcoxon(nz, zero_method="wilcox", alternative="two-sided").pvalue)


def rank_biserial(d: np.ndarray) -> float:
    """Matched-pairs rank-biserial correlation (W+ − W−) / (W+ + W−) in [-1, 1] (0 when all zero)."""
    from scipy import stats as st

    nz = d[d != 0]
    if nz.size == 0:
        return 0.0
    r = st.rankdata(np.abs(nz))
    return float((r[nz > 0].sum() - r[nz < 0].sum()) / r.sum())


def cohen_dz(d: np.ndarray) -> float:
    """Paired Cohen's d_z = mean(d) / sd(d) (0 for no difference, ±inf for a constant non-zero one)."""
    m = float(d.mean())
    sd = float(d.std(ddof=1)) if d.size > 1 else 0.0
    if sd == 0.0:
        return 0.0 if m == 0.0 else math.copysign(math.inf, m)
    return m / sd


def bootstrap_mean(
    d: np.ndarray, clusters: np.ndarray | None, n_boot: int, rng: np.random.Generator
) -> np.ndarray:
    """``n_boot`` bootstrap means of ``d``. With ``clusters`` (e.g. the seed of each pair) two-stage:
    draw clusters with replacement, then units with replacement inside each drawn cluster."""
    if clusters is None:
        idx = rng.integers(0, d.size, size=(n_boot, d.size))
        return d[idx].mean(axis=1)
    ids = np.unique(clusters)
    members = [np.flatnonzero(clusters == c) for c in ids]
    picks = rng.integers(0, len(ids), size=(n_boot, len(ids)))
    sums = np.zeros(n_boot)
    counts = np.zeros(n_boot)
    for k, mem in enumerate(members):
        # resample this cluster's units once per bootstrap draw, weighted by how often it was drawn
        times = (picks == k).sum(axis=1)
        if not times.any():
            continue
        inner = d[mem[rng.integers(0, mem.size, size=(n_boot, mem.size))]].sum(axis=1)
        sums += times * inner
        counts += times * mem.size
    return sums / counts


@dataclass
class PairedComparison:
    """B against A on the same units; ``diff`` = B − A. ``better``: "lower" or "higher" is better.
    ``ci_lo``/``ci_hi``: the bootstrap (1 − α) interval of the mean difference."""

    n: int
    n_clusters: int
    mean_a: float
    mean_b: float
    mean_diff: float
    ci_lo: float
    ci_hi: float
    wilcoxon_p: float
    cohen_dz: float
    rank_biserial: float
    b_better_fraction: float
    alpha: float
    better: str
    verdict: str
    bootstrap: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def difference_verdict(p: float, lo: float, hi: float, better: str, alpha: float) -> str:
    """Verdict on "B is better than A" from a two-sided p and the interval of the mean B − A."""
    if better not in ("lower", "higher"):
        raise InputError(f"better must be 'lower' or 'higher', found {better!r}")
    if p >= alpha:
        return NOT_ESTABLISHED
    b_better = hi < 0 if better == "lower" else lo > 0
    b_worse = lo > 0 if better == "lower" else hi < 0
    return ESTABLISHED if b_better else CONTRADICTED if b_worse else NOT_ESTABLISHED


def paired_comparison(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    *,
    clusters: Sequence[Any] | np.ndarray | None = None,
    better: str = "lower",
    alpha: float = 0.05,
    n_boot: int = 10000,
    seed: int = 0,
) -> PairedComparison:
    """Does B beat A on the same units? ``a``, ``b``: one value per unit (e.g. the RMSE of each test
    subject of each seed), in the same order; ``clusters``: the unit's group (its seed) for the
    two-stage bootstrap. See the module docstring for the verdict rule."""
    va, vb = _vector(a, "paired_comparison A"), _vector(b, "paired_comparison B")
    if va.shape != vb.shape:
        raise InputError(
            f"paired_comparison: A and B need the same units, found {va.size} and {vb.size} values"
        )
    if not 0 < alpha < 1:
        raise InputError(f"paired_comparison: alpha must be in (0, 1), found {alpha}")
    cl = None
    if clusters is not None:
        cl = np.asarray(clusters)
        if cl.shape != va.shape:
            raise InputError(f"paired_comparison: one cluster per unit expected ({va.size}), found {cl.size}")
    d = vb - va
    boots = bootstrap_mean(d, cl, int(n_boot), np.random.default_rng(seed))
    lo, hi = (float(x) for x in np.quantile(boots, [alpha / 2, 1 - alpha / 2]))
    p = wilcoxon_p(d)
    sign = -1.0 if better == "lower" else 1.0
    return PairedComparison(
        n=int(d.size),
        n_clusters=int(np.unique(cl).size) if cl is not None else int(d.size),
        mean_a=float(va.mean()),
        mean_b=float(vb.mean()),
        mean_diff=float(d.mean()),
        ci_lo=lo,
        ci_hi=hi,
        wilcoxon_p=p,
        cohen_dz=cohen_dz(d),
        rank_biserial=rank_biserial(d),
        b_better_fraction=float((sign * d > 0).mean()),
        alpha=float(alpha),
        better=better,
        verdict=difference_verdict(p, lo, hi, better, alpha),
        bootstrap=f"{'two-stage (clusters, then units)' if cl is not None else 'units'}, {int(n_boot)} draws, percentile",
    )


@dataclass
class Equivalence:
    """Is |B − A| within ``margin``? ``tost`` = the (1 − 2α) t interval; ``ci`` = the (1 − α) one."""

    n: int
    mean_a: float
    mean_b: float
    mean_diff: float
    tost_lo: float
    tost_hi: float
    ci_lo: float
    ci_hi: float
    margin: float
    alpha: float
    verdict: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def equivalence(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    margin: float,
    alpha: float = 0.05,
) -> Equivalence:
    """ "B is as good as A within ``margin``" on paired independent replicates (e.g. one AUC per seed):
    two one-sided t tests. Established when the (1 − 2α) interval of B − A lies inside ±margin;
    contradicted when the (1 − α) interval lies wholly outside it; otherwise not established."""
    va, vb = _vector(a, "equivalence A"), _vector(b, "equivalence B")
    if va.shape != vb.shape:
        raise InputError(f"equivalence: A and B need the same replicates, found {va.size} and {vb.size}")
    if not margin > 0:
        raise InputError(f"equivalence: margin must be > 0, found {margin}")
    d = vb - va
    tost = mean_ci(d, 1 - 2 * alpha)
    ci = mean_ci(d, 1 - alpha)
    if d.size >= 2 and -margin < tost.lo and tost.hi < margin:
        verdict = ESTABLISHED
    elif d.size >= 2 and (ci.lo > margin or ci.hi < -margin):
        verdict = CONTRADICTED
    else:
        verdict = NOT_ESTABLISHED
    return Equivalence(
        n=int(d.size),
        mean_a=float(va.mean()),
        mean_b=float(vb.mean()),
        mean_diff=float(d.mean()),
        tost_lo=tost.lo,
        tost_hi=tost.hi,
        ci_lo=ci.lo,
        ci_hi=ci.hi,
        margin=float(margin),
        alpha=float(alpha),
        verdict=verdict,
    )
