"""DeepSSMLogic.cohort: CSV manifests, ShapeWorks projects, validation that reports every problem."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest_cohort import rewrite_manifest, tiny_image, write_tiny_cohort

from DeepSSMLogic.cohort import Cohort, Subject, load_cohort, load_shapeworks_project, write_cohort_csv
from DeepSSMLogic.errors import InputError, ValidationError
from DeepSSMLogic.io import polydata_from_arrays, write_image, write_mesh, write_particles


def _problems(path: Path, **kwargs) -> list[str]:
    with pytest.raises(ValidationError) as e:
        load_cohort(path, **kwargs)
    assert e.value.problems, "a ValidationError must list its problems"
    return e.value.problems


def _edit_row(index: int, **changes):
    def edit(rows):
        rows[index].update(changes)
        return rows

    return edit


# -- loading a CSV manifest -------------------------------------------------------------------------
def test_manifest_loads_subjects_with_absolute_paths_and_metadata(tmp_path):
    manifest, particles = write_tiny_cohort(
        tmp_path,
        n=4,
        extra_columns={"label": ["normal", "metopic", "normal", "metopic"], "severity": list("0123")},
    )
    cohort = load_cohort(manifest)
    assert cohort.source == manifest.absolute()
    assert cohort.ids == ["s00", "s01", "s02", "s03"]
    s = cohort.subjects[1]
    assert s.image == tmp_path / "images" / "s01.nrrd" and s.image.is_absolute()
    assert s.particles == tmp_path / "particles" / "s01.particles"
    assert s.segmentation == tmp_path / "segmentations" / "s01.nii.gz"
    assert s.mesh is None
    assert s.group == "b"
    assert s.split == "train"
    assert s.metadata == {"label": "metopic", "severity": "1"}
    assert cohort.metadata_columns == ["label", "severity"]
    assert cohort.groups == ["a", "b"]
    assert cohort.n_particles() == 10
    np.testing.assert_array_equal(cohort.particles(), particles)


def test_particles_stack_is_float64_lps_in_subject_order(tmp_path):
    manifest, particles = write_tiny_cohort(tmp_path, n=4, m=6)
    cohort = load_cohort(manifest)
    train = cohort.by_split("train")
    stacked = cohort.particles(train)
    assert stacked.shape == (2, 6, 3) and stacked.dtype == np.float64
    np.testing.assert_array_equal(stacked, particles[:2])
    np.testing.assert_array_equal(cohort.particles(["s03", "s00"]), particles[[3, 0]])


def test_particles_are_read_from_disk_when_not_cached(tmp_path):
    manifest, particles = write_tiny_cohort(tmp_path, n=2, m=5)
    loaded = load_cohort(manifest)
    fresh = Cohort(loaded.subjects, loaded.source)  # built by hand: nothing cached
    np.testing.assert_array_equal(fresh.particles(), particles)


def test_split_defaults_to_train_and_is_case_insensitive(tmp_path):
    manifest, _ = write_tiny_cohort(tmp_path, n=4, splits=["", " TEST ", "Val", "train"])
    cohort = load_cohort(manifest)
    assert [s.split for s in cohort.subjects] == [None, "test", "val", "train"]
    assert [s.id for s in cohort.by_split("train")] == ["s00", "s03"]
    assert [s.id for s in cohort.by_split("VAL", "test")] == ["s01", "s02"]
    assert cohort.split_counts() == {"train": 2, "val": 1, "test": 1}


def test_by_split_refuses_unknown_or_no_split(tmp_path):
    cohort = load_cohort(write_tiny_cohort(tmp_path, n=2)[0])
    with pytest.raises(InputError, match="unknown split 'validation'"):
        cohort.by_split("validation")
    with pytest.raises(InputError, match="at least one split"):
        cohort.by_split()


def test_id_defaults_to_the_image_name_without_suffix_and_columns_are_case_insensitive(tmp_path):
    manifest, _ = write_tiny_cohort(tmp_path, n=2)
    write_image(tiny_image(), tmp_path / "images" / "knee.left.nii.gz")

    def edit(rows):
        rows[1]["image"] = "images/knee.left.nii.gz"
        return [{("IMAGE" if k == "image" else k): v for k, v in r.items() if k != "id"} for r in rows]

    rewrite_manifest(manifest, edit)
    cohort = load_cohort(manifest)
    assert cohort.ids == ["s00", "knee.left"]


def test_absolute_paths_are_allowed(tmp_path):
    manifest, _ = write_tiny_cohort(tmp_path / "data", n=2)
    absolute = str(tmp_path / "data" / "images" / "s00.nrrd")
    rewrite_manifest(manifest, _edit_row(0, image=absolute))
    moved = tmp_path / "elsewhere" / "cohort.csv"
    moved.parent.mkdir()
    moved.write_text(
        manifest.read_text()
        .replace("particles/", "../data/particles/")
        .replace("segmentations/", "../data/segmentations/")
        .replace("images/s01", "../data/images/s01")
    )
    cohort = load_cohort(moved)
    assert cohort.subjects[0].image == Path(absolute)
    assert cohort.subjects[1].image == tmp_path / "data" / "images" / "s01.nrrd"


def test_mesh_column_and_missing_optional_columns(tmp_path):
    manifest, _ = write_tiny_cohort(tmp_path, n=2)
    verts = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]], float)
    write_mesh(polydata_from_arrays(verts, [[0, 1, 2]]), tmp_path / "m.vtp")
    rewrite_manifest(
        manifest,
        lambda rows: [
            {"image": r["image"], "particles": r["particles"], "mesh": "m.vtp" if i == 0 else ""}
            for i, r in enumerate(rows)
        ],
    )
    cohort = load_cohort(manifest)
    assert cohort.subjects[0].mesh == tmp_path / "m.vtp" and cohort.subjects[1].mesh is None
    assert cohort.subjects[0].group is None and cohort.subjects[0].split is None
    assert cohort.metadata_columns == [] and cohort.groups == []


# -- writing ----------------------------------------------------------------------------------------
def test_write_cohort_csv_round_trips_from_another_folder(tmp_path):
    manifest, _ = write_tiny_cohort(tmp_path / "data", n=4, extra_columns={"label": ["x", "y,z", "", "w"]})
    cohort = load_cohort(manifest)
    out = tmp_path / "out" / "deeper" / "cohort.csv"
    write_cohort_csv(cohort, out)
    text = out.read_text()
    assert "../../data/images/s00.nrrd" in text  # relative to the new manifest
    again = load_cohort(out)
    assert again.subjects == cohort.subjects
    assert sorted(p.name for p in out.parent.iterdir()) == ["cohort.csv"]  # no temporary left behind


def test_write_cohort_csv_refuses_an_invalid_cohort_and_writes_nothing(tmp_path):
    manifest, _ = write_tiny_cohort(tmp_path, n=3)
    cohort = load_cohort(manifest)
    cohort.subjects[2].id = "s00"
    cohort.subjects[1].split = "training"
    cohort.subjects[0].metadata["Split"] = "x"
    out = tmp_path / "new.csv"
    with pytest.raises(ValidationError) as e:
        write_cohort_csv(cohort, out)
    text = "\n".join(e.value.problems)
    assert "duplicate id 's00'" in text
    assert "unknown split 'training'" in text
    assert "metadata key 'Split' clashes" in text
    assert not out.exists()
    with pytest.raises(InputError, match=r"must be a \.csv"):
        write_cohort_csv(load_cohort(manifest), tmp_path / "cohort.json")


# -- validation: one test per kind of problem ---------------------------------------------------------
def test_missing_files_are_named_with_row_and_path(tmp_path):
    manifest, _ = write_tiny_cohort(tmp_path, n=3)
    (tmp_path / "images" / "s01.nrrd").unlink()
    (tmp_path / "particles" / "s02.particles").unlink()
    (tmp_path / "segmentations" / "s00.nii.gz").unlink()
    rewrite_manifest(manifest, _edit_row(1, mesh="meshes/s01.vtk"))
    problems = _problems(manifest)
    assert len(problems) == 4
    assert any("row 3 (id 's01'): image file not found:" in p and "s01.nrrd" in p for p in problems)
    assert any("row 4 (id 's02'): particles file not found:" in p and "s02.particles" in p for p in problems)
    assert any("row 2 (id 's00'): segmentation file not found:" in p for p in problems)
    assert any("row 3 (id 's01'): mesh file not found:" in p and "s01.vtk" in p for p in problems)


def test_unreadable_image(tmp_path):
    manifest, _ = write_tiny_cohort(tmp_path, n=2)
    (tmp_path / "images" / "s01.nrrd").write_bytes(b"NRRD0004\nthis header is broken\n")
    (problem,) = _problems(manifest)
    assert "row 3 (id 's01'): cannot read image" in problem and "s01.nrrd" in problem
    # header checks can be turned off; then only existence is checked
    assert len(load_cohort(manifest, check_images=False)) == 2


def test_non_3d_image(tmp_path):
    manifest, _ = write_tiny_cohort(tmp_path, n=2)
    sitk.WriteImage(tiny_image(dim=2), str(tmp_path / "images" / "s00.nrrd"))
    (problem,) = _problems(manifest)
    assert "row 2 (id 's00')" in problem and "is 2D (size 8x8); expected a 3D image" in problem


def test_vector_image_and_non_3d_segmentation(tmp_path):
    manifest, _ = write_tiny_cohort(tmp_path, n=2)
    sitk.WriteImage(tiny_image(components=3), str(tmp_path / "images" / "s01.nrrd"))
    sitk.WriteImage(tiny_image(dim=2), str(tmp_path / "segmentations" / "s00.nii.gz"))
    problems = _problems(manifest)
    assert len(problems) == 2
    assert any("s01.nrrd has 3 components per voxel; expected a scalar image" in p for p in problems)
    assert any("segmentation" in p and "s00.nii.gz is 2D" in p for p in problems)


def test_differing_point_counts_name_the_file_its_count_and_the_majority(tmp_path):
    manifest, particles = write_tiny_cohort(tmp_path, n=4, m=10)
    write_particles(tmp_path / "particles" / "s02.particles", particles[2][:7])
    (problem,) = _problems(manifest)
    assert "row 4 (id 's02')" in problem
    assert "s02.particles has 7 points, but 3 of 4 files have 10" in problem


def test_nan_and_inf_coordinates(tmp_path):
    manifest, _ = write_tiny_cohort(tmp_path, n=3, m=4)
    (tmp_path / "particles" / "s01.particles").write_text("1 2 3\n4 5 6\nnan 1 1\n0 0 0\n")
    (tmp_path / "particles" / "s02.particles").write_text("1 2 3\n4 5 inf\n-inf 1 1\n0 0 0\n")
    problems = _problems(manifest)
    assert len(problems) == 2  # the two bad files are not also counted as having a different size
    assert "row 3 (id 's01')" in problems[0] and "1 of 4 points have NaN or Inf" in problems[0]
    assert "s01.particles" in problems[0]
    assert "row 4 (id 's02')" in problems[1] and "2 of 4 points have NaN or Inf" in problems[1]


def test_duplicate_ids(tmp_path):
    manifest, _ = write_tiny_cohort(tmp_path, n=3)
    rewrite_manifest(manifest, _edit_row(2, id="s00"))
    (problem,) = _problems(manifest)
    assert problem.endswith("row 4 (id 's00'): duplicate id 's00' (already used by row 2)")


def test_unknown_split(tmp_path):
    manifest, _ = write_tiny_cohort(tmp_path, n=2)
    rewrite_manifest(manifest, _edit_row(1, split="validation"))
    (problem,) = _problems(manifest)
    assert "row 3 (id 's01'): unknown split 'validation'; expected one of train, val, test" in problem


def test_missing_required_columns_are_reported_once(tmp_path):
    manifest, _ = write_tiny_cohort(tmp_path, n=3)
    rewrite_manifest(
        manifest, lambda rows: [{k: v for k, v in r.items() if k not in ("particles",)} for r in rows]
    )
    (problem,) = _problems(manifest)
    assert "required column 'particles' is missing" in problem and "found columns ['id', 'image'" in problem
    rewrite_manifest(manifest, lambda rows: [{k: v for k, v in r.items() if k != "image"} for r in rows])
    problems = _problems(manifest)
    assert any("required column 'image' is missing" in p for p in problems)
    assert any("required column 'particles' is missing" in p for p in problems)
    assert len(problems) == 2


def test_unsupported_suffixes(tmp_path):
    manifest, _ = write_tiny_cohort(tmp_path, n=2)
    (tmp_path / "p.xyz").write_text("1 2 3\n")
    (tmp_path / "img.png").write_bytes(b"\x89PNG")
    rewrite_manifest(manifest, _edit_row(0, particles="p.xyz", image="img.png"))
    problems = _problems(manifest)
    assert any("particles file" in p and "suffix '.xyz'" in p for p in problems)
    assert any("image file" in p and "suffix '.png'" in p for p in problems)


def test_malformed_manifests(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("\n\n")
    assert "the file is empty" in _problems(empty)[0]
    header_only = tmp_path / "header.csv"
    header_only.write_text("id,image,particles\n")
    assert "no subjects" in _problems(header_only)[0]
    manifest, _ = write_tiny_cohort(tmp_path / "c", n=2)
    text = manifest.read_text().splitlines()
    manifest.write_text("\n".join([text[0] + ",image", text[1] + ",extra,too many", text[2]]) + "\n")
    problems = _problems(manifest)
    assert any("column 'image' appears twice" in p for p in problems)
    assert any("row 2: 8 values but the header has 7 columns" in p for p in problems)
    with pytest.raises(InputError, match=r"unsupported cohort file '\.json'"):
        load_cohort(tmp_path / "cohort.json")
    with pytest.raises(InputError, match="cohort file not found"):
        load_cohort(tmp_path / "nope.csv")


def test_image_only_rows_need_the_explicit_option_and_become_test_subjects(tmp_path):
    manifest, particles = write_tiny_cohort(tmp_path, n=4, splits=["train", "train", "val", ""])
    rewrite_manifest(manifest, _edit_row(3, particles=""))
    (problem,) = _problems(manifest)
    assert "row 5 (id 's03'): no particles file" in problem and "require_particles=False" in problem

    cohort = load_cohort(manifest, require_particles=False)
    assert cohort.subjects[3].particles is None and cohort.subjects[3].split == "test"
    assert [s.id for s in cohort.by_split("test")] == ["s03"]
    np.testing.assert_array_equal(cohort.particles(cohort.by_split("train", "val")), particles[:3])
    with pytest.raises(InputError, match="have no particles file: s03"):
        cohort.particles()

    # a training or validation subject must have ground truth, option or not
    rewrite_manifest(manifest, _edit_row(1, particles=""))
    (problem,) = _problems(manifest, require_particles=False)
    assert "row 3 (id 's01'): split 'train' needs a particles file" in problem

    # and an image-only manifest may leave the particles column out entirely
    rewrite_manifest(manifest, lambda rows: [{"image": r["image"]} for r in rows])
    cohort = load_cohort(manifest, require_particles=False)
    assert cohort.split_counts() == {"train": 0, "val": 0, "test": 4}


def test_every_problem_is_reported_at_once_and_nothing_is_loaded(tmp_path):
    manifest, particles = write_tiny_cohort(tmp_path, n=6, m=8)
    (tmp_path / "images" / "s00.nrrd").unlink()  # missing file
    (tmp_path / "images" / "s01.nrrd").write_text("garbage")  # unreadable image
    sitk.WriteImage(tiny_image(dim=2), str(tmp_path / "images" / "s02.nrrd"))  # 2D
    write_particles(tmp_path / "particles" / "s03.particles", particles[3][:5])  # wrong count
    (tmp_path / "particles" / "s04.particles").write_text("nan 0 0\n" * 8)  # NaN

    def edit(rows):
        rows[5]["id"] = "s04"  # duplicate id
        rows[5]["split"] = "holdout"  # unknown split
        return rows

    rewrite_manifest(manifest, edit)
    problems = _problems(manifest)
    expected = [
        ("row 2 (id 's00')", "image file not found"),
        ("row 3 (id 's01')", "cannot read image"),
        ("row 4 (id 's02')", "is 2D"),
        ("row 5 (id 's03')", "has 5 points, but 4 of 5 files have 8"),
        ("row 6 (id 's04')", "8 of 8 points have NaN or Inf"),
        ("row 7 (id 's04')", "duplicate id 's04'"),
        ("row 7 (id 's04')", "unknown split 'holdout'"),
    ]
    for where, what in expected:
        assert any(where in p and what in p for p in problems), (where, what, problems)
    assert len(problems) == len(expected)


def test_cohort_particles_reports_differing_counts(tmp_path):
    a, b = tmp_path / "a.particles", tmp_path / "b.particles"
    write_particles(a, np.zeros((3, 3)))
    write_particles(b, np.zeros((4, 3)))
    cohort = Cohort([Subject("a", None, a), Subject("b", None, b), Subject("c", None, a)], tmp_path / "x.csv")
    with pytest.raises(ValidationError) as e:
        cohort.particles()
    (problem,) = e.value.problems
    assert "subject 'b'" in problem and "has 4 points, but 2 of 3 files have 3" in problem
    with pytest.raises(InputError, match="no subject with id 'zz'"):
        cohort.particles(["zz"])


# -- ShapeWorks projects --------------------------------------------------------------------------------
WORLD_SHIFT = np.array([100.0, -20.0, 5.0])


def _shapeworks_project(
    root: Path, n: int = 3, m: int = 6, domains=("femur",)
) -> tuple[list[dict], np.ndarray]:
    """Files for ``n`` subjects and the project rows ShapeWorks would write for them."""
    rng = np.random.default_rng(1)
    local = rng.normal(scale=5.0, size=(n, m, 3))
    for sub in ("images", "shapes", "local", "world"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        name = f"case{i}"
        write_image(tiny_image(), root / "images" / f"{name}.nrrd")
        row = {"name": name, "image_ct": f"images\\{name}.nrrd"}  # Windows separators, as Studio may write
        for d in domains:
            seg = root / "shapes" / f"{name}_{d}.nrrd"
            write_image(sitk.Cast(tiny_image() > 200, sitk.sitkUInt8), seg)
            write_particles(root / "local" / f"{name}_{d}.particles", local[i])
            write_particles(root / "world" / f"{name}_{d}.particles", local[i] + WORLD_SHIFT)
            row[f"shape_{d}"] = f"shapes/{name}_{d}.nrrd"
            row[f"groomed_{d}"] = f"groomed/{name}_{d}.nrrd"  # bookkeeping: dropped
            row[f"alignment_{d}"] = "1 0 0 0 1 0 0 0 1 0 0 0"
            row[f"local_particles_{d}"] = f"local/{name}_{d}.particles"
            row[f"world_particles_{d}"] = f"world/{name}_{d}.particles"
        row["group_sex"] = "F" if i % 2 else "M"
        row["split"] = ["train", "val", "test"][i % 3]
        row["registration_transform"] = "1 0 0 0 1 0 0 0 1 0 0 0"
        rows.append(row)
    return rows, local


def _write_swproj(path: Path, rows: list[dict]) -> Path:
    doc = {
        "data": rows,
        "optimize": {"number_of_particles": "6"},
        "groom": {"femur": {"alignment_enabled": "true"}},
    }
    path.write_text(json.dumps(doc, indent=2))
    return path


def _write_xlsx(path: Path, rows: list[dict], sheet: str = "data") -> Path:
    import openpyxl

    wb = openpyxl.Workbook()
    ws = wb.active
    ws.title = sheet
    header = list(dict.fromkeys(k for r in rows for k in r))
    ws.append(header)
    for i, r in enumerate(rows):
        ws.append([r.get(h) for h in header])
        if i == 0:
            ws.append([None] * len(header))  # a blank row, which ShapeWorks skips
    wb.create_sheet("optimize").append(["number_of_particles", 6])
    wb.save(path)
    return path


@pytest.mark.parametrize("writer", [_write_swproj, _write_xlsx], ids=["swproj", "xlsx"])
def test_shapeworks_project_imports_local_particles_by_default(tmp_path, writer):
    rows, local = _shapeworks_project(tmp_path)
    project = writer(tmp_path / f"project{'.swproj' if writer is _write_swproj else '.xlsx'}", rows)
    cohort = load_cohort(project)
    assert cohort.ids == ["case0", "case1", "case2"]
    s = cohort.subjects[1]
    assert s.image == tmp_path / "images" / "case1.nrrd"
    assert s.segmentation == tmp_path / "shapes" / "case1_femur.nrrd" and s.mesh is None
    assert s.particles == tmp_path / "local" / "case1_femur.particles"
    assert s.group == "F"
    assert s.split == "val"
    assert s.metadata == {"registration_transform": "1 0 0 0 1 0 0 0 1 0 0 0"}
    np.testing.assert_array_equal(cohort.particles(), local)


@pytest.mark.parametrize("writer", [_write_swproj, _write_xlsx], ids=["swproj", "xlsx"])
def test_shapeworks_project_world_particles(tmp_path, writer):
    rows, local = _shapeworks_project(tmp_path)
    project = writer(tmp_path / f"project{'.swproj' if writer is _write_swproj else '.xlsx'}", rows)
    cohort = load_shapeworks_project(project, particles="world")
    assert cohort.subjects[0].particles == tmp_path / "world" / "case0_femur.particles"
    np.testing.assert_allclose(cohort.particles(), local + WORLD_SHIFT)


def test_shapeworks_mesh_shapes_and_names_defaulting_to_the_shape_file(tmp_path):
    rows, _ = _shapeworks_project(tmp_path, n=2)
    verts = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]], float)
    write_mesh(polydata_from_arrays(verts, [[0, 1, 2]]), tmp_path / "shapes" / "case0.vtk")
    rows[0]["shape_femur"] = "shapes/case0.vtk"
    del rows[1]["name"]
    cohort = load_cohort(_write_swproj(tmp_path / "p.swproj", rows))
    assert cohort.subjects[0].mesh == tmp_path / "shapes" / "case0.vtk"
    assert cohort.subjects[0].segmentation is None
    # ShapeWorks' naming: the name column, else the input shape's file stem (not the image's)
    assert cohort.ids == ["case0", "case1_femur"]
    del rows[1]["shape_femur"]
    assert load_cohort(_write_swproj(tmp_path / "p.swproj", rows)).ids[1] == "case1_femur"  # groomed


def test_shapeworks_multi_domain_needs_a_domain(tmp_path):
    rows, local = _shapeworks_project(tmp_path, domains=("femur", "pelvis"))
    project = _write_swproj(tmp_path / "p.swproj", rows)
    with pytest.raises(InputError, match=r"2 domains \(femur, pelvis\).*domain="):
        load_cohort(project)
    cohort = load_cohort(project, domain="pelvis")
    assert cohort.subjects[0].particles == tmp_path / "local" / "case0_pelvis.particles"
    assert cohort.subjects[0].segmentation == tmp_path / "shapes" / "case0_pelvis.nrrd"
    assert "shape_femur" not in cohort.subjects[0].metadata  # the other domain's files are not metadata
    np.testing.assert_array_equal(cohort.particles(), local)
    with pytest.raises(InputError, match=r"no domain 'hip'.*\['femur', 'pelvis'\]"):
        load_cohort(project, domain="hip")


def test_shapeworks_without_the_chosen_particles_says_which_to_use(tmp_path):
    rows, _ = _shapeworks_project(tmp_path)
    for r in rows:
        del r["local_particles_femur"]
    (problem,) = _problems(_write_swproj(tmp_path / "p.swproj", rows))
    assert (
        "has 'world_particles_femur' but no 'local_particles_femur'" in problem
        and "particles='world'" in problem
    )
    for r in rows:
        del r["world_particles_femur"]
    (problem,) = _problems(_write_swproj(tmp_path / "p.swproj", rows))
    assert "no 'local_particles_femur' column" in problem
    # images only (ShapeWorks' inference rows): train/val subjects would lack ground truth ...
    problems = _problems(tmp_path / "p.swproj", require_particles=False)
    assert any("split 'train' needs a particles file" in p for p in problems)
    for r in rows:
        del r["split"]
    # ... and without a split they all become test subjects
    cohort = load_cohort(_write_swproj(tmp_path / "p.swproj", rows), require_particles=False)
    assert cohort.split_counts() == {"train": 0, "val": 0, "test": 3}


def test_shapeworks_image_columns(tmp_path):
    rows, _ = _shapeworks_project(tmp_path, n=2)
    for r in rows:
        r["image_mr"] = r["image_ct"]
    project = _write_swproj(tmp_path / "p.swproj", rows)
    cohort = load_cohort(project)  # ShapeWorks takes the first image column, and we say so
    assert any("image column 'image_ct'" in n and "image_mr" in n for n in cohort.notes)
    assert load_cohort(project, image_column="mr").subjects[0].image == tmp_path / "images" / "case0.nrrd"
    assert len(load_cohort(project, image_column="image_ct")) == 2
    with pytest.raises(InputError, match="no column 'pet' to take the images from"):
        load_cohort(project, image_column="pet")
    for r in rows:
        del r["image_ct"], r["image_mr"]
    (problem,) = _problems(_write_swproj(tmp_path / "p.swproj", rows))
    assert "no image column" in problem and "'shape_femur'" in problem and "--image-column" in problem


def test_shapeworks_validation_reports_every_problem(tmp_path):
    rows, _ = _shapeworks_project(tmp_path, n=3)
    (tmp_path / "images" / "case0.nrrd").unlink()
    write_particles(tmp_path / "local" / "case1_femur.particles", np.zeros((2, 3)))
    rows[2]["name"] = "case1"
    rows[2]["split"] = "dev"
    problems = _problems(_write_xlsx(tmp_path / "p.xlsx", rows))
    assert any("p.xlsx row 2 (id 'case0'): image file not found" in p for p in problems)
    # the blank spreadsheet row after the first subject shifts the later ones down by one
    assert any("row 4 (id 'case1')" in p and "has 2 points, but 2 of 3 files have 6" in p for p in problems)
    assert any("row 5 (id 'case1'): duplicate id 'case1'" in p for p in problems)
    assert any("row 5 (id 'case1'): unknown split 'dev'" in p for p in problems)
    assert len(problems) == 4


def test_shapeworks_bad_files(tmp_path):
    bad = tmp_path / "bad.swproj"
    bad.write_text("{ not json")
    with pytest.raises(InputError, match="cannot read the ShapeWorks project as JSON"):
        load_cohort(bad)
    bad.write_text(json.dumps({"subjects": []}))
    with pytest.raises(InputError, match="needs a 'data' list"):
        load_cohort(bad)
    bad_xlsx = tmp_path / "bad.xlsx"
    bad_xlsx.write_bytes(b"not a zip")
    with pytest.raises(InputError, match="cannot read the ShapeWorks spreadsheet"):
        load_cohort(bad_xlsx)
    rows, _ = _shapeworks_project(tmp_path, n=1)
    with pytest.raises(InputError, match="'local' or 'world'"):
        load_cohort(_write_swproj(tmp_path / "p.swproj", rows), particles="groomed")
    with pytest.raises(InputError, match="not a ShapeWorks project"):
        load_shapeworks_project(tmp_path / "cohort.csv")
