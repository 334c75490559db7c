"""Test fixtures built like real ShapeWorks projects.

- :func:`femur_constraints_with_images`: the real FemurConstraints project (its .ply meshes,
  particles, transforms and deepssm sheet, copied unchanged) plus an ``image_ct`` column of images
  rendered from each mesh in that subject's own (local) frame.
- :func:`scanner_frame_project`: synthetic subjects moved into random scanner frames (hundreds of
  mm, a few degrees), with ShapeWorks' alignment/procrustes columns mapping them back, two excluded
  rows whose files are broken, image-only rows and a deepssm sheet.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from DeepSSMLogic import io
from DeepSSMLogic.geometry import Grid
from DeepSSMLogic.predict import apply_matrix
from DeepSSMLogic.preprocess import image_from_array
from DeepSSMLogic.synthetic import voxelize

EXAMPLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "shapeworks-examples"
if not EXAMPLES.is_dir():  # a worktree under /work: the shared folder sits beside it
    EXAMPLES = Path("/work/shared/data/shapeworks-examples")
FEMUR = EXAMPLES / "FemurConstraints"


def render_mesh_image(
    mesh_path: Path, out: Path, spacing: float = 2.0, margin_mm: float = 20.0, seed: int = 0
) -> None:
    """A CT-like image of the closed mesh at ``mesh_path`` in the mesh's own frame: bone 400 on a
    background of 40, Gaussian noise σ 15 (int16 .nrrd)."""
    verts, tris = io.arrays_from_polydata(io.read_mesh(mesh_path))
    grid = Grid.bounding(verts, spacing, margin_mm)
    label = voxelize(verts, np.asarray(tris), grid)
    rng = np.random.default_rng(seed)
    arr = 40.0 + 360.0 * label + rng.normal(0.0, 15.0, label.shape)
    io.write_image(image_from_array(arr.astype(np.int16), grid), out)


def femur_constraints_with_images(root: Path, spacing: float = 2.0) -> Path:
    """Copy FemurConstraints into ``root`` (the originals are read-only), render an image per
    subject, and add an ``image_ct`` column to the project's data sheet. Returns the .xlsx path."""
    import openpyxl

    root.mkdir(parents=True, exist_ok=True)
    for f in FEMUR.iterdir():
        target = root / f.name
        if f.is_dir():
            shutil.copytree(f, target)
        else:
            shutil.copyfile(f, target)
    for p in [*root.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    wb = openpyxl.load_workbook(root / "FemurConstraints.xlsx")
    ws = wb["data"]
    header = [c.value for c in ws[1]]
    col = len(header) + 1
    ws.cell(row=1, column=col, value="image_ct")
    (root / "images").mkdir()
    shape_col = header.index("shape_1") + 1
    for r in range(2, ws.max_row + 1):
        shape = ws.cell(row=r, column=shape_col).value
        if not shape:
            continue
        image = f"images/{Path(shape).stem}.nrrd"
        render_mesh_image(root / shape, root / image, spacing=spacing, seed=r)
        ws.cell(row=r, column=col, value=image)
    out = root / "FemurConstraints.xlsx"
    wb.save(out)
    return out


# -- a synthetic project in scanner frames ------------------------------------------------------------
def rotation(axis: np.ndarray, degrees: float) -> np.ndarray:
    a = np.asarray(axis, dtype=np.float64)
    a = a / np.linalg.norm(a)
    t = np.radians(degrees)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


def random_scanner_pose(
    rng: np.random.Generator, max_degrees: float = 8.0, max_offset_mm: float = 400.0
) -> np.ndarray:
    """4x4 rigid world → scanner pose: a rotation up to ``max_degrees`` and an offset of hundreds of mm."""
    m = np.eye(4)
    m[:3, :3] = rotation(rng.normal(size=3), rng.uniform(0.5, 1.0) * max_degrees)
    m[:3, 3] = rng.uniform(-max_offset_mm, max_offset_mm, 3)
    m[:3, 3] += np.sign(m[:3, 3]) * 100.0  # at least 100 mm away on every axis
    return m


def move_image(image: sitk.Image, pose: np.ndarray) -> sitk.Image:
    """The same voxels with their physical points moved by the rigid 4x4 ``pose`` (exact, no resampling)."""
    out = sitk.Image(image)
    r, t = pose[:3, :3], pose[:3, 3]
    d = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    out.SetDirection(tuple((r @ d).ravel()))
    out.SetOrigin(tuple(r @ np.asarray(image.GetOrigin()) + t))
    return out


def fmt_matrix(m: np.ndarray) -> str:
    """16 row-major numbers, as ShapeWorks writes a transform cell."""
    return " ".join(f"{v:.9f}" for v in np.asarray(m).ravel())


def scanner_frame_project(
    root: Path,
    family: str = "atrium",
    n_train: int = 24,
    n_test: int = 4,
    n_image_only: int = 1,
    n_particles: int = 128,
    seed: int = 0,
    settings: dict[str, str] | None = None,
) -> tuple[dict[str, Path], dict]:
    """Write ``root/project.xlsx`` and ``project.swproj`` (same content). Returns the two paths and
    the ground truth: ``poses`` {id: world→scanner 4x4}, ``world`` {id: (M, 3)}, ``local`` {id: (M, 3)},
    ``split`` {id: split}, ``new_scans`` [(image path, local particles)] not in the project."""
    import openpyxl

    from DeepSSMLogic.synthetic import make_subject

    rng = np.random.default_rng(seed)
    for sub in ("images", "meshes", "particles", "new"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    n_all = n_train + n_test + n_image_only + 2  # + 2 new scans outside the project
    rows: list[dict[str, str]] = []
    truth: dict = {"poses": {}, "world": {}, "local": {}, "split": {}, "new_scans": [], "new_poses": {}}
    for i in range(n_all):
        sid = f"case{i:02d}"
        subj = make_subject(
            family,
            np.random.default_rng([seed, i]),
            image_size=(48, 48, 48),
            spacing=2.0,
            n_particles=n_particles,
        )
        pose = random_scanner_pose(rng)
        world = subj.particles
        local = apply_matrix(pose, world)
        image = move_image(image_from_array(subj.image.astype(np.int16), subj.grid), pose)
        if i >= n_train + n_test + n_image_only:
            path = root / "new" / f"{sid}.nrrd"
            io.write_image(image, path)
            truth["new_scans"].append((path, local))
            truth["new_poses"][sid] = pose
            continue
        io.write_image(image, root / "images" / f"{sid}.nrrd")
        io.write_mesh(
            io.polydata_from_arrays(apply_matrix(pose, subj.vertices), subj.triangles),
            root / "meshes" / f"{sid}.vtk",
        )
        io.write_particles(root / "particles" / f"{sid}_local.particles", local)
        io.write_particles(root / "particles" / f"{sid}_world.particles", world)
        # ShapeWorks' grooming: alignment = centring (a translation), procrustes = the rest
        to_world = np.linalg.inv(pose)
        alignment = np.eye(4)
        alignment[:3, 3] = -local.mean(axis=0)
        procrustes = to_world @ np.linalg.inv(alignment)
        split = "train" if i < n_train else "test"
        row = {
            "name": sid,
            "shape_1": f"meshes/{sid}.vtk",
            "image_ct": f"images/{sid}.nrrd",
            "alignment_1": fmt_matrix(alignment),
            "procrustes_1": fmt_matrix(procrustes),
            "local_particles_1": f"particles/{sid}_local.particles",
            "world_particles_1": f"particles/{sid}_world.particles",
            "split": split,
            "fixed": "true" if i % 2 else "false",
        }
        if i >= n_train + n_test:  # image-only rows: ShapeWorks' inference rows, no shape, no particles
            for key in ("shape_1", "local_particles_1", "world_particles_1", "alignment_1", "procrustes_1"):
                row[key] = ""
            row["split"] = "test"
        rows.append(row)
        truth["poses"][sid] = pose
        truth["world"][sid] = world
        truth["local"][sid] = local
        truth["split"][sid] = row["split"]
    # two excluded rows whose files are broken: a Git LFS pointer image and missing particles
    (root / "images" / "broken.nrrd").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n", encoding="utf-8"
    )
    for name, image in (("excluded_a", "images/broken.nrrd"), ("excluded_b", "images/missing.nrrd")):
        rows.append(
            {
                "name": name,
                "shape_1": "meshes/missing.vtk",
                "image_ct": image,
                "alignment_1": "1 2 3",
                "procrustes_1": "",
                "local_particles_1": "particles/missing.particles",
                "world_particles_1": "particles/missing.particles",
                "split": "train",
                "excluded": "true",
            }
        )
    deepssm = settings or {}
    header = list(dict.fromkeys(k for r in rows for k in r))
    wb = openpyxl.Workbook()
    ws = wb.active
    ws.title = "data"
    ws.append(header)
    for r in rows:
        ws.append([r.get(h, "") for h in header])
    sheet = wb.create_sheet("deepssm")
    sheet.append(["key", "value"])
    for k, v in deepssm.items():
        sheet.append([k, v])
    wb.save(root / "project.xlsx")
    import json

    (root / "project.swproj").write_text(
        json.dumps({"data": [{h: r.get(h, "") for h in header} for r in rows], "deepssm": deepssm}, indent=1),
        encoding="utf-8",
    )
    return {"xlsx": root / "project.xlsx", "swproj": root / "project.swproj"}, truth
