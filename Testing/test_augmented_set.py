"""Offline/online augmented sets (DeepSSMLogic.augment.dataset) and the ``deepssm augment`` CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from DeepSSMLogic.augment import make_sampler
from DeepSSMLogic.augment.dataset import AugmentedSet, OnlineAugmentedDataset, write_augmented_set
from DeepSSMLogic.errors import CancelledError, InputError
from DeepSSMLogic.geometry import Grid
from DeepSSMLogic.progress import CancelToken
from DeepSSMLogic.shape_model import ShapeModel


def _training(n: int = 6, m: int = 40, seed: int = 0):
    """Small blob images with ellipsoid correspondences that vary in size and shape."""
    rng = np.random.default_rng(seed)
    grid = Grid((-12.0, -10.0, -8.0), (1.0, 1.0, 1.0), (24, 20, 16))
    k = np.arange(m) + 0.5
    phi, th = np.arccos(1 - 2 * k / m), np.pi * (1 + 5**0.5) * k
    d = np.stack([np.cos(th) * np.sin(phi), np.sin(th) * np.sin(phi), np.cos(phi)], 1)
    coords = grid.physical_coordinates()
    parts, imgs, segs = [], [], []
    for _ in range(n):
        radii = np.array([7.0, 5.0, 4.0]) * rng.uniform(0.85, 1.15, 3)
        parts.append(d * radii)
        inside = ((coords / radii) ** 2).sum(-1) <= 1.0
        segs.append(inside.astype(np.uint8))
        imgs.append((100.0 * inside + rng.normal(0, 5, inside.shape)).astype(np.float32))
    return grid, np.stack(imgs), np.stack(parts), np.stack(segs)


def _model_and_sampler(parts):
    sm = ShapeModel.fit(parts)
    return sm, make_sampler("kde").fit(sm.project(parts))


def _write(out, n=10, seed=3, **kw):
    grid, imgs, parts, segs = _training()
    sm, sampler = _model_and_sampler(parts)
    return write_augmented_set(
        out, imgs, parts, grid, sm, sampler, n, seed, device="cpu", segmentations=segs, chunk=4, **kw
    )


@pytest.mark.slow
def test_write_and_read_augmented_set(tmp_path):
    out = _write(tmp_path / "aug")
    meta = json.loads((out / "augmentation.json").read_text())
    assert meta["count"] == meta["completed"] == 10 and meta["seed"] == 3
    assert meta["grid"]["size"] == [24, 20, 16] and meta["sampler"]["sampler"] == "kde"
    images = np.load(out / "images.npy", mmap_mode="r")
    assert isinstance(images, np.memmap) and images.shape == (10, 16, 20, 24) and images.dtype == np.float32
    assert np.load(out / "segmentations.npy").dtype == np.uint8
    ds = AugmentedSet(out, transform=lambda a: a / 100.0)
    img, pts = ds[3]
    assert img.shape == (1, 16, 20, 24) and img.dtype == torch.float32
    assert pts.shape == (40, 3) and pts.dtype == torch.float32
    np.testing.assert_allclose(img[0].numpy(), images[3] / 100.0, rtol=1e-6)
    np.testing.assert_allclose(pts.numpy(), np.load(out / "particles.npy")[3], rtol=1e-6)
    assert len(ds) == 10 and ds.scores.shape[0] == 10 and ds.source.max() < 6
    # Warped images are real warps of their sources: not blank, not a copy of the source.
    assert all(images[i].max() > 50 for i in range(10))
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=0)
    assert next(iter(loader))[0].shape == (4, 1, 16, 20, 24)


@pytest.mark.slow
def test_same_seed_identical_set_and_different_seed_differs(tmp_path):
    a, b = _write(tmp_path / "a"), _write(tmp_path / "b")
    c = _write(tmp_path / "c", seed=4)
    for name in ("images.npy", "particles.npy", "scores.npy", "source.npy", "segmentations.npy"):
        assert np.array_equal(np.load(a / name), np.load(b / name)), name
    assert not np.array_equal(np.load(a / "scores.npy"), np.load(c / "scores.npy"))


@pytest.mark.slow
def test_resume_after_cancel_gives_the_same_set(tmp_path):
    ref = _write(tmp_path / "ref")
    token = CancelToken()

    def cancel_after_5(event):
        if event.done >= 5:
            token.cancel()

    with pytest.raises(CancelledError):
        _write(tmp_path / "part", progress=cancel_after_5, cancel=token)
    meta = json.loads((tmp_path / "part" / "augmentation.json").read_text())
    assert 5 <= meta["completed"] < 10
    with pytest.raises(InputError, match="unfinished"):
        AugmentedSet(tmp_path / "part")
    assert len(AugmentedSet(tmp_path / "part", allow_partial=True)) == meta["completed"]
    seen = []
    _write(tmp_path / "part", progress=lambda e: seen.append(e.done))
    assert seen[0] == meta["completed"]  # resumed, did not start over
    for name in ("images.npy", "particles.npy", "scores.npy", "source.npy", "segmentations.npy"):
        assert np.array_equal(np.load(ref / name), np.load(tmp_path / "part" / name)), name


def test_resume_refuses_different_parameters(tmp_path):
    _write(tmp_path / "aug", n=4)
    with pytest.raises(InputError, match=r"different parameters \(n, seed\)"):
        _write(tmp_path / "aug", n=5, seed=9)


def test_bad_inputs_rejected(tmp_path):
    grid, imgs, parts, _segs = _training()
    sm, sampler = _model_and_sampler(parts)
    bad = parts.copy()
    bad[1, 2, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        write_augmented_set(tmp_path / "x", imgs, bad, grid, sm, sampler, 2, 0, device="cpu")
    with pytest.raises(InputError, match=r"particles: expected \(6, M, 3\)"):
        write_augmented_set(tmp_path / "x", imgs, parts[:5], grid, sm, sampler, 2, 0, device="cpu")
    with pytest.raises(InputError, match="images"):
        write_augmented_set(tmp_path / "x", imgs[:, :-1], parts, grid, sm, sampler, 2, 0, device="cpu")
    with pytest.raises(InputError, match="not an augmented set"):
        AugmentedSet(tmp_path / "nowhere")


def test_online_dataset_reproducible_per_epoch_and_fresh_across_epochs():
    grid, imgs, parts, _ = _training()
    sm, sampler = _model_and_sampler(parts)

    def epoch_items(ds, epoch):
        ds.set_epoch(epoch)
        return [(i.clone(), p.clone()) for i, p in ds]

    ds = OnlineAugmentedDataset(imgs, parts, grid, sm, sampler, 5, seed=1, device="cpu", batch_size=2)
    e0, e1 = epoch_items(ds, 0), epoch_items(ds, 1)
    assert len(e0) == 5 and e0[0][0].shape == (1, 16, 20, 24) and e0[0][1].shape == (40, 3)
    again = epoch_items(OnlineAugmentedDataset(imgs, parts, grid, sm, sampler, 5, 1, "cpu", 2), 0)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(e0, again))
    assert not torch.equal(e0[0][1], e1[0][1])
    assert ds.epoch == 2  # iter() advances the epoch


@pytest.mark.slow
def test_augment_cli_end_to_end(tmp_path, capsys):
    from DeepSSMLogic.cli import main
    from DeepSSMLogic.synthetic import generate_cohort

    csv = generate_cohort("femur", 6, tmp_path / "cohort", seed=0, image_size=(32, 32, 32), n_particles=128)
    out = tmp_path / "aug"
    argv = [str(csv), "--n", "6", "--out", str(out), "--device", "cpu", "--quiet", "--export-nrrd", "2"]
    assert main(["augment", *argv]) == 0
    assert "wrote 6 augmented samples" in capsys.readouterr().out
    ds = AugmentedSet(out)
    assert len(ds) == 6 and ds[0][1].shape == (128, 3)
    assert (out / "segmentations.npy").exists() and (out / "nrrd" / "sample_00001.nrrd").exists()
    assert (out / "augmentation_report.json").exists()
    before = np.load(out / "images.npy")
    assert main(["augment", *argv]) == 0  # rerun on a complete set: nothing changes
    assert np.array_equal(before, np.load(out / "images.npy"))
    assert main(["augment", str(csv), "--n", "7", "--out", str(out), "--quiet"]) == 2
    assert "different parameters" in capsys.readouterr().err


# -- content: every augmented sample shows the shape it is labelled with ---------------------------
# Ellipsoids whose radii differ by 1.5-2 voxels between subjects. They are linear maps of each other, so
# the thin-plate spline between two of them is the exact affine map: the warp of subject a onto subject
# b's particles must show subject b's ellipsoid, up to the voxel rounding of the nearest-neighbour sample.
_FACTORS = np.array([[0.8, 1.2, 1.0], [1.2, 0.8, 1.15], [1.0, 1.0, 0.8], [0.9, 1.15, 1.25]])
_PAIRS = np.array([[0, 1], [1, 0], [2, 3], [3, 2], [0, 0]])  # (source subject, target shape)


def _ellipsoids():
    grid = Grid((-12.0, -10.0, -8.0), (1.0, 1.0, 1.0), (24, 20, 16))
    m = 40
    k = np.arange(m) + 0.5
    phi, th = np.arccos(1 - 2 * k / m), np.pi * (1 + 5**0.5) * k
    d = np.stack([np.cos(th) * np.sin(phi), np.sin(th) * np.sin(phi), np.cos(phi)], 1)
    coords = grid.physical_coordinates()
    radii = np.array([7.0, 5.0, 4.0]) * _FACTORS
    parts = np.stack([d * r for r in radii])
    segs = np.stack([(((coords / r) ** 2).sum(-1) <= 1.0).astype(np.uint8) for r in radii])
    noise = np.random.default_rng(0).normal(0, 3, segs.shape)
    return grid, (100.0 * segs + noise).astype(np.float32), parts, segs


class _ChosenShapes:
    """A sampler that returns given shapes: sample i is subject ``pairs[i, 1]``'s scores warped from
    subject ``pairs[i, 0]``, so the expected content of every sample is known."""

    def __init__(self, shape_model: ShapeModel, parts: np.ndarray, pairs: np.ndarray) -> None:
        self.scores = shape_model.project(parts)[pairs[:, 1]]
        self.source = pairs[:, 0].astype(np.int64)

    def sample(self, n, rng):
        from DeepSSMLogic.augment.samplers import SampleBatch

        return SampleBatch(self.scores[:n], self.source[:n])


def _boundary_distance(mask: np.ndarray, grid: Grid, points: np.ndarray, full: bool = False) -> np.ndarray:
    """Distance (voxels) from each point ``(M, 3)`` mm to the boundary voxels of ``mask`` (``full``: the
    whole distance map ``(Z, Y, X)``)."""
    from scipy import ndimage

    inside = mask.astype(bool)
    dist = ndimage.distance_transform_edt(~(inside ^ ndimage.binary_erosion(inside)))
    if full:
        return dist
    idx = np.rint(grid.physical_to_index(points)).astype(int)
    return dist[idx[:, 2], idx[:, 1], idx[:, 0]]


def _assert_sample_shows_its_shape(image: np.ndarray, seg: np.ndarray | None, target: int, grid, parts, segs):
    """Measured with the correct warp: Dice 0.89-0.94, every wrong voxel 1 voxel from the target's
    boundary, particles ≤ 1.41 voxels from the warped boundary; with source and target swapped: Dice
    ~0.5, wrong voxels 2-7 voxels deep, particles 3-5 voxels off."""
    expected = segs[target].astype(bool)
    edge = _boundary_distance(expected, grid, np.zeros((0, 3)), full=True)
    for label, mask in (("image > 50", image > 50.0), ("segmentation", seg)):
        if mask is None:
            continue
        mask = mask.astype(bool)
        dice = 2 * (mask & expected).sum() / (mask.sum() + expected.sum())
        assert dice > 0.85, f"{label}: Dice {dice:.3f} with the target ellipsoid {target}"
        wrong = mask ^ expected
        assert not wrong.any() or edge[wrong].max() <= 1.0, (
            f"{label}: voxels {edge[wrong].max()} deep are wrong"
        )
        d = _boundary_distance(mask, grid, parts[target])
        # the surface passes within a voxel of every generated particle (+ half a voxel of rounding)
        assert d.max() <= 1.0 + np.sqrt(3) / 2, f"{label}: particle {d.argmax()} is {d.max():.2f} voxels off"


def test_offline_samples_show_their_particles_and_an_identity_warp_changes_nothing(tmp_path):
    grid, imgs, parts, segs = _ellipsoids()
    sm = ShapeModel.fit(parts)
    sampler = _ChosenShapes(sm, parts, _PAIRS)
    out = write_augmented_set(
        tmp_path / "aug", imgs, parts, grid, sm, sampler, len(_PAIRS), 0, device="cpu", segmentations=segs
    )
    ds = AugmentedSet(out)
    np.testing.assert_array_equal(ds.source, _PAIRS[:, 0])
    np.testing.assert_allclose(ds.particles, parts[_PAIRS[:, 1]], atol=1e-9)  # the labels are the targets
    wsegs = np.load(out / "segmentations.npy")
    for i, (_, tgt) in enumerate(_PAIRS):
        _assert_sample_shows_its_shape(np.asarray(ds.images[i]), wsegs[i], tgt, grid, parts, segs)
        img, pts = ds[i]
        np.testing.assert_array_equal(img[0].numpy(), ds.images[i])
        np.testing.assert_allclose(pts.numpy(), parts[tgt], atol=1e-5)
    # the source warped to its own particles is the source itself
    np.testing.assert_allclose(ds.images[4], imgs[0], atol=1e-3)
    np.testing.assert_array_equal(wsegs[4], segs[0])


def test_online_samples_show_their_particles():
    grid, imgs, parts, segs = _ellipsoids()
    sm = ShapeModel.fit(parts)
    ds = OnlineAugmentedDataset(
        imgs,
        parts,
        grid,
        sm,
        _ChosenShapes(sm, parts, _PAIRS),
        len(_PAIRS),
        seed=0,
        device="cpu",
        batch_size=3,
    )
    items = ds.__getitems__(list(range(len(_PAIRS))))
    for (img, pts), (_, tgt) in zip(items, _PAIRS, strict=True):
        np.testing.assert_allclose(pts.numpy(), parts[tgt], atol=1e-5)
        _assert_sample_shows_its_shape(img[0].numpy(), None, tgt, grid, parts, segs)
    np.testing.assert_allclose(items[4][0][0].numpy(), imgs[0], atol=1e-3)


def test_exported_nrrds_equal_the_memmap_rows(tmp_path):
    from DeepSSMLogic import io
    from DeepSSMLogic.augment.dataset import export_samples

    grid, imgs, parts, segs = _ellipsoids()
    sm = ShapeModel.fit(parts)
    out = write_augmented_set(
        tmp_path / "aug",
        imgs,
        parts,
        grid,
        sm,
        _ChosenShapes(sm, parts, _PAIRS),
        5,
        0,
        "cpu",
        segmentations=segs,
    )
    written = export_samples(out, 3)
    assert [p.name for p in written] == ["sample_00000.nrrd", "sample_00001.nrrd", "sample_00002.nrrd"]
    images = np.load(out / "images.npy")
    wsegs = np.load(out / "segmentations.npy")
    gen = np.load(out / "particles.npy")
    for i, path in enumerate(written):
        img = io.read_image(path)
        assert Grid.from_sitk(img) == grid
        np.testing.assert_array_equal(sitk_array(img), images[i])
        np.testing.assert_array_equal(
            sitk_array(io.read_image(out / "nrrd" / f"sample_{i:05d}_seg.nrrd")), wsegs[i]
        )
        np.testing.assert_array_equal(io.read_particles(out / "nrrd" / f"sample_{i:05d}.particles"), gen[i])
    assert not (out / "nrrd" / "sample_00003.nrrd").exists()
    assert len(export_samples(out, 99)) == 5  # capped at the samples that exist


def sitk_array(image) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(image)
