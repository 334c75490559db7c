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
