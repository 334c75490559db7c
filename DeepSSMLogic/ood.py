"""Out-of-distribution score of a prediction (issue 13). numpy only.

Four components, each measured on what the predictor has anyway (the image resampled onto the
reference grid after alignment, the normalised network input, the predicted particles in the model
frame and, when the bundle has it, the per-particle uncertainty):

* ``descriptor_mahalanobis`` — the predicted shape's Mahalanobis distance under the training PCA
  (modes for 99 % of the variance, eigenvalues of the real training shapes), in SD units;
* ``uncertainty_mm`` — the prediction's mean per-particle uncertainty (bundles with uncertainty);
* ``intensity`` — RMS of the standardised deviations of nine image statistics (seven quantiles of
  the intensities in training-normaliser units, the mean absolute neighbour difference relative to the
  image's spread — noise raises it, blur lowers it — and the fraction of voxels outside the training
  clip range) from their means over the real training images;
* ``registration`` — ``1 − NCC`` between the normalised input and the normalised reference image on
  the reference grid (after the predictor's alignment): how well the image matches the model's atlas.

Each component is turned into a robust z-score (median and 1.4826 × MAD, at least half the SD and
5 % of the median) against a reference sample of in-family values, and the score is the largest z.
The reference is the validation split, except for ``intensity`` (calibration version 2): its
reference is the training images' leave-one-out distances (:meth:`IntensityReference.leave_one_out`),
because the intensity reference is fitted on those images and the validation split is mostly
augmented copies of them, whose distances are in-sample and too tight (cohort 1 of the uncertainty
study: validation scale 0.116 against 0.238 left out). The threshold is the largest of the 99th
percentile of the validation scores, :func:`null_threshold` (the 99th percentile of the score of an
in-family sample when each component is a ``|N(0, 1)|`` distance scaled on as many samples as the
smallest reference: it carries the skew of a distance, the error of a small-sample median and MAD,
and the maximum over the components, which a fixed "3 robust SDs" ignores) and :data:`MIN_THRESHOLD`.
Version 1 calibrations (validation references, threshold = validation 99th percentile ≥ 3) load and
score as before: the stored medians, scales and threshold are used as they are. The calibration
(:class:`OODCalibration`) is stored in the bundle as ``model.json["ood"]``, with (version 2) the
validation values and the intensity reference's values, so a flag can be recomputed from them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .bundle_schema import OOD_COMPONENTS, OOD_VERSION
from .errors import InputError

QUANTILES = (1.0, 5.0, 25.0, 50.0, 75.0, 95.0, 99.0)
FEATURE_NAMES = (*(f"q{int(q):02d}" for q in QUANTILES), "roughness", "outside_clip")
COMPONENTS = OOD_COMPONENTS
MIN_THRESHOLD = 3.0
DEFAULT_QUANTILE = 0.99
MAHALANOBIS_VARIANCE = 0.99
NULL_DRAWS = 20_000
NULL_SEED = 13
NULL_MAX_N = 200
REFERENCE_SOURCES = {"intensity": "training images, leave one out"}
_FEATURE_SD_FLOOR = 0.05  # features are in normaliser-SD units (or fractions): below this is noise
_REASONS = {
    "descriptor_mahalanobis": "the predicted shape is far from the training shapes",
    "uncertainty_mm": "the model is unusually uncertain",
    "intensity": "the intensities look unlike the training images",
    "registration": "the image matches the model's reference image poorly",
}


# -- the components ---------------------------------------------------------------------------------
def image_statistics(array: np.ndarray, normalizer: Any) -> np.ndarray:
    """The nine statistics (:data:`FEATURE_NAMES`) of a raw image on the reference grid ``(Z, Y, X)``.

    NaN voxels (the part of the grid outside the input image after alignment) are left out, so the
    padding of a resampled, shifted image does not count as image content."""
    a = np.asarray(array, dtype=np.float64)
    if a.ndim == 4:
        a = a[0]
    if a.ndim != 3 or a.size == 0:
        raise InputError(f"image statistics: expected a (Z, Y, X) array, found shape {a.shape}")
    u = (a - float(normalizer.mean)) / float(normalizer.std)
    inside = np.isfinite(u)
    if not inside.any():
        raise InputError("image statistics: the image does not overlap the reference grid")
    q = np.percentile(u[inside], QUANTILES)
    spread = max(float(u[inside].std()), 1e-6)
    diffs = [np.nanmean(np.abs(np.diff(u, axis=ax))) for ax in range(3) if u.shape[ax] > 1]
    diffs = [d for d in diffs if np.isfinite(d)]
    rough = float(np.mean(diffs)) / spread if diffs else 0.0
    vals = a[inside]
    outside = float(np.mean((vals < float(normalizer.clip_low)) | (vals > float(normalizer.clip_high))))
    return np.concatenate([q, [rough, outside]])


def registration_quality(x: np.ndarray, reference: np.ndarray) -> float:
    """``1 − NCC`` of two arrays of one shape (0: identical up to an affine intensity change)."""
    a = np.asarray(x, dtype=np.float64).ravel()
    b = np.asarray(reference, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise InputError(f"registration quality: shapes differ ({a.size} vs {b.size} voxels)")
    a = a - a.mean()
    b = b - b.mean()
    den = math.sqrt(float(a @ a) * float(b @ b))
    return 1.0 if den == 0.0 else 1.0 - float(a @ b) / den


def mahalanobis_modes(shape_model: Any, fraction: float = MAHALANOBIS_VARIANCE) -> int:
    """Modes used for the descriptor distance: enough for ``fraction`` of the variance."""
    return int(shape_model.n_modes_for_variance(fraction))


def descriptor_mahalanobis(particles_model: np.ndarray, shape_model: Any, n_modes: int) -> float:
    """Mahalanobis distance (SD units) of a shape ``(M, 3)`` (model frame, mm) under the PCA."""
    k = min(int(n_modes), shape_model.n_modes)
    scores = shape_model.project(np.asarray(particles_model, dtype=np.float64), k)
    ev = np.maximum(np.asarray(shape_model.eigenvalues[:k], dtype=np.float64), 1e-12)
    return float(np.sqrt(np.sum(scores**2 / ev)))


@dataclass
class IntensityReference:
    """Mean and SD of :func:`image_statistics` over the real training images."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, features: Sequence[np.ndarray]) -> IntensityReference:
        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2 or f.shape[1] != len(FEATURE_NAMES) or f.shape[0] < 1:
            raise InputError(
                f"intensity reference: expected (N, {len(FEATURE_NAMES)}) features, found {f.shape}"
            )
        sd = f.std(axis=0, ddof=1) if f.shape[0] > 1 else np.zeros(f.shape[1])
        return cls(f.mean(axis=0), np.maximum(sd, _FEATURE_SD_FLOOR))

    @staticmethod
    def leave_one_out(features: Sequence[np.ndarray]) -> list[float]:
        """Each training image's distance from the reference fitted on the other images: how far an
        image of the family the reference has not seen lies (empty for fewer than 3 images)."""
        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2 or f.shape[0] < 3:
            return []
        return [IntensityReference.fit(np.delete(f, i, axis=0)).distance(f[i]) for i in range(len(f))]

    def distance(self, features: np.ndarray) -> float:
        z = (np.asarray(features, dtype=np.float64) - self.mean) / self.std
        return float(np.sqrt(np.mean(z**2)))

    def to_dict(self) -> dict[str, Any]:
        return {"features": list(FEATURE_NAMES), "mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> IntensityReference:
        return cls(np.asarray(d["mean"], dtype=np.float64), np.asarray(d["std"], dtype=np.float64))


def image_components(
    raw: np.ndarray, x: np.ndarray, reference: np.ndarray, normalizer: Any, intensity: IntensityReference
) -> dict[str, float]:
    """The image-side components: ``intensity`` (of the raw array on the reference grid) and
    ``registration`` (the normalised input ``x`` against the normalised ``reference``)."""
    return {
        "intensity": intensity.distance(image_statistics(raw, normalizer)),
        "registration": registration_quality(x, reference),
    }


def prediction_components(
    particles_model: np.ndarray, uncertainty: np.ndarray | None, shape_model: Any, n_modes: int
) -> dict[str, float]:
    """The prediction-side components: ``descriptor_mahalanobis`` and (with uncertainty) ``uncertainty_mm``."""
    out = {"descriptor_mahalanobis": descriptor_mahalanobis(particles_model, shape_model, n_modes)}
    if uncertainty is not None:
        out["uncertainty_mm"] = float(np.mean(uncertainty))
    return out


# -- calibration ------------------------------------------------------------------------------------
@dataclass
class OODCalibration:
    """Reference statistics per component (median, robust scale, 99th percentile) on the validation
    split, the intensity reference and the score threshold."""

    threshold: float
    components: dict[str, dict[str, float]]
    intensity: IntensityReference
    n_modes: int
    quantile: float = DEFAULT_QUANTILE
    n_calibration: int = 0
    version: int = OOD_VERSION
    extra: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, list[float]] = field(default_factory=dict)  # per component, v2 bundles

    def zscores(self, values: dict[str, float]) -> dict[str, float]:
        out = {}
        for name, ref in self.components.items():
            if name in values:
                out[name] = (float(values[name]) - ref["median"]) / ref["scale"]
        return out

    def assess(self, values: dict[str, float]) -> dict[str, Any]:
        """The ``"ood"`` object of a prediction: score, threshold, flag, reasons, components."""
        z = self.zscores(values)
        score = max(z.values()) if z else 0.0
        flag = bool(score > self.threshold)
        reasons = []
        for name, zi in sorted(z.items(), key=lambda kv: -kv[1]):
            if zi > self.threshold:
                ref = self.components[name]
                src = "training images left out" if name in self.extra.get("reference", {}) else "validation"
                reasons.append(
                    f"{name}: {_REASONS.get(name, name)} ({values[name]:.3g}; {src}: median "
                    f"{ref['median']:.3g}, 99th percentile {ref['p99']:.3g})"
                )
        return {
            "score": float(score),
            "threshold": float(self.threshold),
            "flag": flag,
            "reasons": reasons,
            "components": {k: float(v) for k, v in values.items()},
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "method": "max robust z over components",
            "threshold": float(self.threshold),
            "quantile": float(self.quantile),
            "n_calibration": int(self.n_calibration),
            "n_modes": int(self.n_modes),
            "components": {k: {kk: float(vv) for kk, vv in v.items()} for k, v in self.components.items()},
            "intensity": self.intensity.to_dict(),
            **({"extra": self.extra} if self.extra else {}),
            **({"validation": self.validation} if self.validation else {}),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> OODCalibration | None:
        """None for bundles without a calibration (older ones); the dict is schema-checked on load."""
        if d is None:
            return None
        return cls(
            threshold=float(d["threshold"]),
            components={k: {kk: float(vv) for kk, vv in v.items()} for k, v in d["components"].items()},
            intensity=IntensityReference.from_dict(d["intensity"]),
            n_modes=int(d["n_modes"]),
            quantile=float(d.get("quantile", DEFAULT_QUANTILE)),
            n_calibration=int(d.get("n_calibration", 0)),
            version=int(d["version"]),
            extra=dict(d.get("extra", {})),
            validation={k: [float(x) for x in v] for k, v in d.get("validation", {}).items()},
        )


def _robust(values: np.ndarray) -> dict[str, float]:
    v = np.asarray(values, dtype=np.float64)
    med = float(np.median(v))
    mad = 1.4826 * float(np.median(np.abs(v - med)))
    sd = float(v.std(ddof=1)) if v.size > 1 else 0.0
    # MAD is robust but collapses on small, tight splits; half the SD and 5 % of the level bound it below
    scale = max(mad, 0.5 * sd, 0.05 * abs(med), 1e-6)
    return {"median": med, "scale": scale, "p99": float(np.percentile(v, 99.0))}


def calibrate(
    rows: Sequence[dict[str, float]],
    intensity: IntensityReference,
    n_modes: int,
    quantile: float = DEFAULT_QUANTILE,
    min_threshold: float = MIN_THRESHOLD,
    references: dict[str, Sequence[float]] | None = None,
) -> OODCalibration:
    """The calibration from the component values of the validation predictions ``rows``.

    ``references``: per component, values of unseen in-family samples to take its median and scale
    from instead of ``rows`` (v2: ``intensity`` from :meth:`IntensityReference.leave_one_out`; the
    validation split is mostly augmented copies of the training images the intensity reference was
    fitted on, so its intensity distances are in-sample and understate an unseen image's spread).
    The threshold is the largest of the validation scores' ``quantile``, :func:`null_threshold`
    (the same quantile of an in-family sample's score under a conservative model, with ``n`` the
    smallest reference sample) and ``min_threshold``."""
    if len(rows) < 2:
        raise InputError(f"OOD calibration needs at least 2 validation predictions, found {len(rows)}")
    names = [c for c in COMPONENTS if all(c in r for r in rows)]
    refs = {c: list(v) for c, v in (references or {}).items() if c in names and len(v) >= 2}
    comps = {c: _robust(np.array(refs.get(c) or [r[c] for r in rows])) for c in names}
    cal = OODCalibration(min_threshold, comps, intensity, n_modes, quantile, len(rows))
    cal.validation = {c: [float(r[c]) for r in rows] for c in names}
    if refs:
        cal.extra = {
            "reference": {
                c: {"source": REFERENCE_SOURCES[c], "values": [float(x) for x in v]} for c, v in refs.items()
            }
        }
    scores = [cal.assess(r)["score"] for r in rows]
    n_ref = min(len(refs.get(c) or rows) for c in names)
    null = null_threshold(n_ref, len(names), quantile)
    cal.extra = {**cal.extra, "null_threshold": null, "null_n": n_ref}
    cal.threshold = max(float(np.quantile(scores, quantile)), null, float(min_threshold))
    return cal


@functools.lru_cache(maxsize=64)
def null_threshold(n: int, k: int, quantile: float = DEFAULT_QUANTILE, draws: int = NULL_DRAWS) -> float:
    """The ``quantile`` of the score (max of ``k`` robust z-scores, each scaled by :func:`_robust` on
    ``n`` reference samples) of an in-family sample, by simulation with a fixed seed.

    Each component is modelled as the size of one Gaussian deviation, ``|N(0, 1)|``: all four are
    non-negative distances, and a chi with one degree of freedom has the heaviest upper tail
    relative to its median and MAD among the norms of Gaussian vectors, so the model is a
    conservative one. The simulation carries the three things a fixed "3 robust SDs" ignores: the
    skew of a distance, the error of a median and MAD from ``n`` samples, and the maximum over ``k``
    components (taken as independent, which is conservative too). ``n`` above
    :data:`NULL_MAX_N` is simulated as :data:`NULL_MAX_N` (a slightly higher threshold)."""
    if n < 2 or k < 1:
        raise InputError(f"OOD null threshold: expected n >= 2 samples and k >= 1 components, found {n}, {k}")
    n = min(int(n), NULL_MAX_N)
    rng = np.random.default_rng(NULL_SEED)
    z = []
    for start in range(0, draws, 2000):
        m = min(2000, draws - start)
        ref = np.abs(rng.standard_normal((m, k, n)))
        new = np.abs(rng.standard_normal((m, k)))
        med = np.median(ref, axis=-1)
        mad = 1.4826 * np.median(np.abs(ref - med[..., None]), axis=-1)
        scale = np.maximum.reduce([mad, 0.5 * ref.std(axis=-1, ddof=1), 0.05 * med, np.full_like(med, 1e-6)])
        z.append(((new - med) / scale).max(axis=-1))
    return float(np.quantile(np.concatenate(z), quantile))


def fit_uncertainty_scale(triples: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray | None]]) -> float:
    """``sqrt(mean err² / mean u²)`` over every validation particle (1.0 without uncertainty)."""
    err2 = [((p - t) ** 2).sum(-1) for t, p, u in triples if u is not None]
    u2 = [np.asarray(u) ** 2 for _, _, u in triples if u is not None]
    if not err2:
        return 1.0
    e, v = float(np.mean(np.concatenate(err2))), float(np.mean(np.concatenate(u2)))
    if not (v > 0 and math.isfinite(v) and math.isfinite(e) and e > 0):
        return 1.0
    return math.sqrt(e / v)
