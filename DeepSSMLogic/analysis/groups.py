"""Group differences on correspondences: mean-shape difference vectors, their signed projection on
the surface normals, and permutation tests of the group labels (seeded, vectorised):

- :func:`hotelling_pointwise`: Hotelling's two-sample T² per particle (its 3D displacement, with the
  pooled within-group 3×3 covariance), permutation p-values, Benjamini–Hochberg FDR and
  max-statistic (family-wise) corrections — the test the shape-analysis literature uses;
- :func:`hotelling_global`: one T² on the shapes' PCA scores (F-distribution and permutation p);
- :func:`permutation_test`: the older statistic, the norm of the mean difference per point (mm),
  which ignores how much each point varies (kept for comparison).

Particles ``(N, M, 3)`` mm, LPS.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InputError
from ..progress import CancelToken, ProgressCallback, ProgressEvent, null_progress
from ..shape_model import check_particles


@dataclass
class GroupDifference:
    """``mean_a``, ``mean_b`` ``(M, 3)``; ``vectors`` ``(M, 3)`` = mean_b - mean_a (mm); ``magnitude``
    ``(M,)`` mm; ``signed`` ``(M,)`` mm, the vectors projected on ``normals`` (None without normals)."""

    mean_a: np.ndarray
    mean_b: np.ndarray
    vectors: np.ndarray
    magnitude: np.ndarray
    signed: np.ndarray | None


def _groups(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ga = check_particles(a, "group A particles")
    gb = check_particles(b, "group B particles", ga.shape[-2])
    if ga.ndim != 3 or gb.ndim != 3 or len(ga) < 1 or len(gb) < 1:
        raise InputError(f"group difference: expected two stacks (N, M, 3), found {ga.shape} and {gb.shape}")
    return ga, gb


def group_difference(a: np.ndarray, b: np.ndarray, normals: np.ndarray | None = None) -> GroupDifference:
    """Difference of the group means, going from A to B (paper Fig. 9: pathological minus control
    shown on a mean shape). ``normals`` ``(M, 3)``: unit outward normals for the signed heatmap."""
    ga, gb = _groups(a, b)
    ma, mb = ga.mean(axis=0), gb.mean(axis=0)
    vec = mb - ma
    signed = None
    if normals is not None:
        n = np.asarray(normals, dtype=np.float64)
        if n.shape != vec.shape:
            raise InputError(f"group difference: normals must have shape {vec.shape}, found {n.shape}")
        signed = np.einsum("mi,mi->m", vec, n)
    return GroupDifference(ma, mb, vec, np.linalg.norm(vec, axis=1), signed)


@dataclass
class PermutationResult:
    """``statistic`` ``(M,)``: the norm of the mean difference per point (mm); ``p_values`` ``(M,)``
    uncorrected; ``p_fdr`` Benjamini–Hochberg adjusted; ``p_max`` family-wise (max-statistic)."""

    statistic: np.ndarray
    p_values: np.ndarray
    p_fdr: np.ndarray
    p_max: np.ndarray
    n_permutations: int
    seed: int


def fdr_bh(p: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (monotone, capped at 1)."""
    p = np.asarray(p, dtype=np.float64).ravel()
    m = p.size
    order = np.argsort(p)
    ranked = p[order] * m / np.arange(1, m + 1)
    adj = np.minimum.accumulate(ranked[::-1])[::-1]
    out = np.empty(m)
    out[order] = np.minimum(adj, 1.0)
    return out


def _permute(
    ga: np.ndarray,
    gb: np.ndarray,
    stat: Callable[[np.ndarray], np.ndarray],
    n_permutations: int,
    seed: int,
    batch: int,
    progress: ProgressCallback,
    cancel: CancelToken | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Observed statistic ``(M,)``, uncorrected and max-statistic p-values of ``stat`` under label
    permutations. ``stat(weights)`` maps ``(P, N)`` group-mean-difference weights (−1/na for A, 1/nb
    for B) to ``(P, M)`` statistics; each permutation reassigns the pooled subjects to groups of
    the original sizes. p = (1 + #{perm ≥ observed}) / (1 + P)."""
    if n_permutations < 1:
        raise InputError(f"permutation test: n_permutations must be >= 1, found {n_permutations}")
    na, nb = len(ga), len(gb)
    n = na + nb
    base = np.r_[np.full(na, -1.0 / na), np.full(nb, 1.0 / nb)]
    observed = stat(base[None])[0]
    rng = np.random.default_rng(seed)
    exceed = np.zeros(observed.shape)
    exceed_max = np.zeros(observed.shape)
    # a tolerance so that ties with the observed value (e.g. identical groups) count as exceeding
    tol = 1e-9 * max(float(observed.max()), 1e-12)
    done = 0
    while done < n_permutations:
        if cancel is not None:
            cancel.check()
        k = min(batch, n_permutations - done)
        w = np.stack([base[rng.permutation(n)] for _ in range(k)])
        s = stat(w)
        exceed += (s >= observed - tol).sum(axis=0)
        exceed_max += (s.max(axis=1)[:, None] >= observed[None] - tol).sum(axis=0)
        done += k
        progress(ProgressEvent("permutation", done, n_permutations))
    return observed, (1.0 + exceed) / (1.0 + n_permutations), (1.0 + exceed_max) / (1.0 + n_permutations)


def _pooled(ga: np.ndarray, gb: np.ndarray) -> np.ndarray:
    """Pooled subjects ``(N, D)``, centred (differences do not change; round-off stays small)."""
    x = np.concatenate([ga.reshape(len(ga), -1), gb.reshape(len(gb), -1)])
    return x - x.mean(axis=0)


def permutation_test(
    a: np.ndarray,
    b: np.ndarray,
    n_permutations: int = 1000,
    seed: int = 0,
    batch: int = 256,
    progress: ProgressCallback = null_progress,
    cancel: CancelToken | None = None,
) -> PermutationResult:
    """Per-point permutation test of the group labels on ``|mean_b - mean_a|`` (mm). A batch of
    permutations is one matrix product ``(P, N) @ (N, 3M)``."""
    ga, gb = _groups(a, b)
    m = ga.shape[1]
    x = _pooled(ga, gb)

    def stat(weights: np.ndarray) -> np.ndarray:
        return np.linalg.norm((weights @ x).reshape(len(weights), m, 3), axis=-1)

    observed, p, p_max = _permute(ga, gb, stat, n_permutations, seed, batch, progress, cancel)
    return PermutationResult(observed, p, fdr_bh(p), p_max, int(n_permutations), int(seed))


def _inverse_scatter(x: np.ndarray, dim: int, ridge: float) -> np.ndarray:
    """Inverse total scatter ``(M, dim, dim)`` of centred pooled data ``(N, M*dim)``, each block
    regularised by ``ridge`` × its mean variance (plus a tiny absolute floor) so that a point that
    never moves gives T² = 0 instead of a division by zero."""
    n = len(x)
    xs = x.reshape(n, -1, dim)
    scatter = np.einsum("nmi,nmj->mij", xs, xs)
    scale = np.trace(scatter, axis1=1, axis2=2) / dim
    floor = 1e-12 * max(float(scale.max()), 1e-300)
    reg = (ridge * scale + floor)[:, None, None] * np.eye(dim)[None]
    return np.linalg.inv(scatter + reg)


def _t2_from_q(q: np.ndarray, na: int, nb: int) -> np.ndarray:
    """Hotelling T² from q = dᵀ T⁻¹ d (T the total scatter, d the mean difference): the pooled
    within-group scatter is W = T − c d dᵀ with c = na nb / n, so by Sherman–Morrison
    dᵀ W⁻¹ d = q / (1 − c q) and T² = c (n − 2) q / (1 − c q). T² grows with q, so permutations
    can rank q, which needs only the (permutation-invariant) T⁻¹."""
    n = na + nb
    c = na * nb / n
    cq = np.minimum(c * q, 1.0 - 1e-12)
    return (n - 2) * cq / (1.0 - cq)


@dataclass
class HotellingResult:
    """Point-wise Hotelling T² ``(M,)`` (3D displacement per particle) and its permutation p-values:
    ``p_values`` uncorrected, ``p_fdr`` Benjamini–Hochberg, ``p_max`` family-wise (max-statistic)."""

    statistic: np.ndarray
    p_values: np.ndarray
    p_fdr: np.ndarray
    p_max: np.ndarray
    n_permutations: int
    seed: int


def hotelling_pointwise(
    a: np.ndarray,
    b: np.ndarray,
    n_permutations: int = 1000,
    seed: int = 0,
    ridge: float = 1e-9,
    batch: int = 256,
    progress: ProgressCallback = null_progress,
    cancel: CancelToken | None = None,
) -> HotellingResult:
    """Hotelling's two-sample T² at every particle: T² = (na nb / n) dᵀ S⁻¹ d with d the difference
    of the group means (3,) and S the pooled within-group covariance (3×3), tested by permuting
    the group labels (no normality assumption). Needs at least 2 subjects per group."""
    ga, gb = _groups(a, b)
    na, nb = len(ga), len(gb)
    if na < 2 or nb < 2 or na + nb < 5:
        raise InputError(
            f"Hotelling T²: needs at least 2 subjects per group and 5 in all, found {na} and {nb}"
        )
    m = ga.shape[1]
    x = _pooled(ga, gb)
    tinv = _inverse_scatter(x, 3, ridge)

    def stat(weights: np.ndarray) -> np.ndarray:
        d = (weights @ x).reshape(len(weights), m, 3)
        return np.einsum("pmi,mij,pmj->pm", d, tinv, d)

    q, p, p_max = _permute(ga, gb, stat, n_permutations, seed, batch, progress, cancel)
    return HotellingResult(_t2_from_q(q, na, nb), p, fdr_bh(p), p_max, int(n_permutations), int(seed))


@dataclass
class GlobalHotelling:
    """Hotelling T² of the two groups' PCA scores (``n_modes`` modes of the pooled shapes): ``f``
    with ``df`` (F test, assumes normal scores) and ``p_permutation`` (label permutations)."""

    t2: float
    f: float
    df: tuple[int, int]
    p_f: float
    p_permutation: float
    n_modes: int
    variance_fraction: float
    n_permutations: int

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def hotelling_global(
    a: np.ndarray,
    b: np.ndarray,
    variance_fraction: float = 0.95,
    n_permutations: int = 1000,
    seed: int = 0,
    cancel: CancelToken | None = None,
) -> GlobalHotelling:
    """One T² for the whole shape: the pooled shapes' PCA scores, ``k`` modes reaching
    ``variance_fraction`` but at most n − 3 (so the pooled covariance is invertible)."""
    from scipy import stats as st

    ga, gb = _groups(a, b)
    na, nb = len(ga), len(gb)
    n = na + nb
    if na < 2 or nb < 2 or n < 5:
        raise InputError(
            f"global Hotelling T²: needs at least 2 subjects per group and 5 in all, found {na}, {nb}"
        )
    x = _pooled(ga, gb)
    _, sv, vt = np.linalg.svd(x, full_matrices=False)
    var = sv**2
    if var.sum() <= 0:
        return GlobalHotelling(0.0, 0.0, (1, n - 2), 1.0, 1.0, 0, 0.0, int(n_permutations))
    frac = np.cumsum(var) / var.sum()
    k = int(min(np.searchsorted(frac, variance_fraction) + 1, n - 3, int((var > 1e-12 * var[0]).sum())))
    k = max(k, 1)
    scores = x @ vt[:k].T  # (N, k), centred
    tinv = _inverse_scatter(scores, k, 0.0)[0]

    def stat(weights: np.ndarray) -> np.ndarray:
        d = weights @ scores
        return np.einsum("pi,ij,pj->p", d, tinv, d)[:, None]

    q, _, p_perm = _permute(ga, gb, stat, n_permutations, seed, 256, null_progress, cancel)
    t2 = float(_t2_from_q(q, na, nb)[0])
    df1, df2 = k, n - k - 1
    f = t2 * df2 / (k * (n - 2))
    return GlobalHotelling(
        t2,
        float(f),
        (df1, df2),
        float(st.f.sf(f, df1, df2)),
        float(p_perm[0]),
        k,
        float(frac[k - 1]),
        int(n_permutations),
    )
