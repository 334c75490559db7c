"""Bringing images onto the model's reference grid and normalising intensities.

``IntensityNormalizer`` is numpy-only (it travels in the bundle and runs on the GPU machine);
:func:`resample_to_grid` needs SimpleITK and is imported lazily.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .errors import InputError
from .geometry import Grid


@dataclass(frozen=True)
class IntensityNormalizer:
    """Clip to training-set percentiles, then z-score with training-set statistics.

    Fitted once on the TRAINING images and reused unchanged for validation, test and inference
    (the reference implementation recomputes statistics per set; that is a bug we do not copy).
    """

    clip_low: float
    clip_high: float
    mean: float
    std: float

    @classmethod
    def fit(cls, images: np.ndarray, percentiles: tuple[float, float] = (0.5, 99.5)) -> IntensityNormalizer:
        """Fit on training images ``(N, Z, Y, X)`` (or any array of their voxels)."""
        arr = np.asarray(images, dtype=np.float32)
        if not np.all(np.isfinite(arr)):
            raise InputError("training images contain NaN or Inf voxels")
        sample = arr.ravel()
        if sample.size > 4_000_000:  # percentiles of a strided subsample are indistinguishable
            sample = sample[:: sample.size // 4_000_000]
        lo, hi = (float(v) for v in np.percentile(sample, percentiles))
        clipped = np.clip(sample, lo, hi)
        std = float(clipped.std())
        if not std > 0:
            raise InputError("training images have constant intensity; cannot normalise")
        return cls(lo, hi, float(clipped.mean()), std)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """Normalised float32 copy of ``image`` (any shape)."""
        out = np.clip(np.asarray(image, dtype=np.float32), self.clip_low, self.clip_high)
        out -= np.float32(self.mean)
        out /= np.float32(self.std)
        return out

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> IntensityNormalizer:
        try:
            return cls(float(d["clip_low"]), float(d["clip_high"]), float(d["mean"]), float(d["std"]))
        except KeyError as e:
            raise InputError(f"normalisation description lacks the field {e.args[0]!r}") from None


def check_image_values(array: np.ndarray, name: str) -> None:
    """Refuse NaN/Inf voxels and constant images with a message naming the image."""
    if not np.all(np.isfinite(array)):
        raise InputError(f"{name}: the image contains NaN or Inf voxels")
    if float(array.max()) == float(array.min()):
        raise InputError(f"{name}: the image is constant (every voxel is {float(array.min())})")


def resample_to_grid(
    image: Any,
    grid: Grid,
    transform: Any | None = None,
    interpolator: str = "linear",
    default_value: float | None = None,
) -> np.ndarray:
    """Sample a SimpleITK ``image`` on ``grid``; returns ``(Z, Y, X)`` float32.

    ``transform`` (a SimpleITK transform) maps grid points to input-image points, as in ITK's
    ResampleImageFilter. ``default_value`` fills voxels outside the input (defaults to the input's
    minimum, i.e. background). ``interpolator`` is "linear" or "nearest".
    """
    import SimpleITK as sitk

    interp = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor}[interpolator]
    img = sitk.Cast(image, sitk.sitkFloat32)
    if default_value is None:
        default_value = float(sitk.GetArrayViewFromImage(img).min())
    ref = sitk.Image([int(s) for s in grid.size], sitk.sitkFloat32)
    ref.SetOrigin(grid.origin)
    ref.SetSpacing(grid.spacing)
    ref.SetDirection(grid.direction)
    out = sitk.Resample(
        img,
        ref,
        transform if transform is not None else sitk.Transform(),
        interp,
        default_value,
        sitk.sitkFloat32,
    )
    return sitk.GetArrayFromImage(out)


def image_from_array(array: np.ndarray, grid: Grid) -> Any:
    """A SimpleITK image holding ``array`` ``(Z, Y, X)`` with ``grid``'s geometry."""
    import SimpleITK as sitk

    if tuple(array.shape) != grid.shape_zyx:
        raise InputError(f"array shape {array.shape} does not match the grid's {grid.shape_zyx} (Z, Y, X)")
    img = sitk.GetImageFromArray(np.ascontiguousarray(array))
    img.SetOrigin(grid.origin)
    img.SetSpacing(grid.spacing)
    img.SetDirection(grid.direction)
    return img
