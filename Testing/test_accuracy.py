"""Accuracy on synthetic cohorts with exact ground truth (the demo settings, CPU).

For each family: held-out RMSE (paper eq. 12) ≤ 0.5 × the RMSE of predicting the training mean
shape, at the demo settings (light encoder, 80 augmented samples, 15 epochs). A pose-jittered
held-out image predicts as well as the original thanks to the alignment step, and markedly worse
without it.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import SimpleITK as sitk

from DeepSSMLogic import io
from DeepSSMLogic.analysis.metrics import rmse
from DeepSSMLogic.commands.demo import DemoResult, DemoSettings, run_demo
from DeepSSMLogic.predict import Predictor, apply_matrix

pytestmark = pytest.mark.slow

_RESULTS: dict[tuple[str, bool], tuple[DemoResult, object]] = {}

# The three-family criterion trains three demo models (about 1.5-2 min each on 2 CPU cores); set
# DEEPSSM_SKIP_ACCURACY=1 to skip it locally. CI runs it.
RUN_ACCURACY = os.environ.get("DEEPSSM_SKIP_ACCURACY") != "1"


def _demo(family: str, tmp_path_factory, quick: bool = False) -> tuple[DemoResult, object]:
    key = (family, quick)
    if key not in _RESULTS:
        out = tmp_path_factory.mktemp(f"acc_{family}")
        settings = DemoSettings(family=family, seed=0)
        if quick:  # enough for the pose test, which compares the same network with itself
            settings.n_subjects, settings.augment, settings.epochs = 24, 48, 6
        _RESULTS[key] = (run_demo(out, settings, test_subjects=4), out)
    return _RESULTS[key]


# Held-out RMSE ≤ 0.5 × the mean-shape RMSE on every family (issue 16). Measured at the demo settings
# (light encoder, 80 KDE samples, 15 epochs, 4 test subjects, 2026-12-06; docs/ACCURACY.md): femur
# 0.088 vs 0.291 mm (0.30), atrium 0.828 vs 3.607 mm (0.23), cranium 0.171 vs 0.612 mm (0.28). The
# paper's network at the previous demo settings (200 samples, 20 epochs, 2.5-7 min a family) left the
# cranium at 0.79.
CRITERION = {"femur": 0.5, "atrium": 0.5, "cranium": 0.5}


@pytest.mark.skipif(not RUN_ACCURACY, reason="DEEPSSM_SKIP_ACCURACY=1")
@pytest.mark.parametrize(
    "family",
    [
        "femur",  # measured 0.088 vs 0.291 mm (ratio 0.30)
        "atrium",  # measured 0.828 vs 3.607 mm (ratio 0.23)
        "cranium",  # measured 0.171 vs 0.612 mm (ratio 0.28)
    ],
)
def test_heldout_rmse_beats_the_mean_shape_by_the_criterion(family, tmp_path_factory):
    result, _ = _demo(family, tmp_path_factory)
    assert result.n_test >= 4
    ratio = CRITERION[family]
    assert result.heldout_rmse_mm <= ratio * result.baseline_rmse_mm, (
        f"{family}: held-out {result.heldout_rmse_mm:.3f} mm vs mean-shape {result.baseline_rmse_mm:.3f} mm "
        f"(criterion ratio {ratio})"
    )


def _moved(image: sitk.Image, pose: np.ndarray) -> sitk.Image:
    """The same anatomy moved by ``pose`` (4x4, physical), on the same voxel grid."""
    inv = np.linalg.inv(pose)
    tx = sitk.AffineTransform(3)
    tx.SetMatrix(tuple(inv[:3, :3].ravel()))
    tx.SetTranslation(tuple(inv[:3, 3]))
    background = float(sitk.GetArrayViewFromImage(image).min())
    return sitk.Resample(image, image, tx, sitk.sitkLinear, background)


def test_pose_jitter_is_absorbed_by_the_alignment(tmp_path_factory):
    from DeepSSMLogic.cohort import load_cohort

    result, out = _demo("cranium", tmp_path_factory, quick=not RUN_ACCURACY)
    cohort = load_cohort(out / "cohort" / "cohort.csv")
    test = cohort.by_split("test")[:4]
    a = np.deg2rad(4.0)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1.0]])
    pose = np.eye(4)
    pose[:3, :3] = rot
    pose[:3, 3] = [3.0, -2.5, 2.0]
    aligned = Predictor(result.bundle, device="cpu", align=True)
    unaligned = Predictor(result.bundle, device="cpu", align=False)
    r_orig, r_jit, r_noalign, d_jit, d_noalign = [], [], [], [], []
    for s in test:
        img = io.read_image(s.image)
        gt = io.read_particles(s.particles)
        jittered = _moved(img, pose)
        gt_j = apply_matrix(pose, gt)
        p_orig = aligned.predict(img).particles
        p_jit = aligned.predict(jittered).particles
        p_noalign = unaligned.predict(jittered).particles
        r_orig.append(rmse(p_orig, gt))
        r_jit.append(rmse(p_jit, gt_j))
        r_noalign.append(rmse(p_noalign, gt_j))
        # the network-independent part: the moved image must give the moved prediction
        d_jit.append(rmse(p_jit, apply_matrix(pose, p_orig)))
        d_noalign.append(rmse(p_noalign, apply_matrix(pose, p_orig)))
    orig, jit, noalign = (float(np.mean(r)) for r in (r_orig, r_jit, r_noalign))
    dj, dn = float(np.mean(d_jit)), float(np.mean(d_noalign))
    assert dj <= 0.35, f"aligned prediction of the jittered image is {dj:.3f} mm from the moved original"
    assert dn >= max(1.0, 3.0 * dj), f"without alignment {dn:.3f} mm vs with {dj:.3f} mm"
    assert jit <= 1.25 * orig + 0.05, f"jittered {jit:.3f} mm vs original {orig:.3f} mm (vs ground truth)"
    # against ground truth too (measured: 2.73 vs 1.07 mm quick, 2.5-3.1 vs 0.3-1.9 mm per subject trained)
    factor = 2.0 if RUN_ACCURACY else 1.5
    assert noalign >= factor * jit, f"without alignment {noalign:.3f} mm vs with {jit:.3f} mm"
