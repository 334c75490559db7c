"""The automatic default grid spacing (issue 16): chosen from the anatomy's size for a voxel budget,
never finer than the images, the user's --spacing / --downsample win, the summary says why."""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk

from DeepSSMLogic.errors import InputError
from DeepSSMLogic.geometry import Grid
from DeepSSMLogic.pipeline import (
    CPU_VOXEL_BUDGET,
    CUDA_VOXEL_BUDGET,
    TrainingOptions,
    auto_grid_spacing,
    default_voxel_budget,
    reference_grid,
    resolve_spacing,
)


def _box(extent_mm, n_subjects: int = 3) -> np.ndarray:
    """Particles whose bounding box is ``extent_mm`` (x, y, z), for ``n_subjects`` subjects."""
    rng = np.random.default_rng(0)
    pts = rng.uniform(0, 1, size=(n_subjects, 40, 3)) * np.asarray(extent_mm)
    pts[0, 0], pts[0, 1] = 0.0, extent_mm
    return pts


def _voxels(pts, spacing, margin=10.0) -> int:
    return int(np.prod(Grid.bounding(pts, spacing, margin).size))


def test_a_small_anatomy_keeps_the_images_spacing():
    pts = _box((60, 50, 40))  # + 2 × 10 mm margin: 80×70×60 mm → 54×47×41 voxels at 1.5 mm
    spacing, reason = auto_grid_spacing(pts, (1.5, 1.5, 1.5), 10.0, 48**3)
    assert spacing == (1.5, 1.5, 1.5)
    assert "the images' spacing 1.5 mm" in reason and "within the 48³ voxel budget" in reason


def test_a_large_anatomy_gets_the_finest_spacing_within_the_budget():
    pts = _box((100, 80, 120))  # 120×100×140 mm with the margin
    spacing, reason = auto_grid_spacing(pts, (1.0, 1.0, 1.0), 10.0, 48**3)
    s = spacing[0]
    assert spacing == (s, s, s) and s > 1.0
    assert _voxels(pts, spacing) <= 48**3 < _voxels(pts, s - 0.05)  # the finest multiple of 0.05 mm that fits
    assert abs(s / 0.05 - round(s / 0.05)) < 1e-9
    assert reason.startswith(f"spacing {s:g} mm chosen from a 120×100×140 mm anatomy")
    assert "for the 48³ voxel budget" in reason and "set --spacing" in reason
    grid = reference_grid(pts, spacing, 10.0)
    assert int(np.prod(grid.size)) <= 48**3


def test_never_finer_than_the_images_on_any_axis():
    pts = _box((100, 80, 120))
    spacing, _ = auto_grid_spacing(pts, (1.0, 1.0, 4.0), 10.0, 48**3)  # thick slices along z
    assert spacing[2] == 4.0 and spacing[0] == spacing[1] > 1.0
    assert _voxels(pts, spacing) <= 48**3


def test_a_frame_mix_up_is_refused_not_hidden_by_a_coarse_spacing(tmp_path):
    pts = _box((100, 80, 120))
    pts[1] += 5000.0  # one subject metres away (local particles without their transforms)
    with pytest.raises(
        InputError, match=r"reference grid too large.*subject 's1'.*checked before the automatic"
    ):
        resolve_spacing(
            TrainingOptions(device="cpu"), pts, _first_subject(tmp_path, (1.0, 1.0, 1.0)), ["s0", "s1", "s2"]
        )


def test_the_budget_depends_on_the_device():
    assert default_voxel_budget("cpu") == (CPU_VOXEL_BUDGET, "cpu")
    assert default_voxel_budget("cuda:1") == (CUDA_VOXEL_BUDGET, "cuda")
    assert CUDA_VOXEL_BUDGET > CPU_VOXEL_BUDGET


def _first_subject(tmp_path, spacing=(0.5, 0.5, 0.5)):
    img = sitk.Image(8, 8, 8, sitk.sitkFloat32)
    img.SetSpacing(spacing)
    sitk.WriteImage(img, str(tmp_path / "a.nrrd"))
    return SimpleNamespace(id="a", image=tmp_path / "a.nrrd")


def test_the_users_spacing_and_downsample_win(tmp_path):
    pts, first = _box((100, 80, 120)), _first_subject(tmp_path)
    spacing, info = resolve_spacing(TrainingOptions(spacing=0.7, device="cpu"), pts, first)
    assert spacing == 0.7 and info["source"] == "--spacing"
    spacing, info = resolve_spacing(TrainingOptions(downsample=2.0, device="cpu"), pts, first)
    assert spacing == (0.5, 0.5, 0.5) and info == {
        "source": "image",
        "reason": "the images' spacing (--downsample 2)",
    }
    spacing, info = resolve_spacing(TrainingOptions(spacing="image", device="cpu"), pts, first)
    assert spacing == (0.5, 0.5, 0.5) and info["source"] == "image"
    spacing, info = resolve_spacing(TrainingOptions(device="cpu"), pts, first)
    assert spacing[0] > 0.5 and info["source"] == "auto" and info["voxel_budget"] == CPU_VOXEL_BUDGET
    spacing, info = resolve_spacing(TrainingOptions(device="cuda", voxel_budget=1000), pts, first)
    assert info["voxel_budget"] == 1000 and info["budget_for"] == "given"
    with pytest.raises(InputError, match="--spacing: expected a number of mm, 'auto' or 'image'"):
        resolve_spacing(TrainingOptions(spacing="fine"), pts, first)


def test_cli_spacing_argument():
    from DeepSSMLogic.commands.train import spacing_arg

    assert spacing_arg("auto") is None and spacing_arg("IMAGE") == "image" and spacing_arg("2.5") == 2.5
    for bad in ("0", "-1", "fine", "inf"):
        with pytest.raises(argparse.ArgumentTypeError):
            spacing_arg(bad)


def test_training_records_the_automatic_choice(tmp_path):
    """End to end on a tiny cohort (3 mm images) with a 12³ budget: the bundle's grid is the chosen
    one and the training summary says what was chosen and why."""
    from DeepSSMLogic.bundle import load_bundle
    from DeepSSMLogic.pipeline import train_model
    from DeepSSMLogic.synthetic import generate_cohort

    csv = generate_cohort(
        "cranium", 8, tmp_path / "cohort", seed=3, image_size=(32, 32, 32), spacing=3.0, n_particles=64
    )
    opts = TrainingOptions(epochs=1, batch_size=4, device="cpu", voxel_budget=12**3, encoder="light")
    outcome = train_model(csv, tmp_path / "m.zip", opts)
    grid = outcome.summary["grid"]
    b = load_bundle(outcome.bundle)
    assert grid["source"] == "auto" and grid["voxel_budget"] == 12**3
    assert list(b.grid.spacing) == grid["spacing_mm"] and b.grid.spacing[0] > 3.0
    assert int(np.prod(b.grid.size)) <= 12**3 and list(b.grid.size) == grid["size"]
    assert "chosen from a" in grid["reason"] and "12³ voxel budget" in grid["reason"]
    assert b.meta["training_summary"]["grid"] == grid
