"""Severity from shape (paper eq. 13-15): PPCA of a normal group, Mahalanobis scores, point-wise
whitened deviations and their signed projection on the surface normals.

Uses :class:`DeepSSMLogic.shape_model.PPCA` (95 % variance subspace, σ² from the discarded
eigenvalues). Particles ``(N, M, 3)`` mm, LPS; scores are unitless (a multivariate z-score).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InputError
from ..shape_model import PPCA, check_particles


@dataclass
class SeverityResult:
    """``scores`` ``(N,)`` Mahalanobis distance to the normal group; ``pointwise`` ``(N, M, 3)`` C̃
    (eq. 15, unitless); ``signed`` ``(N, M)`` C̃ projected on the outward normals of the normal mean
    shape (> 0: outward of normal); ``magnitude`` ``(N, M)`` ``|C̃_i|``; ``normals`` ``(M, 3)``."""

    model: PPCA
    scores: np.ndarray
    pointwise: np.ndarray
    signed: np.ndarray
    magnitude: np.ndarray
    normals: np.ndarray


def fit_normal_model(normal_particles: np.ndarray, variance_fraction: float = 0.95) -> PPCA:
    """PPCA of the normal (control) group ``(N, M, 3)`` mm."""
    arr = check_particles(normal_particles, "normal-group particles")
    if arr.ndim != 3 or arr.shape[0] < 3:
        raise InputError(
            f"severity: the normal group needs at least 3 subjects of shape (M, 3), found {arr.shape}"
        )
    return PPCA.fit(arr, variance_fraction=variance_fraction)


def severity(model: PPCA, particles: np.ndarray, normals: np.ndarray | None = None) -> SeverityResult:
    """Severity of ``particles`` ``(N, M, 3)`` mm under a normal-group PPCA.

    ``normals`` ``(M, 3)`` are unit outward normals at the PPCA mean shape; when omitted they are
    estimated from the mean particles (fine for star-shaped anatomies; pass mesh normals otherwise).
    """
    arr = check_particles(particles, "particles", model.n_particles)
    if arr.ndim == 2:
        arr = arr[None]
    if normals is None:
        from ..mesh import estimate_point_normals

        normals = estimate_point_normals(model.mean)
    n = np.asarray(normals, dtype=np.float64)
    if n.shape != (model.n_particles, 3):
        raise InputError(f"severity: normals must have shape ({model.n_particles}, 3), found {n.shape}")
    scores = model.mahalanobis(arr)
    ctilde = model.pointwise_deviation(arr)
    return SeverityResult(
        model=model,
        scores=scores,
        pointwise=ctilde,
        signed=np.einsum("nmi,mi->nm", ctilde, n),
        magnitude=np.linalg.norm(ctilde, axis=-1),
        normals=n,
    )


def evaluate_severity(
    scores: Any, labels: Any | None = None, continuous: Any | None = None
) -> dict[str, Any]:
    """AUC of ``scores`` against binary ``labels`` (True = abnormal) and Pearson/Spearman against a
    ``continuous`` severity (each skipped when not given)."""
    from .metrics import auc, correlation

    out: dict[str, Any] = {"n": int(np.size(scores))}
    if labels is not None:
        out["auc"] = auc(scores, labels)
    if continuous is not None:
        out.update({f"{k}": v for k, v in correlation(scores, continuous).to_dict().items() if k != "n"})
    return out
