"""Group differences on correspondences: mean-shape difference vectors, their signed projection on
the surface normals, and a vectorised per-point permutation test (seeded) with optional FDR and
max-statistic (family-wise) corrections.

Particles ``(N, M, 3)`` mm, LPS.
"""

from __future__ import annotations

from dataclasses import dataclass

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


def permutation_test(
    a: np.ndarray,
    b: np.ndarray,
    n_permutations: int = 1000,
    seed: int = 0,
    batch: int = 256,
    progress: ProgressCallback = null_progress,
    cancel: CancelToken | None = None,
) -> PermutationResult:
    """Per-point permutation test of the group labels on ``|mean_b - mean_a|``.

    Each permutation reassigns the pooled subjects to groups of the original sizes; a batch of
    permutations is one matrix product ``(P, N) @ (N, 3M)``. p = (1 + #{perm ≥ observed}) / (1 + P).
    """
    ga, gb = _groups(a, b)
    if n_permutations < 1:
        raise InputError(f"permutation_test: n_permutations must be >= 1, found {n_permutations}")
    na, nb = len(ga), len(gb)
    n, m = na + nb, ga.shape[1]
    x = np.concatenate([ga, gb]).reshape(n, 3 * m)
    x = x - x.mean(axis=0)  # centring does not change differences but keeps round-off small

    def stat(weights: np.ndarray) -> np.ndarray:
        return np.linalg.norm((weights @ x).reshape(len(weights), m, 3), axis=-1)

    base = np.r_[np.full(na, -1.0 / na), np.full(nb, 1.0 / nb)]
    observed = stat(base[None])[0]
    rng = np.random.default_rng(seed)
    exceed = np.zeros(m)
    exceed_max = np.zeros(m)
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
    p = (1.0 + exceed) / (1.0 + n_permutations)
    p_max = (1.0 + exceed_max) / (1.0 + n_permutations)
    return PermutationResult(observed, p, fdr_bh(p), p_max, int(n_permutations), int(seed))
