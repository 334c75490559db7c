"""Shape-model explorer (DeepSSMExtension/DeepSSMLib/explorer.py) and heatmap colours, on slicer-core's
real MRML scene, with offscreen renders whose pixels are checked."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("slicer")
import slicer_scene as ss
from vtk.util import numpy_support as ns

PIL = pytest.importorskip("PIL.Image")

pytestmark = pytest.mark.slicer

from DeepSSMLib import controller as ctl  # noqa: E402
from DeepSSMLib import explorer as ex  # noqa: E402
from DeepSSMLib import mrml  # noqa: E402
from DeepSSMLib import runner as rn  # noqa: E402

from DeepSSMLogic.errors import BundleError  # noqa: E402


@pytest.fixture(scope="module")
def source():
    return ex.load_shape_model(ss.demo_bundle())


@pytest.fixture(scope="module")
def explorer(source):
    return ex.ShapeModelExplorer(source)


def _rgb(path: Path) -> np.ndarray:
    return np.asarray(PIL.open(path).convert("RGB")).astype(np.int32)


def _foreground(img: np.ndarray) -> np.ndarray:
    """Not Slicer's blue-violet background gradient."""
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    background = (b > r + 20) & (b > g + 20) & (b > 120) & (abs(r - g) < 25)
    return ~background


def test_load_shape_model_from_zip_and_folder_without_torch(source, tmp_path):
    assert source.model.n_modes >= 3 and source.particles.shape == source.model.mean.shape
    assert source.vertices.shape[1] == 3 and source.triangles.shape[1] == 3
    folder = tmp_path / "bundle"
    shutil.unpack_archive(ss.demo_bundle(), folder, "zip")
    again = ex.load_shape_model(folder)
    np.testing.assert_array_equal(again.vertices, source.vertices)
    # a modified template is refused (sha256 in model.json)
    with open(folder / ex.TEMPLATE_MESH, "ab") as f:
        f.write(b"\n")
    with pytest.raises(BundleError, match="sha256 mismatch"):
        ex.load_shape_model(folder)


def test_mode_sliders_warp_the_template_linearly_and_match_the_pca(explorer, source):
    model = source.model
    assert explorer.n_modes == 3
    np.testing.assert_allclose(explorer.sigma, np.sqrt(model.eigenvalues[:3]))
    # at 0 SD the surface is the template warped onto the mean shape
    np.testing.assert_allclose(explorer.vertices_at([0, 0, 0]), explorer.mean_vertices)
    # the warp is linear in the mode weights (a slider move is a weighted sum of fields)
    a = explorer.vertices_at([1.5, -0.5, 0.0]) - explorer.mean_vertices
    np.testing.assert_allclose(a, 1.5 * explorer.mode_fields[0] - 0.5 * explorer.mode_fields[1], atol=1e-9)
    # it equals a direct thin-plate warp onto the PCA shape at those weights
    from DeepSSMLogic.mesh import MeshWarper

    direct = MeshWarper(source.vertices, source.triangles, source.particles).warp(
        explorer.particles_at([1.5, -0.5, 0.0])
    )
    np.testing.assert_allclose(explorer.vertices_at([1.5, -0.5, 0.0]), direct, atol=1e-6)
    # sliders stop at +-3 SD
    np.testing.assert_allclose(explorer.vertices_at([10.0]), explorer.vertices_at([3.0]))
    # the descriptor of a shape reads back as its weights in SD
    scores = model.project(explorer.particles_at([2.0, -1.0, 0.5]))
    np.testing.assert_allclose(explorer.descriptor_sigmas(scores), [2.0, -1.0, 0.5], atol=1e-9)


def test_explorer_nodes_variance_plot_and_subject_marks(explorer):
    ctx = ss.make_scene()
    z = [1.2, -2.0, 0.3]
    descriptor = np.r_[np.asarray(z) * explorer.sigma, np.zeros(explorer.source.model.n_modes - 3)]
    nodes = ex.show_explorer(ctx.scene, explorer, descriptor)
    cols = mrml.table_columns(nodes.variance_table)
    ratios = explorer.variance_explained
    np.testing.assert_allclose(cols["variance explained (%)"], 100 * ratios[: len(cols["mode"])])
    assert np.all(np.diff(cols["cumulative (%)"]) >= 0) and cols["cumulative (%)"][0] > 0
    assert nodes.variance_chart.GetNumberOfPlotSeriesNodes() == 2
    subject = mrml.table_columns(nodes.subject_table)
    np.testing.assert_allclose(subject["subject (SD)"], z, atol=1e-9)
    assert subject["-3 SD"] == [-3.0] * 3 and subject["+3 SD"] == [3.0] * 3
    legend = ctx.scene.GetFirstNodeByClass("vtkMRMLColorLegendDisplayNode")
    assert legend.GetTitleText() == "Distance to mean (mm)"
    # showing it again (another subject) updates the same nodes instead of piling up charts
    again = ex.show_explorer(ctx.scene, explorer, descriptor * 0.5, nodes)
    assert again.surface is nodes.surface and again.subject_table is nodes.subject_table
    assert again.variance_chart is nodes.variance_chart and again.subject_chart is nodes.subject_chart
    assert ctx.scene.GetNodesByClass("vtkMRMLPlotChartNode").GetNumberOfItems() == 2
    assert ctx.scene.GetNodesByClass("vtkMRMLPlotSeriesNode").GetNumberOfItems() == 5
    np.testing.assert_allclose(mrml.table_columns(nodes.subject_table)["subject (SD)"], np.asarray(z) / 2)
    # surface points are RAS
    ras = ns.vtk_to_numpy(nodes.surface.GetPolyData().GetPoints().GetData())
    np.testing.assert_allclose(ras, mrml.lps_to_ras(explorer.mean_vertices), atol=1e-5)


def test_controller_shows_the_selected_bundle_and_warps_live(tmp_path):
    ctx = ss.make_scene()
    c = ctl.DeepSSMController(
        scene=lambda: ctx.scene, runner=rn.BackgroundRunner(), recent_store=tmp_path / "r.json"
    )
    folder = tmp_path / "bundle"
    shutil.unpack_archive(ss.demo_bundle(), folder, "zip")
    exp = c.showShapeModel(str(folder / "model.json"))  # the file dialog's pick stands for the folder
    surface = c.explorerNodes.surface
    before = ns.vtk_to_numpy(surface.GetPolyData().GetPoints().GetData()).copy()
    c.warpShapeModel([0.0, 3.0, 0.0])
    after = ns.vtk_to_numpy(surface.GetPolyData().GetPoints().GetData())
    np.testing.assert_allclose(after, mrml.lps_to_ras(exp.vertices_at([0, 3, 0])), atol=1e-5)
    assert np.abs(after - before).max() > 0.5
    assert "modes 1:" in c.explorerSummary()
    # the user deletes the surface: the next slider move brings it back
    ctx.scene.RemoveNode(surface)
    c.warpShapeModel([1.0, 0.0, 0.0])
    assert mrml.in_scene(c.explorerNodes.surface, ctx.scene) is not None


def _blobs(mask: np.ndarray) -> list[tuple[int, int]]:
    """Column ranges of the foreground, separated by empty columns."""
    cols = mask.any(axis=0)
    out, start = [], None
    for x, on in enumerate(cols):
        if on and start is None:
            start = x
        if not on and start is not None:
            out.append((start, x))
            start = None
    if start is not None:
        out.append((start, len(cols)))
    return [b for b in out if b[1] - b[0] > 5]


def test_explorer_render_shows_the_warp_of_mode_one(tmp_path):
    png = ss.render_explorer_png(tmp_path / "explorer.png", size=(540, 200))
    img = _rgb(png)
    fg = _foreground(img)
    fg[: int(0.27 * img.shape[0])] = False  # the legend title (the shapes start lower)
    fg[:, int(0.82 * img.shape[1]) :] = False  # the legend labels and colour bar
    shapes = _blobs(fg)
    assert len(shapes) == 3, f"expected -3 SD, mean and +3 SD side by side, found {shapes}"
    rows = [np.flatnonzero(fg[:, a:b].any(axis=1)) for a, b in shapes]
    heights = [int(r.max() - r.min()) for r in rows]
    # mode 1 of the demo model changes the shaft length: -3 SD and +3 SD silhouettes differ from
    # the mean's (measured 114, 95, 88 px; without the warp all three are 95 px)
    assert abs(heights[0] - heights[1]) >= 8 and abs(heights[2] - heights[1]) >= 4, heights
    # the mean is the low end of viridis (distance 0); the -3 SD shape reaches brighter colours
    a, b = shapes[0]
    warped = img[:, a:b][fg[:, a:b]]
    assert (warped[:, 1] > 120).sum() > 5, "no green/yellow where the shape moved most"


def test_heatmap_render_spans_the_colour_map_despite_an_outlier(tmp_path):
    """Robust range: a surface whose values grow along S, plus one wild vertex, still shows the
    whole viridis map (purple at the bottom, yellow at the top)."""
    import vtk

    ctx = ss.make_scene()
    view = ss.OffscreenThreeDView(ctx, (320, 320))
    try:
        # a flat sheet facing the camera: the headlight shades it evenly, so pixels show the map
        plane = vtk.vtkPlaneSource()
        plane.SetOrigin(-20.0, 0.0, -20.0)
        plane.SetPoint1(20.0, 0.0, -20.0)
        plane.SetPoint2(-20.0, 0.0, 20.0)
        plane.SetResolution(40, 40)
        tri = vtk.vtkTriangleFilter()
        tri.SetInputConnection(plane.GetOutputPort())
        tri.Update()
        surface = tri.GetOutput()
        verts = ns.vtk_to_numpy(surface.GetPoints().GetData()).astype(np.float64)
        values = verts[:, 2] - verts[:, 2].min()  # grows towards superior (LPS z = RAS S)
        values[0] = 1000.0  # one outlier vertex
        model = mrml.add_mesh_model(ctx.scene, surface, "heat", point_arrays={"error_mm": values})
        legend = mrml.show_scalar_heatmap(model, "error_mm", title="Error (mm)")
        legend.SetVisibility(False)  # only the surface's pixels
        view.set_camera(position=(0.0, -120.0, 0.0), focal_point=(0.0, 0.0, 0.0))
        img = _rgb(view.capture(tmp_path / "heat.png"))
    finally:
        view.close()
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    yellow = (r > 150) & (g > 150) & (b < 110)
    purple = (g < 60) & (b > 50) & (r < 110)
    total = img.shape[0] * img.shape[1]
    assert yellow.sum() > 0.01 * total and purple.sum() > 0.01 * total
    ys, yp = np.flatnonzero(yellow.any(axis=1)), np.flatnonzero(purple.any(axis=1))
    assert ys.mean() < yp.mean(), "high values (top, +S) must be yellow, low values purple"


def test_readme_shows_the_rendered_explorer():
    shot = ss.REPO / "docs" / "explorer.png"
    assert shot.is_file(), "run `python Testing/slicer_scene.py` to write docs/explorer.png"
    img = _rgb(shot)
    fg = _foreground(img)
    fg[: int(0.27 * img.shape[0])] = False
    fg[:, int(0.82 * img.shape[1]) :] = False
    assert len(_blobs(fg)) == 3, "docs/explorer.png must show -3 SD, the mean and +3 SD"
    assert "docs/explorer.png" in (ss.REPO / "README.md").read_text(encoding="utf-8")


def test_a_prediction_with_the_shown_bundle_marks_the_subject_on_the_modes(tmp_path):
    ctx = ss.make_scene()
    c = ctl.DeepSSMController(
        scene=lambda: ctx.scene,
        runner=rn.BackgroundRunner(process_factory=ss.ResultProcess),
        recent_store=tmp_path / "r.json",
    )
    folder = tmp_path / "bundle"
    shutil.unpack_archive(ss.demo_bundle(), folder, "zip")
    exp = c.showShapeModel(str(folder))
    assert c.explorerNodes.subject_table is None
    volume = mrml.add_volume_from_sitk(ctx.scene, ss.ellipsoid_image(size=(16, 16, 16)), "img")
    c.predictBlocking(volume, str(folder))
    expected = np.asarray(c.lastPrediction["descriptor"][:3]) / exp.sigma
    np.testing.assert_allclose(mrml.table_columns(c.explorerNodes.subject_table)["subject (SD)"], expected)
    assert "subject" in c.explorerSummary()
