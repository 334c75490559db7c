"""MRML adapters (DeepSSMExtension/DeepSSMLib/mrml.py) on a real headless MRML scene (slicer-core)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("slicer")
import SimpleITK as sitk
import slicer_scene as ss
import vtk
from vtk.util import numpy_support as ns

from DeepSSMLogic import io
from DeepSSMLogic.errors import InputError

pytestmark = pytest.mark.slicer

from DeepSSMLib import mrml  # noqa: E402  (slicer_scene puts DeepSSMExtension on sys.path)

FLIP = np.diag([-1.0, -1.0, 1.0])


@pytest.fixture
def ctx():
    return ss.make_scene()


def _oblique_image():
    """Non-cubic, anisotropic, with a permuted and flipped (non-identity) direction matrix."""
    rng = np.random.default_rng(3)
    arr = rng.normal(size=(7, 5, 9)).astype(np.float32)  # (Z, Y, X): size x=9, y=5, z=7
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.7, 1.3, 2.1))
    img.SetOrigin((12.5, -40.0, 7.25))
    # columns are the i, j, k axes in LPS: i -> +y, j -> -z, k -> +x (a left-handed frame, det = -1)
    d = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
    img.SetDirection(tuple(d.ravel()))
    return img, arr


def _ijk_to_ras(node):
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(i, j) for j in range(4)] for i in range(4)])


def test_volume_from_sitk_has_ras_geometry_and_kji_axis_order(ctx):
    img, arr = _oblique_image()
    node = mrml.add_volume_from_sitk(ctx.scene, img, "oblique")
    assert node.GetImageData().GetDimensions() == (9, 5, 7)
    m = _ijk_to_ras(node)
    for ijk in [(0, 0, 0), (8, 4, 6), (3, 1, 5)]:
        lps = np.asarray(img.TransformIndexToPhysicalPoint(ijk))
        ras = m @ np.array([*ijk, 1.0])
        np.testing.assert_allclose(ras[:3], FLIP @ lps, atol=1e-9)
        # the voxel value at (i, j, k) is arr[k, j, i] on both sides
        assert mrml.array_from_volume(node)[ijk[2], ijk[1], ijk[0]] == arr[ijk[2], ijk[1], ijk[0]]


def test_volume_round_trip_to_sitk_is_exact(ctx):
    img, arr = _oblique_image()
    node = mrml.add_volume_from_sitk(ctx.scene, img, "oblique")
    back = mrml.volume_to_sitk(node)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), arr)
    np.testing.assert_allclose(back.GetOrigin(), img.GetOrigin(), atol=1e-9)
    np.testing.assert_allclose(back.GetSpacing(), img.GetSpacing(), atol=1e-9)
    np.testing.assert_allclose(back.GetDirection(), img.GetDirection(), atol=1e-9)


def test_volume_read_by_slicer_storage_node_matches_simpleitk(ctx, tmp_path):
    """Independent check: Slicer's own NRRD reader + our adapter == SimpleITK's reader.

    Slicer makes left-handed voxel frames right-handed on read (it flips k), so the voxel order
    may differ; the image in physical space must be the same voxel for voxel."""
    img, arr = _oblique_image()
    path = tmp_path / "oblique.nrrd"
    sitk.WriteImage(img, str(path))
    node = ctx.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "read")
    storage = ctx.scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    back = mrml.volume_to_sitk(node)
    assert np.linalg.det(np.reshape(back.GetDirection(), (3, 3))) > 0
    same_grid = sitk.Resample(back, img, sitk.Transform(), sitk.sitkNearestNeighbor, float("nan"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(same_grid), arr)


def test_multicomponent_volume_is_refused(ctx):
    node = ctx.scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "rgb")
    data = vtk.vtkImageData()
    data.SetDimensions(3, 3, 3)
    data.AllocateScalars(vtk.VTK_FLOAT, 3)
    node.SetAndObserveImageData(data)
    with pytest.raises(InputError, match="3 components"):
        mrml.volume_to_sitk(node)


def test_particles_to_point_list_round_trip_lps_ras_lps(ctx, tmp_path):
    pts = np.array([[1.0, 2.0, 3.0], [-4.5, 6.25, -7.0], [10.0, -20.0, 30.0]])
    node = mrml.particles_to_markups(ctx.scene, pts, "pred")
    ras = np.array([node.GetNthControlPointPosition(i) for i in range(3)])
    np.testing.assert_allclose(ras, pts @ FLIP.T)
    np.testing.assert_allclose(mrml.markups_to_particles(node), pts)
    assert node.GetLocked() and node.GetFixedNumberOfControlPoints()
    assert all(node.GetNthControlPointLabel(i) == "" for i in range(3))
    assert not node.GetDisplayNode().GetPointLabelsVisibility()
    # Slicer's markups writer + DeepSSMLogic's reader agree: the file holds the same LPS points
    node.AddDefaultStorageNode()
    storage = node.GetStorageNode()
    storage.SetFileName(str(tmp_path / "pred.mrk.json"))
    assert storage.WriteData(node)
    np.testing.assert_allclose(io.read_particles(tmp_path / "pred.mrk.json"), pts, atol=1e-6)


def test_particles_with_nan_are_refused(ctx):
    with pytest.raises(InputError, match="NaN"):
        mrml.particles_to_markups(ctx.scene, np.array([[0.0, np.nan, 1.0]]), "bad")


def test_outputs_follow_the_volume_parent_transform_and_hierarchy(ctx):
    img, _ = _oblique_image()
    volume = mrml.add_volume_from_sitk(ctx.scene, img, "vol")
    sh = ctx.scene.GetSubjectHierarchyNode()
    study = sh.CreateStudyItem(sh.CreateSubjectItem(sh.GetSceneItemID(), "patient"), "study")
    sh.CreateItem(study, volume)
    transform = ctx.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "T")
    t = vtk.vtkTransform()
    t.Translate(5.0, -3.0, 12.0)
    t.RotateZ(30.0)
    transform.SetMatrixTransformToParent(t.GetMatrix())
    volume.SetAndObserveTransformNodeID(transform.GetID())

    pts = np.array([[1.0, 2.0, 3.0], [4.0, -5.0, 6.0]])
    node = mrml.particles_to_markups(ctx.scene, pts, "pred", reference=volume)
    assert node.GetTransformNodeID() == transform.GetID()
    assert sh.GetItemParent(sh.GetItemByDataNode(node)) == study
    world = np.zeros(3)
    for i, p in enumerate(pts):
        node.GetNthControlPointPositionWorld(i, world)
        expected = np.array(t.TransformPoint(*(FLIP @ p)))
        np.testing.assert_allclose(world, expected, atol=1e-9)
    np.testing.assert_allclose(mrml.markups_to_particles(node, world=False), pts)


def _sphere_lps(center=(10.0, 20.0, 30.0)):
    s = vtk.vtkSphereSource()
    s.SetCenter(*center)
    s.SetRadius(5.0)
    s.Update()
    return s.GetOutput()


def test_mesh_model_scalars_colour_table_and_legend(ctx):
    mesh = _sphere_lps()
    v_lps = ns.vtk_to_numpy(mesh.GetPoints().GetData()).astype(np.float64)
    values = v_lps[:, 2] - 30.0
    model = mrml.add_mesh_model(ctx.scene, mesh, "surface", point_arrays={"error_mm": values})
    v_ras = ns.vtk_to_numpy(model.GetPolyData().GetPoints().GetData())
    np.testing.assert_allclose(v_ras, v_lps @ FLIP.T, atol=1e-5)
    np.testing.assert_allclose(
        ns.vtk_to_numpy(model.GetPolyData().GetPointData().GetArray("error_mm")), values
    )

    legend = mrml.show_scalar_heatmap(model, "error_mm", "coolwarm", symmetric=True, title="Error")
    display = model.GetDisplayNode()
    assert display.GetActiveScalarName() == "error_mm" and display.GetScalarVisibility()
    color = ctx.scene.GetNodeByID(display.GetColorNodeID())
    assert color.GetName() == "DeepSSM coolwarm" and color.GetNumberOfColors() == 256
    lo, hi = display.GetScalarRange()
    assert lo == pytest.approx(-hi) and 4.5 < hi <= 5.0  # 98th percentile of |z - 30|, radius 5
    assert legend.IsA("vtkMRMLColorLegendDisplayNode") and legend.GetTitleText() == "Error"
    assert legend.GetPrimaryDisplayNode() is display
    # round trip back to LPS
    back = mrml.model_to_polydata_lps(model)
    np.testing.assert_allclose(ns.vtk_to_numpy(back.GetPoints().GetData()), v_lps, atol=1e-5)
    with pytest.raises(InputError, match="one value per vertex"):
        mrml.add_mesh_model(ctx.scene, mesh, "bad", point_arrays={"x": values[:-1]})


def test_point_cloud_model_places_a_glyph_on_each_particle(ctx):
    pts = ss.fibonacci_particles(50)
    model = mrml.add_point_cloud_model(ctx.scene, pts, "cloud", radius=0.5)
    pd = model.GetPolyData()
    ids = ns.vtk_to_numpy(pd.GetPointData().GetArray("particle_id"))
    xyz = ns.vtk_to_numpy(pd.GetPoints().GetData())
    centres = np.array([xyz[ids == k].mean(axis=0) for k in range(50)])
    np.testing.assert_allclose(centres, pts @ FLIP.T, atol=1e-3)


def test_descriptor_table_and_live_plot(ctx):
    table = mrml.descriptor_table(ctx.scene, [1.5, -2.0], "pca", "desc", severity=3.25)
    cols = mrml.table_columns(table)
    assert cols["quantity"] == ["PC1", "PC2", "severity (Mahalanobis)"]
    assert cols["value"] == [1.5, -2.0, 3.25]

    chart = mrml.plot_chart(ctx.scene, "loss", "epoch", ["train_loss", "val_loss"], y_label="loss")
    mrml.append_table_row(chart.table, {"epoch": 1, "train_loss": 0.5, "val_loss": 0.7})
    mrml.append_table_row(chart.table, {"epoch": 2, "train_loss": 0.25})
    cols = mrml.table_columns(chart.table)
    assert cols["epoch"] == [1.0, 2.0] and cols["train_loss"] == [0.5, 0.25]
    assert cols["val_loss"][0] == 0.7 and np.isnan(cols["val_loss"][1])
    assert chart.chart.GetNumberOfPlotSeriesNodes() == 2
    series = chart.series["val_loss"]
    assert series.GetTableNodeID() == chart.table.GetID()
    assert (series.GetXColumnName(), series.GetYColumnName()) == ("epoch", "val_loss")


def test_show_prediction_builds_all_outputs_next_to_the_volume(ctx, tmp_path):
    built = ss.build_result_scene(ctx, tmp_path)
    volume, nodes, result = built["volume"], built["nodes"], built["result"]
    np.testing.assert_allclose(
        mrml.markups_to_particles(nodes.particles), io.read_particles(result["particles"]), atol=1e-9
    )
    assert nodes.point_cloud is None  # 256 particles: the point list is enough
    arr = nodes.surface.GetPolyData().GetPointData().GetArray("error_mm")
    assert arr is not None and arr.GetNumberOfTuples() == nodes.surface.GetPolyData().GetNumberOfPoints()
    assert "error_mm" in nodes.legends
    assert mrml.table_columns(nodes.descriptor)["value"][-1] == pytest.approx(2.75)
    sh = ctx.scene.GetSubjectHierarchyNode()
    parent = sh.GetItemParent(sh.GetItemByDataNode(volume))
    for node in (nodes.particles, nodes.surface, nodes.descriptor):
        assert sh.GetItemParent(sh.GetItemByDataNode(node)) == parent
    # re-running reuses the same nodes
    again = mrml.show_prediction(ctx.scene, volume, result, nodes=nodes)
    assert again.particles is nodes.particles and again.surface is nodes.surface
    assert len([n for n in ctx.scene.GetNodesByClass("vtkMRMLMarkupsFiducialNode")]) == 1


def test_many_particles_get_a_point_cloud_model(ctx, tmp_path):
    img = ss.ellipsoid_image(size=(8, 8, 8))
    volume = mrml.add_volume_from_sitk(ctx.scene, img, "small")
    pts = ss.fibonacci_particles(mrml.POINT_CLOUD_THRESHOLD)
    io.write_particles(tmp_path / "p.csv", pts)
    nodes = mrml.show_prediction(
        ctx.scene,
        volume,
        {"particles": str(tmp_path / "p.csv"), "descriptor": [0.0], "descriptor_kind": "latent"},
    )
    assert nodes.point_cloud is not None and nodes.surface is None
    assert not nodes.particles.GetDisplayNode().GetVisibility3D()
    assert mrml.table_columns(nodes.descriptor)["quantity"] == ["z1"]


def test_group_difference_heatmap_and_swim(ctx, tmp_path):
    """Analysis panel path: folders of particle files -> difference heatmap on a point cloud, swim."""
    from DeepSSMLib import analysis as dsa

    from DeepSSMLogic.analysis.groups import group_difference

    base = ss.fibonacci_particles(40)
    rng = np.random.default_rng(0)
    for group, scale in (("a", 1.0), ("b", 1.2)):
        (tmp_path / group).mkdir()
        for i in range(4):
            io.write_particles(
                tmp_path / group / f"s{i}.particles", base * scale + rng.normal(0, 0.1, base.shape)
            )
    names, a = dsa.load_group(tmp_path / "a")
    _, b = dsa.load_group(tmp_path / "b")
    assert names == [f"s{i}.particles" for i in range(4)] and a.shape == (4, 40, 3)
    diff = group_difference(a, b)
    model = mrml.add_point_cloud_model(
        ctx.scene, diff.mean_a, "diff", radius=0.3, particle_values={"difference_mm": diff.magnitude}
    )
    pd = model.GetPolyData()
    ids = ns.vtk_to_numpy(pd.GetPointData().GetArray("particle_id"))
    np.testing.assert_allclose(
        ns.vtk_to_numpy(pd.GetPointData().GetArray("difference_mm")), diff.magnitude[ids]
    )
    legend = mrml.show_scalar_heatmap(model, "difference_mm")
    assert legend.GetPrimaryDisplayNode() is model.GetDisplayNode()

    swim = dsa.swim_between_groups(a, b, steps=5)
    np.testing.assert_allclose(swim.at(0.0), a.mean(axis=0), atol=1e-6)
    np.testing.assert_allclose(swim.at(1.0), b.mean(axis=0), atol=1e-6)
    np.testing.assert_allclose(swim.at(0.5), (a.mean(axis=0) + b.mean(axis=0)) / 2, atol=1e-6)
    with pytest.raises(InputError, match="no particle files"):
        (tmp_path / "empty").mkdir()
        dsa.load_group(tmp_path / "empty")


# -- issue 12: mesh arrays, editable results, value table ----------------------------------------
def _mesh_with_normals_and_scalars():
    """An ellipsoid with point normals (the active Normals attribute), then a 3-component
    vector array and a scalar array after it, plus cell normals: the layout that the old
    remove-and-re-add loop flipped twice."""
    surface = ss.ellipsoid_surface(resolution=12)
    normals = vtk.vtkPolyDataNormals()
    normals.SetInputData(surface)
    normals.ComputeCellNormalsOn()
    normals.SplittingOff()
    normals.Update()
    mesh = vtk.vtkPolyData()
    mesh.DeepCopy(normals.GetOutput())
    pts = ns.vtk_to_numpy(mesh.GetPoints().GetData()).astype(np.float64)
    vec = ns.numpy_to_vtk(np.ascontiguousarray(pts * 0.1), deep=True)
    vec.SetName("displacement")
    mesh.GetPointData().AddArray(vec)
    sc = ns.numpy_to_vtk(np.ascontiguousarray(pts[:, 2]), deep=True)
    sc.SetName("height")
    mesh.GetPointData().AddArray(sc)
    return mesh


def test_polydata_flip_flips_each_vector_array_once_and_keeps_the_normals_attribute():
    mesh = _mesh_with_normals_and_scalars()
    pd = mesh.GetPointData()
    before = {
        pd.GetArrayName(i): ns.vtk_to_numpy(pd.GetArray(i)).copy() for i in range(pd.GetNumberOfArrays())
    }
    cell_before = ns.vtk_to_numpy(mesh.GetCellData().GetNormals()).copy()
    assert pd.GetNormals() is not None and {"Normals", "displacement", "height"} <= set(before)

    ras = mrml.polydata_lps_to_ras(mesh)
    out = ras.GetPointData()
    assert out.GetNormals() is not None and out.GetNormals().GetName() == "Normals"
    for name in ("Normals", "displacement"):
        np.testing.assert_allclose(ns.vtk_to_numpy(out.GetArray(name)), before[name] @ FLIP, atol=1e-6)
    np.testing.assert_array_equal(ns.vtk_to_numpy(out.GetArray("height")), before["height"])
    np.testing.assert_allclose(ns.vtk_to_numpy(ras.GetCellData().GetNormals()), cell_before @ FLIP, atol=1e-6)
    # the input is untouched and the round trip is exact
    np.testing.assert_array_equal(
        ns.vtk_to_numpy(mesh.GetPointData().GetArray("displacement")), before["displacement"]
    )
    back = mrml.polydata_ras_to_lps(ras)
    for name, values in before.items():
        np.testing.assert_allclose(ns.vtk_to_numpy(back.GetPointData().GetArray(name)), values, atol=1e-6)
    # outward normals stay outward: the normal at the +R-most vertex points to +R
    r = ns.vtk_to_numpy(ras.GetPoints().GetData())
    i = int(np.argmax(r[:, 0]))
    assert ns.vtk_to_numpy(out.GetNormals())[i, 0] > 0.9


def test_prediction_surface_is_also_an_editable_closed_surface_segmentation(ctx, tmp_path):
    img = ss.ellipsoid_image()
    volume = mrml.add_volume_from_sitk(ctx.scene, img, "img")
    result = ss.write_fake_result(tmp_path)
    nodes = mrml.show_prediction(ctx.scene, volume, result)
    seg = nodes.segmentation
    assert seg is not None and seg.IsA("vtkMRMLSegmentationNode")
    segmentation = seg.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 1
    assert segmentation.GetSourceRepresentationName() == "Closed surface"
    surface = vtk.vtkPolyData()
    seg.GetClosedSurfaceRepresentation(segmentation.GetNthSegmentID(0), surface)
    np.testing.assert_allclose(
        ns.vtk_to_numpy(surface.GetPoints().GetData()),
        ns.vtk_to_numpy(nodes.surface.GetPolyData().GetPoints().GetData()),
    )
    assert seg.GetTransformNodeID() == volume.GetTransformNodeID()
    # particles: a locked point list that a stray click cannot extend
    assert nodes.particles.GetLocked() and nodes.particles.GetFixedNumberOfControlPoints()
    # the surface is see-through in 3D and outlined over the slices
    display = nodes.surface.GetDisplayNode()
    assert 0.3 <= display.GetOpacity() < 1.0 and display.GetVisibility2D()


def test_per_point_value_table_lists_each_particle_with_units(ctx, tmp_path):
    volume = mrml.add_volume_from_sitk(ctx.scene, ss.ellipsoid_image(), "img")
    result = ss.write_fake_result(tmp_path)
    nodes = mrml.show_prediction(ctx.scene, volume, result)
    cols = mrml.table_columns(nodes.values)
    assert list(cols) == ["particle", "R (mm)", "A (mm)", "S (mm)", "error (mm)"]
    particles = io.read_particles(result["particles"])
    assert len(cols["particle"]) == len(particles)
    np.testing.assert_allclose(np.c_[cols["R (mm)"], cols["A (mm)"], cols["S (mm)"]], particles @ FLIP)
    np.testing.assert_allclose(cols["error (mm)"], result["point_arrays"]["error_mm"])
    assert nodes.legends["error_mm"].GetTitleText() == "Error (mm)"


def test_robust_range_ignores_outliers_and_centres_signed_maps():
    vals = np.r_[np.linspace(0.0, 1.0, 1000), 500.0]
    lo, hi = mrml.robust_range(vals)
    assert lo == pytest.approx(0.02, abs=1e-3) and hi == pytest.approx(0.98, abs=0.01)
    lo, hi = mrml.robust_range(np.r_[np.linspace(-0.5, 2.0, 1000), -300.0], symmetric=True)
    assert lo == -hi and hi == pytest.approx(
        np.percentile(np.abs(np.r_[np.linspace(-0.5, 2.0, 1000), -300]), 98)
    )
    assert mrml.robust_range(np.full(10, 3.0)) == (3.0, 4.0)
    assert mrml.robust_range(np.array([np.nan])) == (0.0, 1.0)
