"""Round trips and error messages of DeepSSMLogic.io (images, particles, meshes)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from DeepSSMLogic.errors import InputError
from DeepSSMLogic.io import (
    arrays_from_polydata,
    polydata_from_arrays,
    read_image,
    read_mesh,
    read_particles,
    suffix_of,
    write_image,
    write_mesh,
    write_particles,
)

RNG = np.random.default_rng(7)
POINTS = RNG.normal(scale=30.0, size=(17, 3)) + np.array([12.3456789012345, -98.7654321, 0.1])


# -- particles ------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".particles", ".csv", ".mrk.json", ".txt", ".pts"])
def test_particles_round_trip_is_exact(tmp_path, suffix):
    path = tmp_path / f"p{suffix}"
    write_particles(path, POINTS)
    back = read_particles(path)
    assert back.dtype == np.float64 and back.shape == POINTS.shape
    np.testing.assert_array_equal(back, POINTS)  # float64 survives the text formats bit for bit


def test_markups_are_written_in_lps(tmp_path):
    path = tmp_path / "p.mrk.json"
    write_particles(path, POINTS[:3])
    markup = json.loads(path.read_text())["markups"][0]
    assert markup["coordinateSystem"] == "LPS"
    assert markup["coordinateUnits"] == "mm"
    np.testing.assert_array_equal([cp["position"] for cp in markup["controlPoints"]], POINTS[:3])


def _markups(path, points, system):
    doc = {"markups": [{"type": "Fiducial", "controlPoints": [{"position": list(p)} for p in points]}]}
    if system is not None:
        doc["markups"][0]["coordinateSystem"] = system
    path.write_text(json.dumps(doc))


def test_ras_markups_are_read_back_as_lps(tmp_path):
    path = tmp_path / "ras.mrk.json"
    _markups(path, [[1.0, 2.0, 3.0], [-4.0, 5.5, -6.0]], "RAS")
    np.testing.assert_array_equal(read_particles(path), [[-1.0, -2.0, 3.0], [4.0, -5.5, -6.0]])


def test_markups_without_coordinate_system_are_lps_like_slicer(tmp_path):
    # slicer-core 5.13 reads a markups file without "coordinateSystem" as LPS (checked by hand).
    path = tmp_path / "plain.mrk.json"
    _markups(path, [[1.0, 2.0, 3.0]], None)
    np.testing.assert_array_equal(read_particles(path), [[1.0, 2.0, 3.0]])


@pytest.mark.slicer
def test_slicer_reads_our_markups_as_the_same_points(tmp_path):
    slicer = pytest.importorskip("slicer")
    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkMRMLApplicationLogic()
    app_logic.SetMRMLScene(scene)
    logic = slicer.vtkSlicerMarkupsLogic()
    logic.SetMRMLApplicationLogic(app_logic)
    logic.SetMRMLScene(scene)
    app_logic.SetModuleLogic("Markups", logic)

    ours = tmp_path / "ours.mrk.json"
    write_particles(ours, POINTS[:4])
    node = scene.GetNodeByID(logic.LoadMarkups(str(ours)))
    ras = slicer.util.arrayFromMarkupsControlPoints(node)
    np.testing.assert_allclose(ras, POINTS[:4] * [-1, -1, 1], atol=1e-9)

    # and a file Slicer writes in RAS comes back to us in LPS
    storage = node.GetStorageNode()
    theirs = tmp_path / "theirs.mrk.json"
    storage.SetFileName(str(theirs))
    storage.SetCoordinateSystem(slicer.vtkMRMLStorageNode.CoordinateSystemRAS)
    assert storage.WriteData(node)
    assert json.loads(theirs.read_text())["markups"][0]["coordinateSystem"] == "RAS"
    np.testing.assert_allclose(read_particles(theirs), POINTS[:4], atol=1e-9)


def test_csv_particles_with_header_in_any_order_and_without_header(tmp_path):
    with_header = tmp_path / "h.csv"
    with_header.write_text("id,Z,y,x\n1,3,2,1\n2,6,5,4\n")
    np.testing.assert_array_equal(read_particles(with_header), [[1, 2, 3], [4, 5, 6]])
    bare = tmp_path / "b.csv"
    bare.write_text("1e-3,2,3\n4,5,6\n")
    np.testing.assert_array_equal(read_particles(bare), [[1e-3, 2, 3], [4, 5, 6]])


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("nan.particles", "1 2 3\nnan 5 6\n"),
        ("inf.particles", "1 2 3\n4 inf 6\n"),
        ("nan.csv", "nan,2,3\n4,5,6\n"),  # a first row of nan is data, not a header
        ("nan.csv", "x,y,z\n1,2,3\n4,5,-inf\n"),
    ],
)
def test_non_finite_particles_are_refused_naming_the_point(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(InputError, match=r"1 of 2 points have NaN or Inf") as e:
        read_particles(path)
    assert str(path) in str(e.value)


def test_ras_markups_with_nan_are_refused(tmp_path):
    path = tmp_path / "p.mrk.json"
    _markups(path, [[1.0, 2.0, 3.0], [float("nan"), 0.0, 0.0]], "RAS")
    with pytest.raises(InputError, match="NaN or Inf"):
        read_particles(path)


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("two.particles", "1 2\n3 4\n", r"shape \(2, 2\)"),
        ("four.particles", "1 2 3 4\n", r"shape \(1, 4\)"),
        ("empty.particles", "", "file is empty"),
        ("ragged.particles", "1 2 3\n4 5\n", "cannot parse particles"),
        ("words.particles", "a b c\n", "cannot parse particles"),
        ("header_only.csv", "x,y,z\n", r"shape \(0,\)"),
        ("wrong_header.csv", "a,b,c\n1,2,3\n", "must name columns x, y, z"),
        ("short_row.csv", "x,y,z\n1,2\n", "cannot parse particles"),
        ("bad.mrk.json", "{not json", "not a valid JSON markups file"),
        ("nolist.mrk.json", '{"markups": []}', "no 'markups' list"),
        ("nopoints.mrk.json", '{"markups": [{"controlPoints": []}]}', "no control points"),
        (
            "nopos.mrk.json",
            '{"markups": [{"controlPoints": [{"positionStatus": "undefined"}]}]}',
            "has no position",
        ),
        ("frame.mrk.json", '{"markups": [{"coordinateSystem": "IJK", "controlPoints": []}]}', "LPS or RAS"),
    ],
)
def test_malformed_particle_files_raise_a_clear_error(tmp_path, name, text, expected):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(InputError, match=expected) as e:
        read_particles(path)
    assert name in str(e.value)


def test_particles_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(InputError, match="particles file not found"):
        read_particles(tmp_path / "nope.particles")
    odd = tmp_path / "p.xyz"
    odd.write_text("1 2 3\n")
    with pytest.raises(InputError, match=r"unsupported particle format '\.xyz'"):
        read_particles(odd)
    with pytest.raises(InputError, match=r"unsupported particle format '\.xyz'"):
        write_particles(tmp_path / "q.xyz", POINTS)
    assert not (tmp_path / "q.xyz").exists()


@pytest.mark.parametrize(
    ("points", "expected"),
    [
        (np.zeros((4, 2)), r"shape \(M, 3\).*\(4, 2\)"),
        (np.zeros(3), r"shape \(M, 3\).*\(3,\)"),
        (np.zeros((0, 3)), r"M >= 1"),
        (np.array([[0.0, np.nan, 1.0]]), "NaN or Inf"),
        (np.array([[0.0, np.inf, 1.0]]), "NaN or Inf"),
    ],
)
def test_write_particles_refuses_bad_arrays_and_writes_nothing(tmp_path, points, expected):
    path = tmp_path / "p.particles"
    with pytest.raises(InputError, match=expected):
        write_particles(path, points)
    assert list(tmp_path.iterdir()) == []


# -- images ---------------------------------------------------------------------------------------
def _oblique_image(pixel=sitk.sitkFloat32) -> sitk.Image:
    rng = np.random.default_rng(3)
    image = sitk.GetImageFromArray(rng.normal(size=(6, 7, 8)).astype(np.float32))
    image = sitk.Cast(image, pixel)
    rotation = sitk.VersorTransform((0.3, -0.5, 0.8), 0.7)  # a rotation about an oblique axis
    image.SetDirection(rotation.GetMatrix())
    image.SetSpacing((0.7, 1.1, 2.5))
    image.SetOrigin((-12.5, 30.25, 4.0))
    return image


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz", ".nii", ".mha", ".mhd"])
def test_image_round_trip_keeps_voxels_and_oblique_geometry(tmp_path, suffix):
    image = _oblique_image()
    assert not np.allclose(np.reshape(image.GetDirection(), (3, 3)), np.eye(3))
    path = tmp_path / f"img{suffix}"
    write_image(image, path)
    back = read_image(path)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))
    # NIfTI stores the geometry as float32 quaternions, the others as decimal text
    atol = 1e-5 if suffix.startswith(".nii") else 1e-12
    np.testing.assert_allclose(back.GetDirection(), image.GetDirection(), atol=atol)
    np.testing.assert_allclose(back.GetSpacing(), image.GetSpacing(), atol=atol)
    np.testing.assert_allclose(back.GetOrigin(), image.GetOrigin(), atol=atol)
    assert back.GetPixelID() == image.GetPixelID()


def test_mhd_writes_its_data_file_next_to_the_header(tmp_path):
    write_image(_oblique_image(), tmp_path / "img.mhd")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names[0] == "img.mhd" and names[1].startswith("img.") and names[1] != "img.mhd"
    assert len(names) == 2  # no temporary folder left behind


def test_image_errors_name_the_file(tmp_path):
    with pytest.raises(InputError, match="image file not found"):
        read_image(tmp_path / "missing.nrrd")

    flat = tmp_path / "flat.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5), np.float32)), str(flat))
    with pytest.raises(InputError, match="expected a 3D image, found 2D") as e:
        read_image(flat)
    assert "flat.nrrd" in str(e.value)

    vector = tmp_path / "vector.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 4, 5, 3), np.float32), isVector=True), str(vector))
    with pytest.raises(InputError, match="expected a scalar image, found 3 components"):
        read_image(vector)

    garbage = tmp_path / "garbage.nrrd"
    garbage.write_bytes(b"this is not an image")
    with pytest.raises(InputError, match=r"garbage\.nrrd: cannot read image"):
        read_image(garbage)

    jpeg = tmp_path / "photo.jpg"
    jpeg.write_bytes(b"\xff\xd8")
    with pytest.raises(InputError, match=r"unsupported image format '\.jpg'"):
        read_image(jpeg)
    with pytest.raises(InputError, match=r"unsupported image format '\.png'"):
        write_image(_oblique_image(), tmp_path / "out.png")
    assert not (tmp_path / "out.png").exists()


@pytest.mark.parametrize(
    ("name", "suffix"),
    [("a.NII.GZ", ".nii.gz"), ("b.mrk.json", ".mrk.json"), ("c.seg.nrrd", ".seg.nrrd"), ("d.Nrrd", ".nrrd")],
)
def test_suffix_of_keeps_compound_suffixes(name, suffix):
    assert suffix_of(name) == suffix


# -- meshes ---------------------------------------------------------------------------------------
def _octahedron() -> tuple[np.ndarray, np.ndarray]:
    verts = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]], float) * 10.5
    verts += [100.25, -50.5, 3.0]
    tris = np.array([[0, 2, 4], [2, 1, 4], [1, 3, 4], [3, 0, 4], [2, 0, 5], [1, 2, 5], [3, 1, 5], [0, 3, 5]])
    return verts, tris


def _triangle_set(verts: np.ndarray, tris: np.ndarray) -> set:
    return {tuple(sorted(tuple(np.round(verts[i], 4)) for i in t)) for t in tris}


@pytest.mark.parametrize("suffix", [".vtk", ".vtp", ".stl", ".ply"])
def test_mesh_round_trip(tmp_path, suffix):
    verts, tris = _octahedron()
    path = tmp_path / f"m{suffix}"
    write_mesh(polydata_from_arrays(verts, tris), path)
    back_verts, back_tris = arrays_from_polydata(read_mesh(path))
    assert back_tris.shape == tris.shape
    if suffix in (".vtk", ".vtp"):  # these keep float64 points and the vertex order
        np.testing.assert_array_equal(back_verts, verts)
        np.testing.assert_array_equal(back_tris, tris)
    else:  # STL and PLY store float32; STL rebuilds the vertex list, so compare triangles as sets
        np.testing.assert_allclose(np.sort(back_verts, axis=0), np.sort(verts, axis=0), atol=1e-4)
        assert _triangle_set(back_verts, back_tris) == _triangle_set(verts, tris)


def test_arrays_from_polydata_triangulates_quads():
    import vtk

    points = vtk.vtkPoints()
    for p in [(0, 0, 0), (1, 0, 0), (1, 1, 0), (0, 1, 0)]:
        points.InsertNextPoint(p)
    quad = vtk.vtkCellArray()
    quad.InsertNextCell(4, [0, 1, 2, 3])
    mesh = vtk.vtkPolyData()
    mesh.SetPoints(points)
    mesh.SetPolys(quad)
    verts, tris = arrays_from_polydata(mesh)
    assert verts.shape == (4, 3) and tris.shape == (2, 3)


@pytest.mark.parametrize(
    ("verts", "tris", "expected"),
    [
        (np.zeros((4, 2)), np.array([[0, 1, 2]]), r"vertices must have shape \(V, 3\)"),
        (np.array([[0, 0, np.nan], [1, 0, 0], [0, 1, 0]]), np.array([[0, 1, 2]]), "NaN or Inf"),
        (np.eye(3), np.array([[0, 1, 2, 0]]), r"triangles must have shape \(T, 3\)"),
        (np.eye(3), np.array([[0, 1, 3]]), r"indices in \[0, 3\)"),
        (np.eye(3), np.array([[0, -1, 2]]), r"indices in \[0, 3\)"),
        (np.eye(3), np.array([[0.0, 1.5, 2.0]]), "not all whole"),
    ],
)
def test_polydata_from_arrays_refuses_bad_arrays(verts, tris, expected):
    with pytest.raises(InputError, match=expected):
        polydata_from_arrays(verts, tris)


def test_polydata_from_arrays_accepts_whole_float_indices():
    verts, tris = _octahedron()
    _, back = arrays_from_polydata(polydata_from_arrays(verts, tris.astype(float)))
    np.testing.assert_array_equal(back, tris)


def test_mesh_errors_name_the_file(tmp_path):
    with pytest.raises(InputError, match="mesh file not found"):
        read_mesh(tmp_path / "missing.vtk")
    odd = tmp_path / "m.off"  # .obj is supported (ShapeWorks accepts it); .off is not
    odd.write_text("OFF\n1 0 0\n0 0 0\n")
    with pytest.raises(InputError, match=r"m\.off: unsupported mesh format '\.off'"):
        read_mesh(odd)
    verts, tris = _octahedron()
    with pytest.raises(InputError, match=r"out\.off: unsupported mesh format"):
        write_mesh(polydata_from_arrays(verts, tris), tmp_path / "out.off")
    assert not (tmp_path / "out.off").exists()
    write_mesh(polydata_from_arrays(verts, tris), tmp_path / "out.obj")
    back_verts, _ = arrays_from_polydata(read_mesh(tmp_path / "out.obj"))
    np.testing.assert_allclose(back_verts, verts, atol=1e-5)
    empty = tmp_path / "empty.vtk"
    empty.write_text("# vtk DataFile Version 3.0\nempty\nASCII\nDATASET POLYDATA\nPOINTS 0 float\n")
    with pytest.raises(InputError, match="holds no points"):
        read_mesh(empty)
