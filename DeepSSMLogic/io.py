"""Reading and writing images, particles and meshes.

- Images (.nrrd .nii .nii.gz .mha .mhd) through SimpleITK.
- Particles ``(M, 3)`` float64, mm, LPS: ShapeWorks ``.particles`` text (one "x y z" per line),
  ``.csv`` (header ``x,y,z``), Slicer ``.mrk.json`` (markups, stored in LPS).
- Meshes (.vtk .vtp .stl .ply) through vtk, returned as ``vtkPolyData``.

SimpleITK and vtk are imported inside the functions that need them, so importing this module
costs nothing on a machine that has only numpy.
"""

from __future__ import annotations

import csv
import io as _io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError
from .fileutil import atomic_path, atomic_write_text

PathLike = str | os.PathLike[str]

IMAGE_SUFFIXES = (".nrrd", ".nii", ".nii.gz", ".mha", ".mhd")
PARTICLE_SUFFIXES = (".particles", ".csv", ".mrk.json", ".txt", ".pts")
MESH_SUFFIXES = (".vtk", ".vtp", ".stl", ".ply", ".obj")


def suffix_of(path: PathLike) -> str:
    """The lower-case file suffix, with the compound ones (.nii.gz, .mrk.json) kept whole."""
    name = Path(path).name.lower()
    for compound in (".nii.gz", ".mrk.json", ".seg.nrrd"):
        if name.endswith(compound):
            return compound
    return Path(name).suffix


def _require_file(path: PathLike, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{what} file not found: {p}")
    return p


# -- images ---------------------------------------------------------------------------------------
def read_image(path: PathLike) -> Any:
    """Read a 3D image with SimpleITK; raises :class:`InputError` for unreadable or non-3D files."""
    import SimpleITK as sitk

    p = _require_file(path, "image")
    if suffix_of(p) not in IMAGE_SUFFIXES + (".seg.nrrd",):
        raise InputError(f"{p}: unsupported image format {suffix_of(p)!r}; expected one of {IMAGE_SUFFIXES}")
    try:
        image = sitk.ReadImage(str(p))
    except RuntimeError as e:
        raise InputError(f"{p}: cannot read image ({str(e).strip().splitlines()[-1]})") from None
    if image.GetDimension() != 3:
        raise InputError(f"{p}: expected a 3D image, found {image.GetDimension()}D")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{p}: expected a scalar image, found {image.GetNumberOfComponentsPerPixel()} components per voxel"
        )
    return image


def write_image(image: Any, path: PathLike, compress: bool = True) -> None:
    """Write a SimpleITK image atomically."""
    import SimpleITK as sitk

    target = Path(path)
    if suffix_of(target) not in IMAGE_SUFFIXES + (".seg.nrrd",):
        raise InputError(f"{target}: unsupported image format {suffix_of(target)!r}")
    with atomic_path(target) as tmp:
        sitk.WriteImage(image, str(tmp), compress)
        if suffix_of(target) == ".mhd":
            # MetaImage keeps the voxels in a companion file (.raw/.zraw) named in the header; move
            # it into place before the header so that a reader never sees a header without data.
            for companion in tmp.parent.iterdir():
                if companion != tmp:
                    os.replace(companion, target.parent / companion.name)


# -- particles ------------------------------------------------------------------------------------
def read_particles(path: PathLike) -> np.ndarray:
    """Read correspondence points as ``(M, 3)`` float64, mm, LPS."""
    p = _require_file(path, "particles")
    suffix = suffix_of(p)
    if suffix not in PARTICLE_SUFFIXES:
        raise InputError(f"{p}: unsupported particle format {suffix!r}; expected one of {PARTICLE_SUFFIXES}")
    try:
        text = p.read_text(encoding="utf-8")
        if not text.strip():
            raise InputError(f"{p}: the particles file is empty (expected rows of 3 coordinates x y z)")
        if suffix == ".mrk.json":
            pts = _read_markups_json(p, text)
        elif suffix == ".csv":
            pts = _read_particles_csv(p, text)
        else:
            try:
                pts = np.loadtxt(_io.StringIO(text), dtype=np.float64, ndmin=2)
            except ValueError:
                # numpy counts rows from 0 in some messages and from 1 in others: name the line ourselves
                bad = _first_bad_line(text)
                if bad is None:
                    raise
                raise InputError(
                    f"{p}: cannot parse particles: {bad}; expected 3 numbers x y z per line"
                ) from None
    except InputError:
        raise
    except (ValueError, OSError, KeyError, IndexError, TypeError, UnicodeDecodeError) as e:
        raise InputError(f"{p}: cannot parse particles ({e})") from None
    if pts.ndim != 2 or pts.shape[1] != 3 or pts.shape[0] == 0:
        raise InputError(f"{p}: expected rows of 3 coordinates (x y z), found an array of shape {pts.shape}")
    bad = np.flatnonzero(~np.all(np.isfinite(pts), axis=1))
    if bad.size:
        raise InputError(
            f"{p}: {bad.size} of {len(pts)} points have NaN or Inf coordinates "
            f"(first at point {bad[0] + 1}: {pts[bad[0]].tolist()}); expected finite x y z in mm"
        )
    return pts


def _first_bad_line(text: str) -> str | None:
    """``"line N: ..."`` (1-based, as an editor shows it) for the first line of a whitespace
    particles file that is not 3 numbers, or None. Blank lines and ``#`` comments are skipped."""
    width = None
    for n, line in enumerate(text.splitlines(), start=1):
        values = line.split("#", 1)[0].split()
        if not values:
            continue
        for v in values:
            try:
                float(v)
            except ValueError:
                return f"line {n}: {v!r} is not a number"
        if width is None:
            width = len(values)
        elif len(values) != width:
            return f"line {n}: {len(values)} values where the lines before have {width}"
    return None


def _read_particles_csv(p: Path, text: str) -> np.ndarray:
    rows = [r for r in csv.reader(_io.StringIO(text.lstrip("\ufeff"))) if any(v.strip() for v in r)]
    try:  # a first row of numbers (nan and inf included) means there is no header
        [float(v) for v in rows[0]]
        has_header = False
    except ValueError:
        has_header = True
    if has_header:
        header = [h.strip().lower() for h in rows[0]]
        try:
            cols = [header.index(c) for c in ("x", "y", "z")]
        except ValueError:
            raise InputError(f"{p}: CSV header must name columns x, y, z; found {rows[0]}") from None
        rows = [[r[c] for c in cols] for r in rows[1:]]
    return np.asarray([[float(v) for v in r] for r in rows], dtype=np.float64)


def _read_markups_json(p: Path, text: str) -> np.ndarray:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{p}: not a valid JSON markups file ({e})") from None
    if not isinstance(doc, dict):
        raise InputError(f"{p}: expected a Slicer markups JSON object, found {type(doc).__name__}")
    markups = doc.get("markups") or []
    if not markups:
        raise InputError(f"{p}: no 'markups' list in the Slicer markups file")
    m = markups[0]
    system = str(m.get("coordinateSystem", "LPS")).upper()
    if system not in ("LPS", "RAS"):
        raise InputError(f"{p}: coordinateSystem must be LPS or RAS, found {system!r}")
    control_points = m.get("controlPoints") or []
    for i, cp in enumerate(control_points):
        if "position" not in cp:
            raise InputError(
                f"{p}: control point {i + 1} has no position (status {cp.get('positionStatus')!r})"
            )
    pts = np.asarray([cp["position"] for cp in control_points], dtype=np.float64)
    if pts.size == 0:
        raise InputError(f"{p}: the markups file has no control points")
    if system == "RAS":
        pts[:, :2] *= -1.0
    return pts


def write_particles(path: PathLike, points: np.ndarray) -> None:
    """Write ``(M, 3)`` LPS points; the format follows the suffix (.particles, .csv, .mrk.json)."""
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 3 or pts.shape[0] == 0:
        raise InputError(f"{path}: particles must have shape (M, 3) with M >= 1, found {pts.shape}")
    if not np.all(np.isfinite(pts)):
        raise InputError(f"{path}: refusing to write particles containing NaN or Inf")
    suffix = suffix_of(path)
    # repr() of a Python float is the shortest text that reads back to the same float64: exact round trips.
    rows = pts.tolist()
    if suffix == ".mrk.json":
        text = json.dumps(_markups_document(pts), indent=2)
    elif suffix == ".csv":
        text = "x,y,z\n" + "".join(f"{x!r},{y!r},{z!r}\n" for x, y, z in rows)
    elif suffix in (".particles", ".txt", ".pts"):
        text = "".join(f"{x!r} {y!r} {z!r}\n" for x, y, z in rows)
    else:
        raise InputError(
            f"{path}: unsupported particle format {suffix!r}; expected one of {PARTICLE_SUFFIXES}"
        )
    atomic_write_text(path, text)


def _markups_document(pts: np.ndarray) -> dict[str, Any]:
    return {
        "@schema": "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/Schema/markups-schema-v1.0.3.json#",
        "markups": [
            {
                "type": "Fiducial",
                "coordinateSystem": "LPS",
                "coordinateUnits": "mm",
                "locked": True,
                "labelFormat": "",
                "controlPoints": [
                    {"id": str(i + 1), "label": "", "position": [float(v) for v in p], "locked": True}
                    for i, p in enumerate(pts)
                ],
                "display": {"pointLabelsVisibility": False},
            }
        ],
    }


# -- meshes ---------------------------------------------------------------------------------------
def _mesh_io_classes(path: Path) -> tuple[Any, Any]:
    import vtk

    suffix = suffix_of(path)
    table = {
        ".vtk": (vtk.vtkPolyDataReader, vtk.vtkPolyDataWriter),
        ".vtp": (vtk.vtkXMLPolyDataReader, vtk.vtkXMLPolyDataWriter),
        ".stl": (vtk.vtkSTLReader, vtk.vtkSTLWriter),
        ".ply": (vtk.vtkPLYReader, vtk.vtkPLYWriter),
        ".obj": (vtk.vtkOBJReader, vtk.vtkOBJWriter),  # ShapeWorks accepts .obj shapes
    }
    if suffix not in table:
        raise InputError(f"{path}: unsupported mesh format {suffix!r}; expected one of {MESH_SUFFIXES}")
    return table[suffix]


def read_mesh(path: PathLike) -> Any:
    """Read a surface mesh as ``vtkPolyData`` (coordinates as stored: LPS mm for our files)."""
    p = _require_file(path, "mesh")
    reader_cls, _ = _mesh_io_classes(p)
    reader = reader_cls()
    reader.SetFileName(str(p))
    reader.Update()
    mesh = reader.GetOutput()
    if mesh is None or mesh.GetNumberOfPoints() == 0:
        raise InputError(f"{p}: the mesh file holds no points")
    return mesh


def write_mesh(mesh: Any, path: PathLike) -> None:
    """Write ``vtkPolyData`` atomically; the format follows the suffix."""
    target = Path(path)
    _, writer_cls = _mesh_io_classes(target)
    with atomic_path(target) as tmp:
        writer = writer_cls()
        writer.SetFileName(str(tmp))
        writer.SetInputData(mesh)
        if hasattr(writer, "SetFileTypeToBinary"):
            writer.SetFileTypeToBinary()
        if not writer.Write():
            raise InputError(f"{target}: vtk could not write the mesh")


def polydata_from_arrays(points: np.ndarray, triangles: np.ndarray) -> Any:
    """``vtkPolyData`` from vertices ``(V, 3)`` and triangle indices ``(T, 3)``."""
    import vtk
    from vtk.util import numpy_support as ns

    verts = np.asarray(points, dtype=np.float64)
    tri = np.asarray(triangles)
    if verts.ndim != 2 or verts.shape[1] != 3:
        raise InputError(f"mesh vertices must have shape (V, 3), found {verts.shape}")
    if not np.all(np.isfinite(verts)):
        raise InputError("mesh vertices contain NaN or Inf")
    if tri.ndim != 2 or tri.shape[1] != 3:
        raise InputError(f"mesh triangles must have shape (T, 3), found {tri.shape}")
    if tri.size and (
        not np.all(np.isfinite(tri))
        or np.any(tri != np.round(tri))
        or tri.min() < 0
        or tri.max() >= len(verts)
    ):
        raise InputError(
            f"mesh triangles must hold integer vertex indices in [0, {len(verts)}); "
            f"found values in [{tri.min()}, {tri.max()}]"
            + ("" if np.all(tri == np.round(tri)) else ", not all whole")
        )
    tri = tri.astype(np.int64)
    pts = vtk.vtkPoints()
    pts.SetData(ns.numpy_to_vtk(np.ascontiguousarray(verts), deep=True))
    cells = vtk.vtkCellArray()
    offsets = np.arange(0, 3 * len(tri) + 1, 3, dtype=np.int64)
    cells.SetData(
        ns.numpy_to_vtkIdTypeArray(offsets, deep=True), ns.numpy_to_vtkIdTypeArray(tri.ravel(), deep=True)
    )
    mesh = vtk.vtkPolyData()
    mesh.SetPoints(pts)
    mesh.SetPolys(cells)
    return mesh


def arrays_from_polydata(mesh: Any) -> tuple[np.ndarray, np.ndarray]:
    """Vertices ``(V, 3)`` float64 and triangles ``(T, 3)`` int64 of a triangle ``vtkPolyData``."""
    import vtk
    from vtk.util import numpy_support as ns

    if mesh.GetPolys().GetMaxCellSize() > 3:
        tri = vtk.vtkTriangleFilter()
        tri.SetInputData(mesh)
        tri.Update()
        mesh = tri.GetOutput()
    verts = ns.vtk_to_numpy(mesh.GetPoints().GetData()).astype(np.float64)
    conn = ns.vtk_to_numpy(mesh.GetPolys().GetConnectivityArray()).astype(np.int64)
    return verts, conn.reshape(-1, 3)
