"""Image grids and coordinate frames (numpy only; importable without SimpleITK).

A :class:`Grid` describes a 3D image the way ITK/SimpleITK does: ``origin`` (mm, LPS),
``spacing`` (mm), ``direction`` (3x3, columns are the i/j/k axes in LPS), ``size`` (voxels),
all in (x, y, z) = (i, j, k) order. The voxel array of such an image is ``(Z, Y, X)``.

    physical = origin + direction @ (spacing * index_xyz)

Slicer's RAS differs from LPS by ``diag(-1, -1, 1)``; convert only at the Slicer boundary with
:func:`lps_to_ras` / :func:`ras_to_lps`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import InputError, format_bytes

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class Grid:
    """Geometry of a 3D image. All vectors in (x, y, z) order; mm; LPS."""

    origin: tuple[float, float, float]
    spacing: tuple[float, float, float]
    size: tuple[int, int, int]
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    def __post_init__(self) -> None:
        if len(self.origin) != 3 or len(self.spacing) != 3 or len(self.size) != 3 or len(self.direction) != 9:
            raise InputError(
                "Grid needs 3 origin, 3 spacing, 3 size and 9 direction values; found "
                f"{len(self.origin)}, {len(self.spacing)}, {len(self.size)}, {len(self.direction)}"
            )
        if min(self.spacing) <= 0:
            raise InputError(f"Grid spacing must be positive, found {self.spacing}")
        if min(self.size) < 1:
            raise InputError(f"Grid size must be at least 1 voxel per axis, found {self.size}")

    # -- constructors -------------------------------------------------------------------------
    @classmethod
    def from_sitk(cls, image: Any) -> Grid:
        """The grid of a SimpleITK image."""
        return cls(
            tuple(float(v) for v in image.GetOrigin()),
            tuple(float(v) for v in image.GetSpacing()),
            tuple(int(v) for v in image.GetSize()),
            tuple(float(v) for v in image.GetDirection()),
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Grid:
        try:
            return cls(
                tuple(float(v) for v in d["origin"]),
                tuple(float(v) for v in d["spacing"]),
                tuple(int(v) for v in d["size"]),
                tuple(float(v) for v in d.get("direction", np.eye(3).ravel())),
            )
        except KeyError as e:
            raise InputError(f"grid description lacks the field {e.args[0]!r}") from None

    @classmethod
    def bounding(
        cls, points: np.ndarray, spacing: float | tuple[float, float, float], margin_mm: float
    ) -> Grid:
        """An axis-aligned grid covering ``points`` ((..., 3) mm, LPS) plus ``margin_mm`` on each side."""
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        sp = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,))
        lo = pts.min(axis=0) - margin_mm
        hi = pts.max(axis=0) + margin_mm
        size = np.ceil((hi - lo) / sp).astype(int) + 1
        return cls(tuple(lo.tolist()), tuple(sp.tolist()), tuple(int(s) for s in size))

    # -- properties ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "origin": list(self.origin),
            "spacing": list(self.spacing),
            "size": list(self.size),
            "direction": list(self.direction),
        }

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        """The numpy/torch array shape of an image on this grid."""
        return (self.size[2], self.size[1], self.size[0])

    def index_to_physical_matrix(self) -> np.ndarray:
        """4x4 affine mapping homogeneous (i, j, k, 1) to LPS mm."""
        m = np.eye(4)
        m[:3, :3] = self.direction_matrix @ np.diag(self.spacing)
        m[:3, 3] = self.origin
        return m

    def physical_to_index(self, points: np.ndarray) -> np.ndarray:
        """Continuous (i, j, k) = (x, y, z) voxel indices of LPS points ``(..., 3)``."""
        pts = np.asarray(points, dtype=np.float64)
        a = self.direction_matrix @ np.diag(self.spacing)
        return np.linalg.solve(a, (pts - np.asarray(self.origin)).reshape(-1, 3).T).T.reshape(pts.shape)

    def index_to_physical(self, index: np.ndarray) -> np.ndarray:
        """LPS mm of continuous (i, j, k) indices ``(..., 3)``."""
        idx = np.asarray(index, dtype=np.float64)
        a = self.direction_matrix @ np.diag(self.spacing)
        return (idx.reshape(-1, 3) @ a.T + np.asarray(self.origin)).reshape(idx.shape)

    def physical_coordinates(self) -> np.ndarray:
        """LPS mm of every voxel centre, ``(Z, Y, X, 3)`` float64."""
        k, j, i = np.meshgrid(*(np.arange(n) for n in self.shape_zyx), indexing="ij")
        return self.index_to_physical(np.stack([i, j, k], axis=-1))

    def contains(self, points: np.ndarray, margin_voxels: float = 0.0) -> np.ndarray:
        """Whether each LPS point ``(..., 3)`` lies inside the grid (voxel-centre extent)."""
        idx = self.physical_to_index(points)
        hi = np.asarray(self.size) - 1 + margin_voxels
        return np.all((idx >= -margin_voxels) & (idx <= hi), axis=-1)


def lps_to_ras(points: np.ndarray) -> np.ndarray:
    """Flip x and y: LPS mm -> RAS mm (the same operation both ways)."""
    out = np.array(points, dtype=np.float64, copy=True)
    out[..., :2] *= -1.0
    return out


ras_to_lps = lps_to_ras


# 384^3 voxels: 216 MiB per float32 volume; the paper's grids are ~120^3 and the network's memory
# grows with the voxel count, so a larger grid is almost always a spacing or frame mistake. The
# per-axis limit catches a frame mix-up that stays under the total (subjects metres apart along one
# axis, as ShapeWorks local particles without their transforms give).
MAX_GRID_VOXELS = 384**3
MAX_GRID_VOXELS_PER_AXIS = 512


def grid_size_problem(
    particles: np.ndarray,
    spacing: Any,
    margin_mm: float = 10.0,
    ids: Any = None,
    spacing_source: str = "--spacing",
    max_voxels: int = MAX_GRID_VOXELS,
    max_per_axis: int = MAX_GRID_VOXELS_PER_AXIS,
) -> str | None:
    """Why the bounding grid of ``particles`` ``(N, M, 3)`` (mm, training frame) at ``spacing`` mm
    (scalar or x,y,z) plus ``margin_mm`` is too large to train on, or None. Sizes are computed in
    float so a 1e30 mm coordinate cannot overflow; the message names the subject farthest from the
    cohort's median point (``ids`` in the order of ``particles``) and where the spacing came from."""
    pts = np.asarray(particles, dtype=np.float64)
    sp = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,))
    flat = pts.reshape(-1, 3)
    lo, hi = flat.min(axis=0) - margin_mm, flat.max(axis=0) + margin_mm
    with np.errstate(over="ignore", invalid="ignore"):
        size = np.ceil((hi - lo) / sp) + 1
        voxels = float(np.prod(size))
    if np.all(np.isfinite(size)) and voxels <= max_voxels and size.max() <= max_per_axis:
        return None
    per_subject = pts.reshape(pts.shape[0], -1, 3) if pts.ndim == 3 else flat[None]
    centre = np.median(flat, axis=0)
    far = np.abs(per_subject - centre).max(axis=(1, 2))
    worst = int(np.argmax(far))
    who = f"subject {ids[worst]!r}" if ids is not None and worst < len(ids) else f"subject #{worst + 1}"
    shown = "x".join(f"{v:.3g}" for v in size.tolist())
    per_image = format_bytes(voxels * 4) if np.isfinite(voxels) else "an unbounded size"
    return (
        f"reference grid too large: the training particles span {', '.join(f'{e:.4g}' for e in (hi - lo))} mm "
        f"(farthest out: {who}, {far[worst]:.4g} mm from the cohort's median point) and the spacing is "
        f"{', '.join(f'{v:.4g}' for v in sp.tolist())} mm (from {spacing_source}): {shown} voxels, "
        f"{per_image} per image, over the limit of {max_voxels} voxels in all or {max_per_axis} per axis. "
        "Are the subjects in different frames? For a ShapeWorks project train in its world frame "
        "(--frame world; or --particles world with already aligned images). Otherwise check that "
        "subject's particle coordinates (mm), or choose a coarser --spacing (or --downsample 2-4)"
    )


# -- the automatic default spacing (issue 16) --------------------------------------------------------
CPU_VOXEL_BUDGET = 48**3  # the automatic grid's budget on a CPU (BENCHMARKS.md, grid budget)
SPACING_STEP_MM = 0.05  # automatic spacings are rounded up to a multiple of this


def _bounding_size(extent: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    return np.ceil(extent / spacing).astype(np.int64) + 1  # as Grid.bounding


def _cube(voxels: int) -> str:
    n = round(voxels ** (1 / 3))
    return f"{n}³" if n**3 == voxels else f"{voxels} voxels"


def auto_grid_spacing(
    particles: np.ndarray, image_spacing: Sequence[float], margin_mm: float, max_voxels: int
) -> tuple[tuple[float, float, float], str]:
    """``(spacing x, y, z mm, reason)``: the images' own spacing when the particles' bounding box
    plus ``margin_mm`` fits ``max_voxels`` at it; otherwise the finest isotropic spacing (a multiple
    of 0.05 mm, never finer than the images' on any axis) whose grid fits. Callers check the grid at
    the images' spacing with :func:`grid_size_problem` first: coarsening must not hide a frame mix-up."""
    pts = np.asarray(particles, dtype=np.float64).reshape(-1, 3)
    img = np.broadcast_to(np.asarray(image_spacing, dtype=np.float64), (3,))
    extent = pts.max(axis=0) - pts.min(axis=0) + 2.0 * margin_mm
    box = "×".join(f"{e:.0f}" for e in extent)
    size_img = _bounding_size(extent, img)
    shown_img = "×".join(str(int(v)) for v in size_img)
    img_text = ", ".join(f"{v:g}" for v in img) if len(set(img.tolist())) > 1 else f"{img[0]:g}"
    if int(np.prod(size_img)) <= max_voxels:
        return tuple(float(v) for v in img), (
            f"the images' spacing {img_text} mm: a {box} mm anatomy (particles' box + {margin_mm:g} mm "
            f"margin) gives a {shown_img} grid, within the {_cube(max_voxels)} voxel budget"
        )
    step = SPACING_STEP_MM
    s = max(float(np.cbrt(np.prod(extent) / max_voxels)), float(img.min()))
    s = math.ceil(s / step - 1e-9) * step
    while int(np.prod(_bounding_size(extent, np.maximum(s, img)))) > max_voxels:
        s += step
    sp = np.maximum(round(s, 6), img)
    shown = "×".join(str(int(v)) for v in _bounding_size(extent, sp))
    sp_text = ", ".join(f"{v:g}" for v in sp) if len(set(sp.tolist())) > 1 else f"{sp[0]:g}"
    return tuple(float(v) for v in sp), (
        f"spacing {sp_text} mm chosen from a {box} mm anatomy (particles' box + {margin_mm:g} mm margin) "
        f"for the {_cube(max_voxels)} voxel budget: grid {shown}; the images' {img_text} mm "
        f"would give {shown_img}; set --spacing to choose"
    )
