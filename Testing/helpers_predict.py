"""Small phantoms and a tiny untrained bundle for the bundle / predictor / CLI tests (fast, CPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from DeepSSMLogic.bundle import save_bundle
from DeepSSMLogic.geometry import Grid
from DeepSSMLogic.networks import BaseDeepSSM
from DeepSSMLogic.preprocess import IntensityNormalizer, resample_to_grid
from DeepSSMLogic.shape_model import ShapeModel


def rotation(deg_xyz: tuple[float, float, float]) -> np.ndarray:
    """3x3 rotation from Euler angles in degrees (x, then y, then z)."""
    ax, ay, az = np.deg2rad(deg_xyz)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def rigid(deg_xyz=(0.0, 0.0, 0.0), shift=(0.0, 0.0, 0.0), centre=(0.0, 0.0, 0.0)) -> np.ndarray:
    """4x4 rigid motion rotating about ``centre`` then shifting by ``shift`` (mm)."""
    r = rotation(deg_xyz)
    c = np.asarray(centre, dtype=np.float64)
    m = np.eye(4)
    m[:3, :3] = r
    m[:3, 3] = c - r @ c + np.asarray(shift, dtype=np.float64)
    return m


def phantom_value(q: np.ndarray, radii=(14.0, 10.0, 8.0)) -> np.ndarray:
    """Intensity of an asymmetric phantom at phantom-frame points ``q`` (..., 3) mm."""
    f = np.sqrt(((q / np.asarray(radii)) ** 2).sum(-1))
    body = 1.0 / (1.0 + np.exp((f - 1.0) * 12.0))
    bump = np.exp(-(((q - np.array([9.0, 6.0, 3.0])) ** 2).sum(-1)) / (2 * 3.0**2))
    dark = np.exp(-(((q - np.array([-6.0, -3.0, -2.0])) ** 2).sum(-1)) / (2 * 2.5**2))
    return 20.0 + 100.0 * body + 60.0 * bump - 50.0 * dark


def phantom_image(
    pose: np.ndarray | None = None,
    size=(40, 36, 32),
    spacing=(1.5, 1.5, 1.5),
    origin=None,
    direction=None,
    noise: float = 2.0,
    seed: int = 0,
    radii=(14.0, 10.0, 8.0),
) -> sitk.Image:
    """A phantom placed by ``pose`` (4x4 phantom frame → physical) on an image grid (mm, LPS)."""
    pose = np.eye(4) if pose is None else pose
    sp = np.asarray(spacing, dtype=np.float64)
    if origin is None:
        origin = -(np.asarray(size) - 1) * sp / 2.0
    grid = Grid(
        tuple(float(v) for v in origin),
        tuple(sp.tolist()),
        tuple(int(s) for s in size),
        tuple(np.eye(3).ravel()) if direction is None else tuple(np.asarray(direction, dtype=float).ravel()),
    )
    phys = grid.physical_coordinates()
    inv = np.linalg.inv(pose)
    q = phys @ inv[:3, :3].T + inv[:3, 3]
    arr = phantom_value(q, radii).astype(np.float32)
    arr += np.random.default_rng(seed).normal(0.0, noise, arr.shape).astype(np.float32)
    img = sitk.GetImageFromArray(arr)
    img.SetOrigin(grid.origin)
    img.SetSpacing(grid.spacing)
    img.SetDirection(grid.direction)
    return img


def phantom_particles(n: int = 64, radii=(14.0, 10.0, 8.0), seed: int = 3) -> np.ndarray:
    """``(n, 3)`` points on the phantom's ellipsoid surface (phantom frame, mm)."""
    rng = np.random.default_rng(seed)
    d = rng.normal(size=(n, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    return d * np.asarray(radii)


def reference_grid_for_phantom() -> Grid:
    return Grid((-22.0, -18.0, -16.0), (2.0, 2.0, 2.0), (23, 19, 17))


def tiny_bundle_parts(seed: int = 0, n_particles: int = 64, encoder: str = "paper"):
    """What :func:`make_tiny_bundle` saves: ``(network (eval mode), shape_model, grid, reference image,
    normaliser)``. The network is built right after ``torch.manual_seed(seed)`` (nothing else draws
    from torch's generator), so two calls with one seed give identical weights."""
    import torch

    grid = reference_grid_for_phantom()
    base = phantom_particles(n_particles)
    scales = np.linspace(0.85, 1.15, 6)
    shapes = np.stack([base * np.array([s, 1.0, 2.0 - s]) for s in scales])
    sm = ShapeModel.fit(shapes).truncated(3)
    ref = phantom_image(noise=0.0)
    ref_arr = resample_to_grid(ref, grid)
    ref_img = sitk.GetImageFromArray(ref_arr)
    ref_img.SetOrigin(grid.origin)
    ref_img.SetSpacing(grid.spacing)
    normalizer = IntensityNormalizer.fit(ref_arr[None])
    torch.manual_seed(seed)
    net = BaseDeepSSM(
        grid.shape_zyx,
        3,
        sm.mean,
        sm.components,
        sm.score_mean,
        sm.score_std,
        conv_padding="same",
        encoder=encoder,
    ).eval()
    return net, sm, grid, ref_img, normalizer


def make_tiny_bundle(path: Path, seed: int = 0, n_particles: int = 64, encoder: str = "paper") -> Path:
    """An untrained Base-DeepSSM bundle on a 23×19×17 grid (2 mm); PCA from scaled phantoms."""
    net, sm, grid, ref_img, normalizer = tiny_bundle_parts(seed, n_particles, encoder)
    return save_bundle(
        path,
        net,
        net.architecture,
        grid,
        normalizer,
        sm,
        ref_img,
        training_summary={"note": "untrained test bundle"},
    )


def save_calibrated_bundle(path: Path, net, spec, val_set, train_images, parts) -> Path:
    """``net`` with uncertainty ``spec`` calibrated on ``val_set`` (items ``(raw (1, Z, Y, X), particles)``)
    by the pipeline's calibration step and saved with its uncertainty and OOD calibration;
    ``parts``: ``(shape_model, grid, reference image, normaliser)`` of :func:`tiny_bundle_parts`."""
    from DeepSSMLogic.pipeline import _calibrate  # the pipeline's own calibration step

    sm, grid, ref, norm = parts
    cal = _calibrate(net, spec, val_set, norm, ref, sm, train_images)
    return save_bundle(
        path,
        net,
        net.architecture,
        grid,
        norm,
        sm,
        ref,
        uncertainty=cal.spec.to_dict(),
        ood=cal.ood.to_dict(),
    )


def predict_mesh_uncertainty(model: Path, image: Path, out: Path, *flags: str) -> tuple[dict, object]:
    """``deepssm predict MODEL IMAGE --mesh --no-align`` into ``out``; checks the mesh carries one
    ``uncertainty_mm`` value per point and returns ``(<stem>.json, mesh)``."""
    import json

    from DeepSSMLogic import io
    from DeepSSMLogic.cli import main

    rc = main(
        ["predict", str(model), str(image), "--out", str(out), "--mesh", "--no-align", "--quiet", *flags]
    )
    assert rc == 0
    stem = image.name[: -len(".nrrd")]
    mesh = io.read_mesh(out / f"{stem}.vtk")
    arr = mesh.GetPointData().GetArray("uncertainty_mm")
    assert arr is not None and arr.GetNumberOfTuples() == mesh.GetNumberOfPoints()
    return json.loads((out / f"{stem}.json").read_text()), mesh
