"""Generative models of PCA-score space for model-based augmentation (paper section 3.1).

All samplers share one contract: ``fit(scores (N, K) mm)`` returns the sampler, then
``sample(n, rng: np.random.Generator) -> SampleBatch(scores (n, K) mm, source (n,) int)`` where
``source[i]`` is the index of the real training subject whose image is warped to make sample i.
``describe()`` gives the fitted parameters as JSON-able values. numpy/scipy only; the same
generator state gives the same samples.

* ``KDESampler`` (paper eq. 1): pick a subject uniformly, add Gaussian noise. ``kernel="isotropic"``
  is the paper's (std σ = mean nearest-neighbour distance in mm, the same in every mode);
  ``kernel="scaled"`` (default) shapes the kernel like the data covariance with the same expected
  displacement σ. See docs/AUGMENTATION.md for the measurements behind the default.
* ``GaussianSampler``: one full-covariance Gaussian.
* ``GMMSampler``: full-covariance Gaussian mixture fitted by EM, number of components by BIC.

Gaussian and GMM samples are attached to the nearest real subject by Mahalanobis distance under
the (regularised) covariance of the training scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.special import logsumexp

from DeepSSMLogic.errors import InputError

__all__ = [
    "SAMPLERS",
    "GMMSampler",
    "GaussianSampler",
    "KDESampler",
    "SampleBatch",
    "Sampler",
    "make_sampler",
    "nearest_neighbour_distances",
]

# Rows per block when comparing generated with real scores: bounds memory at ~block * N floats.
_BLOCK = 4096


@dataclass(frozen=True)
class SampleBatch:
    """``scores`` (n, K) float64 mm; ``source`` (n,) int64 index of the real subject to warp."""

    scores: np.ndarray
    source: np.ndarray

    def __len__(self) -> int:
        return int(self.scores.shape[0])


def _check_scores(scores: Any, name: str = "scores", min_rows: int = 2) -> np.ndarray:
    z = np.asarray(scores, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] < 1:
        raise InputError(f"{name}: expected a 2-D array (N subjects, K modes), found shape {z.shape}")
    n, k = z.shape
    if n < min_rows:
        raise InputError(f"{name}: a sampler needs at least {min_rows} subjects, found {n}")
    if k > n - 1:
        raise InputError(
            f"{name}: {k} modes but only {n} subjects; at most N-1 = {n - 1} PCA modes carry variance "
            "(pass fewer modes or more subjects)"
        )
    if not np.all(np.isfinite(z)):
        bad = np.argwhere(~np.isfinite(z))[0]
        raise InputError(f"{name}: contains NaN or Inf (first at row {bad[0]}, mode {bad[1]})")
    return z


def _check_rng(rng: Any) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise InputError(f"rng: expected a numpy.random.Generator, found {type(rng).__name__}")
    return rng


def _check_n(n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or int(n) < 0:
        raise InputError(f"n: expected a non-negative integer number of samples, found {n!r}")
    return int(n)


def nearest_neighbour_distances(points: np.ndarray) -> np.ndarray:
    """Distance from each row of ``points`` (N, K) to its nearest other row: ``(N,)``, same units."""
    p = np.asarray(points, dtype=np.float64)
    sq = np.einsum("ij,ij->i", p, p)
    out = np.empty(p.shape[0])
    for start in range(0, p.shape[0], _BLOCK):
        blk = p[start : start + _BLOCK]
        d2 = sq[start : start + _BLOCK, None] + sq[None, :] - 2.0 * blk @ p.T
        d2[np.arange(blk.shape[0]), np.arange(start, start + blk.shape[0])] = np.inf
        out[start : start + _BLOCK] = np.sqrt(np.maximum(d2.min(axis=1), 0.0))
    return out


def _nearest_rows(queries: np.ndarray, refs: np.ndarray) -> np.ndarray:
    """Index into ``refs`` (N, K) of the Euclidean-nearest row for each of ``queries`` (n, K)."""
    ref_sq = np.einsum("ij,ij->i", refs, refs)
    out = np.empty(queries.shape[0], dtype=np.int64)
    for start in range(0, queries.shape[0], _BLOCK):
        blk = queries[start : start + _BLOCK]
        # |q|² is the same for every ref, so it does not change the argmin.
        out[start : start + _BLOCK] = np.argmin(ref_sq[None, :] - 2.0 * blk @ refs.T, axis=1)
    return out


def _regularised_cholesky(cov: np.ndarray, reg: float) -> tuple[np.ndarray, float]:
    """Lower Cholesky factor of ``cov + eps I`` with ``eps = reg * mean(diag)``, raised until it works."""
    d = cov.shape[0]
    scale = float(np.mean(np.diag(cov)))
    if not scale > 0:
        raise InputError("scores: every mode has zero variance; nothing to sample")
    eps = reg * scale
    for _ in range(12):
        try:
            return np.linalg.cholesky(cov + eps * np.eye(d)), eps
        except np.linalg.LinAlgError:
            eps = max(eps * 10.0, 1e-12 * scale)
    raise InputError("scores: the covariance could not be regularised to positive definite")


class Sampler:
    """Common plumbing: training scores, the Mahalanobis metric for source assignment."""

    name = "base"

    def __init__(self) -> None:
        self._train: np.ndarray | None = None

    @property
    def fitted(self) -> bool:
        return self._train is not None

    @property
    def n_modes(self) -> int:
        return int(self._require().shape[1])

    def _require(self) -> np.ndarray:
        if self._train is None:
            raise InputError(f"{type(self).__name__}: call fit(scores) before sample()")
        return self._train

    def fit(self, scores: np.ndarray) -> Sampler:
        raise NotImplementedError

    def sample(self, n: int, rng: np.random.Generator) -> SampleBatch:
        """``n`` generated scores and their source subjects (see the module docstring)."""
        z = self._require()
        return self._draw(z, _check_n(n), _check_rng(rng))

    def _draw(self, z: np.ndarray, n: int, rng: np.random.Generator) -> SampleBatch:
        """Draw ``n`` samples; ``z`` is the fitted training scores ``(N, K)`` mm."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError

    def _sizes(self) -> dict[str, int]:
        """The ``describe()`` fields every sampler has: training subjects and modes."""
        z = self._require()
        return {"n_train": int(z.shape[0]), "n_modes": int(z.shape[1])}

    def _set_metric(self, z: np.ndarray, reg: float) -> None:
        cov = np.atleast_2d(np.cov(z, rowvar=False))
        self._metric_chol, self._metric_eps = _regularised_cholesky(cov, reg)
        # Whitening the reals once turns every Mahalanobis distance into a Euclidean one.
        self._metric_inv_chol = np.linalg.inv(self._metric_chol)
        self._train_white = z @ self._metric_inv_chol.T

    def nearest_source(self, scores: np.ndarray) -> np.ndarray:
        """Index of the Mahalanobis-nearest training subject for each row of ``scores`` (n, K)."""
        z = np.asarray(scores, dtype=np.float64)
        if z.ndim != 2 or z.shape[1] != self.n_modes:
            raise InputError(f"scores: expected shape (n, {self.n_modes}), found {z.shape}")
        if z.shape[0] == 0:
            return np.zeros(0, dtype=np.int64)
        white = z @ self._metric_inv_chol.T
        return _nearest_rows(white, self._train_white)


class KDESampler(Sampler):
    """Kernel density estimate of score space (paper eq. 1): a uniformly picked subject plus noise.

    σ is the mean over subjects of the Euclidean distance (mm) to the nearest other subject, and
    it is a standard deviation, times ``bandwidth_scale``.

    * ``kernel="isotropic"`` (the paper's): noise ~ N(0, σ² I). Each mode's variance grows by σ².
    * ``kernel="scaled"``: noise ~ N(0, h² diag(v)) with v the per-mode score variances (ddof=1)
      and h = σ / sqrt(Σ v), so the expected squared displacement equals σ² as in the isotropic
      kernel but is spread over the modes in proportion to their variance: each mode's variance is
      multiplied by about (1 + h²). (The nearest-neighbour distance measured in whitened space
      cannot set h: with all N-1 modes every pair of whitened subjects is exactly sqrt(2(N-1))
      apart, see docs/AUGMENTATION.md.)

    ``source`` is the picked subject.
    """

    name = "kde"
    KERNELS = ("scaled", "isotropic")

    def __init__(self, kernel: str = "scaled", bandwidth_scale: float = 1.0) -> None:
        super().__init__()
        if kernel not in self.KERNELS:
            raise InputError(f"kernel: expected one of {list(self.KERNELS)}, found {kernel!r}")
        scale = float(bandwidth_scale)
        if not (math.isfinite(scale) and scale > 0):
            raise InputError(f"bandwidth_scale: expected a positive number, found {bandwidth_scale!r}")
        self.kernel = kernel
        self.bandwidth_scale = scale
        self.sigma = float("nan")
        self.noise_std = np.zeros(0)

    def fit(self, scores: np.ndarray) -> KDESampler:
        """Fit on training scores ``(N, K)`` mm."""
        z = _check_scores(scores)
        nn = nearest_neighbour_distances(z)
        sigma = float(nn.mean()) * self.bandwidth_scale
        if not sigma > 0:
            raise InputError(
                "scores: all subjects coincide (nearest-neighbour distance 0); nothing to sample"
            )
        if self.kernel == "isotropic":
            noise_std = np.full(z.shape[1], sigma)
        else:
            var = z.var(axis=0, ddof=1)
            noise_std = sigma * np.sqrt(var / var.sum())
        self._train = z.copy()
        self.sigma = sigma
        self.noise_std = noise_std
        return self

    def _draw(self, z: np.ndarray, n: int, rng: np.random.Generator) -> SampleBatch:
        source = rng.integers(0, z.shape[0], size=n, dtype=np.int64)
        noise = rng.standard_normal((n, z.shape[1])) * self.noise_std
        return SampleBatch(z[source] + noise, source)

    def describe(self) -> dict[str, Any]:
        return {
            "sampler": self.name,
            "kernel": self.kernel,
            **self._sizes(),
            "bandwidth_scale": self.bandwidth_scale,
            "sigma_mm": self.sigma,
            "noise_std_mm": [float(x) for x in self.noise_std],
        }


class GaussianSampler(Sampler):
    """One Gaussian with the scores' mean and full covariance (ddof=1), sampled via Cholesky.

    ``reg`` adds ``reg * mean(variance)`` to the diagonal (more if needed for positive definiteness).
    """

    name = "gaussian"

    def __init__(self, reg: float = 1e-6) -> None:
        super().__init__()
        self.reg = float(reg)
        if not (math.isfinite(self.reg) and self.reg >= 0):
            raise InputError(f"reg: expected a non-negative number, found {reg!r}")

    def fit(self, scores: np.ndarray) -> GaussianSampler:
        z = _check_scores(scores)
        self.mean = z.mean(axis=0)
        self.cov = np.atleast_2d(np.cov(z, rowvar=False))
        self._chol, self._eps = _regularised_cholesky(self.cov, self.reg)
        self._train = z.copy()
        self._set_metric(z, self.reg)
        return self

    def _draw(self, z: np.ndarray, n: int, rng: np.random.Generator) -> SampleBatch:
        scores = self.mean + rng.standard_normal((n, self.mean.size)) @ self._chol.T
        return SampleBatch(scores, self.nearest_source(scores))

    def describe(self) -> dict[str, Any]:
        return {
            "sampler": self.name,
            **self._sizes(),
            "mean_mm": [float(x) for x in self.mean],
            "std_mm": [float(x) for x in np.sqrt(np.diag(self.cov))],
            "regularisation_mm2": self._eps,
        }


class GMMSampler(Sampler):
    """Full-covariance Gaussian mixture fitted by EM; number of components by BIC.

    ``n_components``: an int fixes it; ``None`` tries k = 1..min(``max_components``, N // (K+1))
    (so each component can have at least K+1 subjects on average, the minimum for a non-singular
    full covariance) and keeps the lowest BIC = -2 log L + p log N with p = (k-1) + k K +
    k K(K+1)/2 free parameters. With all N-1 modes this always gives one component; fit the GMM
    on fewer modes for a real mixture. EM starts from
    k-means++ seeds (``n_init`` restarts, the best likelihood wins) and every covariance gets
    ``reg * mean(variance of the data)`` added to its diagonal (the floor that keeps a component
    from collapsing onto a few subjects). ``seed`` makes the fit deterministic.
    """

    name = "gmm"

    def __init__(
        self,
        n_components: int | None = None,
        max_components: int = 8,
        reg: float = 1e-6,
        n_init: int = 3,
        max_iter: int = 200,
        tol: float = 1e-6,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if n_components is not None and (not isinstance(n_components, (int, np.integer)) or n_components < 1):
            raise InputError(f"n_components: expected a positive integer or None, found {n_components!r}")
        if not isinstance(max_components, (int, np.integer)) or max_components < 1:
            raise InputError(f"max_components: expected a positive integer, found {max_components!r}")
        if not (math.isfinite(float(reg)) and float(reg) > 0):
            raise InputError(f"reg: expected a positive number (the covariance floor), found {reg!r}")
        self.n_components = None if n_components is None else int(n_components)
        self.max_components = int(max_components)
        self.reg = float(reg)
        self.n_init = max(1, int(n_init))
        self.max_iter = int(max_iter)
        self.tol = float(tol)
        self.seed = int(seed)
        self.bic: dict[int, float] = {}

    # ---- EM -----------------------------------------------------------------------------------

    @staticmethod
    def _log_gauss(x: np.ndarray, means: np.ndarray, chols: np.ndarray) -> np.ndarray:
        """``(N, k)`` log N(x_i | mean_j, L_j L_jᵀ)."""
        n, d = x.shape
        out = np.empty((n, means.shape[0]))
        for j in range(means.shape[0]):
            # A small K x K inverse then a matmul: scipy's triangular solve measured ~10 ms per
            # call on this machine (OpenBLAS threading), which dominated EM.
            inv_l = np.linalg.inv(chols[j])
            y = (x - means[j]) @ inv_l.T
            logdet = 2.0 * np.log(np.diag(chols[j])).sum()
            out[:, j] = -0.5 * (d * math.log(2.0 * math.pi) + logdet + np.einsum("ij,ij->i", y, y))
        return out

    def _m_step(self, x: np.ndarray, resp: np.ndarray, floor: float):
        n, d = x.shape
        nk = resp.sum(axis=0) + 10.0 * np.finfo(float).eps
        weights = nk / n
        means = (resp.T @ x) / nk[:, None]
        chols = np.empty((resp.shape[1], d, d))
        for j in range(resp.shape[1]):
            diff = x - means[j]
            cov = (resp[:, j, None] * diff).T @ diff / nk[j] + floor * np.eye(d)
            chols[j], _ = _regularised_cholesky(cov, 0.0)
        return weights, means, chols

    @staticmethod
    def _kmeans_pp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
        centres = [x[rng.integers(x.shape[0])]]
        for _ in range(1, k):
            d2 = np.min(((x[:, None, :] - np.asarray(centres)[None]) ** 2).sum(-1), axis=1)
            total = d2.sum()
            idx = rng.integers(x.shape[0]) if total <= 0 else rng.choice(x.shape[0], p=d2 / total)
            centres.append(x[idx])
        centres_arr = np.asarray(centres)
        # A few Lloyd steps turn the seeds into a sensible hard partition.
        for _ in range(10):
            labels = np.argmin(((x[:, None, :] - centres_arr[None]) ** 2).sum(-1), axis=1)
            for j in range(k):
                if np.any(labels == j):
                    centres_arr[j] = x[labels == j].mean(axis=0)
        return np.argmin(((x[:, None, :] - centres_arr[None]) ** 2).sum(-1), axis=1)

    def _em(self, x: np.ndarray, k: int, rng: np.random.Generator, floor: float):
        best = None
        for _ in range(self.n_init):
            labels = self._kmeans_pp(x, k, rng)
            resp = np.zeros((x.shape[0], k))
            resp[np.arange(x.shape[0]), labels] = 1.0
            weights, means, chols = self._m_step(x, resp, floor)
            prev = -np.inf
            for _ in range(self.max_iter):
                logp = self._log_gauss(x, means, chols) + np.log(weights)
                norm = logsumexp(logp, axis=1)
                ll = float(norm.sum())
                resp = np.exp(logp - norm[:, None])
                weights, means, chols = self._m_step(x, resp, floor)
                if abs(ll - prev) <= self.tol * max(1.0, abs(ll)):
                    break
                prev = ll
            ll = float(logsumexp(self._log_gauss(x, means, chols) + np.log(weights), axis=1).sum())
            if best is None or ll > best[0]:
                best = (ll, weights, means, chols)
        return best

    def fit(self, scores: np.ndarray) -> GMMSampler:
        z = _check_scores(scores)
        n, d = z.shape
        floor = self.reg * float(np.mean(z.var(axis=0)))
        if not floor > 0:
            raise InputError("scores: every mode has zero variance; nothing to sample")
        rng = np.random.default_rng(self.seed)
        if self.n_components is not None:
            if self.n_components > n:
                raise InputError(f"n_components: {self.n_components} exceeds the {n} subjects")
            candidates = [self.n_components]
        else:
            # A full covariance needs > K points: with fewer per component the floored likelihood
            # of a collapsed component grows without bound and BIC would reward over-splitting.
            k_max = max(1, min(self.max_components, n // (d + 1)))
            candidates = list(range(1, k_max + 1))
        self.bic = {}
        fits = {}
        for k in candidates:
            ll, weights, means, chols = self._em(z, k, rng, floor)
            p = (k - 1) + k * d + k * d * (d + 1) // 2
            self.bic[k] = -2.0 * ll + p * math.log(n)
            fits[k] = (weights, means, chols)
        k_best = min(self.bic, key=lambda kk: self.bic[kk])
        self.weights, self.means, self._chols = fits[k_best]
        self._train = z.copy()
        self._set_metric(z, self.reg)
        return self

    @property
    def k(self) -> int:
        self._require()
        return int(self.weights.size)

    def _draw(self, z: np.ndarray, n: int, rng: np.random.Generator) -> SampleBatch:
        # Each sample draws its own component by weight (not the reference's grouped `[-1]`).
        comp = rng.choice(self.weights.size, size=n, p=self.weights / self.weights.sum())
        normals = rng.standard_normal((n, self.means.shape[1]))
        scores = self.means[comp] + np.einsum("nij,nj->ni", self._chols[comp], normals)
        return SampleBatch(scores, self.nearest_source(scores))

    def describe(self) -> dict[str, Any]:
        return {
            "sampler": self.name,
            **self._sizes(),
            "n_components": self.k,
            "weights": [float(w) for w in self.weights],
            "means_mm": [[float(v) for v in m] for m in self.means],
            "bic": {str(k): float(v) for k, v in self.bic.items()},
            "covariance_floor_relative": self.reg,
        }


SAMPLERS: dict[str, type[Sampler]] = {
    "kde": KDESampler,
    "gaussian": GaussianSampler,
    "gmm": GMMSampler,
}


def make_sampler(name: str, **kwargs: Any) -> Sampler:
    """A new, unfitted sampler: ``"kde"`` | ``"gaussian"`` | ``"gmm"`` with its keyword options."""
    key = str(name).lower()
    if key not in SAMPLERS:
        raise InputError(f"sampler: expected one of {sorted(SAMPLERS)}, found {name!r}")
    try:
        return SAMPLERS[key](**kwargs)
    except TypeError as exc:
        raise InputError(f"sampler {key!r}: invalid option(s) {sorted(kwargs)}: {exc}") from None
