"""Image corruptions: Gaussian noise, Gaussian blur and a cut field of view (issue 13). numpy/scipy.

One implementation for the two users: the ``variance`` uncertainty head is fitted on corrupted copies
of the training grid arrays (``variance_head.fit_variance_head``), and ``benchmarks/uncertainty_study.py``
corrupts its held-out images with the same function (through a SimpleITK wrapper).

* ``noise``: additive Gaussian noise of SD ``level`` × the array's intensity SD;
* ``blur``: Gaussian smoothing of SD ``level`` mm (per axis ``level / spacing`` voxels, edges
  replicated);
* ``fov``: the last ``level`` fraction of the x axis (the last array axis) set to the array's minimum
  (the background), as when the scan's field of view cuts the organ.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ..errors import InputError

KINDS = ("noise", "blur", "fov")
#: upper ends of the random levels :func:`random_corruption` draws (uniform in [5 %, 100 %] of these):
#: noise 1.2 × SD, blur 7 mm, 55 % of the field of view cut
RANDOM_LEVELS = {"noise": 1.2, "blur": 7.0, "fov": 0.55}
RANDOM_LOW = 0.05


def corrupt_array(
    arr: np.ndarray, kind: str, level: float, spacing_zyx: Sequence[float], rng: np.random.Generator
) -> np.ndarray:
    """A corrupted float32 copy of the image array ``arr`` ``(Z, Y, X)`` (see the module docstring);
    ``spacing_zyx`` mm per voxel (blur), ``rng`` draws the noise."""
    a = np.array(arr, dtype=np.float32, copy=True)
    if a.ndim != 3:
        raise InputError(f"corrupt_array: expected a (Z, Y, X) array, found shape {a.shape}")
    if not (np.isfinite(level) and level >= 0):
        raise InputError(f"corrupt_array: level must be a finite number ≥ 0, found {level!r}")
    if kind == "noise":
        return a + rng.normal(0.0, float(level) * float(a.std()), a.shape).astype(np.float32)
    if kind == "blur":
        from scipy import ndimage

        sigma = [float(level) / float(s) for s in spacing_zyx]
        return ndimage.gaussian_filter(a, sigma=sigma, mode="nearest").astype(np.float32)
    if kind == "fov":
        if level > 1:
            raise InputError(f"corrupt_array: a field-of-view cut is a fraction in [0, 1], found {level}")
        nx = a.shape[2]
        cut = round(float(level) * nx)
        if cut > 0:
            a[:, :, nx - cut :] = float(a.min())
        return a
    raise InputError(f"corrupt_array: kind must be one of {KINDS}, found {kind!r}")


def random_corruption(
    arr: np.ndarray,
    spacing_zyx: Sequence[float],
    rng: np.random.Generator,
    levels: Mapping[str, float] = RANDOM_LEVELS,
) -> tuple[np.ndarray, str, float]:
    """``(corrupted copy, kind, level)``: a kind drawn uniformly from ``levels`` and a level uniform
    in [5 %, 100 %] of its upper end."""
    kinds = list(levels)
    kind = kinds[int(rng.integers(len(kinds)))]
    level = float(rng.uniform(RANDOM_LOW, 1.0) * levels[kind])
    return corrupt_array(arr, kind, level, spacing_zyx, rng), kind, level
