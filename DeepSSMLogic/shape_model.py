"""Linear statistical shape models of correspondence points: PCA and probabilistic PCA.

Everything here is numpy only. Particles are ``(N, M, 3)`` float arrays in mm (LPS); a shape is
flattened to a vector of length ``D = 3M`` in ``(x0, y0, z0, x1, ...)`` order. PCA scores are in
mm (projection onto orthonormal directions), eigenvalues are variances in mm².
"""

from __future__ import annotations

from typing import Any

import numpy as np

from DeepSSMLogic.errors import InputError

FORMAT_VERSION = 1

__all__ = ["PPCA", "ShapeModel", "check_particles"]


def check_particles(particles: Any, name: str = "particles", n_particles: int | None = None) -> np.ndarray:
    """Validate a particle array and return it as float64 ``(..., M, 3)``.

    Raises ``InputError`` naming ``name`` on a wrong shape, a particle count other than
    ``n_particles`` (when given) or non-finite values.
    """
    arr = np.asarray(particles, dtype=np.float64)
    if arr.ndim < 2 or arr.shape[-1] != 3:
        raise InputError(f"{name}: expected an array of shape (..., M, 3), found shape {arr.shape}")
    if n_particles is not None and arr.shape[-2] != n_particles:
        raise InputError(
            f"{name}: expected {n_particles} particles per shape (the model's), found {arr.shape[-2]}"
        )
    if not np.all(np.isfinite(arr)):
        bad = np.argwhere(~np.isfinite(arr))[0]
        raise InputError(f"{name}: contains NaN or Inf (first at index {tuple(int(i) for i in bad)})")
    return arr


def _check_group(particles: Any, name: str) -> np.ndarray:
    arr = check_particles(particles, name)
    if arr.ndim != 3:
        raise InputError(f"{name}: expected a stack of shapes (N, M, 3), found shape {arr.shape}")
    if arr.shape[0] < 2:
        raise InputError(f"{name}: a shape model needs at least 2 subjects, found {arr.shape[0]}")
    return arr


def _fix_signs(vt: np.ndarray) -> np.ndarray:
    """Make each row's largest-magnitude entry positive, so the same data gives the same modes."""
    idx = np.argmax(np.abs(vt), axis=1)
    signs = np.sign(vt[np.arange(vt.shape[0]), idx])
    signs[signs == 0] = 1.0
    return vt * signs[:, None]


def _principal_axes(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean ``(D,)``, orthonormal directions ``(K, D)`` and singular values ``(K,)`` of ``(N, D)`` data.

    The thin SVD of the centred ``N x D`` matrix costs O(N² D) like the Gram-matrix trick but keeps
    full precision for small modes (the Gram matrix squares the condition number). K = min(N-1, D):
    centring removes one degree of freedom.
    """
    n, d = flat.shape
    mean = flat.mean(axis=0)
    centred = flat - mean
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    k = min(n - 1, d)
    return mean, _fix_signs(vt[:k]), s[:k]


class ShapeModel:
    """PCA of training correspondences with all ``K = N-1`` modes (or ``truncated(k)`` fewer).

    Attributes:
        mean: ``(M, 3)`` mm, the training mean shape.
        components: ``(K, 3M)`` orthonormal rows, descending variance.
        eigenvalues: ``(K,)`` mm², variance along each mode with the 1/(N-1) convention.
        score_mean, score_std: ``(K,)`` mm, per-mode mean and std (ddof=1) of the scores used to
            whiten network targets: ``(scores - score_mean) / score_std``. After ``fit`` they are the
            training set's (mean 0, std sqrt(eigenvalue)); ``with_whitening`` recomputes them, e.g.
            over the augmented training set.
        n_subjects: number of shapes the model was fitted on.
    """

    def __init__(
        self,
        mean: np.ndarray,
        components: np.ndarray,
        eigenvalues: np.ndarray,
        score_mean: np.ndarray | None = None,
        score_std: np.ndarray | None = None,
        n_subjects: int | None = None,
    ) -> None:
        mean = np.asarray(mean, dtype=np.float64)
        components = np.asarray(components, dtype=np.float64)
        eigenvalues = np.asarray(eigenvalues, dtype=np.float64)
        if mean.ndim != 2 or mean.shape[1] != 3 or mean.shape[0] < 1:
            raise InputError(f"shape model 'mean': expected shape (M, 3), found {mean.shape}")
        d = mean.size
        if components.ndim != 2 or components.shape[1] != d or components.shape[0] < 1:
            raise InputError(
                f"shape model 'components': expected shape (K, {d}) for M={mean.shape[0]} particles, "
                f"found {components.shape}"
            )
        k = components.shape[0]
        if eigenvalues.shape != (k,):
            raise InputError(f"shape model 'eigenvalues': expected shape ({k},), found {eigenvalues.shape}")
        if score_mean is None:
            score_mean = np.zeros(k)
        if score_std is None:
            score_std = np.sqrt(np.maximum(eigenvalues, 0.0))
        score_mean = np.asarray(score_mean, dtype=np.float64)
        score_std = np.asarray(score_std, dtype=np.float64)
        for name, arr in (("score_mean", score_mean), ("score_std", score_std)):
            if arr.shape != (k,):
                raise InputError(f"shape model '{name}': expected shape ({k},), found {arr.shape}")
        for name, arr in (
            ("mean", mean),
            ("components", components),
            ("eigenvalues", eigenvalues),
            ("score_mean", score_mean),
            ("score_std", score_std),
        ):
            if not np.all(np.isfinite(arr)):
                raise InputError(f"shape model '{name}': contains NaN or Inf")
        if np.any(eigenvalues < -1e-9 * max(1.0, float(np.abs(eigenvalues).max()))):
            raise InputError("shape model 'eigenvalues': expected non-negative variances, found negatives")
        if np.any(np.diff(eigenvalues) > 1e-9 * max(1.0, float(eigenvalues[0]))):
            raise InputError("shape model 'eigenvalues': expected descending order")
        if np.any(score_std < 0):
            raise InputError("shape model 'score_std': expected non-negative values")
        gram = components @ components.T
        err = float(np.abs(gram - np.eye(k)).max())
        if err > 1e-6:
            raise InputError(
                f"shape model 'components': rows must be orthonormal, found max |C Cᵀ - I| = {err:.3g}"
            )
        self.mean = mean
        self.components = components
        self.eigenvalues = np.maximum(eigenvalues, 0.0)
        self.score_mean = score_mean
        self.score_std = score_std
        self.n_subjects = int(n_subjects) if n_subjects is not None else k + 1

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def fit(cls, particles: np.ndarray) -> ShapeModel:
        """Fit on training correspondences ``(N, M, 3)`` mm; keeps all ``min(N-1, 3M)`` modes."""
        arr = _check_group(particles, "particles")
        n, m, _ = arr.shape
        flat = arr.reshape(n, 3 * m)
        mean, components, s = _principal_axes(flat)
        eigenvalues = s**2 / (n - 1)
        if eigenvalues.sum() <= 1e-20 * max(1.0, float(np.abs(flat).max()) ** 2):
            raise InputError(
                f"particles: the {n} training shapes are identical (total variance 0); "
                "a shape model needs shape variation"
            )
        model = cls(mean.reshape(m, 3), components, eigenvalues, n_subjects=n)
        scores = model.project(arr)
        model.score_mean = scores.mean(axis=0)
        model.score_std = scores.std(axis=0, ddof=1)
        return model

    # ---- basic properties ---------------------------------------------------------------------

    @property
    def n_particles(self) -> int:
        return int(self.mean.shape[0])

    @property
    def n_modes(self) -> int:
        return int(self.components.shape[0])

    @property
    def explained_variance_ratio(self) -> np.ndarray:
        """``(K,)`` fraction of the total (kept) variance per mode."""
        total = float(self.eigenvalues.sum())
        return self.eigenvalues / total if total > 0 else np.zeros_like(self.eigenvalues)

    # ---- projection ---------------------------------------------------------------------------

    def _k(self, n_modes: int | None) -> int:
        if n_modes is None:
            return self.n_modes
        if isinstance(n_modes, bool) or not isinstance(n_modes, (int, np.integer)):
            raise InputError(f"n_modes: expected an integer, found {n_modes!r}")
        if not 1 <= int(n_modes) <= self.n_modes:
            raise InputError(f"n_modes: expected 1..{self.n_modes} (the model's modes), found {n_modes}")
        return int(n_modes)

    def project(self, particles: np.ndarray, n_modes: int | None = None) -> np.ndarray:
        """Scores of shapes: ``(..., M, 3)`` mm -> ``(..., k)`` mm (k = n_modes or all)."""
        arr = check_particles(particles, "particles", self.n_particles)
        k = self._k(n_modes)
        lead = arr.shape[:-2]
        flat = arr.reshape(*lead, 3 * self.n_particles) - self.mean.reshape(-1)
        return flat @ self.components[:k].T

    def reconstruct(self, scores: np.ndarray) -> np.ndarray:
        """Shapes from scores: ``(..., k)`` mm with k <= n_modes -> ``(..., M, 3)`` mm."""
        z = np.asarray(scores, dtype=np.float64)
        if z.ndim < 1 or not 1 <= z.shape[-1] <= self.n_modes:
            raise InputError(
                f"scores: expected shape (..., k) with 1 <= k <= {self.n_modes}, found {z.shape}"
            )
        if not np.all(np.isfinite(z)):
            raise InputError("scores: contains NaN or Inf")
        k = z.shape[-1]
        flat = z @ self.components[:k] + self.mean.reshape(-1)
        return flat.reshape(*z.shape[:-1], self.n_particles, 3)

    # ---- mode selection -----------------------------------------------------------------------

    def n_modes_for_variance(self, fraction: float) -> int:
        """Smallest k whose cumulative explained-variance ratio is >= ``fraction`` (0 < fraction <= 1)."""
        f = float(fraction)
        if not 0.0 < f <= 1.0:
            raise InputError(f"variance fraction: expected a value in (0, 1], found {fraction!r}")
        cum = np.cumsum(self.explained_variance_ratio)
        # Rounding can leave the full sum a hair below 1.0.
        k = int(np.searchsorted(cum, f - 1e-12, side="left")) + 1
        return min(k, self.n_modes)

    def truncated(self, k: int) -> ShapeModel:
        """A copy keeping only the first ``k`` modes (mean and whitening stats kept for those modes)."""
        k = self._k(k)
        return ShapeModel(
            self.mean.copy(),
            self.components[:k].copy(),
            self.eigenvalues[:k].copy(),
            self.score_mean[:k].copy(),
            self.score_std[:k].copy(),
            n_subjects=self.n_subjects,
        )

    # ---- whitening ----------------------------------------------------------------------------

    def with_whitening(self, scores: np.ndarray) -> ShapeModel:
        """A copy whose ``score_mean``/``score_std`` are computed over ``scores`` ``(N, K)`` mm."""
        z = np.asarray(scores, dtype=np.float64)
        if z.ndim != 2 or z.shape[1] != self.n_modes or z.shape[0] < 2:
            raise InputError(
                f"scores: expected shape (N>=2, {self.n_modes}) to compute whitening, found {z.shape}"
            )
        if not np.all(np.isfinite(z)):
            raise InputError("scores: contains NaN or Inf")
        std = z.std(axis=0, ddof=1)
        if np.any(std <= 0):
            raise InputError(f"scores: mode(s) {np.flatnonzero(std <= 0).tolist()} have zero variance")
        out = self.truncated(self.n_modes)
        out.score_mean = z.mean(axis=0)
        out.score_std = std
        return out

    def _check_scores(self, scores: np.ndarray) -> np.ndarray:
        z = np.asarray(scores, dtype=np.float64)
        if z.ndim < 1 or z.shape[-1] != self.n_modes:
            raise InputError(f"scores: expected shape (..., {self.n_modes}), found {z.shape}")
        return z

    def whiten(self, scores: np.ndarray) -> np.ndarray:
        """``(..., K)`` mm -> ``(..., K)`` unitless: ``(scores - score_mean) / score_std``."""
        z = self._check_scores(scores)
        if np.any(self.score_std <= 0):
            raise InputError("shape model: a mode has zero score std; truncate the model before whitening")
        return (z - self.score_mean) / self.score_std

    def unwhiten(self, whitened: np.ndarray) -> np.ndarray:
        """Inverse of ``whiten``: ``(..., K)`` unitless -> ``(..., K)`` mm."""
        w = self._check_scores(whitened)
        return w * self.score_std + self.score_mean

    # ---- serialisation ------------------------------------------------------------------------

    @property
    def meta(self) -> dict[str, Any]:
        """JSON-able description (what ``from_arrays`` checks the arrays against)."""
        return {
            "kind": "pca",
            "format_version": FORMAT_VERSION,
            "n_subjects": self.n_subjects,
            "n_particles": self.n_particles,
            "n_modes": self.n_modes,
            "total_variance_mm2": float(self.eigenvalues.sum()),
            "explained_variance_ratio": [float(x) for x in self.explained_variance_ratio],
            "modes_for_95": self.n_modes_for_variance(0.95),
            "modes_for_99": self.n_modes_for_variance(0.99),
        }

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain float64 arrays (save with ``np.savez``; load with ``allow_pickle=False``)."""
        return {
            "mean": self.mean.copy(),
            "components": self.components.copy(),
            "eigenvalues": self.eigenvalues.copy(),
            "score_mean": self.score_mean.copy(),
            "score_std": self.score_std.copy(),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], meta: dict[str, Any] | None = None) -> ShapeModel:
        """Rebuild from ``to_arrays()`` (and optionally check against ``meta``); ``InputError`` if inconsistent."""
        missing = [k for k in ("mean", "components", "eigenvalues") if k not in arrays]
        if missing:
            raise InputError(f"shape model arrays: missing {missing}, found keys {sorted(arrays)}")
        n_subjects = None
        if meta is not None:
            if meta.get("kind", "pca") != "pca":
                raise InputError(f"shape model meta 'kind': expected 'pca', found {meta.get('kind')!r}")
            version = meta.get("format_version", FORMAT_VERSION)
            if version != FORMAT_VERSION:
                raise InputError(
                    f"shape model meta 'format_version': expected {FORMAT_VERSION}, found {version!r}"
                )
            n_subjects = meta.get("n_subjects")
        model = cls(
            arrays["mean"],
            arrays["components"],
            arrays["eigenvalues"],
            arrays.get("score_mean"),
            arrays.get("score_std"),
            n_subjects=n_subjects,
        )
        if meta is not None:
            for key, value in (("n_particles", model.n_particles), ("n_modes", model.n_modes)):
                if key in meta and int(meta[key]) != value:
                    raise InputError(
                        f"shape model meta '{key}': says {meta[key]}, but the arrays hold {value}"
                    )
        return model


class PPCA:
    """Probabilistic PCA (Tipping & Bishop) of a group, as used for severity (paper eq. 13-15).

    Following eq. 13, the eigen-decomposition is of the 1/N sample covariance of the group; the
    first L modes (smallest L reaching ``variance_fraction`` of the variance, at most N-2 so that one
    non-zero mode is always discarded) are kept and the residual variance is spread isotropically, σ² = Σ_{i>L} Λ_i / (D - L) with D = 3M (the
    eigenvalues beyond N-1 are zero, so the sum runs over the discarded non-zero ones). The full
    rank covariance (eq. 14) is S = U_L Λ_L U_Lᵀ + σ² I = W Wᵀ + σ² I with W = U_L Λ_L^{1/2}.

    Attributes: ``mean`` (M, 3) mm, ``components`` (L, 3M) = U_Lᵀ, ``eigenvalues`` (L,) = Λ_L mm²,
    ``sigma2`` (float, mm²), ``n_subjects``.
    """

    def __init__(
        self,
        mean: np.ndarray,
        components: np.ndarray,
        eigenvalues: np.ndarray,
        sigma2: float,
        n_subjects: int,
        variance_fraction: float,
    ) -> None:
        self.mean = np.asarray(mean, dtype=np.float64)
        self.components = np.asarray(components, dtype=np.float64)
        self.eigenvalues = np.asarray(eigenvalues, dtype=np.float64)
        self.sigma2 = float(sigma2)
        self.n_subjects = int(n_subjects)
        self.variance_fraction = float(variance_fraction)
        d = self.mean.size
        l = self.components.shape[0] if self.components.ndim == 2 else -1
        if self.mean.ndim != 2 or self.mean.shape[1] != 3:
            raise InputError(f"PPCA 'mean': expected shape (M, 3), found {self.mean.shape}")
        if self.components.ndim != 2 or self.components.shape[1] != d:
            raise InputError(f"PPCA 'components': expected shape (L, {d}), found {self.components.shape}")
        if self.eigenvalues.shape != (l,):
            raise InputError(f"PPCA 'eigenvalues': expected shape ({l},), found {self.eigenvalues.shape}")
        if not (np.isfinite(self.sigma2) and self.sigma2 > 0):
            raise InputError(f"PPCA 'sigma2': expected a positive finite variance, found {self.sigma2}")
        for name, arr in (
            ("mean", self.mean),
            ("components", self.components),
            ("eigenvalues", self.eigenvalues),
        ):
            if not np.all(np.isfinite(arr)):
                raise InputError(f"PPCA '{name}': contains NaN or Inf")

    @classmethod
    def fit(cls, particles: np.ndarray, variance_fraction: float = 0.95) -> PPCA:
        """Fit on a group ``(N, M, 3)`` mm, keeping the modes for ``variance_fraction`` of the variance."""
        arr = _check_group(particles, "particles")
        if arr.shape[0] < 3:
            raise InputError(
                f"particles: PPCA needs at least 3 subjects (one kept and one discarded mode), found {arr.shape[0]}"
            )
        f = float(variance_fraction)
        if not 0.0 < f < 1.0:
            raise InputError(
                f"variance_fraction: expected a value in (0, 1) (PPCA needs discarded variance "
                f"for σ²), found {variance_fraction!r}"
            )
        n, m, _ = arr.shape
        d = 3 * m
        mean, vt, s = _principal_axes(arr.reshape(n, d))
        lam = s**2 / n  # eq. 13: the 1/N covariance
        total = float(lam.sum())
        if total <= 0:
            raise InputError(f"particles: the {n} shapes are identical (total variance 0)")
        cum = np.cumsum(lam) / total
        l = int(np.searchsorted(cum, f - 1e-12, side="left")) + 1
        # Small groups can need every non-zero mode for the fraction; keep at least one discarded
        # so σ² (the variance outside the subspace) is estimated from data, never zero.
        l = min(l, len(lam) - 1)
        if l >= d:
            raise InputError(f"PPCA: keeping {l} modes leaves no residual dimensions (D = {d})")
        sigma2 = float(lam[l:].sum()) / (d - l)
        if sigma2 <= 1e-12 * total:
            raise InputError(
                f"PPCA: the discarded modes hold no variance (σ² = {sigma2:.3g} mm²) with {n} subjects "
                f"and variance_fraction={f}; use a smaller fraction or more subjects"
            )
        return cls(mean.reshape(m, 3), vt[:l], lam[:l], sigma2, n, f)

    @property
    def n_modes(self) -> int:
        return int(self.components.shape[0])

    @property
    def n_particles(self) -> int:
        return int(self.mean.shape[0])

    def _deviation(self, particles: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
        arr = check_particles(particles, "particles", self.n_particles)
        lead = arr.shape[:-2]
        return arr.reshape(*lead, self.mean.size) - self.mean.reshape(-1), lead

    def mahalanobis(self, particles: np.ndarray) -> np.ndarray:
        """Mahalanobis distance under S = W Wᵀ + σ² I: ``(N, M, 3)`` mm -> ``(N,)`` unitless.

        Woodbury: S⁻¹ = σ⁻²(I - W (σ² I_L + WᵀW)⁻¹ Wᵀ), so dᵀS⁻¹d needs only the L projections of
        d; the D x D matrix is never formed.
        """
        dev, _ = self._deviation(particles)
        w = self.components.T * np.sqrt(self.eigenvalues)  # (D, L)
        inner = self.sigma2 * np.eye(self.n_modes) + w.T @ w
        proj = dev @ w  # (..., L)
        sol = np.linalg.solve(inner, proj.reshape(-1, self.n_modes).T).T.reshape(proj.shape)
        sq = (np.einsum("...i,...i->...", dev, dev) - np.einsum("...i,...i->...", proj, sol)) / self.sigma2
        return np.sqrt(np.maximum(sq, 0.0))

    def pointwise_deviation(self, particles: np.ndarray) -> np.ndarray:
        """Whitened deviation C̃ (paper eq. 15): ``(N, M, 3)`` mm -> ``(N, M, 3)`` unitless.

        C̃ = (C - C̄)ᵀ U_S Λ_S^{-1/2} U_Sᵀ with U_S Λ_S U_Sᵀ = S (eq. 14). S's eigenvectors are U_L
        (eigenvalues Λ_L + σ²) and the orthogonal complement (eigenvalue σ²), so
        C̃ = U_L (Λ_L + σ²)^{-1/2} U_Lᵀ d + σ⁻¹ (d - U_L U_Lᵀ d) with d = C - C̄, computed without
        forming S. Its norm over all points equals ``mahalanobis``.
        """
        dev, lead = self._deviation(particles)
        u = self.components  # (L, D)
        proj = dev @ u.T  # (..., L)
        inside = (proj / np.sqrt(self.eigenvalues + self.sigma2)) @ u
        outside = (dev - proj @ u) / np.sqrt(self.sigma2)
        return (inside + outside).reshape(*lead, self.n_particles, 3)

    @property
    def meta(self) -> dict[str, Any]:
        return {
            "kind": "ppca",
            "format_version": FORMAT_VERSION,
            "n_subjects": self.n_subjects,
            "n_particles": self.n_particles,
            "n_modes": self.n_modes,
            "variance_fraction": self.variance_fraction,
            "sigma2_mm2": self.sigma2,
        }

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            "mean": self.mean.copy(),
            "components": self.components.copy(),
            "eigenvalues": self.eigenvalues.copy(),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> PPCA:
        """Rebuild from ``to_arrays()`` and ``meta``; ``InputError`` when they disagree."""
        missing = [k for k in ("mean", "components", "eigenvalues") if k not in arrays]
        if missing:
            raise InputError(f"PPCA arrays: missing {missing}, found keys {sorted(arrays)}")
        if meta.get("kind") != "ppca":
            raise InputError(f"PPCA meta 'kind': expected 'ppca', found {meta.get('kind')!r}")
        for key in ("sigma2_mm2", "n_subjects", "variance_fraction"):
            if key not in meta:
                raise InputError(f"PPCA meta: missing '{key}'")
        model = cls(
            arrays["mean"],
            arrays["components"],
            arrays["eigenvalues"],
            meta["sigma2_mm2"],
            meta["n_subjects"],
            meta["variance_fraction"],
        )
        for key, value in (("n_particles", model.n_particles), ("n_modes", model.n_modes)):
            if key in meta and int(meta[key]) != value:
                raise InputError(f"PPCA meta '{key}': says {meta[key]}, but the arrays hold {value}")
        return model
