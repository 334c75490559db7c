"""Training end to end on tiny synthetic cohorts (slow): TL-DeepSSM through the CLI to a bundle and a
prediction, training with alignment on, and the paper's ``valid`` convolutions. Each checks content:
the bundle holds the trained (best) weights, and the Predictor on the reloaded bundle gives what the
network gives on the same input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from DeepSSMLogic import io
from DeepSSMLogic.bundle import load_bundle
from DeepSSMLogic.cli import main
from DeepSSMLogic.cohort import load_cohort
from DeepSSMLogic.predict import Predictor, apply_matrix
from DeepSSMLogic.preprocess import resample_to_grid
from DeepSSMLogic.synthetic import generate_cohort
from DeepSSMLogic.training import load_checkpoint

pytestmark = pytest.mark.slow


def _assert_bundle_holds_the_best_weights(model: Path, work: Path) -> None:
    best = load_checkpoint(work / "training" / "checkpoint.pt")["best_state"]
    b = load_bundle(model)
    state = b.network.state_dict()
    stored = torch.load(b._files_dir / "weights.pt", weights_only=True)  # float16 where the bundle chose it
    assert set(state) == set(best)
    for k, v in state.items():
        assert torch.equal(v, best[k].to(stored[k].dtype).to(v.dtype)), k


def _assert_predictor_is_the_network(model: Path, image: Path) -> np.ndarray:
    """Predictor(align=False) on ``image`` == the bundle's network on the resampled, normalised image."""
    b = load_bundle(model)
    pred = Predictor(b, device="cpu", align=False).predict(image)
    x = np.asarray(b.normalizer(resample_to_grid(io.read_image(image), b.grid)), dtype=np.float32)
    with torch.no_grad():
        descriptor, particles = b.network(torch.as_tensor(x)[None, None])
    assert pred.descriptor_kind == b.descriptor_kind
    np.testing.assert_allclose(pred.particles, particles[0].double().numpy(), atol=1e-4)
    np.testing.assert_allclose(pred.descriptor, descriptor[0].double().numpy(), atol=1e-4)
    return pred.particles


def test_tl_deepssm_through_the_cli_to_a_bundle_and_a_prediction(tmp_path, capsys):
    csv = generate_cohort(
        "femur", 10, tmp_path / "c", seed=2, image_size=(24, 24, 24), spacing=3.0, n_particles=32
    )
    model = tmp_path / "tl.zip"
    stages = ["ae_epochs=2", "tf_epochs=1", "joint_epochs=1", "latent_dim=6", "ae_hidden=32"]
    extra = [a for s in stages for a in ("--extra", s)]
    argv = ["train", str(csv), "--out", str(model), "--variant", "tl", "--batch-size", "4", "--device", "cpu"]
    assert main([*argv, *extra, "--quiet"]) == 0, capsys.readouterr().err
    b = load_bundle(model)
    assert b.descriptor_kind == "latent" and b.meta["architecture"]["variant"] == "tl"
    assert b.meta["hyperparameters"]["train_config"]["latent_dim"] == 6
    assert b.meta["training_summary"]["epochs_run"] == 4  # 2 + 1 + 1
    _assert_bundle_holds_the_best_weights(model, tmp_path / "tl.work")
    test = load_cohort(csv).by_split("test")[0]
    particles = _assert_predictor_is_the_network(model, test.image)
    assert particles.shape == (32, 3)
    assert (
        main(["predict", str(model), str(test.image), "--out", str(tmp_path / "p"), "--no-align", "--quiet"])
        == 0
    )
    written = io.read_particles(tmp_path / "p" / f"{test.image.name.removesuffix('.nrrd')}.particles")
    np.testing.assert_allclose(written, particles, atol=1e-5)


def _move(path: Path, pose: np.ndarray, interpolator) -> None:
    """Rewrite the image at ``path`` with its content moved by ``pose`` (4x4, LPS mm), same grid."""
    img = io.read_image(path)
    inv = np.linalg.inv(pose)
    tx = sitk.AffineTransform(3)
    tx.SetMatrix(tuple(inv[:3, :3].ravel()))
    tx.SetTranslation(tuple(inv[:3, 3]))
    background = float(sitk.GetArrayViewFromImage(img).min())
    io.write_image(sitk.Resample(img, img, tx, interpolator, background), path)


def _posed_cohort(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A femur cohort whose training subjects 1, 3, 5 ... are moved by 8° and 5 mm (images,
    segmentations and particles together). Returns the CSV, the poses and the unmoved particles."""
    csv = generate_cohort(
        "femur", 8, tmp_path / "c", seed=4, image_size=(40, 40, 40), spacing=1.5, n_particles=64
    )
    a = np.deg2rad(8.0)
    pose = np.eye(4)
    pose[:3, :3] = [[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]
    pose[:3, 3] = [4.0, -3.0, 2.0]
    poses, unmoved = {}, {}
    for k, s in enumerate(load_cohort(csv).by_split("train")):
        unmoved[s.id] = io.read_particles(s.particles)
        poses[s.id] = pose if k % 2 else np.eye(4)
        if k % 2:
            _move(s.image, pose, sitk.sitkLinear)
            _move(s.segmentation, pose, sitk.sitkNearestNeighbor)
            io.write_particles(s.particles, apply_matrix(pose, unmoved[s.id]))
    return csv, poses, unmoved


def test_align_training_arrays_moves_images_and_particles_together(tmp_path):
    from scipy import ndimage

    from DeepSSMLogic.pipeline import (
        align_training_arrays,
        mean_reference_image,
        prepare_training_arrays,
        reference_grid,
    )

    csv, poses, unmoved = _posed_cohort(tmp_path)
    subjects = load_cohort(csv).by_split("train")
    grid = reference_grid(np.stack(list(unmoved.values())), 1.5, 10.0)
    still = [s for s in subjects if np.allclose(poses[s.id], np.eye(4))]
    reference = mean_reference_image(prepare_training_arrays(still, grid).images, grid)
    arrays = prepare_training_arrays(subjects, grid)
    aligned, matrices = align_training_arrays(subjects, arrays, reference)
    for i, s in enumerate(subjects):
        # the registration undoes the pose: back within ~1 mm of the unmoved shape (the pose is 5-7 mm)
        off = np.linalg.norm(aligned.particles[i] - unmoved[s.id], axis=1).mean()
        assert off < 1.5, f"{s.id}: aligned particles {off:.2f} mm from the unmoved ones"
        np.testing.assert_allclose(
            apply_matrix(matrices[i], aligned.particles[i]), arrays.particles[i], atol=1e-6
        )
        # image and particles moved together: the aligned segmentation's surface is on the aligned particles
        inside = aligned.segmentations[i].astype(bool)
        dist = ndimage.distance_transform_edt(~(inside ^ ndimage.binary_erosion(inside)))
        idx = np.rint(grid.physical_to_index(aligned.particles[i])).astype(int)
        d = dist[idx[:, 2], idx[:, 1], idx[:, 0]]
        assert np.percentile(d, 90) <= 1.0 and d.max() <= 2.0, (s.id, np.percentile(d, 90), d.max())


def test_train_model_with_alignment_on(tmp_path):
    from DeepSSMLogic.pipeline import TrainingOptions, train_model

    csv, _poses, _ = _posed_cohort(tmp_path)
    opts = TrainingOptions(epochs=1, batch_size=4, device="cpu", spacing=3.0, align=True)
    events = []
    outcome = train_model(csv, tmp_path / "m", opts, progress=events.append)
    assert outcome.summary["training_images_aligned"] is True
    assert outcome.summary["epochs"] == {"n": 1, "source": "given"}
    n_train = outcome.summary["n_train_subjects"]
    assert sum(e.stage == "align" for e in events) >= n_train  # every training subject was registered
    _assert_bundle_holds_the_best_weights(outcome.bundle, outcome.work_dir)
    test = load_cohort(csv).by_split("test")[0]
    assert _assert_predictor_is_the_network(outcome.bundle, test.image).shape == (64, 3)
    assert Predictor(load_bundle(outcome.bundle), device="cpu").predict(test.image).particles.shape == (64, 3)


def test_train_model_with_the_papers_valid_convolutions(tmp_path):
    from DeepSSMLogic.networks import minimum_grid_size
    from DeepSSMLogic.pipeline import TrainingOptions, reference_grid, train_model

    csv = generate_cohort(
        "cranium", 6, tmp_path / "c", seed=5, image_size=(24, 24, 24), spacing=3.0, n_particles=32
    )
    coh = load_cohort(csv)
    parts = np.stack([io.read_particles(s.particles) for s in coh.by_split("train")])
    spacing, need = 2.0, minimum_grid_size("valid")
    # the smallest margin that gives the valid encoder its 60 voxels per axis
    margin = next(m for m in np.arange(0.0, 80.0, 1.0) if min(reference_grid(parts, spacing, m).size) >= need)
    opts = TrainingOptions(
        epochs=1, batch_size=2, device="cpu", spacing=spacing, margin_mm=float(margin), encoder="paper"
    )  # the default encoder (light2) always pads
    outcome = train_model(coh, tmp_path / "m", opts)
    b = load_bundle(outcome.bundle)
    assert b.meta["architecture"]["conv_padding"] == "valid" and min(b.grid.size) == need
    _assert_bundle_holds_the_best_weights(outcome.bundle, outcome.work_dir)
    assert _assert_predictor_is_the_network(outcome.bundle, coh.by_split("test")[0].image).shape == (32, 3)
