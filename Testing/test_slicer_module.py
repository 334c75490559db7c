"""The module's logic (DeepSSMExtension/DeepSSMLib/controller.py) on a real headless MRML scene:
the defects a review against Slicer's source found (issue 12), each with the case that exposed it.

The worker is replaced by a fake process that "writes" a result, so no torch run is needed; the
scene, the nodes and the transforms are slicer-core's real ones.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("slicer")
import slicer_scene as ss
import vtk

pytestmark = pytest.mark.slicer

from DeepSSMLib import controller as ctl  # noqa: E402
from DeepSSMLib import install, mrml  # noqa: E402
from DeepSSMLib import runner as rn  # noqa: E402

from DeepSSMLogic import io  # noqa: E402


class FailingProcess:
    """A process that cannot be started (PythonSlicer missing, permissions...)."""

    def start(self, args, env, cwd):
        raise FileNotFoundError(2, "No such file or directory", args[0])

    def read_lines(self):
        return []

    def poll(self):
        return None

    def kill_tree(self):
        pass


@pytest.fixture
def ctx():
    return ss.make_scene()


def _controller(ctx, tmp_path, process_factory=ss.ResultProcess):
    c = ctl.DeepSSMController(
        scene=lambda: ctx.scene,
        runner=rn.BackgroundRunner(process_factory=process_factory),
        recent_store=tmp_path / "recent.json",
    )
    return c


def _bundle_dir(tmp_path: Path) -> Path:
    d = tmp_path / "bundle"
    d.mkdir(exist_ok=True)
    (d / "model.json").write_text("{}", encoding="utf-8")
    return d


def _predict(c, volume, bundle, ground_truth=None):
    return c.predictBlocking(volume, str(bundle), device="cpu", groundTruth=ground_truth)


def _all_in_scene(nodes, scene):
    for f in mrml.PredictionNodes.NODE_FIELDS:
        node = getattr(nodes, f)
        if node is not None:
            assert mrml.in_scene(node, scene) is node, f"{f} node is not in the scene"


# -- defect 1: stale nodes ------------------------------------------------------------------------
def test_predict_after_close_scene_creates_nodes_in_the_new_scene(ctx, tmp_path):
    c = _controller(ctx, tmp_path)
    bundle = _bundle_dir(tmp_path)
    vol = mrml.add_volume_from_sitk(ctx.scene, ss.ellipsoid_image(size=(16, 16, 16)), "img")
    first = _predict(c, vol, bundle)
    _all_in_scene(first, ctx.scene)
    old_id = vol.GetID()

    ctx.scene.Clear(0)  # File > Close Scene
    assert len(c.predictions) == 0, "the map must be cleared when the scene starts closing"
    vol2 = mrml.add_volume_from_sitk(ctx.scene, ss.ellipsoid_image(size=(16, 16, 16)), "img")
    assert vol2.GetID() == old_id  # IDs restart: the old map would have matched
    second = _predict(c, vol2, bundle)
    _all_in_scene(second, ctx.scene)
    assert second.particles.GetNumberOfControlPoints() == 256


def test_predict_again_recreates_nodes_the_user_deleted_and_reuses_the_others(ctx, tmp_path):
    c = _controller(ctx, tmp_path)
    bundle = _bundle_dir(tmp_path)
    vol = mrml.add_volume_from_sitk(ctx.scene, ss.ellipsoid_image(size=(16, 16, 16)), "img")
    first = _predict(c, vol, bundle)
    ctx.scene.RemoveNode(first.surface)
    second = _predict(c, vol, bundle)
    _all_in_scene(second, ctx.scene)
    assert second.surface is not first.surface
    assert second.surface.GetPolyData().GetNumberOfPoints() > 0
    assert second.particles is first.particles  # still there: updated in place
    assert ctx.scene.GetNodesByClass("vtkMRMLMarkupsFiducialNode").GetNumberOfItems() == 1


# -- defect 5: ground truth in world coordinates ----------------------------------------------------
def test_ground_truth_under_another_transform_is_mapped_into_the_volume_frame(ctx, tmp_path):
    gt_lps = ss.fibonacci_particles(64)
    vol = mrml.add_volume_from_sitk(ctx.scene, ss.ellipsoid_image(size=(16, 16, 16)), "img")
    gt = mrml.particles_to_markups(ctx.scene, gt_lps, "gt")
    # the user moved the ground truth's frame: 10 mm right and rotated 90 degrees about S
    t = ctx.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "gt frame")
    m = vtk.vtkMatrix4x4()
    for i, row in enumerate([[0, -1, 0, 10], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]):
        for j, v in enumerate(row):
            m.SetElement(i, j, v)
    t.SetMatrixTransformToParent(m)
    gt.SetAndObserveTransformNodeID(t.GetID())
    # ... and the volume sits under its own transform (5 mm anterior)
    tv = ctx.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "volume frame")
    mv = vtk.vtkMatrix4x4()
    mv.SetElement(1, 3, 5.0)
    tv.SetMatrixTransformToParent(mv)
    vol.SetAndObserveTransformNodeID(tv.GetID())

    got = mrml.markups_to_particles_in_frame_of(gt, vol)
    ras = mrml.lps_to_ras(gt_lps)
    world = (
        np.c_[ras, np.ones(len(ras))]
        @ np.array([[0, -1, 0, 10], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]]).T
    )[:, :3]
    expected_local = world - np.array([0.0, 5.0, 0.0])
    np.testing.assert_allclose(got, mrml.ras_to_lps(expected_local), atol=1e-6)

    # the controller hands exactly these points to the worker
    c = _controller(ctx, tmp_path)
    c.startPrediction(vol, str(_bundle_dir(tmp_path)), "cpu", groundTruth=gt)
    try:
        args = c.runner._process.args
        written = io.read_particles(args[args.index("--ground-truth") + 1])
        np.testing.assert_allclose(written, got, atol=1e-6)
    finally:
        c.runner.cancel()
        c.runner.poll()
        c.cleanupTask()


# -- defect 6: a process that cannot start -----------------------------------------------------------
def test_failed_start_raises_a_clear_error_and_cleans_up(ctx, tmp_path):
    c = _controller(ctx, tmp_path, process_factory=FailingProcess)
    made = []
    new_work_dir = c._newWorkDir
    c._newWorkDir = lambda: made.append(new_work_dir()) or made[-1]
    seen = []
    c.runner.on_finished.append(seen.append)  # the widget's onFinished listens the same way
    vol = mrml.add_volume_from_sitk(ctx.scene, ss.ellipsoid_image(size=(16, 16, 16)), "img")
    with pytest.raises(RuntimeError, match="could not start the DeepSSM predict process"):
        c.startPrediction(vol, str(_bundle_dir(tmp_path)), "cpu")
    assert c.task is None
    assert c.workDir is None
    assert len(made) == 1 and not Path(made[0]).exists(), "the work directory leaked"
    assert seen and seen[0].state is rn.RunState.FAILED and seen[0].returncode is None
    # the runner is idle again: a new start is possible
    assert not c.runner.running


def test_widget_finish_handler_survives_a_start_failure_before_any_progress_widgets():
    """onFinished must not touch progress widgets that were never set (AttributeError hid the
    real error): it reads them through attributes initialised to None in __init__."""
    import ast

    tree = ast.parse((ss.REPO / "DeepSSMExtension" / "DeepSSM.py").read_text(encoding="utf-8"))
    widget = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "DeepSSMWidget")
    methods = {f.name: ast.unparse(f) for f in widget.body if isinstance(f, ast.FunctionDef)}
    assert "self._bar = None" in methods["__init__"] and "self._label = None" in methods["__init__"]
    finished = methods["onFinished"]
    assert "self._bar is not None" in finished
    assert finished.index("self._timer.stop()") < finished.index("self._bar is not None")
    # the progress widgets are chosen before the process is started
    apply = methods["onApplyButton"]
    assert apply.index("self._bar, self._label =") < apply.index("startPrediction")


# -- bundle paths (defect 7: folder pick) ------------------------------------------------------------
def test_bundle_model_json_stands_for_its_folder(tmp_path):
    d = _bundle_dir(tmp_path)
    assert ctl.resolve_bundle_path(d / "model.json") == str(d)
    assert ctl.resolve_bundle_path(d) == str(d)
    assert ctl.resolve_bundle_path("") == "" and ctl.resolve_bundle_path(".") == ""
    with pytest.raises(Exception, match="model bundle not found"):
        ctl.resolve_bundle_path(tmp_path / "nope.zip")


# -- defect 3: slicer.packaging is a submodule -------------------------------------------------------
def test_requirements_go_through_slicer_packaging_when_it_exists(tmp_path, monkeypatch):
    import slicer

    calls = []
    fake = types.ModuleType("slicer.packaging")
    fake.load_requirements = lambda path: ["deepssm-test-missing-package>=1"]
    fake.pip_ensure = lambda reqs, requester: calls.append(("pip_ensure", reqs, requester))
    # as in Slicer: the submodule exists but a plain `import slicer` does not bind it
    monkeypatch.setitem(sys.modules, "slicer.packaging", fake)
    monkeypatch.delattr(slicer, "packaging", raising=False)
    monkeypatch.setattr(
        slicer.util, "pip_install", lambda *a, **k: calls.append(("pip_install", a)), raising=False
    )
    req = tmp_path / "requirements.txt"
    req.write_text("deepssm-test-missing-package>=1\n", encoding="utf-8")
    install.ensure_requirements(req, requester="DeepSSM", confirm=lambda _msg: True)
    assert calls == [("pip_ensure", ["deepssm-test-missing-package>=1"], "DeepSSM")]


def test_requirements_fall_back_to_pip_install_without_slicer_packaging(tmp_path, monkeypatch):
    import slicer

    calls = []
    monkeypatch.setitem(sys.modules, "slicer.packaging", None)  # Slicer < 5.12: ImportError
    monkeypatch.delattr(slicer, "packaging", raising=False)
    monkeypatch.setattr(slicer.util, "pip_install", lambda reqs: calls.append(reqs), raising=False)
    req = tmp_path / "requirements.txt"
    req.write_text("deepssm-test-missing-package>=1\n", encoding="utf-8")
    install.ensure_requirements(req, requester="DeepSSM", confirm=lambda _msg: True)
    assert calls == [["deepssm-test-missing-package>=1"]]


# -- severity table in a layout with a table view (defect 7) -----------------------------------------
def test_severity_table_switches_to_a_layout_with_a_table_view(ctx):
    import slicer

    layout = ctx.scene.AddNewNodeByClass("vtkMRMLLayoutNode")
    layout.SetViewArrangement(slicer.vtkMRMLLayoutNode.SlicerLayoutConventionalView)
    table = ctx.scene.AddNewNodeByClass("vtkMRMLTableNode", "DeepSSM severity")
    mrml.show_table_in_layout(ctx.app_logic, table)
    assert layout.GetViewArrangement() == slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpTableView
    assert ctx.app_logic.GetSelectionNode().GetActiveTableID() == table.GetID()
    # a layout that already shows tables is kept
    layout.SetViewArrangement(slicer.vtkMRMLLayoutNode.SlicerLayout3DTableView)
    mrml.show_table_in_layout(ctx.app_logic, table)
    assert layout.GetViewArrangement() == slicer.vtkMRMLLayoutNode.SlicerLayout3DTableView


def test_module_icon_is_found_in_the_source_tree_layout():
    icon = install.module_icon_path()
    assert icon is not None and icon.is_file() and icon.name == "DeepSSM.png"


@pytest.mark.slow
def test_in_slicer_self_test_body_runs_headless_on_the_controller(tmp_path):
    """DeepSSMTest's body (DeepSSMExtension/Testing/DeepSSMSelfTest.py) with the Qt-free controller
    as the logic and the real worker (CPU): demo load, explorer, prediction, subject on the modes."""
    import importlib.util
    import unittest

    pytest.importorskip("torch")
    ctx = ss.make_scene()
    spec = importlib.util.spec_from_file_location(
        "DeepSSMSelfTest", ss.REPO / "DeepSSMExtension" / "Testing" / "DeepSSMSelfTest.py"
    )
    body = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(body)

    class Case(unittest.TestCase):
        def runTest(self):  # pragma: no cover - not run by unittest here
            pass

        def delayDisplay(self, message):
            pass

    def logic():
        return ctl.DeepSSMController(scene=lambda: ctx.scene, recent_store=tmp_path / "recent.json")

    body.run_all(Case(), logic)


# -- issue 10: the training panel's cohort options reach the worker -------------------------------
def _training_argv(c, tmp_path, **cohort_options) -> list[str]:
    """The worker argv ``startTraining`` launches (the launch itself is captured, not run)."""
    cohort = tmp_path / "project.swproj"
    cohort.write_text("{}", encoding="utf-8")
    launched = []
    c._launch = lambda task, args, device: launched.append((task, args))
    c.startTraining(
        str(cohort), str(tmp_path / "out"), "base", "l2", 3, 2, "cpu", 0, "kde", False, **cohort_options
    )
    assert [task for task, _ in launched] == ["train"]
    return launched[0][1]


def test_training_panel_passes_the_shared_cohort_options_to_the_worker(ctx, tmp_path):
    from DeepSSMLib import worker

    c = _controller(ctx, tmp_path)
    argv = _training_argv(
        c, tmp_path, domain=" femur ", particles="world", frame="world", imageColumn="image_ct"
    )
    joined = " ".join(argv)
    assert "--frame world" in joined and "--domain femur" in joined and "--particles world" in joined
    assert "--image-column image_ct" in joined and "--allow-image-only" not in argv
    # the worker's own parser accepts exactly what the panel sends (panel and worker cannot drift)
    args = worker.build_parser().parse_args(["train", *argv])
    assert (args.domain, args.particles, args.frame, args.image_column) == (
        "femur",
        "world",
        "world",
        "image_ct",
    )
    assert args.allow_image_only is False and args.epochs == 3 and args.device == "cpu"


def test_training_panel_defaults_add_no_cohort_options(ctx, tmp_path):
    from DeepSSMLib import worker

    from DeepSSMLogic.commands import _cohort_args as ca

    argv = _training_argv(_controller(ctx, tmp_path), tmp_path)
    assert not {"--domain", "--particles", "--frame", "--image-column", "--allow-image-only"} & set(argv)
    args = worker.build_parser().parse_args(["train", *argv])
    assert (args.particles, args.frame) == (ca.DEFAULT_PARTICLES, ca.DEFAULT_FRAME)
    argv = _training_argv(_controller(ctx, tmp_path), tmp_path, allowImageOnly=True)
    assert worker.build_parser().parse_args(["train", *argv]).allow_image_only is True


def test_training_panel_rejects_an_unknown_frame_before_launching(ctx, tmp_path):
    c = _controller(ctx, tmp_path)
    with pytest.raises(ValueError, match="frame must be one of"):
        _training_argv(c, tmp_path, frame="aligned")
