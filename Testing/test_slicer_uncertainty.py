"""Issue 13 in the Slicer module: the uncertainty heatmap on the predicted surface and particles,
the "Colour by" choice and the out-of-distribution verdict (DeepSSMLib: controller.py, mrml.py), on
a real headless MRML scene with a fake worker, plus an offscreen render that the heatmap's colours
follow the uncertainty."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("slicer")
import slicer_scene as ss

pytestmark = pytest.mark.slicer

from DeepSSMLib import controller as ctl  # noqa: E402
from DeepSSMLib import mrml  # noqa: E402
from DeepSSMLib import runner as rn  # noqa: E402
from vtk.util import numpy_support as ns  # noqa: E402

from DeepSSMLogic import io  # noqa: E402

FLAGGED = {
    "score": 9.5,
    "threshold": 4.0,
    "flag": True,
    "reasons": ["image intensities outside the training range", "registration failed"],
    "components": {"intensity": 9.5},
}
WITHIN = {"score": 1.25, "threshold": 4.0, "flag": False, "reasons": [], "components": {}}


@pytest.fixture
def ctx():
    return ss.make_scene()


def _predict(ctx, tmp_path, **result_options):
    c = ctl.DeepSSMController(
        scene=lambda: ctx.scene,
        runner=rn.BackgroundRunner(process_factory=functools.partial(ss.ResultProcess, **result_options)),
        recent_store=tmp_path / "recent.json",
    )
    bundle = tmp_path / "bundle"
    bundle.mkdir(parents=True, exist_ok=True)
    (bundle / "model.json").write_text("{}", encoding="utf-8")
    vol = mrml.add_volume_from_sitk(ctx.scene, ss.ellipsoid_image(size=(16, 16, 16)), "img")
    nodes = c.predictBlocking(vol, str(bundle), device="cpu")
    return c, nodes


def _array(node, name):
    arr = node.GetPolyData().GetPointData().GetArray(name)
    assert arr is not None, f"{node.GetName()} has no point array {name!r}"
    return ns.vtk_to_numpy(arr).astype(np.float64)


def _shown(node):
    d = node.GetDisplayNode()
    return d.GetActiveScalarName() if d.GetScalarVisibility() else None


def test_verdict_texts():
    v = ctl.prediction_verdict(
        {"uncertainty": {"mean_mm": 0.84, "max_mm": 2.5, "method": "ensemble"}, "ood": FLAGGED}
    )
    assert v.warning
    assert v.ood.startswith(
        "Out of distribution: image intensities outside the training range; registration failed"
    )
    assert "score 9.5 / threshold 4" in v.ood
    assert v.uncertainty == "Uncertainty (ensemble): mean 0.84 mm, max 2.5 mm per particle"
    v = ctl.prediction_verdict({"uncertainty": None, "ood": WITHIN})
    assert not v.warning and v.ood == "Within the training distribution (score 1.25 / threshold 4)."
    assert v.uncertainty.startswith("No uncertainty")
    v = ctl.prediction_verdict({"descriptor": [1.0]})  # an older worker / bundle: neither field
    assert not v.warning and v.uncertainty.startswith("No uncertainty")
    assert v.ood.startswith("No out-of-distribution check")
    assert v.text == f"{v.ood}\n{v.uncertainty}"


def test_uncertainty_heatmap_follows_the_error_heatmap_conventions(ctx, tmp_path):
    c, nodes = _predict(ctx, tmp_path, uncertainty=ss.step_uncertainty, ood=FLAGGED)
    assert c.lastVerdict.warning and "registration failed" in c.lastVerdict.ood
    assert _shown(nodes.surface) == "error_mm" and c.shownHeatmap == "error_mm"  # auto: error first
    assert c.setColourBy("uncertainty") == "uncertainty_mm"
    d = nodes.surface.GetDisplayNode()
    assert _shown(nodes.surface) == "uncertainty_mm"
    assert d.GetColorNode().GetName() == "DeepSSM magma"
    values = _array(nodes.surface, "uncertainty_mm")
    assert d.GetScalarRange() == pytest.approx(mrml.robust_range(values))  # robust 2-98 % range
    legend = ctx.scene.GetFirstNodeByClass("vtkMRMLColorLegendDisplayNode")
    assert legend.GetTitleText() == "Uncertainty (mm)" and legend.GetVisibility()
    # the value table reads the same per-particle values, with units
    particles = mrml.markups_to_particles(nodes.particles)  # LPS (the work folder is gone)
    cols = mrml.table_columns(nodes.values)
    np.testing.assert_allclose(cols["uncertainty (mm)"], ss.step_uncertainty(particles))
    assert "error (mm)" in cols
    # back to the error map, and the choice sticks for the next prediction
    assert c.setColourBy("error") == "error_mm" and _shown(nodes.surface) == "error_mm"
    assert legend.GetTitleText() == "Error (mm)"
    c.setColourBy("uncertainty")
    again = c.predictBlocking(c._volume, str(tmp_path / "bundle"), device="cpu")
    assert _shown(again.surface) == "uncertainty_mm"
    with pytest.raises(ValueError, match="Colour by must be one of"):
        c.setColourBy("entropy")


def test_a_bundle_without_uncertainty_says_so_and_shows_no_uncertainty_map(ctx, tmp_path):
    c, nodes = _predict(ctx, tmp_path)  # no uncertainty, no OOD calibration (an older bundle)
    assert c.lastVerdict.uncertainty.startswith("No uncertainty") and not c.lastVerdict.warning
    assert nodes.surface.GetPolyData().GetPointData().GetArray("uncertainty_mm") is None
    assert c.setColourBy("uncertainty") == "error_mm"  # falls back, no error
    assert "uncertainty (mm)" not in mrml.table_columns(nodes.values)
    # nothing at all to colour by (no ground truth either): plain surface, no legend, no error
    ctx2 = ss.make_scene()
    c2, nodes2 = _predict(ctx2, tmp_path / "b", with_error=False)
    assert c2.shownHeatmap is None and c2.setColourBy("uncertainty") is None
    assert not nodes2.surface.GetDisplayNode().GetScalarVisibility()
    legend = mrml._existing_legend(nodes2.surface)
    assert legend is None or not legend.GetVisibility()


def test_particles_carry_the_heatmap_in_the_surface_range(ctx, tmp_path):
    volume = mrml.add_volume_from_sitk(ctx.scene, ss.ellipsoid_image(size=(16, 16, 16)), "img")
    result = ss.write_fake_result(
        tmp_path, n_particles=mrml.POINT_CLOUD_THRESHOLD, uncertainty=ss.step_uncertainty
    )
    nodes = mrml.show_prediction(ctx.scene, volume, result, heatmap="uncertainty")
    particles = io.read_particles(result["particles"])
    ids = _array(nodes.point_cloud, "particle_id").astype(int)
    np.testing.assert_allclose(
        _array(nodes.point_cloud, "uncertainty_mm"), ss.step_uncertainty(particles)[ids]
    )
    assert _shown(nodes.point_cloud) == _shown(nodes.surface) == "uncertainty_mm"
    assert nodes.point_cloud.GetDisplayNode().GetScalarRange() == pytest.approx(
        nodes.surface.GetDisplayNode().GetScalarRange()
    )
    assert list(nodes.legends) == ["uncertainty_mm"]
    assert not mrml._existing_legend(nodes.point_cloud).GetVisibility()  # one legend: the surface's
    # without a surface (no template mesh) the glyphs carry the map and the legend
    ctx2 = ss.make_scene()
    volume2 = mrml.add_volume_from_sitk(ctx2.scene, ss.ellipsoid_image(size=(16, 16, 16)), "img")
    bare = dict(ss.write_fake_result(tmp_path / "bare", uncertainty=ss.step_uncertainty), mesh=None)
    nodes2 = mrml.show_prediction(ctx2.scene, volume2, bare, heatmap="uncertainty")
    assert nodes2.surface is None and _shown(nodes2.point_cloud) == "uncertainty_mm"
    assert nodes2.legends["uncertainty_mm"].GetTitleText() == "Uncertainty (mm)"
    with pytest.raises(Exception, match="unknown heatmap 'entropy'"):
        mrml.apply_heatmap(nodes2, "entropy")


# -- offscreen render: the colours follow the uncertainty ------------------------------------------
def _render_halves(tmp_path: Path, uncertainty) -> tuple[np.ndarray, np.ndarray, Path]:
    """Render the surface coloured by ``uncertainty`` seen from the front; returns the mean RGB of
    the pixels over visible vertices on the patient's right (LPS x < 0) and left halves."""
    PIL = pytest.importorskip("PIL.Image")
    ctx = ss.make_scene()
    view = ss.OffscreenThreeDView(ctx, size=(480, 360))
    try:
        volume = mrml.add_volume_from_sitk(ctx.scene, ss.ellipsoid_image(), "img")
        result = ss.write_fake_result(tmp_path, uncertainty=uncertainty, with_error=False)
        nodes = mrml.show_prediction(ctx.scene, volume, result, heatmap="uncertainty")
        nodes.particles.GetDisplayNode().SetVisibility(False)  # only the surface in the picture
        view.set_camera(position=(0.0, -140.0, 0.0))  # from the front (RAS -y), S up
        png = view.capture(tmp_path / "uncertainty.png")
        img = np.asarray(PIL.open(png).convert("RGB")).astype(np.float64)
        ras = ns.vtk_to_numpy(nodes.surface.GetPolyData().GetPoints().GetData()).astype(np.float64)
        front = ras[:, 1] < -8.0  # facing the camera
        means = []
        for side in (ras[:, 0] > 5.0, ras[:, 0] < -5.0):  # RAS x > 0 is LPS x < 0 (low uncertainty)
            pix = []
            for p in ras[front & side]:
                view.renderer.SetWorldPoint(*p, 1.0)
                view.renderer.WorldToDisplay()
                x, y, _ = view.renderer.GetDisplayPoint()
                pix.append(img[img.shape[0] - 1 - round(y), round(x)])
            assert len(pix) > 20
            means.append(np.mean(pix, axis=0))
        return means[0], means[1], png
    finally:
        view.close()


def test_uncertainty_heatmap_colours_differ_where_the_uncertainty_differs(tmp_path):
    low, high, _ = _render_halves(tmp_path / "step", ss.step_uncertainty)
    # magma: low uncertainty is dark purple, high is light yellow
    assert high.sum() - low.sum() > 150, (low, high)
    assert high[1] - low[1] > 60  # green: absent from the dark end of magma, strong at the light end
    # control: the same scene with a constant uncertainty shows the same colour on both halves
    flat_low, flat_high, _ = _render_halves(tmp_path / "flat", lambda p: np.full(len(p), 0.7))
    # (one colour: the low end, not rounding noise stretched over the whole map)
    assert np.abs(flat_high - flat_low).max() < 10, (flat_low, flat_high)
    assert flat_low.sum() < 100 and flat_high.sum() < 100, (flat_low, flat_high)


def test_a_constant_map_up_to_rounding_gets_one_colour():
    vals = 0.7 + np.random.default_rng(0).normal(0.0, 1e-15, 500)  # interpolated constant
    assert mrml.robust_range(vals) == (pytest.approx(0.7), pytest.approx(1.7))
    assert mrml.robust_range(np.r_[np.zeros(50), np.full(50, 1e-6)]) == pytest.approx((0.0, 1e-6))
