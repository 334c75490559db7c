"""The ``model.json`` schema of a model bundle: each field a loader relies on, checked for type,
shape, range and finiteness, with a :class:`~DeepSSMLogic.errors.BundleError` naming the field.

Checked independently of the content digest: a ``model.json`` whose digest was recomputed after an
edit still has to be well formed. Numpy only.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from .errors import BundleError

MAX_PARTICLES = 10_000_000
MAX_GRID_VOXELS = 1024**3  # far above any trainable grid; a guard against absurd sizes
DESCRIPTOR_KINDS = ("pca", "latent")
VARIANTS = ("base", "tl")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
PCA_ARRAYS = ("mean", "components", "eigenvalues", "score_mean", "score_std")
UNCERTAINTY_METHODS = ("none", "mc-dropout", "ensemble", "variance")  # issue 13; see uncertainty.py
UNCERTAINTY_VERSION = 2  # 2: method "variance" (its "head" object); other methods still write 1
UNCERTAINTY_VERSION_V1 = 1
VARIANCE_FEATURES = ("conv-mean",)  # variance_head.FEATURES
VARIANCE_HEAD_LIMITS = {"n_features": 100_000, "n_outputs": 100_000, "hidden": 4096, "heads": 32}
OOD_VERSION = 2  # 2: the intensity component is scaled on the training images left out one at a time (ood.calibrate references); the validation values are stored
OOD_COMPONENTS = ("descriptor_mahalanobis", "uncertainty_mm", "intensity", "registration")
OOD_FEATURES = 9  # ood.FEATURE_NAMES


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Fields:
    """Checks with messages of the form ``<where>: field 'a.b': expected ..., found ...``."""

    def __init__(self, where: str):
        self.where = where

    def fail(self, field: str, expected: str, found: Any) -> None:
        raise BundleError(f"{self.where}: field {field!r}: expected {expected}, found {_show(found)}")

    def get(self, obj: dict[str, Any], field: str, key: str) -> Any:
        if key not in obj:
            raise BundleError(f"{self.where}: lacks the field {field!r}")
        return obj[key]

    def mapping(self, obj: dict[str, Any], field: str, key: str, optional: bool = False) -> dict[str, Any]:
        if optional and obj.get(key) is None:
            return {}
        value = self.get(obj, field, key)
        if not isinstance(value, dict):
            self.fail(field, "an object", value)
        return value

    def number(self, value: Any, field: str, positive: bool = False) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            self.fail(field, "a finite number", value)
        if positive and not value > 0:
            self.fail(field, "a positive number", value)
        return float(value)

    def integer(self, value: Any, field: str, low: int, high: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            self.fail(field, f"an integer in {low}..{high}", value)
        return int(value)

    def vector(self, value: Any, field: str, n: int, positive: bool = False) -> list[float]:
        if not isinstance(value, list) or len(value) != n:
            self.fail(field, f"a list of {n} numbers", value)
        return [self.number(v, f"{field}[{i}]", positive) for i, v in enumerate(value)]

    def array(self, value: Any, field: str) -> np.ndarray:
        try:
            arr = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            self.fail(field, "a numeric (nested) list of equal-length rows", value)
        if arr.dtype == object or not np.all(np.isfinite(arr)):
            self.fail(field, "finite numbers only (no NaN or Infinity)", "non-finite values")
        return arr


def validate_meta(meta: dict[str, Any], where: str) -> None:
    """Raise :class:`BundleError` at the first field of ``meta`` (a parsed model.json, format and
    schema version already checked) that a loader could not use; ``where`` prefixes the message."""
    f = _Fields(where)
    kind = meta.get("descriptor_kind", "pca")
    if kind not in DESCRIPTOR_KINDS:
        f.fail("descriptor_kind", f"one of {list(DESCRIPTOR_KINDS)}", kind)
    arch = f.mapping(meta, "architecture", "architecture")
    if arch.get("variant") not in VARIANTS:
        f.fail("architecture.variant", f"one of {list(VARIANTS)}", arch.get("variant"))
    for key in ("hyperparameters", "training_summary"):
        f.mapping(meta, key, key, optional=True)
    _validate_grid(f, f.mapping(meta, "reference_grid", "reference_grid"))
    _validate_normalizer(f, f.mapping(meta, "normalizer", "normalizer"))
    n = f.integer(f.get(meta, "n_particles", "n_particles"), "n_particles", 1, MAX_PARTICLES)
    _validate_pca(f, meta.get("pca"), n)
    _validate_uncertainty(f, meta.get("uncertainty"))
    _validate_ood(f, meta.get("ood"))
    _validate_weights(f, f.mapping(meta, "weights", "weights", optional=True), meta.get("schema_version"))
    files = f.mapping(meta, "files", "files")
    for name, digest in files.items():
        if not isinstance(digest, str) or not _HEX64.match(digest):
            f.fail(f"files.{name}", "a sha256 digest (64 lowercase hex digits)", digest)
    digest = meta.get("content_sha256")
    if not isinstance(digest, str) or not _HEX64.match(digest):
        f.fail("content_sha256", "a sha256 digest (64 lowercase hex digits)", digest)


def _validate_grid(f: _Fields, grid: dict[str, Any]) -> None:
    f.vector(f.get(grid, "reference_grid.origin", "origin"), "reference_grid.origin", 3)
    f.vector(f.get(grid, "reference_grid.spacing", "spacing"), "reference_grid.spacing", 3, positive=True)
    size = f.get(grid, "reference_grid.size", "size")
    if not isinstance(size, list) or len(size) != 3:
        f.fail("reference_grid.size", "a list of 3 voxel counts", size)
    dims = [f.integer(v, f"reference_grid.size[{i}]", 1, MAX_GRID_VOXELS) for i, v in enumerate(size)]
    if math.prod(dims) > MAX_GRID_VOXELS:
        f.fail("reference_grid.size", f"at most {MAX_GRID_VOXELS} voxels in all", size)
    if "direction" in grid:
        f.vector(grid["direction"], "reference_grid.direction", 9)
        if abs(abs(np.linalg.det(np.asarray(grid["direction"], dtype=np.float64).reshape(3, 3))) - 1) > 1e-3:
            f.fail("reference_grid.direction", "a rotation matrix (|det| = 1)", grid["direction"])


def _validate_normalizer(f: _Fields, norm: dict[str, Any]) -> None:
    values = {
        k: f.number(f.get(norm, f"normalizer.{k}", k), f"normalizer.{k}")
        for k in ("clip_low", "clip_high", "mean")
    }
    f.number(f.get(norm, "normalizer.std", "std"), "normalizer.std", positive=True)
    if values["clip_low"] > values["clip_high"]:
        f.fail("normalizer.clip_high", f"at least clip_low ({values['clip_low']})", values["clip_high"])


def _validate_pca(f: _Fields, pca: Any, n_particles: int) -> None:
    if pca is None:
        return
    if not isinstance(pca, dict):
        f.fail("pca", "an object or null", pca)
    if "meta" in pca and not isinstance(pca["meta"], dict):
        f.fail("pca.meta", "an object", pca["meta"])
    for key in PCA_ARRAYS:
        if key in pca:
            f.array(pca[key], f"pca.{key}")
    mean = pca.get("mean")
    if mean is not None and np.asarray(mean, dtype=np.float64).size != 3 * n_particles:
        f.fail("pca.mean", f"{n_particles} x 3 coordinates (n_particles)", f"{np.asarray(mean).size} values")
    eig = pca.get("eigenvalues")
    if eig is not None and np.any(np.asarray(eig, dtype=np.float64) < 0):
        f.fail("pca.eigenvalues", "non-negative variances", "a negative value")
    std = pca.get("score_std")
    if std is not None and not np.all(np.asarray(std, dtype=np.float64) > 0):
        f.fail("pca.score_std", "positive standard deviations", "a zero or negative value")


def _optional_versioned(f: _Fields, obj: Any, field: str, supported: int) -> bool:
    """Whether the optional object ``field`` is present (None: absent, as in older bundles); when
    present it must be an object with a supported ``version``."""
    if obj is None:
        return False
    if not isinstance(obj, dict):
        f.fail(field, "an object or null", obj)
    _validate_version(f, obj, field, supported)
    return True


def _validate_version(f: _Fields, obj: dict[str, Any], field: str, supported: int) -> None:
    version = f.get(obj, f"{field}.version", "version")
    f.integer(version, f"{field}.version", 1, 1_000_000)
    if version > supported:
        raise BundleError(
            f"{f.where}: field '{field}.version' is {version}, newer than this software supports "
            f"({supported}); update DeepSSM to load this bundle"
        )


def _validate_uncertainty(f: _Fields, unc: Any) -> None:
    """``uncertainty`` (issue 13, optional: older bundles have none = no uncertainty)."""
    if not _optional_versioned(f, unc, "uncertainty", UNCERTAINTY_VERSION):
        return
    method = unc.get("method")
    if method not in UNCERTAINTY_METHODS:
        f.fail("uncertainty.method", f"one of {list(UNCERTAINTY_METHODS)}", method)
    if method == "none":
        return
    f.number(f.get(unc, "uncertainty.scale", "scale"), "uncertainty.scale", positive=True)
    if method == "mc-dropout":
        rate = f.number(f.get(unc, "uncertainty.dropout", "dropout"), "uncertainty.dropout", positive=True)
        if rate >= 1:
            f.fail("uncertainty.dropout", "a rate in (0, 1)", rate)
        f.integer(f.get(unc, "uncertainty.samples", "samples"), "uncertainty.samples", 2, 1000)
    if method == "ensemble":
        f.integer(f.get(unc, "uncertainty.members", "members"), "uncertainty.members", 2, 32)
    if method == "variance":
        _validate_variance_head(f, unc)


def variance_head_problems(head: Any) -> list[tuple[str, str, Any]]:
    """``(field, expected, found)`` for each problem of a variance head config (``uncertainty.head``,
    ``variance_head.VarianceHead.config``); also used by ``UncertaintySpec.validate``."""
    if not isinstance(head, dict):
        return [("head", "an object", head)]
    problems: list[tuple[str, str, Any]] = []
    unknown = sorted(set(head) - {"features", *VARIANCE_HEAD_LIMITS})
    if unknown:
        problems.append(("head", f"only the fields {['features', *VARIANCE_HEAD_LIMITS]}", unknown))
    if head.get("features") not in VARIANCE_FEATURES:
        problems.append(("head.features", f"one of {list(VARIANCE_FEATURES)}", head.get("features")))
    for key, high in VARIANCE_HEAD_LIMITS.items():
        v = head.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= high:
            problems.append((f"head.{key}", f"an integer in 1..{high}", v))
    return problems


def _validate_variance_head(f: _Fields, unc: dict[str, Any]) -> None:
    """``uncertainty.head`` of method "variance" (uncertainty version 2): the head's shape."""
    if unc["version"] < 2:
        f.fail("uncertainty.version", "2 or later for method 'variance'", unc["version"])
    f.get(unc, "uncertainty.head", "head")
    for field, expected, found in variance_head_problems(unc["head"])[:1]:
        f.fail(f"uncertainty.{field}", expected, found)


def _validate_ood(f: _Fields, cal: Any) -> None:
    """``ood`` calibration (issue 13, optional: older bundles have none = no OOD flag)."""
    if not _optional_versioned(f, cal, "ood", OOD_VERSION):
        return
    f.number(f.get(cal, "ood.threshold", "threshold"), "ood.threshold", positive=True)
    f.integer(f.get(cal, "ood.n_modes", "n_modes"), "ood.n_modes", 1, 3 * MAX_PARTICLES)
    comps = f.mapping(cal, "ood.components", "components")
    if not comps:
        f.fail("ood.components", "at least one component", comps)
    for name, ref in comps.items():
        where = f"ood.components.{name}"
        if name not in OOD_COMPONENTS:
            f.fail("ood.components", f"components among {list(OOD_COMPONENTS)}", name)
        if not isinstance(ref, dict):
            f.fail(where, "an object", ref)
        f.number(f.get(ref, f"{where}.median", "median"), f"{where}.median")
        f.number(f.get(ref, f"{where}.scale", "scale"), f"{where}.scale", positive=True)
        f.number(f.get(ref, f"{where}.p99", "p99"), f"{where}.p99")
    inten = f.mapping(cal, "ood.intensity", "intensity")
    f.vector(f.get(inten, "ood.intensity.mean", "mean"), "ood.intensity.mean", OOD_FEATURES)
    f.vector(f.get(inten, "ood.intensity.std", "std"), "ood.intensity.std", OOD_FEATURES, positive=True)
    # version 2: the calibration's own samples (validation values, the intensity reference's
    # leave-one-out distances), kept so the flags can be recomputed; optional, lists of numbers
    samples = [(f"ood.validation.{k}", v) for k, v in (cal.get("validation") or {}).items()]
    extra = cal.get("extra") or {}
    if not isinstance(extra, dict):
        f.fail("ood.extra", "an object", extra)
    ref = extra.get("reference") or {}
    if not isinstance(ref, dict):
        f.fail("ood.extra.reference", "an object", ref)
    for name, r in ref.items():
        if name not in OOD_COMPONENTS or not isinstance(r, dict):
            f.fail("ood.extra.reference", f"objects named by components among {list(OOD_COMPONENTS)}", name)
        samples.append((f"ood.extra.reference.{name}.values", r.get("values")))
    for where, values in samples:
        if not isinstance(values, list) or not values:
            f.fail(where, "a non-empty list of numbers", values)
        f.vector(values, where, len(values))


WEIGHTS_STORAGE = ("float32", "float16")


def _validate_weights(f: _Fields, weights: dict[str, Any], schema_version: Any) -> None:
    """The optional ``weights`` section (schema 2): how ``weights.pt`` stores its tensors."""
    if not weights:
        return
    storage = weights.get("storage")
    if storage not in WEIGHTS_STORAGE:
        f.fail("weights.storage", f"one of {list(WEIGHTS_STORAGE)}", storage)
    if storage == "float16" and not (isinstance(schema_version, int) and schema_version >= 2):
        f.fail("schema_version", "2 or later for float16 weights", schema_version)
    for key in ("probe_max_change_mm", "probe_mean_change_mm", "tolerance_mm"):
        if key in weights and f.number(weights[key], f"weights.{key}") < 0:
            f.fail(f"weights.{key}", "a distance ≥ 0 mm", weights[key])
