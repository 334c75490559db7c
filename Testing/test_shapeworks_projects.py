"""Real ShapeWorks projects in, correct models out (issue 10).

The real project files in ``shared/data/shapeworks-examples`` (see its README), and projects built
like them: subjects in their own scanner frames with ShapeWorks' alignment/procrustes transforms.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers_shapeworks import EXAMPLES, FEMUR, femur_constraints_with_images, scanner_frame_project

from DeepSSMLogic import io
from DeepSSMLogic.cli import main
from DeepSSMLogic.cohort import load_cohort, particles_in_image_space
from DeepSSMLogic.errors import InputError, ValidationError
from DeepSSMLogic.pipeline import reference_grid
from DeepSSMLogic.shapeworks_project import parse_transform

pytestmark = pytest.mark.skipif(not EXAMPLES.is_dir(), reason="shapeworks-examples not present")


# -- every real project validates or fails with the documented message (docs/SHAPEWORKS.md) --------------
REAL_PROJECTS = {
    "Ellipsoid/ellipsoid.xlsx": (
        [],
        [
            "no image column",
            "--image-column COLUMN, one of ['segmentation_file']",
            "segmentation file not found",
        ],
    ),
    "EllipsoidMultipleDomain/ellipsoid_md_example.xlsx": (
        [],
        ["the project has 2 domains (domain1, domain2)", "--domain"],
    ),
    "FemurConstraints/FemurConstraints.xlsx": (
        [],
        ["no image column", "add an image_<name> column naming each subject's scan"],
    ),
    "sphere/groom.xlsx": ([], ["no image column", "no 'local_particles_file' column"]),
    "sphere/optimize.xlsx": ([], ["no image column", "no 'local_particles_file' column"]),
    "EllipsoidMultipleDomain/ellipsoid_md_example.xlsx --domain domain2": (
        ["--domain", "domain2"],
        ["no image column", "one of ['segmentation_domain2']"],
    ),
}


@pytest.mark.parametrize("case", list(REAL_PROJECTS))
def test_every_real_project_validates_or_fails_with_the_documented_message(case, capsys):
    path = EXAMPLES / case.split(" ")[0]
    extra, expected = REAL_PROJECTS[case]
    assert main(["validate", str(path), *extra]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) >= 1
    for text in expected:
        assert text in err, f"{text!r} not in:\n{err}"


def test_transform_cells_are_read_as_shapeworks_reads_them():
    m = parse_transform("1 2 0 5  0 1 0 6  0 0 1 7  0 0 0 1")
    np.testing.assert_array_equal(m, [[1, 2, 0, 5], [0, 1, 0, 6], [0, 0, 1, 7], [0, 0, 0, 1]])  # row-major
    legacy = parse_transform("0 1 0 -1 0 0 0 0 1 5 6 7")  # ITK 12: ShapeWorks keeps the translation only
    np.testing.assert_array_equal(legacy, [[1, 0, 0, 5], [0, 1, 0, 6], [0, 0, 1, 7], [0, 0, 0, 1]])
    for bad in ("1 2 3", "a b c d e f g h i j k l", "0 " * 16, "1 0 0 0 0 1 0 0 0 0 1 0 1 0 0 1"):
        with pytest.raises(InputError):
            parse_transform(bad)


def test_femur_constraints_world_particles_are_procrustes_alignment_local(tmp_path):
    """The real transforms, parsed and composed, reproduce ShapeWorks' own world particles."""
    project = femur_constraints_with_images(tmp_path / "femur", spacing=3.0)
    cohort = load_cohort(project)
    assert cohort.frame == "world" and "alignment_1" in cohort.frame_reason
    assert cohort.ids == ["m03_L_femur", "m04_L_femur", "m05_L_femur", "m06_L_femur"]
    assert cohort.settings["train_epochs"] == "100" and cohort.settings["aug_sampler_type"] == "Gaussian"
    world_files = np.stack(
        [
            io.read_particles(FEMUR / "FemurConstraints_particles" / f"{i}_groomed_world.particles")
            for i in cohort.ids
        ]
    )
    assert np.abs(cohort.particles() - world_files).max() < 0.01
    for s in cohort.subjects:  # and back in each image's own frame: the local particles
        local = io.read_particles(FEMUR / "FemurConstraints_particles" / f"{s.id}_groomed_local.particles")
        np.testing.assert_allclose(particles_in_image_space(s), local, atol=1e-6)
    grid = reference_grid(cohort.particles(), 3.0, 10.0)
    assert max(grid.size) <= 100


def test_femur_validate_cli_says_world_frame_and_refuses_local(tmp_path, capsys):
    project = femur_constraints_with_images(tmp_path / "femur", spacing=3.0)
    assert main(["validate", str(project)]) == 0
    out = capsys.readouterr().out
    assert "Frame: world (auto: the project has alignment_1/procrustes_1 transforms" in out
    assert "train_epochs=100" in out
    assert main(["validate", str(project), "--frame", "local"]) == 2
    err = capsys.readouterr().err
    assert "the reference grid would be" in err and "m05_L_femur" in err and "--frame world" in err
    # world particles read as such and trained in the world frame give the same cohort
    a = load_cohort(project)
    b = load_cohort(project, particles="world")
    assert np.abs(a.particles() - b.particles()).max() < 0.01


@pytest.mark.slow
def test_femur_constraints_trains_in_the_world_frame_on_a_small_grid(tmp_path, capsys):
    project = femur_constraints_with_images(tmp_path / "femur", spacing=3.0)
    model = tmp_path / "femur_model"
    rc = main(
        [
            "train", str(project), "--out", str(model), "--spacing", "3", "--epochs", "1", "--augment", "0",
            "--batch-size", "2", "--device", "cpu", "--quiet", "--val-fraction", "0.25",
        ]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "Frame: world" in captured.out
    assert "epochs = 1 (command line; project has train_epochs='100')" in captured.out
    assert "sampler = 'gaussian' (project deepssm sheet: aug_sampler_type='Gaussian')" in captured.out
    from DeepSSMLogic.bundle import load_bundle

    b = load_bundle(model)
    assert max(b.grid.size) <= 100 and b.grid.spacing == (3.0, 3.0, 3.0)
    assert b.meta["training_summary"]["frame"]["name"] == "world"


# -- a project built like a real one, at test scale ----------------------------------------------------
def test_excluded_rows_are_skipped_fixed_kept_and_both_formats_agree(tmp_path):
    paths, truth = scanner_frame_project(tmp_path, n_train=4, n_test=1, n_image_only=1)
    a = load_cohort(paths["xlsx"], require_particles=False)
    b = load_cohort(paths["swproj"], require_particles=False)
    assert a.excluded == b.excluded == ["excluded_a", "excluded_b"]
    assert a.ids == b.ids and "excluded_a" not in a.ids
    for sa, sb in zip(a.subjects, b.subjects):
        assert (sa.image, sa.particles, sa.mesh, sa.split, sa.metadata) == (
            sb.image,
            sb.particles,
            sb.mesh,
            sb.split,
            sb.metadata,
        )
    np.testing.assert_allclose(a.particles(a.by_split("train")), b.particles(b.by_split("train")))
    assert a.subjects[1].metadata["fixed"] == "true"
    # the particles are the world ones, the image-only row is a test subject
    for s in a.by_split("train"):
        np.testing.assert_allclose(a.particles([s])[0], truth["world"][s.id], atol=1e-6)
    assert a.subjects[-1].particles is None and a.subjects[-1].split == "test"
    # without the excluded marks the broken files are reported, the LFS pointer by name
    with pytest.raises(ValidationError) as e:
        doc = json.loads(paths["swproj"].read_text())
        for r in doc["data"]:
            r.pop("excluded", None)
        broken = tmp_path / "broken.swproj"
        broken.write_text(json.dumps(doc))
        load_cohort(broken, require_particles=False)
    text = str(e.value)
    assert "is a Git LFS pointer" in text and "git lfs pull" in text
    assert "column 'alignment_1': expected 16 (or legacy 12) numbers, found 3" in text


def test_validate_catches_particles_off_their_image_and_bad_image_values(tmp_path, capsys):
    paths, _ = scanner_frame_project(tmp_path, n_train=3, n_test=0, n_image_only=0)
    # the project read in the local frame but with its world particles: off their images by 100s of mm
    assert main(["validate", str(paths["xlsx"]), "--frame", "local", "--particles", "world"]) == 0
    doc = json.loads(paths["swproj"].read_text())
    for r in doc["data"]:
        if "local_particles_1" in r:
            r["local_particles_1"] = r["world_particles_1"]  # a typical mix-up
    mixed = tmp_path / "mixed.swproj"
    mixed.write_text(json.dumps(doc))
    assert main(["validate", str(mixed), "--frame", "local"]) == 2
    err = capsys.readouterr().err
    assert "lie outside its image's physical extent" in err and "--frame" in err
    # NaN and constant images are refused by validate, not first by train
    import SimpleITK as sitk

    img = sitk.ReadImage(str(tmp_path / "images" / "case00.nrrd"), sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(img)
    arr[0, 0, 0] = np.nan
    nan_img = sitk.GetImageFromArray(arr)
    nan_img.CopyInformation(img)
    io.write_image(nan_img, tmp_path / "images" / "case00.nrrd")
    const = sitk.GetImageFromArray(np.zeros_like(arr))
    const.CopyInformation(img)
    io.write_image(const, tmp_path / "images" / "case01.nrrd")
    assert main(["validate", str(paths["xlsx"])]) == 2
    err = capsys.readouterr().err
    assert "'case00'" in err and "NaN/Inf" in err and "'case01'" in err and "is constant" in err
