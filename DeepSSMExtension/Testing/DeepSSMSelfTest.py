"""Body of DeepSSMTest (run by Slicer's self-test / ``Slicer --no-main-window --testing``).

Kept out of DeepSSM.py so the module file stays thin; it needs the Slicer application (it drives
the module logic, which launches the worker with PythonSlicer). When torch is not installed (as
on the extension build factories) the prediction step is skipped with a message instead of
installing anything: installs never happen under --testing.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import slicer
import vtk


def _ras_inside_volume(volume, ras_points: np.ndarray, margin_voxels: float = 0.5) -> bool:
    m = vtk.vtkMatrix4x4()
    volume.GetRASToIJKMatrix(m)
    a = np.array([[m.GetElement(i, j) for j in range(4)] for i in range(4)])
    ijk = (np.c_[ras_points, np.ones(len(ras_points))] @ a.T)[:, :3]
    dims = np.asarray(volume.GetImageData().GetDimensions())
    return bool(np.all(ijk >= -margin_voxels) and np.all(ijk <= dims - 1 + margin_voxels))


def test_demo_data_loads(case, logic_class):
    logic = logic_class()
    volume, truth, bundle = logic.loadDemo()
    case.assertIsNotNone(volume.GetImageData())
    case.assertGreater(truth.GetNumberOfControlPoints(), 0)
    case.assertTrue(truth.GetLocked())
    ras = slicer.util.arrayFromMarkupsControlPoints(truth)
    case.assertTrue(_ras_inside_volume(volume, ras), "ground truth must lie over the demo image")
    return logic, volume, truth, bundle


def test_prediction_on_demo(case, logic, volume, truth, bundle):
    from DeepSSMLib import mrml

    nodes = logic.predictBlocking(volume, bundle, device="cpu", groundTruth=truth)
    n = truth.GetNumberOfControlPoints()
    case.assertEqual(nodes.particles.GetNumberOfControlPoints(), n)
    pred = mrml.markups_to_particles(nodes.particles)
    gt = mrml.markups_to_particles(truth)
    rmse = float(np.sqrt(np.mean(np.sum((pred - gt) ** 2, axis=1))))
    case.assertLess(rmse, 5.0, f"demo prediction RMSE {rmse:.2f} mm is implausibly large")
    case.assertTrue(_ras_inside_volume(volume, slicer.util.arrayFromMarkupsControlPoints(nodes.particles)))
    case.assertIsNotNone(nodes.surface, "the demo bundle carries a template mesh")
    case.assertIsNotNone(nodes.surface.GetPolyData().GetPointData().GetArray("error_mm"))
    case.assertIn("error_mm", nodes.legends)
    case.assertGreater(nodes.descriptor.GetTable().GetNumberOfRows(), 0)
    case.assertEqual(nodes.segmentation.GetSegmentation().GetNumberOfSegments(), 1)
    case.assertEqual(nodes.values.GetTable().GetNumberOfRows(), n)
    # the status area's verdict matches what the bundle gives (issue 13): an uncertainty map iff it
    # predicts an uncertainty
    verdict = logic.lastVerdict
    case.assertIsNotNone(verdict, "a prediction must leave an OOD/uncertainty verdict for the status area")
    has_map = nodes.surface.GetPolyData().GetPointData().GetArray("uncertainty_mm") is not None
    case.assertEqual(has_map, not verdict.uncertainty.startswith("No uncertainty"))
    sh = slicer.mrmlScene.GetSubjectHierarchyNode()
    parent = sh.GetItemParent(sh.GetItemByDataNode(volume))
    for node in (nodes.particles, nodes.surface, nodes.descriptor):
        case.assertEqual(sh.GetItemParent(sh.GetItemByDataNode(node)), parent)


def test_shape_model_explorer(case, logic, bundle):
    explorer = logic.showShapeModel(bundle)
    surface = logic.explorerNodes.surface
    before = slicer.util.arrayFromModelPoints(surface).copy()
    logic.warpShapeModel([3.0, 0.0, 0.0])
    moved = np.abs(slicer.util.arrayFromModelPoints(surface) - before).max()
    case.assertGreater(moved, 0.1, "mode 1 at +3 SD must move the mean surface")
    case.assertEqual(explorer.n_modes, 3)
    if logic.explorerNodes.subject_table is not None:  # after a PCA prediction
        case.assertEqual(logic.explorerNodes.subject_table.GetTable().GetNumberOfRows(), 3)


def run_all(case, logic_class) -> None:
    case.delayDisplay("DeepSSM: loading the demo data")
    logic, volume, truth, bundle = test_demo_data_loads(case, logic_class)
    case.delayDisplay("DeepSSM: shape-model explorer of the demo bundle (no torch needed)")
    test_shape_model_explorer(case, logic, bundle)
    if importlib.util.find_spec("torch") is None:
        case.delayDisplay("DeepSSM: torch is not installed (PyTorch extension); prediction test skipped")
        return
    case.delayDisplay("DeepSSM: predicting with the demo bundle")
    test_prediction_on_demo(case, logic, volume, truth, bundle)
    case.delayDisplay("DeepSSM: the predicted subject on the explorer's modes")
    test_shape_model_explorer(case, logic, bundle)
    case.assertIsNotNone(logic.explorerNodes.subject_table)
    case.delayDisplay("DeepSSM: test passed")
