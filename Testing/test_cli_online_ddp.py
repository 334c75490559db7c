"""`deepssm train` end to end with online augmentation, and under torchrun (DDP, 2 gloo CPU processes).

Both train a tiny synthetic cohort (24³ voxels at 4 mm, 64 particles) for 2 epochs through the real
CLI, then predict a held-out image with the bundle.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from DeepSSMLogic import io
from DeepSSMLogic.augment.dataset import OnlineAugmentedDataset
from DeepSSMLogic.bundle import load_bundle
from DeepSSMLogic.cli import main
from DeepSSMLogic.cohort import load_cohort
from DeepSSMLogic.training import LOG_NAME

REPO = Path(__file__).resolve().parents[1]
N_PARTICLES = 64
ONLINE_SAMPLES = 8
DIST_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="module")
def cohort_csv(tmp_path_factory) -> Path:
    from DeepSSMLogic.synthetic import generate_cohort

    return generate_cohort(
        "cranium",
        10,
        tmp_path_factory.mktemp("online_ddp") / "cohort",
        seed=3,
        image_size=(24, 24, 24),
        spacing=4.0,
        n_particles=N_PARTICLES,
    )


def _train_argv(csv: Path, model: Path, *extra: str) -> list[str]:
    return [
        "train", str(csv), "--out", str(model), "--epochs", "2", "--batch-size", "4",
        "--device", "cpu", "--seed", "1", "--quiet", *extra,
    ]  # fmt: skip


def _epoch_log(model: Path) -> list[dict]:
    """The per-epoch records of the run that wrote ``model`` (its default work directory)."""
    log = model.with_name(model.name + ".work") / "training" / LOG_NAME
    return [json.loads(line) for line in log.read_text().splitlines()]


def _predict_held_out(csv: Path, model: Path, out: Path) -> tuple[np.ndarray, np.ndarray]:
    """``deepssm predict`` on the first test-split image: (predicted, ground truth) ``(M, 3)`` mm."""
    subject = load_cohort(csv).by_split("test")[0]
    assert main(["predict", str(model), str(subject.image), "--out", str(out), "--quiet"]) == 0
    stem = Path(subject.image).name.removesuffix(".nrrd")
    return io.read_particles(out / f"{stem}.particles"), io.read_particles(subject.particles)


def _check_prediction(pred: np.ndarray, truth: np.ndarray) -> None:
    assert pred.shape == (N_PARTICLES, 3) and np.all(np.isfinite(pred))
    # Two epochs learn little and the rigid registration of a 4 mm image to the mean image is off by
    # up to ~12° (measured: 3-5 mm RMSE, 1-2 mm without alignment), but the particles must land on
    # the anatomy: a frame or axis mistake puts them ~28 mm away (mirrored in x).
    rmse = float(np.sqrt(((pred - truth) ** 2).sum(-1).mean()))
    assert rmse < 10.0, f"held-out RMSE {rmse:.2f} mm"


def test_online_set_indexed_like_the_trainer_matches_its_iteration():
    """``ds[i]`` / ``__getitems__`` (the trainer's access) give the current epoch's samples."""
    import torch
    from test_augmented_set import _model_and_sampler, _training

    grid, imgs, parts, _ = _training()
    sm, sampler = _model_and_sampler(parts)
    ds = OnlineAugmentedDataset(imgs, parts, grid, sm, sampler, 5, seed=1, device="cpu", batch_size=2)
    ds.set_epoch(3)
    iterated = list(ds)  # epoch 3, then the counter moves to 4
    ds.set_epoch(3)
    picked = ds.__getitems__([4, 1])
    assert ds.epoch == 3  # indexing never advances the epoch
    for (img, pts), j in zip(picked, (4, 1), strict=True):
        assert torch.equal(pts, iterated[j][1])
        assert torch.allclose(img, iterated[j][0], atol=1e-3)  # warped in another batch: float noise only
    assert torch.equal(ds[2][1], iterated[2][1])
    ds.set_epoch(4)
    assert not torch.equal(ds[2][1], iterated[2][1])
    with pytest.raises(IndexError):
        ds.__getitems__([5])


@pytest.mark.slow
def test_train_augment_online_end_to_end(cohort_csv, tmp_path, monkeypatch, capsys):
    for name in DIST_ENV:
        monkeypatch.delenv(name, raising=False)
    # spy on the online set as the trainer indexes it: (epoch, sample index, targets (M, 3))
    fetched: list[tuple[int, int, np.ndarray]] = []
    getitems = OnlineAugmentedDataset.__getitems__

    def spy(self: OnlineAugmentedDataset, indices: list[int]) -> list:
        items = getitems(self, indices)
        fetched.extend(
            (self.epoch, int(i), p.numpy().copy()) for i, (_, p) in zip(indices, items, strict=True)
        )
        return items

    monkeypatch.setattr(OnlineAugmentedDataset, "__getitems__", spy)
    model = tmp_path / "model"
    argv = _train_argv(cohort_csv, model, "--augment-online", "--online-samples", str(ONLINE_SAMPLES))
    assert main(argv) == 0, capsys.readouterr().err

    summary = load_bundle(model).meta["training_summary"]
    assert summary["augmentation"] == {
        "kind": "online",
        "sampler": "kde",
        "samples_per_epoch": ONLINE_SAMPLES,
    }
    assert summary["n_train_samples"] == ONLINE_SAMPLES and summary["epochs_run"] == 2
    assert [(r["stage"], r["epoch"]) for r in _epoch_log(model)] == [("base", 1), ("base", 2)]

    # every epoch trained on all its samples, each fetch of a sample gave the same shape (the load-time
    # pass and epoch 1 both read epoch 0), and epoch 2 drew shapes epoch 1 never saw
    by_epoch: dict[int, dict[int, np.ndarray]] = {}
    for epoch, i, targets in fetched:
        earlier = by_epoch.setdefault(epoch, {}).setdefault(i, targets)
        assert np.array_equal(earlier, targets), f"epoch {epoch} sample {i} changed between fetches"
    assert sorted(by_epoch) == [0, 1]
    assert all(sorted(by_epoch[e]) == list(range(ONLINE_SAMPLES)) for e in (0, 1))
    first, second = (np.stack([by_epoch[e][i] for i in range(ONLINE_SAMPLES)]) for e in (0, 1))
    gap = np.abs(first[:, None] - second[None]).max(axis=(-2, -1))  # (8, 8) largest coordinate gap, mm
    assert gap.min() > 1e-3, "an epoch-2 sample repeats an epoch-1 sample"
    # and they are generated shapes, not copies of the real training subjects
    real = load_cohort(cohort_csv).particles(load_cohort(cohort_csv).by_split("train"))
    assert np.abs(second[:, None] - real[None]).max(axis=(-2, -1)).min() > 1e-3

    _check_prediction(*_predict_held_out(cohort_csv, model, tmp_path / "pred"))


@pytest.mark.slow
def test_torchrun_two_gloo_processes_write_one_bundle(cohort_csv, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    model = tmp_path / "model"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    # offline augmentation too: rank 0 writes the augmented set while rank 1 waits at the barrier
    argv = _train_argv(cohort_csv, model, "--augment", "4")
    proc = subprocess.run(
        [*launcher, "-m", "DeepSSMLogic.cli", *argv],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("model: ") == 1, proc.stdout  # only rank 0 reports a bundle
    # one bundle and its work directory; no temporary directory of an atomic write left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "model.work"]
    leftovers = [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".")]
    assert leftovers == []

    summary = load_bundle(model).meta["training_summary"]
    assert summary["world_size"] == 2
    assert summary["augmentation"]["kind"] == "offline" and summary["augmentation"]["n"] == 4
    assert [(r["stage"], r["epoch"]) for r in _epoch_log(model)] == [("base", 1), ("base", 2)]
    _check_prediction(*_predict_held_out(cohort_csv, model, tmp_path / "pred"))
