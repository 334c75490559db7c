"""Mesh from particles (template warp), surface distances, normals and heatmap interpolation."""

import numpy as np
import pytest

from DeepSSMLogic.errors import InputError
from DeepSSMLogic.mesh import (
    MeshWarper,
    estimate_point_normals,
    interpolate_to_vertices,
    merge_close_points,
    normals_at_points,
    point_to_surface_distance,
    surface_distance,
    vertex_normals,
)


def sphere(radius=10.0, theta=48, phi=24):
    import vtk

    from DeepSSMLogic.io import arrays_from_polydata

    src = vtk.vtkSphereSource()
    src.SetRadius(radius)
    src.SetThetaResolution(theta)
    src.SetPhiResolution(phi)
    src.Update()
    return arrays_from_polydata(src.GetOutput())


def plate(n=11, size=10.0):
    g = np.linspace(0, size, n)
    xx, yy = np.meshgrid(g, g, indexing="ij")
    verts = np.c_[xx.ravel(), yy.ravel(), np.zeros(n * n)]
    tris = []
    for i in range(n - 1):
        for j in range(n - 1):
            a, b, c, d = i * n + j, (i + 1) * n + j, (i + 1) * n + j + 1, i * n + j + 1
            tris += [(a, b, c), (a, c, d)]
    return verts, np.array(tris)


def fibonacci_sphere(m, radius=10.0):
    k = np.arange(m) + 0.5
    phi = np.arccos(1 - 2 * k / m)
    theta = np.pi * (1 + 5**0.5) * k
    return radius * np.c_[np.cos(theta) * np.sin(phi), np.sin(theta) * np.sin(phi), np.cos(phi)]


# -- surface distance ------------------------------------------------------------------------------
def test_surface_distance_to_itself_is_zero():
    v, t = sphere()
    d = surface_distance((v, t), (v, t))
    assert d.mean == pytest.approx(0.0, abs=1e-9)
    assert d.hausdorff == pytest.approx(0.0, abs=1e-9)


def test_surface_distance_to_shifted_plate_equals_the_shift():
    v, t = plate()
    d = surface_distance((v, t), (v + [0, 0, 0.7], t))
    assert d.mean == pytest.approx(0.7)
    assert d.p95 == pytest.approx(0.7)
    assert d.hausdorff == pytest.approx(0.7)
    assert d.a_to_b.shape == (len(v),) and d.b_to_a.shape == (len(v),)


def test_surface_distance_shifted_sphere_hausdorff_is_the_shift():
    v, t = sphere()
    d = surface_distance((v, t), (v + [0, 0, 1.5], t))
    assert d.hausdorff == pytest.approx(1.5, rel=0.02)  # at the poles
    assert 0 < d.mean < 1.5


def test_point_to_cell_not_point_to_point():
    # a vertex above the middle of a big triangle is 1 mm from the triangle, far from its vertices
    v = np.array([[0.0, 0, 0], [10, 0, 0], [0, 10, 0]])
    dist = point_to_surface_distance(np.array([[2.0, 2.0, 1.0]]), (v, np.array([[0, 1, 2]])))
    assert dist[0] == pytest.approx(1.0)


def test_surface_distance_rejects_bad_input():
    with pytest.raises(InputError):
        surface_distance("not a mesh", (np.zeros((3, 3)), np.array([[0, 1, 2]])))
    with pytest.raises(InputError, match="indices"):
        surface_distance((np.zeros((3, 3)), np.array([[0, 1, 5]])), (np.zeros((3, 3)), np.array([[0, 1, 2]])))


# -- warp ------------------------------------------------------------------------------------------
def test_warp_identity_and_affine_are_exact():
    v, t = sphere()
    p = fibonacci_sphere(200)
    w = MeshWarper(v, t, p)
    np.testing.assert_allclose(w.warp(p), v, atol=1e-6)
    a = np.array([[1.1, 0.1, 0.0], [0.0, 0.9, 0.2], [0.05, 0.0, 1.2]])
    b = np.array([3.0, -2.0, 5.0])
    np.testing.assert_allclose(w.warp(p @ a.T + b), v @ a.T + b, atol=1e-6)


def test_warp_smooth_deformation_is_accurate_and_batched():
    v, t = sphere(theta=64, phi=32)
    p = fibonacci_sphere(400)

    def f(x):
        return x * [1.2, 0.9, 1.0] + 0.02 * x[:, [1]] ** 2 + [0, 0, 0.01] * x[:, [0]] * x[:, [1]]

    w = MeshWarper(v, t, p)
    out = w.warp(f(p))
    assert np.abs(out - f(v)).max() < 0.1  # mm, on a 20 mm object with ~1.8 mm particle spacing
    many = w.warp_many(np.stack([p, f(p)]))
    np.testing.assert_allclose(many[1], out, atol=1e-9)
    np.testing.assert_allclose(many[0], v, atol=1e-6)


def test_warp_uncached_kernel_path_matches_cached(monkeypatch):
    v, t = sphere()
    p = fibonacci_sphere(100)
    target = p * [1.1, 1.0, 0.9] + 0.01 * p**2
    cached = MeshWarper(v, t, p).warp(target)
    monkeypatch.setattr(MeshWarper, "max_cached_entries", 500)
    w = MeshWarper(v, t, p)
    assert w._phi is None
    np.testing.assert_allclose(w.warp(target), cached, atol=1e-9)


def test_warp_robust_to_duplicate_and_near_duplicate_particles():
    v, t = sphere()
    p = fibonacci_sphere(200)
    dup = np.vstack([p, p[:10], p[10:20] + 1e-7])
    w = MeshWarper(v, t, dup)
    assert w.n_controls == 200
    target = dup * 1.1
    target[200:210] += 1e-3  # duplicated particles predicted at slightly different places
    out = w.warp(target)
    assert np.all(np.isfinite(out))
    assert np.abs(out - v * 1.1).max() < 1e-2
    # merge_distance=0 keeps every particle as its own control point
    w_raw = MeshWarper(v, t, dup, merge_distance=0.0)
    assert w_raw.n_controls == 220


def test_warp_input_validation():
    v, t = sphere()
    p = fibonacci_sphere(50)
    w = MeshWarper(v, t, p)
    with pytest.raises(InputError, match=r"\(B, 50, 3\)"):
        w.warp(p[:40])
    bad = p.copy()
    bad[0, 0] = np.inf
    with pytest.raises(InputError, match="NaN or Inf"):
        w.warp(bad)
    with pytest.raises(InputError, match="kernel"):
        MeshWarper(v, t, p, kernel="gauss")


def test_warp_polydata_roundtrip():
    v, t = sphere()
    p = fibonacci_sphere(80)
    poly = MeshWarper(v, t, p).polydata(p * 2.0)
    assert poly.GetNumberOfPoints() == len(v) and poly.GetNumberOfPolys() == len(t)
    w2 = MeshWarper.from_polydata(poly, p * 2.0)
    np.testing.assert_allclose(w2.vertices, v * 2.0, atol=1e-6)


def test_merge_close_points_labels():
    pts = np.array([[0.0, 0, 0], [5, 0, 0], [0, 0, 1e-6], [5, 0, 2e-6], [9, 9, 9]])
    labels, first = merge_close_points(pts, 1e-3)
    np.testing.assert_array_equal(labels, [0, 1, 0, 1, 2])
    np.testing.assert_array_equal(first, [0, 1, 4])


# -- normals and heatmaps --------------------------------------------------------------------------
def test_vertex_normals_point_outwards_on_a_sphere():
    v, t = sphere()
    n = vertex_normals(v, t)
    radial = v / np.linalg.norm(v, axis=1, keepdims=True)
    assert np.einsum("ij,ij->i", n, radial).min() > 0.98
    flipped = vertex_normals(v, t[:, ::-1])  # inconsistent winding is corrected by the volume sign
    assert np.einsum("ij,ij->i", flipped, radial).min() > 0.98
    pn = normals_at_points(fibonacci_sphere(30), v, t)
    assert np.einsum("ij,ij->i", pn, fibonacci_sphere(30) / 10).min() > 0.95


def test_estimate_point_normals_outward():
    p = fibonacci_sphere(300)
    n = estimate_point_normals(p)
    assert np.einsum("ij,ij->i", n, p / 10).min() > 0.95


def test_interpolate_to_vertices_exact_at_particles_and_bounded():
    v, _ = sphere()
    p = fibonacci_sphere(100)
    vals = p[:, 2]
    out = interpolate_to_vertices(p, vals, v)
    assert out.min() >= vals.min() - 1e-9 and out.max() <= vals.max() + 1e-9
    np.testing.assert_allclose(interpolate_to_vertices(p, vals, p), vals, atol=1e-9)
    assert np.corrcoef(out, v[:, 2])[0, 1] > 0.98
    multi = interpolate_to_vertices(p, np.c_[vals, -vals], v)
    np.testing.assert_allclose(multi[:, 1], -out)


# -- reconstruction of a synthetic subject from its ground-truth particles --------------------------
@pytest.mark.slow
@pytest.mark.parametrize("family", ["cranium", "femur", "atrium"])
def test_reconstruction_from_gt_particles_within_half_a_voxel(family):
    from DeepSSMLogic import synthetic

    spacing = 1.5
    template = synthetic.mean_subject(family, spacing=spacing)
    warper = MeshWarper(template.vertices, template.triangles, template.particles)
    subject = synthetic.make_subject(family, np.random.default_rng(2), spacing=spacing, pose_jitter=True)
    assert not np.allclose(subject.particles, template.particles)  # a real deformation, not the template
    verts = warper.warp(subject.particles)
    d = surface_distance((subject.vertices, subject.triangles), (verts, warper.triangles))
    assert d.mean < 0.5 * spacing
    assert d.p95 < 0.5 * spacing
    # the untouched template is much further away: the warp did the work
    d0 = surface_distance((subject.vertices, subject.triangles), (template.vertices, template.triangles))
    assert d0.mean > 3 * d.mean
