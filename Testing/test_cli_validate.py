"""`deepssm validate`: summary and exit 0 on a good cohort, every problem and exit 2 on a bad one."""

from __future__ import annotations

import json

from conftest_cohort import rewrite_manifest, write_tiny_cohort

from DeepSSMLogic.cli import main
from DeepSSMLogic.io import write_particles


def test_validate_prints_a_summary_and_exits_0(tmp_path, capsys):
    manifest, _ = write_tiny_cohort(
        tmp_path, n=4, m=12, extra_columns={"label": list("xyxy"), "severity": ["0.1", "0.2", "0.3", "0.4"]}
    )
    assert main(["validate", str(manifest)]) == 0
    out = capsys.readouterr().out
    assert "Subjects: 4 (train 2, val 1, test 1)" in out
    assert "Particles: 12 per subject (mm, LPS)" in out
    assert "Groups: a (2), b (2)" in out
    assert "Metadata columns: label, severity" in out
    assert "OK" in out


def test_validate_lists_every_problem_and_exits_2(tmp_path, capsys):
    manifest, particles = write_tiny_cohort(tmp_path, n=4, m=12)
    (tmp_path / "images" / "s00.nrrd").unlink()
    write_particles(tmp_path / "particles" / "s01.particles", particles[1][:9])
    rewrite_manifest(
        manifest, lambda rows: [dict(r, split="Training") if r["id"] == "s03" else r for r in rows]
    )
    assert main(["validate", str(manifest)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # no summary for an invalid cohort
    err = captured.err
    assert err.startswith("deepssm validate: error:")
    assert "(3 problem(s))" in err
    assert "row 2 (id 's00'): image file not found" in err
    assert "s01.particles has 9 points, but 3 of 4 files have 12" in err
    assert "row 5 (id 's03'): unknown split 'Training'" in err


def test_validate_options_image_only_and_no_image_check(tmp_path, capsys):
    manifest, _ = write_tiny_cohort(tmp_path, n=3, splits=["train", "val", ""])
    (tmp_path / "images" / "s00.nrrd").write_text("not an image")
    rewrite_manifest(manifest, lambda rows: [dict(r, particles="") if r["id"] == "s02" else r for r in rows])
    assert main(["validate", str(manifest)]) == 2
    err = capsys.readouterr().err
    assert "cannot read image" in err and "--allow-image-only" in err

    assert main(["validate", "--no-check-images", "--allow-image-only", str(manifest)]) == 0
    out = capsys.readouterr().out
    assert "Subjects: 3 (train 1, val 1, test 1)" in out
    assert "1 image-only subject(s) (test)" in out


def test_validate_shapeworks_project_world_and_domain(tmp_path, capsys):
    _, particles = write_tiny_cohort(tmp_path, n=2, m=5)
    for i in range(2):
        write_particles(tmp_path / "particles" / f"w{i}.particles", particles[i][:4] + 1.0)
    rows = [
        {
            "name": f"s0{i}",
            "shape_femur": f"segmentations/s0{i}.nii.gz",
            "image_ct": f"images/s0{i}.nrrd",
            "local_particles_femur": f"particles/s0{i}.particles",
            "world_particles_femur": f"particles/w{i}.particles",
        }
        for i in range(2)
    ]
    project = tmp_path / "project.swproj"
    project.write_text(json.dumps({"data": rows}))
    assert main(["validate", str(project)]) == 0
    assert "Particles: 5 per subject" in capsys.readouterr().out
    assert main(["validate", "--particles", "world", str(project)]) == 0
    assert "Particles: 4 per subject" in capsys.readouterr().out
    assert main(["validate", "--domain", "pelvis", str(project)]) == 2
    assert "no domain 'pelvis'" in capsys.readouterr().err


def test_validate_missing_or_unsupported_file(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nope.csv")]) == 2
    assert "cohort file not found" in capsys.readouterr().err
    (tmp_path / "cohort.txt").write_text("image,particles\n")
    assert main(["validate", str(tmp_path / "cohort.txt")]) == 2
    assert "unsupported cohort file '.txt'" in capsys.readouterr().err
