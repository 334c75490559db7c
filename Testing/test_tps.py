"""Thin-plate spline warps (DeepSSMLogic.augment.tps): interpolation, identity, geometry, accuracy
of the fast path against the exact spline, and clear errors on degenerate landmarks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from DeepSSMLogic.augment.tps import (
    ThinPlateSpline,
    fit_warp,
    sampling_deviation,
    sampling_positions,
    warp_images,
)
from DeepSSMLogic.errors import InputError
from DeepSSMLogic.geometry import Grid


def _cloud(n: int = 60, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 3)) * 12.0


def _rotation(deg: float) -> np.ndarray:
    t = np.radians(deg)
    return np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1.0]])


def test_tps_interpolates_landmarks():
    rng = np.random.default_rng(1)
    ctrl = torch.as_tensor(_cloud()[None].repeat(2, 0))
    vals = ctrl + torch.as_tensor(rng.normal(size=ctrl.shape) * 3.0)
    spline = ThinPlateSpline(ctrl, vals)
    assert float((spline(ctrl) - vals).abs().max()) < 1e-3
    # The backward warp maps every target landmark exactly onto its source landmark.
    src, tgt = _cloud(seed=2)[None], _cloud(seed=2)[None] + rng.normal(size=(1, 60, 3))
    warp = fit_warp(src, tgt)
    mapped = torch.as_tensor(tgt) + warp(torch.as_tensor(tgt))
    assert float((mapped - torch.as_tensor(src)).norm(dim=-1).max()) < 1e-3


def test_tps_reproduces_affine_maps_and_regularisation_smooths():
    pts = _cloud(seed=3)
    a = np.array([[1.1, 0.1, 0.0], [0.0, 0.9, 0.2], [0.05, 0.0, 1.0]])
    spline = ThinPlateSpline(torch.as_tensor(pts), torch.as_tensor(pts @ a.T + [1.0, -2.0, 3.0]))
    q = torch.as_tensor(_cloud(seed=4))[None]
    assert torch.allclose(
        spline(q)[0], q[0] @ torch.as_tensor(a).T + torch.tensor([1.0, -2.0, 3.0]), atol=1e-6
    )
    noisy = pts + np.random.default_rng(5).normal(size=pts.shape)
    exact = ThinPlateSpline(torch.as_tensor(pts), torch.as_tensor(noisy))
    smooth = ThinPlateSpline(torch.as_tensor(pts), torch.as_tensor(noisy), regularization=50.0)
    at = torch.as_tensor(pts)[None]
    assert float((exact(at)[0] - torch.as_tensor(noisy)).abs().max()) < 1e-6
    assert float((smooth(at)[0] - torch.as_tensor(noisy)).abs().max()) > 0.05


def test_identity_warp_leaves_image_unchanged():
    grid = Grid((-20.0, -16.0, -12.0), (1.0, 1.0, 1.5), (40, 32, 16))
    img = torch.rand(2, 1, *grid.shape_zyx)
    pts = np.stack([_cloud(seed=6) * 0.8, _cloud(seed=7) * 0.8])
    for coarse in (1, 4):
        out = warp_images(img, grid, pts, pts, coarse=coarse)
        assert torch.allclose(out, img, atol=1e-4)
    seg = (img > 0.5).to(torch.uint8)
    out = warp_images(seg, grid, pts, pts, mode="nearest")
    assert out.dtype == torch.uint8 and torch.equal(out, seg)


def test_translation_moves_content_with_non_identity_direction():
    """A rigid shift of the landmarks must shift the image by the same mm along the grid's axes, for a
    rotated grid with anisotropic spacing (checks the LPS mm <-> voxel index conversion)."""
    rot = _rotation(30.0)
    grid = Grid((5.0, -3.0, 2.0), (1.0, 1.5, 2.0), (36, 28, 20), tuple(rot.ravel()))
    idx = np.stack(np.meshgrid(*(np.arange(n) for n in grid.shape_zyx), indexing="ij"), -1)
    img = torch.as_tensor(np.sin(idx[..., 2] / 4.0) + np.cos(idx[..., 1] / 3.0) + 0.1 * idx[..., 0])
    img = img.float()[None, None]
    centre = grid.index_to_physical(np.array([17.5, 13.5, 9.5]))
    src = centre + _cloud(seed=8) * 0.5
    shift_index = np.array([2.0, -1.0, 1.0])  # voxels along i, j, k
    shift_mm = rot @ (np.asarray(grid.spacing) * shift_index)
    tgt = src + shift_mm
    out = warp_images(img, grid, src[None], tgt[None], coarse=1)[0, 0].numpy()
    # Output voxel (i, j, k) shows the source at (i, j, k) - shift.
    expected = np.roll(img[0, 0].numpy(), shift=(1, -1, 2), axis=(0, 1, 2))
    inner = (slice(3, -3), slice(3, -3), slice(4, -4))
    np.testing.assert_allclose(out[inner], expected[inner], atol=1e-4)
    # Sampling positions are the output index minus the shift, in (i, j, k).
    pos = sampling_positions(fit_warp(src[None], tgt[None]), grid, coarse=1)[0].numpy()
    np.testing.assert_allclose(pos[5, 6, 7], np.array([7, 6, 5]) - shift_index, atol=1e-4)


def _femur_pair(size=(48, 40, 44), spacing=1.0, n_particles=512):
    from DeepSSMLogic.synthetic import make_subject

    a = make_subject(
        "femur", np.random.default_rng(11), image_size=size, spacing=spacing, n_particles=n_particles
    )
    b = make_subject(
        "femur", np.random.default_rng(12), image_size=size, spacing=spacing, n_particles=n_particles
    )
    return a, b


@pytest.mark.slow
def test_warped_segmentation_boundary_meets_generated_particles():
    from DeepSSMLogic.synthetic import make_subject

    a = make_subject(
        "femur", np.random.default_rng(11), image_size=(56, 48, 64), spacing=1.0, n_particles=512
    )
    # A generated shape clearly different from the source: enlarged 15% and bent (several voxels).
    c = a.particles.mean(axis=0)
    gen = c + 1.15 * (a.particles - c)
    gen[:, 0] += 2.5 * np.sin((gen[:, 2] - c[2]) / 8.0)
    seg = torch.as_tensor(a.segmentation)[None, None]
    warped = warp_images(seg, a.grid, a.particles[None], gen[None], mode="nearest")[0, 0].numpy()
    assert warped.dtype == np.uint8 and warped.any()

    def boundary_distance(mask: np.ndarray) -> np.ndarray:
        inside = mask.astype(bool)
        dist = ndimage.distance_transform_edt(~(inside ^ ndimage.binary_erosion(inside)))
        idx = np.rint(a.grid.physical_to_index(gen)).astype(int)
        return dist[idx[:, 2], idx[:, 1], idx[:, 0]]

    d = boundary_distance(warped)
    # Within one voxel (+ the half-voxel rounding of the particle position).
    assert np.percentile(d, 95) <= 1.0 and d.max() <= 1.0 + np.sqrt(3) / 2, (np.percentile(d, 95), d.max())
    d0 = boundary_distance(a.segmentation)  # the unwarped segmentation misses the generated shape
    assert d0.max() > 2.0 and d0.mean() > 2 * d.mean()


@pytest.mark.slow
def test_fast_path_within_005_voxel_of_exact_on_realistic_field():
    """Synthetic femur correspondences (1024 particles) warped to another subject's on a 1 mm grid."""
    a, b = _femur_pair(size=(72, 56, 64), n_particles=1024)
    spline = fit_warp(a.particles[None], b.particles[None])
    exact = sampling_positions(spline, a.grid, coarse=1)
    disp = (
        exact[0]
        - torch.stack(torch.meshgrid(*(torch.arange(n) for n in a.grid.shape_zyx), indexing="ij")[::-1], -1)
    ).norm(dim=-1)
    assert float(disp.max()) > 3.0  # a real deformation, not a near-identity
    dev = sampling_deviation(spline, a.grid, reference=exact)
    assert dev["max_voxels"] <= 0.05, dev
    coarse_only = sampling_deviation(spline, a.grid, coarse=4, band=0.0, reference=exact)
    assert coarse_only["max_voxels"] > dev["max_voxels"]  # the exact band is what buys the accuracy


@pytest.mark.parametrize(
    ("src", "tgt", "match"),
    [
        (np.c_[_cloud()[:, :2], np.zeros(60)], None, "coplanar"),
        (np.r_[_cloud()[:59], _cloud()[:1]], None, "duplicates"),
        (np.where(np.arange(180).reshape(60, 3) == 7, np.nan, _cloud()), None, "NaN"),
        (_cloud(), _cloud()[:50], "same shape"),
        (_cloud()[:4], _cloud()[:4], "at least 5"),
    ],
)
def test_degenerate_landmarks_raise_clear_errors(src, tgt, match):
    tgt = src.copy() if tgt is None else tgt
    with pytest.raises(InputError, match=match):
        fit_warp(src[None], tgt[None])


def test_degenerate_target_named_and_bad_images_rejected():
    src = _cloud()
    tgt = src.copy()
    tgt[:, 2] = 0.0
    with pytest.raises(InputError, match=r"target_points.*coplanar"):
        fit_warp(src[None], tgt[None])
    grid = Grid((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), (8, 8, 8))
    with pytest.raises(InputError, match="spatial shape"):
        warp_images(torch.zeros(1, 1, 8, 8, 9), grid, src[None], src[None])
    with pytest.raises(InputError, match="batch"):
        warp_images(torch.zeros(2, 1, 8, 8, 8), grid, src[None], src[None])


def test_batched_fit_with_many_landmarks_matches_single_fits():
    """Batches of large landmark sets (a batched CPU LU bug in torch 2.13 broke these) interpolate."""
    rng = np.random.default_rng(9)
    src = rng.normal(size=(2, 700, 3)) * 20.0
    tgt = src + rng.normal(size=src.shape)
    warp = fit_warp(src, tgt)
    mapped = torch.as_tensor(tgt) + warp(torch.as_tensor(tgt))
    assert float((mapped - torch.as_tensor(src)).norm(dim=-1).max()) < 1e-3
    single = fit_warp(src[1:], tgt[1:])
    assert torch.allclose(warp.weights[1], single.weights[0], atol=1e-8)
