"""Reference grid and training-array preparation (DeepSSMLogic.pipeline)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk

from DeepSSMLogic import io
from DeepSSMLogic.errors import InputError, ValidationError
from DeepSSMLogic.pipeline import TrainingArrays, prepare_training_arrays, reference_grid


def _ball_image(center, size=(24, 20, 16), spacing=(2.0, 2.0, 2.0), origin=(-20.0, -18.0, -10.0)):
    idx = np.stack(np.meshgrid(*(np.arange(n) for n in size[::-1]), indexing="ij"), axis=-1)[..., ::-1]
    phys = np.asarray(origin) + idx * np.asarray(spacing)
    d = np.linalg.norm(phys - np.asarray(center), axis=-1)
    arr = (100.0 * (d < 8.0) + 10.0).astype(np.float32)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    return img


def _subject(tmp_path, name, center, n_pts=20, with_seg=True):
    img = _ball_image(center)
    io.write_image(img, tmp_path / f"{name}.nrrd")
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    dirs = rng.normal(size=(n_pts, 3))
    pts = np.asarray(center) + 8.0 * dirs / np.linalg.norm(dirs, axis=1, keepdims=True)
    io.write_particles(tmp_path / f"{name}.particles", pts)
    seg = None
    if with_seg:
        s = sitk.Cast(sitk.BinaryThreshold(img, 50.0, 1e9, 1, 0), sitk.sitkUInt8)
        io.write_image(s, tmp_path / f"{name}_seg.nrrd")
        seg = tmp_path / f"{name}_seg.nrrd"
    return SimpleNamespace(
        id=name, image=tmp_path / f"{name}.nrrd", particles=tmp_path / f"{name}.particles", segmentation=seg
    )


def test_reference_grid_covers_particles_with_margin():
    pts = np.array([[[0.0, 0.0, 0.0], [10.0, 20.0, 30.0]], [[-5.0, 2.0, 1.0], [3.0, 4.0, 5.0]]])
    g = reference_grid(pts, 2.0, margin_mm=10.0)
    assert g.direction == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    assert np.allclose(g.origin, [-15.0, -10.0, -10.0])
    assert g.spacing == (2.0, 2.0, 2.0)
    assert np.all(g.contains(pts.reshape(-1, 3)))
    hi = np.asarray(g.origin) + (np.asarray(g.size) - 1) * 2.0
    assert np.all(hi >= np.array([20.0, 30.0, 40.0]) - 1e-9)


def test_reference_grid_downsample_and_min_size():
    pts = np.random.default_rng(0).uniform(-10, 10, size=(3, 50, 3))
    fine = reference_grid(pts, 1.0, margin_mm=5.0)
    coarse = reference_grid(pts, 1.0, margin_mm=5.0, downsample=2.0)
    assert coarse.spacing == (2.0, 2.0, 2.0)
    assert all(c <= f // 2 + 1 for c, f in zip(coarse.size, fine.size, strict=True))
    big = reference_grid(pts, 1.0, margin_mm=5.0, min_size=64)
    assert min(big.size) >= 64
    # growth is symmetric: the box centre stays put
    c_fine = np.asarray(fine.origin) + (np.asarray(fine.size) - 1) / 2.0
    c_big = np.asarray(big.origin) + (np.asarray(big.size) - 1) / 2.0
    assert np.allclose(c_fine, c_big, atol=0.51)


@pytest.mark.parametrize(
    "bad",
    [np.zeros((0, 3)), np.full((2, 4, 3), np.nan), np.zeros((2, 4, 2))],
)
def test_reference_grid_rejects_bad_particles(bad):
    with pytest.raises(InputError):
        reference_grid(bad, 1.0)


def test_prepare_training_arrays_resamples_images_and_segmentations(tmp_path):
    subjects = [_subject(tmp_path, f"s{i}", (i * 2.0, 0.0, 5.0)) for i in range(3)]
    pts = np.stack([io.read_particles(s.particles) for s in subjects])
    grid = reference_grid(pts, 2.0, margin_mm=4.0)
    events = []
    arrays = prepare_training_arrays(subjects, grid, progress=events.append)
    assert isinstance(arrays, TrainingArrays)
    assert arrays.ids == ["s0", "s1", "s2"]
    assert arrays.images.shape == (3,) + grid.shape_zyx and arrays.images.dtype == np.float32
    assert arrays.particles.shape == (3, 20, 3) and arrays.particles.dtype == np.float64
    assert arrays.segmentations is not None and arrays.segmentations.dtype == np.uint8
    # raw intensities (not normalised), and the ball centre lands where it should on the grid
    assert arrays.images.max() == pytest.approx(110.0, abs=1e-3)
    for i in range(3):
        idx = np.round(grid.physical_to_index(np.array([i * 2.0, 0.0, 5.0]))).astype(int)
        assert arrays.images[i, idx[2], idx[1], idx[0]] == pytest.approx(110.0)
        assert arrays.segmentations[i, idx[2], idx[1], idx[0]] == 1
    assert [e.done for e in events] == [1, 2, 3]


def test_prepare_training_arrays_no_segmentation_gives_none(tmp_path):
    subjects = [_subject(tmp_path, f"s{i}", (0.0, 0.0, 0.0), with_seg=(i == 0)) for i in range(2)]
    grid = reference_grid(np.stack([io.read_particles(s.particles) for s in subjects]), 2.0)
    assert prepare_training_arrays(subjects, grid).segmentations is None


def test_prepare_training_arrays_reports_all_problems(tmp_path):
    a = _subject(tmp_path, "a", (0.0, 0.0, 0.0), n_pts=20)
    b = _subject(tmp_path, "b", (0.0, 0.0, 0.0), n_pts=21)
    nan = _ball_image((0.0, 0.0, 0.0))
    arr = sitk.GetArrayFromImage(nan)
    arr[0, 0, 0] = np.nan
    bad = sitk.GetImageFromArray(arr)
    bad.CopyInformation(nan)
    io.write_image(bad, tmp_path / "nan.nrrd")
    c = SimpleNamespace(id="c", image=tmp_path / "nan.nrrd", particles=a.particles, segmentation=None)
    grid = reference_grid(io.read_particles(a.particles)[None], 2.0)
    with pytest.raises(ValidationError) as e:
        prepare_training_arrays([a, b, c], grid)
    msg = str(e.value)
    assert "differing point counts" in msg and "a: 20" in msg and "b: 21" in msg
    assert "nan.nrrd" in msg and "NaN" in msg


def test_prepare_training_arrays_rejects_image_off_grid(tmp_path):
    a = _subject(tmp_path, "a", (0.0, 0.0, 0.0))
    grid = reference_grid(io.read_particles(a.particles)[None] + 500.0, 2.0)
    with pytest.raises(ValidationError, match="constant on the reference grid"):
        prepare_training_arrays([a], grid)


def test_epochs_auto_resolves_per_encoder_and_a_given_count_wins():
    """issue 16: without --epochs a light encoder trains 30 epochs, the paper network 100."""
    from DeepSSMLogic.cli import build_parser
    from DeepSSMLogic.pipeline import DEFAULT_EPOCHS, TrainingOptions, resolve_epochs

    assert TrainingOptions().epochs == "auto"
    assert resolve_epochs("auto", "light2") == (30, "auto: the default for the light2 encoder")
    assert resolve_epochs("auto", "light")[0] == 30
    assert resolve_epochs("auto", "paper")[0] == 100
    assert resolve_epochs(7, "light2") == (7, "given")
    assert set(DEFAULT_EPOCHS) >= {"paper", "light", "light2"}
    for bad in (0, -3, "many", 2.5, True):
        with pytest.raises(InputError, match="--epochs"):
            resolve_epochs(bad, "light2")
    parse = build_parser().parse_args
    assert str(parse(["train", "c.csv", "--out", "m"]).epochs) == "auto"  # a project may replace it
    assert parse(["train", "c.csv", "--out", "m", "--epochs", "12"]).epochs == 12
    assert parse(["train", "c.csv", "--out", "m", "--epochs", "AUTO"]).epochs == "auto"
    for bad in ("0", "x"):
        with pytest.raises(SystemExit):
            parse(["train", "c.csv", "--out", "m", "--epochs", bad])
