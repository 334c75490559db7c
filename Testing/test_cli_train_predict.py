"""`deepssm train` / `deepssm predict`: exit codes, messages and output files, on real files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from helpers_predict import make_tiny_bundle, phantom_image, rigid

from DeepSSMLogic import io
from DeepSSMLogic.bundle import load_bundle
from DeepSSMLogic.cli import main
from DeepSSMLogic.predict import apply_matrix


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp("cli") / "model")


def test_predict_writes_particles_and_json(model, tmp_path, capsys):
    io.write_image(phantom_image(seed=1), tmp_path / "a.nii.gz")
    pose = rigid((0.0, 0.0, 5.0), (12.0, -6.0, 4.0))
    io.write_image(phantom_image(pose=pose, size=(48, 44, 40), seed=2), tmp_path / "b.nrrd")
    rc = main(
        [
            "predict",
            str(model),
            str(tmp_path / "a.nii.gz"),
            str(tmp_path / "b.nrrd"),
            "--out",
            str(tmp_path / "o"),
            "--quiet",
        ]
    )
    assert rc == 0
    out = tmp_path / "o"
    assert sorted(p.name for p in out.iterdir()) == ["a.json", "a.particles", "b.json", "b.particles"]
    a = io.read_particles(out / "a.particles")
    b = io.read_particles(out / "b.particles")
    assert a.shape == (64, 3)
    # particles are written in each image's own physical space
    assert np.sqrt(((apply_matrix(pose, a) - b) ** 2).sum(1).mean()) < 0.5
    doc = json.loads((out / "b.json").read_text())
    assert doc["descriptor_kind"] == "pca" and len(doc["descriptor"]) == 3
    assert doc["alignment"]["kind"] == "rigid" and doc["particles_file"] == "b.particles"
    assert set(doc["timings_s"]) >= {"align", "forward", "total"}


def test_predict_no_align(model, tmp_path):
    io.write_image(phantom_image(seed=1), tmp_path / "a.nrrd")
    assert (
        main(
            [
                "predict",
                str(model),
                str(tmp_path / "a.nrrd"),
                "--out",
                str(tmp_path / "o"),
                "--no-align",
                "--quiet",
            ]
        )
        == 0
    )
    doc = json.loads((tmp_path / "o" / "a.json").read_text())
    assert doc["alignment"]["kind"] == "none"
    assert np.allclose(doc["alignment"]["matrix_model_to_input"], np.eye(4))


def test_predict_errors_exit_2(model, tmp_path, capsys):
    io.write_image(phantom_image(seed=1), tmp_path / "a.nrrd")
    # --mesh with a bundle that has no template mesh
    rc = main(
        ["predict", str(model), str(tmp_path / "a.nrrd"), "--out", str(tmp_path / "o"), "--mesh", "--quiet"]
    )
    assert rc == 2 and "no template mesh" in capsys.readouterr().err
    # a missing image
    rc = main(["predict", str(model), str(tmp_path / "nope.nrrd"), "--out", str(tmp_path / "o"), "--quiet"])
    assert rc == 2 and "nope.nrrd" in capsys.readouterr().err
    # a 2D image
    sitk.WriteImage(sitk.Image([30, 30], sitk.sitkFloat32), str(tmp_path / "flat.nrrd"))
    rc = main(["predict", str(model), str(tmp_path / "flat.nrrd"), "--out", str(tmp_path / "o2"), "--quiet"])
    assert rc == 2 and "expected a 3D image" in capsys.readouterr().err
    assert not (tmp_path / "o2" / "flat.particles").exists()
    # a tampered bundle
    bad = shutil.copytree(model, tmp_path / "bad")
    with open(bad / "mean.particles", "a") as f:
        f.write("1 1 1\n")
    rc = main(["predict", str(bad), str(tmp_path / "a.nrrd"), "--out", str(tmp_path / "o3"), "--quiet"])
    assert rc == 2 and "sha256 mismatch for mean.particles" in capsys.readouterr().err
    # two inputs that would overwrite each other's outputs
    (tmp_path / "d").mkdir()
    shutil.copy(tmp_path / "a.nrrd", tmp_path / "d" / "a.nrrd")
    rc = main(
        [
            "predict",
            str(model),
            str(tmp_path / "a.nrrd"),
            str(tmp_path / "d" / "a.nrrd"),
            "--out",
            str(tmp_path / "o4"),
            "--quiet",
        ]
    )
    assert rc == 2 and "share the output name" in capsys.readouterr().err


def test_train_rejects_bad_cohort(tmp_path, capsys):
    rc = main(["train", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "m"), "--quiet"])
    assert rc == 2
    assert "missing.csv" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def _tiny_cohort(tmp_path: Path, n: int = 12) -> Path:
    from DeepSSMLogic.synthetic import generate_cohort

    return generate_cohort(
        "cranium", n, tmp_path / "cohort", seed=3, image_size=(32, 32, 32), spacing=3.0, n_particles=64
    )


@pytest.mark.slow
def test_train_then_predict_end_to_end(tmp_path, capsys):
    csv = _tiny_cohort(tmp_path)
    model = tmp_path / "model.zip"
    rc = main(
        [
            "train", str(csv), "--out", str(model), "--epochs", "2", "--augment", "6", "--batch-size", "4",
            "--spacing", "4", "--device", "cpu", "--seed", "1", "--quiet",
        ]
    )  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    assert model.is_file() and "best validation RMSE" in capsys.readouterr().out
    b = load_bundle(model)
    assert b.meta["architecture"]["conv_padding"] == "same"
    assert b.meta["training_summary"]["augmentation"]["kind"] == "offline"
    assert b.template_mesh_path is not None
    assert b.grid.spacing == (4.0, 4.0, 4.0)
    # the normaliser was fitted on the training images and stored
    assert b.normalizer.std > 0
    test_img = next((csv.parent / "images").glob("*.nrrd"))
    rc = main(["predict", str(model), str(test_img), "--out", str(tmp_path / "pred"), "--mesh", "--quiet"])
    assert rc == 0
    stem = test_img.name[: -len(".nrrd")]
    assert (tmp_path / "pred" / f"{stem}.vtk").is_file()
    mesh = io.read_mesh(tmp_path / "pred" / f"{stem}.vtk")
    assert mesh.GetNumberOfPoints() > 64
    assert io.read_particles(tmp_path / "pred" / f"{stem}.particles").shape == (64, 3)


@pytest.mark.slow
def test_train_refuses_differing_particle_counts(tmp_path, capsys):
    csv = _tiny_cohort(tmp_path, n=6)
    first = sorted((csv.parent / "particles").glob("*.particles"))[0]
    pts = io.read_particles(first)
    io.write_particles(first, pts[:-3])
    rc = main(["train", str(csv), "--out", str(tmp_path / "m"), "--epochs", "1", "--quiet"])
    assert rc == 2
    err = capsys.readouterr().err
    assert first.name in err or "point count" in err
    assert not (tmp_path / "m").exists()
