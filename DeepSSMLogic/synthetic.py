"""Synthetic cohorts with exact ground-truth correspondences (for demos, tests and benchmarks).

Three families mirror the paper's datasets (Bhalodia et al., DeepSSM):

- ``cranium`` (metopic craniosynostosis, CT-like): smooth global variation (size and a few low-order
  modes) plus a severity ``s >= 0`` that raises a keel along the anterior midline, narrows the frontal
  region and expands the back of the skull (trigonocephaly). Groups ``normal`` (s = 0) / ``metopic``.
- ``femur`` (cam-FAI, CT-like): an almost constant proximal femur (head, neck, trochanter, shaft) whose
  variance sits in one small region: a cam bump of variable height on the antero-superior head-neck
  junction in ~25% of subjects (group ``cam``), plus a variable distal cut plane (shaft length).
- ``atrium`` (left atrium / AF recurrence, LGE-MR-like): body size and elongation, pulmonary vein stubs of
  variable length, and an appendage whose orientation follows a bimodal distribution, so its points move
  along arcs; the outcome (``recurrence`` / ``no_recurrence``) is drawn from the body's enlargement and
  roundness (``atrium_recurrence_probability``), so a PDM of the shapes predicts it.

How correspondence is made exact: every subject is the image of ONE fixed parametric surface (an
icosphere, level 5 by default: 10242 vertices) under the subject's smooth map ``u -> c + r(u) psi(u)``
(a radial graph, so the mesh is always closed and never self-intersects). The particles are a fixed
subset of the icosphere vertices (farthest-point sampled on the family's template), so they lie exactly
on the dense mesh, and particle ``j`` is the same parametric point on every subject. The segmentation is
voxelised from that mesh, and the image is rendered from the segmentation. Shapes are built in a
canonical frame (mm at nominal anatomical size), scaled uniformly so the family template fills a fixed
fraction of the field of view, optionally posed (small rigid jitter) and written in the image's LPS
physical space.

Randomness comes only from ``numpy.random.Generator`` objects seeded explicitly: the same seed gives
byte-identical files.
"""

from __future__ import annotations

import csv
import functools
import io as _io
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError
from .fileutil import (
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    check_replace_target,
    is_synthetic_cohort,
)
from .geometry import Grid
from .progress import CancelToken, ProgressCallback, ProgressEvent, null_progress

FAMILIES = ("cranium", "femur", "atrium")
GROUPS = {
    "cranium": ("normal", "metopic"),
    "femur": ("normal", "cam"),
    "atrium": ("no_recurrence", "recurrence"),
}
METADATA_COLUMNS = {
    "cranium": ("severity",),
    "femur": ("cam_height", "shaft_length"),
    "atrium": ("sphericity", "appendage_angle", "cluster"),
}
MIN_IMAGE_SIZE = 16
MAX_PARTICLES = 10240
# The family template's bounding box fills this fraction of the field of view (per axis, the tightest
# axis decides), leaving room for the population's variation, pose jitter and a blur margin.
_FILL = 0.62
_BASE_LEVEL = 5


@dataclass
class SyntheticSubject:
    """One synthetic subject, everything in the image's physical space (mm, LPS).

    ``image`` ``(Z, Y, X)`` float32 (integer-valued, CT/MR-like units); ``segmentation`` ``(Z, Y, X)``
    uint8 (1 inside); ``grid`` their geometry; ``particles`` ``(M, 3)`` float64 = ``vertices[particle_indices]``;
    ``vertices`` ``(V, 3)`` float64 and ``triangles`` ``(T, 3)`` int64 (closed, outward-oriented) the dense
    ground-truth mesh; ``metadata`` the family's ground-truth labels (mm where lengths); ``params`` the raw
    shape parameters (canonical units); ``pose`` the 4x4 map from the un-posed to the posed shape.
    """

    id: str
    family: str
    image: np.ndarray
    segmentation: np.ndarray
    grid: Grid
    particles: np.ndarray
    vertices: np.ndarray
    triangles: np.ndarray
    particle_indices: np.ndarray
    group: str
    metadata: dict[str, float] = field(default_factory=dict)
    params: dict[str, float] = field(default_factory=dict)
    pose: np.ndarray = field(default_factory=lambda: np.eye(4))


# -- small helpers --------------------------------------------------------------------------------
def _smoothstep(x: np.ndarray) -> np.ndarray:
    t = np.clip(x, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _unit(v: Sequence[float]) -> np.ndarray:
    a = np.asarray(v, dtype=np.float64)
    return a / np.linalg.norm(a)


def _angle(d: np.ndarray, axis: np.ndarray) -> np.ndarray:
    """Angle (rad) between unit vectors ``d`` ``(V, 3)`` and a unit ``axis`` ``(3,)``."""
    return np.arccos(np.clip(d @ axis, -1.0, 1.0))


def _rotation(axis: np.ndarray, angle: np.ndarray | float) -> np.ndarray:
    """Rodrigues rotation matrices ``(..., 3, 3)`` about a unit ``axis`` by ``angle`` (rad)."""
    a = np.asarray(angle, dtype=np.float64)[..., None, None]
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(a) * k + (1.0 - np.cos(a)) * (k @ k)


def _smooth_max(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Polynomial smooth maximum (C1; exceeds max(a, b) by at most k/4)."""
    h = np.clip(k - np.abs(a - b), 0.0, None) / k
    return np.maximum(a, b) + h * h * k * 0.25


def _radial_bisect(inside: Callable[[np.ndarray], np.ndarray], dirs: np.ndarray, t_max: float) -> np.ndarray:
    """Distance from the origin to the boundary of a convex set containing the origin, along ``dirs``.

    ``inside(points (V, 3)) -> bool (V,)``. Convexity makes the crossing unique, so the result is a
    smooth function of the set's parameters (needed for smooth correspondences).
    """
    lo = np.zeros(len(dirs))
    hi = np.full(len(dirs), float(t_max))
    for _ in range(34):  # t_max / 2**34 is far below 1e-6 mm
        mid = 0.5 * (lo + hi)
        ins = inside(dirs * mid[:, None])
        lo = np.where(ins, mid, lo)
        hi = np.where(ins, hi, mid)
    return 0.5 * (lo + hi)


def _capsule_inside(a: np.ndarray, b: np.ndarray, radius: float) -> Callable[[np.ndarray], np.ndarray]:
    ab = b - a
    l2 = float(ab @ ab)

    def inside(p: np.ndarray) -> np.ndarray:
        t = np.clip(((p - a) @ ab) / l2, 0.0, 1.0)
        q = a + t[:, None] * ab
        return np.einsum("ij,ij->i", p - q, p - q) <= radius * radius

    return inside


def _round_cone_inside(
    a: np.ndarray, b: np.ndarray, ra: float, rb: float
) -> Callable[[np.ndarray], np.ndarray]:
    """Inside test of the convex hull of two spheres (centre a radius ra, centre b radius rb)."""
    ba = b - a
    l2 = float(ba @ ba)
    rr = ra - rb
    a2 = l2 - rr * rr

    def inside(p: np.ndarray) -> np.ndarray:
        # signed distance of a "round cone" (I. Quilez), evaluated branch-wise
        pa = p - a
        y = pa @ ba
        z = y - l2
        w = pa * l2 - y[:, None] * ba
        x2 = np.einsum("ij,ij->i", w, w)
        y2 = y * y * l2
        z2 = z * z * l2
        k = np.sign(rr) * rr * rr * x2
        d_b = np.sqrt(x2 + z2) / l2 - rb
        d_a = np.sqrt(x2 + y2) / l2 - ra
        d_side = (np.sqrt(x2 * a2 / l2) + y * rr) / l2 - ra
        d = np.where(np.sign(z) * a2 * z2 > k, d_b, np.where(np.sign(y) * a2 * y2 < k, d_a, d_side))
        return d <= 0.0

    return inside


# -- the parametric sphere ------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _icosphere(level: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit icosphere: vertices ``(V, 3)`` and outward triangles ``(T, 3)``; V = 10 * 4**level + 2."""
    p = (1.0 + 5.0**0.5) / 2.0
    verts = np.array(
        [
            [-1, p, 0], [1, p, 0], [-1, -p, 0], [1, -p, 0],
            [0, -1, p], [0, 1, p], [0, -1, -p], [0, 1, -p],
            [p, 0, -1], [p, 0, 1], [-p, 0, -1], [-p, 0, 1],
        ],
        dtype=np.float64,
    )  # fmt: skip
    faces = np.array(
        [
            [0, 11, 5], [0, 5, 1], [0, 1, 7], [0, 7, 10], [0, 10, 11],
            [1, 5, 9], [5, 11, 4], [11, 10, 2], [10, 7, 6], [7, 1, 8],
            [3, 9, 4], [3, 4, 2], [3, 2, 6], [3, 6, 8], [3, 8, 9],
            [4, 9, 5], [2, 4, 11], [6, 2, 10], [8, 6, 7], [9, 8, 1],
        ],
        dtype=np.int64,
    )  # fmt: skip
    verts /= np.linalg.norm(verts, axis=1, keepdims=True)
    for _ in range(level):
        edges = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
        key = np.sort(edges, axis=1)
        uniq, inverse = np.unique(key, axis=0, return_inverse=True)
        mids = verts[uniq[:, 0]] + verts[uniq[:, 1]]
        mids /= np.linalg.norm(mids, axis=1, keepdims=True)
        mid_index = len(verts) + inverse.reshape(3, -1)  # (3, T): midpoints of edges 01, 12, 20
        verts = np.concatenate([verts, mids])
        a, b, c = faces.T
        m01, m12, m20 = mid_index
        faces = np.concatenate(
            [
                np.stack([a, m01, m20], 1),
                np.stack([b, m12, m01], 1),
                np.stack([c, m20, m12], 1),
                np.stack([m01, m12, m20], 1),
            ]
        )
    # outward orientation: the normal of each face points away from the centre
    v0, v1, v2 = verts[faces[:, 0]], verts[faces[:, 1]], verts[faces[:, 2]]
    flip = np.einsum("ij,ij->i", np.cross(v1 - v0, v2 - v0), v0 + v1 + v2) < 0
    faces[flip] = faces[flip][:, [0, 2, 1]]
    verts.setflags(write=False)
    faces.setflags(write=False)
    return verts, faces


def _level_for(n_particles: int) -> int:
    level = _BASE_LEVEL
    while 10 * 4**level + 2 < 4 * n_particles:
        level += 1
    return level


def _farthest_points(points: np.ndarray, m: int) -> np.ndarray:
    """Indices of ``m`` farthest-point samples of ``points`` ``(V, 3)``, starting from the +z-most one."""
    idx = np.empty(m, dtype=np.int64)
    idx[0] = int(np.argmax(points[:, 2]))
    d2 = np.einsum("ij,ij->i", points - points[idx[0]], points - points[idx[0]])
    for i in range(1, m):
        idx[i] = int(np.argmax(d2))
        diff = points - points[idx[i]]
        d2 = np.minimum(d2, np.einsum("ij,ij->i", diff, diff))
    return idx


# -- families: parameters and canonical surfaces --------------------------------------------------
# Canonical frames are LPS-oriented (x = patient left, y = posterior, z = superior), in mm at a
# nominal anatomical size; ``_canonical_surface`` returns the subject's surface points for the
# parametric directions ``u`` (unit vectors).

_CRANIUM_AXES = np.array([68.0, 84.0, 60.0])  # half-widths: left-right, antero-posterior, vertical
_CRANIUM_MODE_SD = np.array([0.03, 0.025, 0.012, 0.02, 0.012, 0.03, 0.025, 0.025])

_FEMUR_R = 23.0  # head radius
_FEMUR_NECK = _unit(
    [
        math.cos(math.radians(40)) * math.cos(math.radians(15)),
        -math.cos(math.radians(40)) * math.sin(math.radians(15)),
        math.sin(math.radians(40)),
    ]
)  # neck-shaft angle 130 deg, anteversion 15 deg (right femur: medial = +x)
_FEMUR_HEAD = 38.0 * _FEMUR_NECK
_FEMUR_WAIST_ANGLE = math.radians(34.0)
_FEMUR_ANTEROSUP = _unit(
    np.array([0.0, -1.0, 1.0]) - (np.array([0.0, -1.0, 1.0]) @ _FEMUR_NECK) * _FEMUR_NECK
)
_FEMUR_CAM_DIR = _unit(
    math.cos(_FEMUR_WAIST_ANGLE) * _FEMUR_NECK + math.sin(_FEMUR_WAIST_ANGLE) * _FEMUR_ANTEROSUP
)
_FEMUR_CAM_WIDTH = math.radians(11.0)

_ATRIUM_AXES = np.array([25.0, 21.0, 19.0])
_ATRIUM_APPENDAGE = _unit([0.55, -0.75, 0.35])  # antero-superior-left
_ATRIUM_SWING_AXIS = _unit(np.cross(_ATRIUM_APPENDAGE, [0.0, 0.0, 1.0]))
_ATRIUM_VEINS = np.array([_unit([sx * 0.55, 0.7, sz * 0.45]) for sx in (-1, 1) for sz in (-1, 1)])
_ATRIUM_CLUSTER_ANGLE = math.radians(32.0)
_ATRIUM_MAX_ANGLE = math.radians(42.0)
_ATRIUM_PLATEAU = math.radians(25.0)
# AF recurrence: logit = (z_size + 0.5 z_round) / 0.35, z_size = (size - 1) / 0.06 and z_round =
# (0.2 - elongation) / 0.115 (the body's enlargement and roundness, standardised by their prior sd).
# Size is the PDM's second mode, so the ground-truth PDM predicts the outcome (held-out AUC ~0.88
# on 60-subject cohorts, 0.86 over 5 seeds); the earlier rule (mesh sphericity, scale 0.01) classified at chance.
_ATRIUM_OUTCOME_WEIGHTS = (1.0, 0.5)
_ATRIUM_OUTCOME_SCALE = 0.35
_ATRIUM_RAMP = math.radians(80.0)  # |angle| * max|grad w| = 0.73 * 1.5 / 1.40 < 1: psi stays a diffeomorphism


def template_params(family: str) -> dict[str, float]:
    """The family's mean (template) shape parameters."""
    _check_family(family)
    if family == "cranium":
        p = {"size": 1.0, "severity": 0.0}
        p.update({f"mode{k}": 0.0 for k in range(len(_CRANIUM_MODE_SD))})
        return p
    if family == "femur":
        return {"size": 1.0, "cam_height": 0.0, "shaft_length": 70.0}
    return {
        "size": 1.0,
        "elongation": 0.2,
        "appendage_angle": 0.0,
        "appendage_length": 15.0,
        **{f"vein{k}": 9.0 for k in range(len(_ATRIUM_VEINS))},
    }


def sample_params(family: str, rng: np.random.Generator, group: str | None = None) -> dict[str, float]:
    """Draw one subject's shape parameters (canonical units: mm at nominal size, radians).

    ``group`` forces the diagnostic group where the family draws it from the parameters' prior
    (cranium, femur); for ``atrium`` the group is an outcome of the shape and ``group`` is ignored.
    """
    _check_family(family)
    groups = GROUPS[family]
    if group is not None and group not in groups:
        raise InputError(f"group for family {family!r} must be one of {groups}, found {group!r}")
    if family == "cranium":
        if group is None:
            group = groups[1] if rng.random() < 0.45 else groups[0]
        p = {"size": float(np.clip(1.0 + 0.05 * rng.standard_normal(), 0.88, 1.12))}
        modes = np.clip(rng.standard_normal(len(_CRANIUM_MODE_SD)), -2.5, 2.5) * _CRANIUM_MODE_SD
        p.update({f"mode{k}": float(v) for k, v in enumerate(modes)})
        p["severity"] = float(rng.uniform(0.25, 1.0)) if group == "metopic" else 0.0
        return p
    if family == "femur":
        if group is None:
            group = groups[1] if rng.random() < 0.25 else groups[0]
        return {
            "size": float(np.clip(1.0 + 0.01 * rng.standard_normal(), 0.97, 1.03)),
            "cam_height": float(rng.uniform(3.0, 7.0)) if group == "cam" else 0.0,
            "shaft_length": float(rng.uniform(55.0, 85.0)),
        }
    cluster = int(rng.random() < 0.5)
    angle = (1 if cluster else -1) * _ATRIUM_CLUSTER_ANGLE + math.radians(6.0) * rng.standard_normal()
    return {
        "size": float(np.clip(1.0 + 0.06 * rng.standard_normal(), 0.85, 1.15)),
        "elongation": float(rng.uniform(0.0, 0.4)),
        "appendage_angle": float(np.clip(angle, -_ATRIUM_MAX_ANGLE, _ATRIUM_MAX_ANGLE)),
        "appendage_length": float(15.0 * np.clip(1.0 + 0.1 * rng.standard_normal(), 0.75, 1.25)),
        **{f"vein{k}": float(rng.uniform(6.0, 12.0)) for k in range(len(_ATRIUM_VEINS))},
    }


def _cranium_surface(u: np.ndarray, p: dict[str, float]) -> np.ndarray:
    dx, dy, dz = u.T
    r = 1.0 / np.sqrt(((u / _CRANIUM_AXES) ** 2).sum(axis=1))
    r *= 1.0 - 0.12 * _smoothstep((-dz - 0.35) / 0.5)  # flatter skull base
    # Shape modes only: no degree-1 terms (dy, dz), which to first order just translate the skull,
    # i.e. pose that neither Procrustes nor image registration can tell apart from shape.
    basis = np.stack(
        [
            dy * (5 * dz * dz - 1),
            3 * dx * dy * dz,
            dx * dy,
            dy * dz,
            dx * dz,
            dx * dx - dy * dy,
            3 * dz * dz - 1,
            dx * dx - dz * dz,
        ],
        axis=1,
    )
    coeffs = np.array([p[f"mode{k}"] for k in range(len(_CRANIUM_MODE_SD))])
    r *= 1.0 + basis @ coeffs
    s = p["severity"]
    frontal = _smoothstep((-dy - 0.1) / 0.6)
    # trigonocephaly: a midline keel ~13 deg wide, bitemporal narrowing, compensatory posterior growth
    keel = np.exp(-((dx / 0.22) ** 2)) * frontal * _smoothstep((dz + 0.25) / 0.5)
    lateral = np.clip(dx * dx / 0.45, 0.0, 1.0)
    posterior = _smoothstep((dy + 0.1) / 0.8) * (1.0 - 0.5 * dz * dz)
    r *= 1.0 + s * (0.12 * keel - 0.20 * frontal * lateral + 0.07 * posterior)
    return u * (p["size"] * r)[:, None]


@functools.lru_cache(maxsize=8)
def _femur_base_radius(level: int) -> np.ndarray:
    """Radial function of the constant femur (shaft, trochanter, head-neck) before the cut plane."""
    u = _femur_directions(level)
    shaft = _radial_bisect(
        _capsule_inside(np.array([0.0, 0.0, 8.0]), np.array([0.0, 0.0, -400.0]), 15.5), u, 420
    )
    troch = _radial_bisect(_capsule_inside(np.zeros(3), np.array([-17.0, 5.0, 20.0]), 15.0), u, 60.0)
    headneck = _radial_bisect(_round_cone_inside(np.zeros(3), _FEMUR_HEAD, 16.0, _FEMUR_R), u, 90.0)
    r = _smooth_max(_smooth_max(shaft, troch, 8.0), headneck, 8.0)
    # the waist between head and neck (the "offset" a cam lesion fills in)
    theta = _angle(u, _FEMUR_NECK)
    r -= 3.5 * np.exp(-(((theta - _FEMUR_WAIST_ANGLE) / math.radians(9.0)) ** 2)) * (u @ _FEMUR_NECK > 0)
    r.setflags(write=False)
    return r


@functools.lru_cache(maxsize=8)
def _femur_directions(level: int) -> np.ndarray:
    # a fixed warp of the sphere that sends more parametric directions down the long shaft
    u = _icosphere(level)[0] * np.array([1.0, 1.0, 2.2])
    u = u / np.linalg.norm(u, axis=1, keepdims=True)
    u.setflags(write=False)
    return u


def _femur_surface(level: int, p: dict[str, float]) -> np.ndarray:
    u = _femur_directions(level)
    r = _femur_base_radius(level).copy()
    r += p["cam_height"] * np.exp(-((_angle(u, _FEMUR_CAM_DIR) / _FEMUR_CAM_WIDTH) ** 2))
    down = -u[:, 2]
    cut = np.where(down > 1e-9, p["shaft_length"] / np.maximum(down, 1e-9), np.inf)
    r = np.minimum(r, cut)
    return u * (p["size"] * r)[:, None]


def _atrium_surface(u: np.ndarray, p: dict[str, float]) -> np.ndarray:
    e = p["elongation"]
    axes = _ATRIUM_AXES * np.array([1.0 + e, 1.0 / math.sqrt(1.0 + e), 1.0 / math.sqrt(1.0 + e)])
    # psi: rotate the appendage region about the swing axis; the weight w falls smoothly to 0 so the
    # map of the sphere stays a diffeomorphism and the rest of the body does not move
    w = 1.0 - _smoothstep((_angle(u, _ATRIUM_APPENDAGE) - _ATRIUM_PLATEAU) / _ATRIUM_RAMP)
    rot = _rotation(_ATRIUM_SWING_AXIS, p["appendage_angle"] * w)
    d = np.einsum("vij,vj->vi", rot, u)
    r = 1.0 / np.sqrt(((d / axes) ** 2).sum(axis=1))
    r += p["appendage_length"] * np.exp(-((_angle(u, _ATRIUM_APPENDAGE) / math.radians(15.0)) ** 2))
    for k, v in enumerate(_ATRIUM_VEINS):
        r += p[f"vein{k}"] * np.exp(-((_angle(u, v) / math.radians(8.5)) ** 2))
    return d * (p["size"] * r)[:, None]


def _canonical_surface(family: str, level: int, params: dict[str, float]) -> np.ndarray:
    if family == "femur":
        return _femur_surface(level, params)
    u = _icosphere(level)[0]
    if family == "cranium":
        return _cranium_surface(u, params)
    return _atrium_surface(u, params)


@functools.lru_cache(maxsize=16)
def _template(family: str, level: int) -> tuple[np.ndarray, np.ndarray]:
    """Template surface bounding box: (centre (3,), extent (3,)) in canonical mm."""
    pts = _canonical_surface(family, level, template_params(family))
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    return 0.5 * (lo + hi), hi - lo


@functools.lru_cache(maxsize=16)
def _particle_indices(family: str, level: int, n_particles: int) -> np.ndarray:
    """Fixed vertex indices of the particles: farthest-point samples of the family template."""
    idx = _farthest_points(_canonical_surface(family, level, template_params(family)), n_particles)
    idx.setflags(write=False)
    return idx


# -- geometry of the image ------------------------------------------------------------------------
def make_grid(image_size: Sequence[int] = (64, 64, 64), spacing: float | Sequence[float] = 1.5) -> Grid:
    """The axis-aligned grid used for synthetic images, centred on the LPS origin. ``image_size`` (X, Y, Z)."""
    size = tuple(int(s) for s in image_size)
    if len(size) != 3:
        raise InputError(f"image size needs 3 values (X Y Z), found {len(size)}")
    if min(size) < MIN_IMAGE_SIZE:
        raise InputError(f"image size must be at least {MIN_IMAGE_SIZE} voxels per axis, found {size}")
    sp = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,))
    if not np.all(np.isfinite(sp)) or sp.min() <= 0:
        raise InputError(f"spacing must be positive mm, found {tuple(sp.tolist())}")
    origin = -0.5 * (np.asarray(size) - 1) * sp
    return Grid(tuple(origin.tolist()), tuple(sp.tolist()), size)


def _placement(family: str, level: int, grid: Grid) -> tuple[float, np.ndarray]:
    """Uniform scale and canonical centre that put the template at the grid centre."""
    centre, extent = _template(family, level)
    fov = np.asarray(grid.size) * np.asarray(grid.spacing)
    scale = float(np.min(_FILL * fov / extent))
    return scale, centre


def _place_matrix(family: str, n_particles: int, grid: Grid) -> np.ndarray:
    """4x4 map from the canonical frame to the un-posed image frame (uniform scale + centring)."""
    scale, centre = _placement(family, _level_for(n_particles), grid)
    place = np.eye(4)
    place[:3, :3] *= scale
    place[:3, 3] = -scale * centre
    return place


def _pose(
    rng: np.random.Generator,
    grid: Grid,
    family: str,
    n_particles: int,
    pose_jitter: bool,
    truncate_fov: bool,
) -> np.ndarray:
    """4x4 rigid transform about the grid centre (the LPS origin): jitter and/or FOV truncation."""
    level = _level_for(n_particles)
    extent_mm = _placement(family, level, grid)[0] * _template(family, level)[1]
    pose = np.eye(4)
    fov = np.asarray(grid.size) * np.asarray(grid.spacing)
    if pose_jitter:
        axis = _unit(rng.standard_normal(3))
        pose[:3, :3] = _rotation(axis, math.radians(rng.uniform(-6.0, 6.0)))
        pose[:3, 3] = rng.uniform(-0.03, 0.03, 3) * fov
    if truncate_fov:
        # push the shape so ~20% of it leaves the field of view along a family-typical axis:
        # the femur loses its distal shaft, the cranium its vertex, the atrium a random side
        axis = {"femur": 2, "cranium": 2}.get(family, int(rng.integers(0, 3)))
        sign = {"femur": -1.0, "cranium": 1.0}.get(family, float(rng.choice([-1.0, 1.0])))
        free = 0.5 * fov[axis] - 0.5 * extent_mm[axis]
        pose[axis, 3] += sign * (free + 0.2 * extent_mm[axis])
    return pose


def make_shape(
    family: str,
    params: dict[str, float],
    *,
    grid: Grid | None = None,
    n_particles: int = 512,
    pose: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ground-truth surface of one parameter set, without rendering an image (fast).

    Returns ``vertices`` ``(V, 3)`` float64 (mm, LPS, in ``grid``'s space; default the 64³ 1.5 mm grid),
    ``triangles`` ``(T, 3)`` int64 (closed, outward) and ``particle_indices`` ``(M,)`` int64; the
    particles are ``vertices[particle_indices]``. ``pose`` is an optional 4x4 rigid map applied last.
    """
    _check_family(family)
    _check_particles(n_particles)
    grid = grid if grid is not None else make_grid()
    full = {**template_params(family), **{k: float(v) for k, v in params.items()}}
    level = _level_for(int(n_particles))
    m = _place_matrix(family, int(n_particles), grid)
    if pose is not None:
        m = np.asarray(pose, dtype=np.float64) @ m
    canonical = _canonical_surface(family, level, full)
    vertices = canonical @ m[:3, :3].T + m[:3, 3]
    triangles = np.array(_icosphere(level)[1], dtype=np.int64)
    return vertices, triangles, np.array(_particle_indices(family, level, int(n_particles)))


# -- rendering --------------------------------------------------------------------------------------
def voxelize(vertices: np.ndarray, triangles: np.ndarray, grid: Grid) -> np.ndarray:
    """Binary ``(Z, Y, X)`` uint8 label map of the closed mesh on ``grid`` (voxel centres inside = 1).

    The grid must be axis-aligned (identity direction).
    """
    import vtk
    from vtk.util import numpy_support as ns

    from .io import polydata_from_arrays

    if not np.allclose(grid.direction_matrix, np.eye(3)):
        raise InputError("voxelize needs an axis-aligned grid (identity direction)")
    sx, sy, sz = grid.size
    stencil = vtk.vtkPolyDataToImageStencil()
    stencil.SetInputData(polydata_from_arrays(vertices, triangles))
    stencil.SetOutputOrigin(*grid.origin)
    stencil.SetOutputSpacing(*grid.spacing)
    stencil.SetOutputWholeExtent(0, sx - 1, 0, sy - 1, 0, sz - 1)
    to_image = vtk.vtkImageStencilToImage()
    to_image.SetInputConnection(stencil.GetOutputPort())
    to_image.SetInsideValue(1)
    to_image.SetOutsideValue(0)
    to_image.SetOutputScalarTypeToUnsignedChar()
    to_image.Update()
    arr = ns.vtk_to_numpy(to_image.GetOutput().GetPointData().GetScalars())
    return np.ascontiguousarray(arr.reshape(sz, sy, sx), dtype=np.uint8)


# intensity model per family: background, inside, boundary shell (value, thickness mm), noise sd,
# distractor (centre and half-axes in canonical mm, intensity)
_APPEARANCE: dict[str, dict[str, Any]] = {
    "cranium": {
        "background": 0.0,
        "inside": 40.0,
        "shell": (1000.0, 3.0),
        "noise": 25.0,
        "bias": 0.12,
        "distractor": ((0.0, 25.0, -90.0), (16.0, 16.0, 12.0), 900.0),  # a vertebra below the skull
    },
    "femur": {
        "background": 40.0,
        "inside": 350.0,
        "shell": (1200.0, 2.5),
        "noise": 30.0,
        "bias": 0.10,
        "distractor": (
            tuple((_FEMUR_HEAD + np.array([22.0, 0.0, 34.0])).tolist()),
            (26.0, 22.0, 12.0),
            1000.0,
        ),
    },
    "atrium": {
        "background": 80.0,
        "inside": 220.0,
        "shell": (0.0, 0.0),
        "noise": 22.0,
        "bias": 0.25,
        "distractor": ((-10.0, -42.0, 8.0), (14.0, 12.0, 22.0), 200.0),  # the aortic root, in front
    },
}


def _render_image(
    family: str,
    seg: np.ndarray,
    grid: Grid,
    to_canonical: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """CT/MR-like ``(Z, Y, X)`` float32 image of the segmentation (integer-valued after rounding)."""
    from scipy import ndimage

    look = _APPEARANCE[family]
    sp = np.asarray(grid.spacing)[::-1]  # z, y, x
    img = np.full(seg.shape, look["background"], dtype=np.float32)
    img[seg > 0] = look["inside"]
    # work near the anatomy only: the distance transform and dilation dominate the cost otherwise
    nz = np.nonzero(seg)
    box = (
        tuple(slice(max(int(a.min()) - 3, 0), min(int(a.max()) + 4, n)) for a, n in zip(nz, seg.shape))
        if len(nz[0])
        else tuple(slice(0, n) for n in seg.shape)
    )
    shell_value, shell_mm = look["shell"]
    if shell_value and len(nz[0]):
        # the cortical/bony rim: voxels inside within shell_mm of the boundary
        sub = seg[box]
        depth = ndimage.distance_transform_edt(sub, sampling=sp)
        img[box][(sub > 0) & (depth <= shell_mm)] = shell_value
    near = np.zeros(seg.shape, dtype=bool)
    near[box] = ndimage.binary_dilation(seg[box] > 0, iterations=2)
    # a distractor structure of similar brightness, kept off the labelled anatomy; the grid is
    # axis-aligned, so its voxel coordinates are separable (cheap broadcasting, no (Z,Y,X,3) array)
    axes = [(grid.origin[k] + grid.spacing[k] * np.arange(grid.size[k])).astype(np.float32) for k in range(3)]
    x, y, z = axes[0][None, None, :], axes[1][None, :, None], axes[2][:, None, None]
    centre, half_axes, value = look["distractor"]
    centre = np.asarray(centre) + rng.uniform(-3.0, 3.0, 3)
    rot, shift = to_canonical[:3, :3].astype(np.float32), (to_canonical[:3, 3] - centre).astype(np.float32)
    q = np.zeros(seg.shape, dtype=np.float32)
    for k in range(3):
        ck = rot[k, 0] * x + rot[k, 1] * y + rot[k, 2] * z + shift[k]
        q += (ck / np.float32(half_axes[k])) ** 2
    img[(q <= 1.0) & ~near] = value
    img = ndimage.gaussian_filter(img, sigma=0.7, mode="nearest")
    # smooth multiplicative bias field (low-order polynomial in normalised coordinates)
    half = (0.5 * np.asarray(grid.size) * np.asarray(grid.spacing)).astype(np.float32)
    xn, yn, zn = x / half[0], y / half[1], z / half[2]
    beta = rng.normal(0.0, look["bias"], 6).astype(np.float32)
    log_bias = beta[0] * xn + beta[1] * yn + beta[2] * zn
    log_bias = log_bias + 0.5 * (beta[3] * xn * yn + beta[4] * yn * zn + beta[5] * xn * zn)
    img *= np.exp(log_bias)
    img += look["noise"] * rng.standard_normal(img.shape, dtype=np.float32)
    return np.round(np.clip(img, -32768, 32767)).astype(np.float32)


# -- subjects -----------------------------------------------------------------------------------
def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise InputError(f"unknown synthetic family {family!r}; expected one of {', '.join(FAMILIES)}")


def _check_particles(n_particles: int) -> None:
    if not isinstance(n_particles, int | np.integer) or not 3 <= int(n_particles) <= MAX_PARTICLES:
        raise InputError(f"particle count must be an integer in [3, {MAX_PARTICLES}], found {n_particles!r}")


def _sphericity(vertices: np.ndarray, triangles: np.ndarray) -> float:
    """Wadell sphericity pi^(1/3) (6V)^(2/3) / A of a closed triangle mesh (1 for a sphere)."""
    a, b, c = (vertices[triangles[:, k]] for k in range(3))
    cross = np.cross(b - a, c - a)
    area = 0.5 * np.linalg.norm(cross, axis=1).sum()
    volume = abs(np.einsum("ij,ij->i", a, np.cross(b, c)).sum()) / 6.0
    return float(math.pi ** (1 / 3) * (6 * volume) ** (2 / 3) / area)


def atrium_recurrence_probability(params: dict[str, float]) -> float:
    """P(AF recurrence | shape): a logistic function of the body's enlargement (``size``) and roundness
    (low ``elongation``), both standardised by their prior sd (see ``_ATRIUM_OUTCOME_WEIGHTS``)."""
    w_size, w_round = _ATRIUM_OUTCOME_WEIGHTS
    z = w_size * (params["size"] - 1.0) / 0.06 + w_round * (0.2 - params["elongation"]) / 0.115
    return 1.0 / (1.0 + math.exp(-z / _ATRIUM_OUTCOME_SCALE))


def make_subject(
    family: str,
    rng_or_params: np.random.Generator | dict[str, float],
    *,
    image_size: Sequence[int] = (64, 64, 64),
    spacing: float | Sequence[float] = 1.5,
    n_particles: int = 512,
    pose_jitter: bool = False,
    truncate_fov: bool = False,
    group: str | None = None,
    subject_id: str = "subject",
    image_rng: np.random.Generator | None = None,
) -> SyntheticSubject:
    """One synthetic subject in memory.

    ``rng_or_params``: a seeded ``numpy.random.Generator`` (draws shape, pose and image noise) or a
    parameter dict (``template_params``/``sample_params`` form; then ``image_rng`` or a fixed seed 0
    drives pose and image noise). ``image_size`` (X, Y, Z) voxels, ``spacing`` mm. Generating one
    64³ subject takes well under a second.
    """
    _check_family(family)
    _check_particles(n_particles)
    grid = make_grid(image_size, spacing)
    if isinstance(rng_or_params, np.random.Generator):
        params = sample_params(family, rng_or_params, group)
        rng = rng_or_params
    elif isinstance(rng_or_params, dict):
        params = {**template_params(family), **{k: float(v) for k, v in rng_or_params.items()}}
        rng = image_rng if image_rng is not None else np.random.default_rng(0)
    else:
        raise InputError(
            f"make_subject needs a numpy.random.Generator or a parameter dict, found {type(rng_or_params).__name__}"
        )
    pose = _pose(rng, grid, family, int(n_particles), pose_jitter, truncate_fov)
    vertices, triangles, pidx = make_shape(family, params, grid=grid, n_particles=n_particles, pose=pose)
    scale, _ = _placement(family, _level_for(int(n_particles)), grid)
    world_from_canonical = pose @ _place_matrix(family, int(n_particles), grid)
    seg = voxelize(vertices, triangles, grid)
    image = _render_image(family, seg, grid, np.linalg.inv(world_from_canonical), rng)

    metadata: dict[str, float]
    if family == "cranium":
        metadata = {"severity": params["severity"]}
        grp = GROUPS[family][1] if params["severity"] > 0 else GROUPS[family][0]
    elif family == "femur":
        metadata = {
            "cam_height": params["cam_height"] * scale,
            "shaft_length": params["shaft_length"] * scale,
        }
        grp = GROUPS[family][1] if params["cam_height"] > 0 else GROUPS[family][0]
    else:
        sph = _sphericity(vertices, triangles)
        metadata = {
            "sphericity": sph,
            "appendage_angle": math.degrees(params["appendage_angle"]),
            "cluster": float(params["appendage_angle"] > 0),
        }
        # larger, rounder atria recur more often (the outcome is noisy, as in the clinic)
        p_recur = atrium_recurrence_probability(params)
        grp = GROUPS[family][1] if rng.random() < p_recur else GROUPS[family][0]
    return SyntheticSubject(
        id=subject_id,
        family=family,
        image=image,
        segmentation=seg,
        grid=grid,
        particles=vertices[pidx],
        vertices=vertices,
        triangles=triangles,
        particle_indices=pidx,
        group=grp,
        metadata=metadata,
        params=params,
        pose=pose,
    )


def mean_subject(
    family: str,
    *,
    image_size: Sequence[int] = (64, 64, 64),
    spacing: float | Sequence[float] = 1.5,
    n_particles: int = 512,
) -> SyntheticSubject:
    """The family template (mean parameters, no pose jitter) on the same grid a cohort would use."""
    return make_subject(
        family,
        template_params(family),
        image_size=image_size,
        spacing=spacing,
        n_particles=n_particles,
        subject_id=f"{family}_template",
    )


# -- cohorts ----------------------------------------------------------------------------------------
def _split_counts(n: int, split: Sequence[float]) -> list[int]:
    fr = np.asarray(split, dtype=np.float64)
    raw = fr / fr.sum() * n
    counts = np.floor(raw).astype(int)
    # rounded so float noise (0.7 * 8 = 5.6000000000000005) cannot break ties; ties go to train first
    for i in np.argsort(-np.round(raw - counts, 9), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    if counts[0] == 0:  # training needs at least one subject
        counts[int(np.argmax(counts))] -= 1
        counts[0] += 1
    return counts.tolist()


def _assign_splits(groups: list[str], split: Sequence[float], rng: np.random.Generator) -> list[str]:
    """Stratified split: groups are interleaved in proportion, then cut into train/val/test."""
    n = len(groups)
    rank = np.empty(n)
    for g in sorted(set(groups)):
        members = [i for i, x in enumerate(groups) if x == g]
        order = rng.permutation(len(members))
        for pos, i in zip(order, members):
            rank[i] = (pos + rng.random()) / len(members)
    order = np.argsort(rank, kind="stable")
    counts = _split_counts(n, split)
    labels = ["train"] * counts[0] + ["val"] * counts[1] + ["test"] * counts[2]
    out = [""] * n
    for label, i in zip(labels, order):
        out[i] = label
    return out


def _fmt(v: float) -> str:
    return repr(round(float(v), 6))


def generate_cohort(
    family: str,
    n: int,
    out_dir: str | Path,
    seed: int,
    *,
    image_size: Sequence[int] = (64, 64, 64),
    spacing: float | Sequence[float] = 1.5,
    n_particles: int = 512,
    pose_jitter: bool = False,
    truncate_fov: bool = False,
    split: Sequence[float] = (0.7, 0.1, 0.2),
    progress: ProgressCallback = null_progress,
    cancel: CancelToken | None = None,
) -> Path:
    """Write a synthetic cohort and return its ``cohort.csv``.

    Layout: ``out_dir/images/<id>.nrrd`` (int16), ``segmentations/<id>.nrrd`` (uint8 labels),
    ``meshes/<id>.vtk`` (dense ground truth), ``particles/<id>.particles`` (ShapeWorks text, LPS mm),
    ``cohort.csv`` (id,image,particles,mesh,segmentation,group,split + the family's metadata columns;
    paths relative to the CSV) and ``synthetic.json`` (the generation settings). The directory appears
    complete or not at all. Subject ``i`` draws from its own stream (``SeedSequence(seed).spawn``), and
    the groups come from one cohort-level draw with exact proportions (cranium 45% metopic, femur 25%
    cam; the atrium outcome is drawn per subject from its size and roundness). Femur lengths are in image mm.
    """
    from .io import polydata_from_arrays, write_image, write_mesh, write_particles
    from .preprocess import image_from_array

    _check_family(family)
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 2:
        raise InputError(f"a synthetic cohort needs at least 2 subjects, found n={n!r}")
    _check_particles(n_particles)
    make_grid(image_size, spacing)  # validates size and spacing before anything is written
    split_t = tuple(float(v) for v in split)
    if len(split_t) != 3 or min(split_t) < 0 or not sum(split_t) > 0:
        raise InputError(f"split needs 3 non-negative fractions (train, val, test), found {split_t}")
    out = Path(out_dir)
    # compressed int16 image + uint8 labels: about a byte per voxel at least, plus mesh and particles
    needed = int(n) * (int(np.prod(image_size)) + 200 * int(n_particles))
    check_replace_target(
        out,
        is_synthetic_cohort,
        "synthetic cohort written by deepssm synth",
        needed_bytes=needed,
        overwrite_flag=None,
    )
    n = int(n)
    root = np.random.SeedSequence(int(seed))
    cohort_seq, *subject_seqs = root.spawn(n + 1)
    cohort_rng = np.random.default_rng(cohort_seq)
    forced: list[str | None]
    if family == "atrium":
        forced = [None] * n
    else:
        frac = 0.45 if family == "cranium" else 0.25
        n_pos = max(1, round(frac * n))
        positive = set(cohort_rng.permutation(n)[:n_pos].tolist())
        forced = [GROUPS[family][1] if i in positive else GROUPS[family][0] for i in range(n)]

    rows: list[dict[str, str]] = []
    subjects_meta: list[tuple[str, str]] = []
    with atomic_path(out, replace_dir=is_synthetic_cohort) as tmp:
        for sub in ("images", "segmentations", "meshes", "particles"):
            (tmp / sub).mkdir(parents=True)
        for i in range(n):
            if cancel is not None:
                cancel.check()
            sid = f"{family}_{i:04d}"
            subj = make_subject(
                family,
                np.random.default_rng(subject_seqs[i]),
                image_size=image_size,
                spacing=spacing,
                n_particles=n_particles,
                pose_jitter=pose_jitter,
                truncate_fov=truncate_fov,
                group=forced[i],
                subject_id=sid,
            )
            write_image(
                image_from_array(subj.image.astype(np.int16), subj.grid), tmp / "images" / f"{sid}.nrrd"
            )
            write_image(image_from_array(subj.segmentation, subj.grid), tmp / "segmentations" / f"{sid}.nrrd")
            write_mesh(polydata_from_arrays(subj.vertices, subj.triangles), tmp / "meshes" / f"{sid}.vtk")
            write_particles(tmp / "particles" / f"{sid}.particles", subj.particles)
            row = {
                "id": sid,
                "image": f"images/{sid}.nrrd",
                "particles": f"particles/{sid}.particles",
                "mesh": f"meshes/{sid}.vtk",
                "segmentation": f"segmentations/{sid}.nrrd",
                "group": subj.group,
                "split": "",
            }
            row.update({k: _fmt(subj.metadata[k]) for k in METADATA_COLUMNS[family]})
            rows.append(row)
            subjects_meta.append((sid, subj.group))
            progress(ProgressEvent("synth", i + 1, n, message=sid))
        splits = _assign_splits([g for _, g in subjects_meta], split_t, cohort_rng)
        for row, s in zip(rows, splits):
            row["split"] = s
        buf = _io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(tmp / "cohort.csv", buf.getvalue())
        grid = make_grid(image_size, spacing)
        atomic_write_json(
            tmp / "synthetic.json",
            {
                "family": family,
                "n": n,
                "seed": int(seed),
                "grid": grid.to_dict(),
                "n_particles": int(n_particles),
                "mesh_vertices": int(10 * 4 ** _level_for(int(n_particles)) + 2),
                "pose_jitter": bool(pose_jitter),
                "truncate_fov": bool(truncate_fov),
                "split": list(split_t),
                "groups": list(GROUPS[family]),
                "metadata_columns": list(METADATA_COLUMNS[family]),
            },
        )
    return out / "cohort.csv"


def read_settings(cohort_dir: str | Path) -> dict[str, Any]:
    """The generation settings a cohort directory was written with (``synthetic.json``)."""
    p = Path(cohort_dir) / "synthetic.json"
    if not p.is_file():
        raise InputError(f"{p}: not found; is {cohort_dir} a synthetic cohort?")
    return json.loads(p.read_text(encoding="utf-8"))
