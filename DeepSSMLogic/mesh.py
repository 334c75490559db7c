"""Meshes from particles, surface-to-surface distances, normals and per-particle heatmaps.

Everything is in mm, LPS. Vertices are ``(V, 3)`` float64, triangles ``(T, 3)`` int64, particles
``(M, 3)`` float64. vtk is imported only by the functions that need it (surface distances and
polydata conversion); the warp itself is numpy/scipy.

The mesh of a predicted shape is the template mesh (the mean shape's surface, whose particles are
``template_particles``) warped by a thin-plate spline that moves each template particle onto the
corresponding predicted particle (kernel ``U(r) = r``, the biharmonic Green's function in 3D, plus
an affine part; or ``r**3``). The kernel system depends only on the template, so it is factorised
once in :class:`MeshWarper` and every prediction costs one triangular solve and one matrix product.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.linalg
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from .errors import InputError

KERNELS = ("r", "r3")


def _as_points(a: Any, name: str, n: int | None = None) -> np.ndarray:
    pts = np.asarray(a, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 3 or pts.shape[0] == 0:
        raise InputError(f"{name}: expected an array of shape (N, 3), found {pts.shape}")
    if n is not None and pts.shape[0] != n:
        raise InputError(f"{name}: expected {n} points (one per template particle), found {pts.shape[0]}")
    if not np.all(np.isfinite(pts)):
        raise InputError(f"{name}: contains NaN or Inf coordinates")
    return pts


def _as_triangles(t: Any, n_vertices: int, name: str = "triangles") -> np.ndarray:
    tri = np.asarray(t)
    if tri.ndim != 2 or tri.shape[1] != 3:
        raise InputError(f"{name}: expected triangle indices of shape (T, 3), found {tri.shape}")
    tri = tri.astype(np.int64)
    if tri.size and (tri.min() < 0 or tri.max() >= n_vertices):
        raise InputError(f"{name}: indices must lie in [0, {n_vertices}), found [{tri.min()}, {tri.max()}]")
    return tri


def merge_close_points(points: np.ndarray, tolerance: float) -> tuple[np.ndarray, np.ndarray]:
    """Cluster points ``(M, 3)`` closer than ``tolerance`` mm to each other (transitively).

    Returns ``(labels, first)``: ``labels`` ``(M,)`` numbers the clusters 0..C-1 in order of their
    first member, ``first`` ``(C,)`` is the index of each cluster's first member.
    """
    pts = _as_points(points, "points")
    m = len(pts)
    if tolerance <= 0 or m < 2:
        return np.arange(m), np.arange(m)
    pairs = cKDTree(pts).query_pairs(r=float(tolerance), output_type="ndarray")
    if len(pairs) == 0:
        return np.arange(m), np.arange(m)
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(m, m))
    _, labels = connected_components(graph, directed=False)
    # relabel so that clusters are numbered by their first member (stable, order-preserving)
    _, first = np.unique(labels, return_index=True)
    order = np.argsort(first)
    remap = np.empty_like(order)
    remap[order] = np.arange(len(order))
    return remap[labels], np.sort(first)


def _kernel(r: np.ndarray, kind: str) -> np.ndarray:
    return r if kind == "r" else r * r * r


def _pairwise(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    np.maximum(d2, 0.0, out=d2)
    return np.sqrt(d2, out=d2)


class MeshWarper:
    """Warp a template mesh onto new particle sets with a thin-plate spline (factorised once).

    ``template_vertices`` ``(V, 3)`` and ``template_triangles`` ``(T, 3)`` describe the template
    surface; ``template_particles`` ``(M, 3)`` are its correspondence points (mm, LPS). Template
    particles closer than ``merge_distance`` (default: 1 % of the median nearest-neighbour spacing)
    are merged into one control point whose target is the mean of their targets, which keeps the
    kernel system non-singular for duplicated or near-duplicated particles. ``smoothing`` (>= 0) is a
    ridge on the kernel diagonal, relative to the mean kernel value: 0 interpolates the particles
    exactly, larger values trade fidelity for smoothness against noisy predictions.
    """

    # above this many vertex×control entries the kernel block is recomputed per call, not cached
    max_cached_entries = 8_000_000

    def __init__(
        self,
        template_vertices: np.ndarray,
        template_triangles: np.ndarray,
        template_particles: np.ndarray,
        kernel: str = "r",
        smoothing: float = 0.0,
        merge_distance: float | None = None,
    ) -> None:
        if kernel not in KERNELS:
            raise InputError(f"MeshWarper: kernel must be one of {KERNELS}, found {kernel!r}")
        if smoothing < 0:
            raise InputError(f"MeshWarper: smoothing must be >= 0, found {smoothing}")
        self.vertices = _as_points(template_vertices, "template vertices")
        self.triangles = _as_triangles(template_triangles, len(self.vertices), "template triangles")
        self.particles = _as_points(template_particles, "template particles")
        if len(self.particles) < 5:
            raise InputError(f"MeshWarper: need at least 5 template particles, found {len(self.particles)}")
        self.kernel = kernel
        self.smoothing = float(smoothing)
        m = len(self.particles)

        nn = cKDTree(self.particles).query(self.particles, k=2)[0][:, 1]
        positive = nn[nn > 0]
        spacing = float(np.median(positive)) if positive.size else 1.0
        self.merge_distance = 0.01 * spacing if merge_distance is None else float(merge_distance)
        labels, reps = merge_close_points(self.particles, self.merge_distance)
        self.labels = labels
        n_ctrl = len(reps)
        # averaging matrix: targets of the particles of one cluster -> its control point
        counts = np.bincount(labels, minlength=n_ctrl).astype(np.float64)
        self._avg = coo_matrix((1.0 / counts[labels], (labels, np.arange(m))), shape=(n_ctrl, m)).tocsr()
        ctrl = self._avg @ self.particles
        if n_ctrl < 5:
            raise InputError(
                f"MeshWarper: only {n_ctrl} distinct template particles after merging those closer than "
                f"{self.merge_distance:.3g} mm; need at least 5"
            )

        # normalised coordinates keep the system well conditioned whatever the units or placement
        self._centre = ctrl.mean(axis=0)
        self._scale = float(np.sqrt(((ctrl - self._centre) ** 2).sum(1).mean())) or 1.0
        c = (ctrl - self._centre) / self._scale
        self._ctrl = c
        k = _kernel(_pairwise(c, c), kernel)
        ridge = self.smoothing * float(k.mean()) if self.smoothing > 0 else 0.0
        # a tiny ridge makes (near-)coplanar or tightly clustered control points solvable
        ridge += 1e-10 * max(float(np.abs(k).max()), 1.0)
        k[np.diag_indices_from(k)] += ridge
        q = np.hstack([np.ones((n_ctrl, 1)), c])
        system = np.zeros((n_ctrl + 4, n_ctrl + 4))
        system[:n_ctrl, :n_ctrl] = k
        system[:n_ctrl, n_ctrl:] = q
        system[n_ctrl:, :n_ctrl] = q.T
        self._lu = scipy.linalg.lu_factor(system, check_finite=False)
        self._vq = np.hstack([np.ones((len(self.vertices), 1)), (self.vertices - self._centre) / self._scale])
        self._phi: np.ndarray | None = None
        if len(self.vertices) * n_ctrl <= self.max_cached_entries:
            self._phi = self._vertex_kernel(slice(None))

    @property
    def n_controls(self) -> int:
        """Number of distinct control points after merging duplicates."""
        return self._ctrl.shape[0]

    @classmethod
    def from_polydata(cls, mesh: Any, template_particles: np.ndarray, **kwargs: Any) -> MeshWarper:
        """A warper whose template is a triangle ``vtkPolyData``."""
        from .io import arrays_from_polydata

        verts, tris = arrays_from_polydata(mesh)
        return cls(verts, tris, template_particles, **kwargs)

    def _vertex_kernel(self, rows: slice) -> np.ndarray:
        v = (self.vertices[rows] - self._centre) / self._scale
        return _kernel(_pairwise(v, self._ctrl), self.kernel)

    def warp_many(self, particles: np.ndarray) -> np.ndarray:
        """Vertices ``(B, V, 3)`` of the template warped onto each of ``particles`` ``(B, M, 3)`` (mm)."""
        p = np.asarray(particles, dtype=np.float64)
        m = len(self.particles)
        if p.ndim != 3 or p.shape[1:] != (m, 3):
            raise InputError(f"MeshWarper: expected particles of shape (B, {m}, 3), found {p.shape}")
        if not np.all(np.isfinite(p)):
            raise InputError("MeshWarper: the particles to warp to contain NaN or Inf")
        b = p.shape[0]
        disp = p - self.particles[None]  # warping displacements keeps round-off relative to the motion
        rhs_ctrl = self._avg @ disp.transpose(1, 0, 2).reshape(m, 3 * b)
        rhs = np.vstack([rhs_ctrl, np.zeros((4, 3 * b))])
        coef = scipy.linalg.lu_solve(self._lu, rhs, check_finite=False)
        n = self.n_controls
        w, a = coef[:n], coef[n:]
        out = self._vq @ a
        if self._phi is not None:
            out += self._phi @ w
        else:
            step = max(1, self.max_cached_entries // n)
            for s in range(0, len(self.vertices), step):
                sl = slice(s, s + step)
                out[sl] += self._vertex_kernel(sl) @ w
        out = out.reshape(len(self.vertices), b, 3).transpose(1, 0, 2)
        return self.vertices[None] + out

    def warp(self, particles: np.ndarray) -> np.ndarray:
        """Vertices ``(V, 3)`` of the template warped onto ``particles`` ``(M, 3)`` (mm)."""
        return self.warp_many(np.asarray(particles, dtype=np.float64)[None])[0]

    def polydata(self, particles: np.ndarray) -> Any:
        """The warped template as ``vtkPolyData`` (same triangles as the template)."""
        from .io import polydata_from_arrays

        return polydata_from_arrays(self.warp(particles), self.triangles)


# -- surface distances ------------------------------------------------------------------------
@dataclass
class SurfaceDistance:
    """Point-to-surface distances between meshes A and B, mm.

    ``a_to_b`` ``(Va,)``: each vertex of A to the closest point on any triangle of B; ``b_to_a``
    likewise. ``mean`` is the symmetric mean ``(mean(a_to_b) + mean(b_to_a)) / 2``; ``p95`` the 95th
    percentile of both directions pooled; ``hausdorff`` the largest distance either way.
    """

    a_to_b: np.ndarray
    b_to_a: np.ndarray

    @property
    def mean_a_to_b(self) -> float:
        return float(self.a_to_b.mean())

    @property
    def mean_b_to_a(self) -> float:
        return float(self.b_to_a.mean())

    @property
    def mean(self) -> float:
        return 0.5 * (self.mean_a_to_b + self.mean_b_to_a)

    @property
    def p95(self) -> float:
        return float(np.percentile(np.concatenate([self.a_to_b, self.b_to_a]), 95))

    @property
    def hausdorff(self) -> float:
        return float(max(self.a_to_b.max(), self.b_to_a.max()))

    def summary(self) -> dict[str, float]:
        return {
            "surface_mean": self.mean,
            "surface_gt_to_pred": self.mean_a_to_b,
            "surface_pred_to_gt": self.mean_b_to_a,
            "surface_p95": self.p95,
            "surface_hausdorff": self.hausdorff,
        }


def _to_polydata(mesh: Any, name: str) -> Any:
    from .io import polydata_from_arrays

    if isinstance(mesh, tuple) and len(mesh) == 2:
        verts = _as_points(mesh[0], f"{name} vertices")
        return polydata_from_arrays(verts, _as_triangles(mesh[1], len(verts), f"{name} triangles"))
    if not hasattr(mesh, "GetNumberOfPoints"):
        raise InputError(
            f"{name}: expected vtkPolyData or (vertices, triangles), found {type(mesh).__name__}"
        )
    if mesh.GetNumberOfPoints() == 0 or mesh.GetNumberOfCells() == 0:
        raise InputError(f"{name}: the mesh is empty")
    return mesh


def point_to_surface_distance(points: np.ndarray, surface: Any) -> np.ndarray:
    """Unsigned distance ``(P,)`` mm from each point ``(P, 3)`` to the closest point on ``surface``
    (vtkPolyData or ``(vertices, triangles)``), point-to-cell through a static cell locator."""
    import vtk
    from vtk.util import numpy_support as ns

    pts = _as_points(points, "points")
    poly = _to_polydata(surface, "surface")
    loc = vtk.vtkStaticCellLocator()
    loc.SetDataSet(poly)
    loc.BuildLocator()
    query = vtk.vtkPolyData()
    vp = vtk.vtkPoints()
    vp.SetData(ns.numpy_to_vtk(np.ascontiguousarray(pts), deep=True))
    query.SetPoints(vp)
    # vtkDistancePolyDataFilter would need cells on the query; a tight Python loop over the
    # locator is fast enough (a few µs per point) and works on bare point sets too.
    out = np.empty(len(pts))
    closest = [0.0, 0.0, 0.0]
    cell_id = vtk.reference(0)
    sub_id = vtk.reference(0)
    d2 = vtk.reference(0.0)
    for i, p in enumerate(pts.tolist()):
        loc.FindClosestPoint(p, closest, cell_id, sub_id, d2)
        out[i] = d2.get()
    return np.sqrt(out)


def surface_distance(mesh_a: Any, mesh_b: Any) -> SurfaceDistance:
    """Two-way point-to-cell surface distance between two meshes (vtkPolyData or
    ``(vertices, triangles)``), mm. By convention A is the ground truth, B the reconstruction."""
    from vtk.util import numpy_support as ns

    a = _to_polydata(mesh_a, "mesh A")
    b = _to_polydata(mesh_b, "mesh B")
    va = ns.vtk_to_numpy(a.GetPoints().GetData()).astype(np.float64)
    vb = ns.vtk_to_numpy(b.GetPoints().GetData()).astype(np.float64)
    return SurfaceDistance(point_to_surface_distance(va, b), point_to_surface_distance(vb, a))


# -- normals and heatmaps ---------------------------------------------------------------------
def vertex_normals(vertices: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """Area-weighted unit vertex normals ``(V, 3)``; flipped to point outwards when the mesh
    encloses a negative signed volume (inconsistently wound closed meshes)."""
    v = _as_points(vertices, "vertices")
    t = _as_triangles(triangles, len(v))
    a, b, c = v[t[:, 0]], v[t[:, 1]], v[t[:, 2]]
    face = np.cross(b - a, c - a)  # length = 2 × area: area weighting for free
    n = np.zeros_like(v)
    for k in range(3):
        np.add.at(n, t[:, k], face)
    signed_volume = float(np.einsum("ij,ij->i", a, np.cross(b, c)).sum()) / 6.0
    if signed_volume < 0:
        n = -n
    norm = np.linalg.norm(n, axis=1, keepdims=True)
    return np.divide(n, norm, out=np.zeros_like(n), where=norm > 0)


def normals_at_points(points: np.ndarray, vertices: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """Unit surface normals ``(P, 3)`` at ``points`` (e.g. particles on the mesh): the normal of
    the nearest vertex of the mesh."""
    pts = _as_points(points, "points")
    vn = vertex_normals(vertices, triangles)
    _, idx = cKDTree(np.asarray(vertices, dtype=np.float64)).query(pts)
    return vn[idx]


def estimate_point_normals(points: np.ndarray, k: int = 12) -> np.ndarray:
    """Unit normals ``(M, 3)`` of a point cloud sampled on a closed surface, without a mesh: the
    least-variance direction of the ``k`` nearest neighbours, oriented away from the centroid
    (right for star-shaped anatomies such as the cranium or the atrium body)."""
    pts = _as_points(points, "points")
    k = int(min(max(k, 4), len(pts)))
    _, idx = cKDTree(pts).query(pts, k=k)
    nb = pts[idx] - pts[idx].mean(axis=1, keepdims=True)
    cov = np.einsum("mki,mkj->mij", nb, nb)
    _, vecs = np.linalg.eigh(cov)
    n = vecs[:, :, 0]
    outward = pts - pts.mean(axis=0)
    n[np.einsum("ij,ij->i", n, outward) < 0] *= -1.0
    return n


def interpolate_to_vertices(
    particles: np.ndarray, values: np.ndarray, vertices: np.ndarray, k: int = 8
) -> np.ndarray:
    """Per-particle scalars ``(M,)`` or ``(M, C)`` onto mesh vertices ``(V, 3)`` by inverse-
    squared-distance weighting of the ``k`` nearest particles (bounded: never overshoots the data,
    unlike a spline, which matters for heatmaps). Returns ``(V,)`` or ``(V, C)``."""
    pts = _as_points(particles, "particles")
    vals = np.asarray(values, dtype=np.float64)
    if vals.shape[0] != len(pts):
        raise InputError(f"interpolate_to_vertices: {len(pts)} particles but {vals.shape[0]} values")
    verts = _as_points(vertices, "vertices")
    k = int(min(max(k, 1), len(pts)))
    d, idx = cKDTree(pts).query(verts, k=k)
    if k == 1:
        d, idx = d[:, None], idx[:, None]
    w = 1.0 / np.maximum(d, 1e-12) ** 2
    exact = d[:, 0] < 1e-9
    w[exact] = 0.0
    w[exact, 0] = 1.0
    w /= w.sum(axis=1, keepdims=True)
    gathered = vals[idx]  # (V, k) or (V, k, C)
    if gathered.ndim == 2:
        return (w * gathered).sum(axis=1)
    return np.einsum("vk,vkc->vc", w, gathered)
