"""Headless MRML scene + offscreen 3D render for the Slicer-side tests (needs slicer-core).

Also a script: ``python Testing/slicer_scene.py [docs/screenshot.png [docs/explorer.png]]`` renders
the README's pictures: the demo prediction (volume slice, predicted particles, error heatmap on the
semi-transparent surface, colour legend) and the shape-model explorer of the demo bundle;
``test_slicer_render.py`` and ``test_slicer_explorer.py`` render the same scenes.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")

import numpy as np

REPO = Path(__file__).resolve().parents[1]
for _p in (REPO, REPO / "DeepSSMExtension"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

DEMO_MANIFEST = REPO / "Resources" / "SampleData" / "manifest.json"


@dataclass
class SceneContext:
    """A scene wired like Slicer's: application logic, colours, markups, Subject Hierarchy."""

    scene: Any
    app_logic: Any
    markups_logic: Any


def make_scene() -> SceneContext:
    """A fresh MRML scene with the logics the adapters rely on; also sets ``slicer.mrmlScene``."""
    import slicer
    import vtk

    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    color_logic = app_logic.GetColorLogic()
    color_logic.SetMRMLScene(scene)
    color_logic.AddDefaultColorNodes()
    app_logic.SetModuleLogic("Colors", color_logic)
    # Slicer's Colors module registers the legend node class; slicer-core has no such module.
    scene.RegisterNodeClass(slicer.vtkMRMLColorLegendDisplayNode())
    markups_logic = slicer.vtkSlicerMarkupsLogic()
    markups_logic.SetMRMLApplicationLogic(app_logic)
    markups_logic.SetMRMLScene(scene)
    app_logic.SetModuleLogic("Markups", markups_logic)
    app_logic.SetSliceLogics(vtk.vtkCollection())
    app_logic.SetViewLogics(vtk.vtkCollection())
    slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    slicer.mrmlScene = scene
    return SceneContext(scene, app_logic, markups_logic)


# -- a synthetic prediction result ----------------------------------------------------------------
def ellipsoid_image(
    size=(48, 40, 36),
    spacing=(1.2, 1.0, 1.5),
    origin=(-28.0, -20.0, -26.0),
    radii=(16.0, 12.0, 10.0),
    direction=None,
):
    """A SimpleITK image of a bright ellipsoid (centre at LPS (0, 0, 0)) on a noisy background."""
    import SimpleITK as sitk

    from DeepSSMLogic.geometry import Grid
    from DeepSSMLogic.preprocess import image_from_array

    grid = Grid(origin, spacing, size, tuple(np.eye(3).ravel()) if direction is None else direction)
    phys = grid.physical_coordinates()
    r = np.sqrt(((phys / np.asarray(radii)) ** 2).sum(-1))
    rng = np.random.default_rng(0)
    arr = (200.0 / (1.0 + np.exp((r - 1.0) * 12.0)) + rng.normal(0, 6, r.shape)).astype(np.float32)
    img = image_from_array(arr, grid)
    assert isinstance(img, sitk.Image)
    return img


def ellipsoid_surface(radii=(16.0, 12.0, 10.0), resolution=48):
    """Triangle mesh of the ellipsoid (LPS mm) as ``vtkPolyData``."""
    import vtk

    s = vtk.vtkSphereSource()
    s.SetRadius(1.0)
    s.SetThetaResolution(resolution)
    s.SetPhiResolution(resolution)
    t = vtk.vtkTransform()
    t.Scale(*radii)
    f = vtk.vtkTransformPolyDataFilter()
    f.SetInputConnection(s.GetOutputPort())
    f.SetTransform(t)
    f.Update()
    out = vtk.vtkPolyData()
    out.DeepCopy(f.GetOutput())
    return out


def fibonacci_particles(n=256, radii=(16.0, 12.0, 10.0)):
    """``(n, 3)`` LPS points spread evenly over the ellipsoid."""
    i = np.arange(n) + 0.5
    phi = np.arccos(1 - 2 * i / n)
    theta = np.pi * (1 + 5**0.5) * i
    unit = np.stack([np.cos(theta) * np.sin(phi), np.sin(theta) * np.sin(phi), np.cos(phi)], axis=1)
    return unit * np.asarray(radii)


def step_uncertainty(particles_lps: np.ndarray, low: float = 0.2, high: float = 2.0) -> np.ndarray:
    """A per-particle uncertainty (mm) that is ``low`` on the patient's right (LPS x < 0) and
    ``high`` on the left: the two halves of a heatmap must show different colours."""
    return np.where(np.asarray(particles_lps)[:, 0] < 0.0, low, high)


def write_fake_result(
    out_dir: Path,
    n_particles: int = 256,
    uncertainty: Any = None,
    ood: dict | None = None,
    with_error: bool = True,
) -> dict:
    """A worker-style prediction result (files + ``result`` dict), as ``worker.run_predict``
    writes it: particles perturbed from the ground truth, a surface with an error heatmap
    (``with_error``). ``uncertainty`` (a function of the predicted particles, LPS -> ``(M,)`` mm)
    and ``ood`` add what a bundle trained with uncertainty gives (issue 13)."""
    from vtk.util import numpy_support as ns

    from DeepSSMLogic import io
    from DeepSSMLogic.mesh import interpolate_to_vertices

    out_dir.mkdir(parents=True, exist_ok=True)
    gt = fibonacci_particles(n_particles)
    rng = np.random.default_rng(1)
    wobble = 1.5 * np.sin(gt[:, 0] / 5.0)[:, None] * gt / np.linalg.norm(gt, axis=1, keepdims=True)
    pred = gt + wobble + rng.normal(0, 0.2, gt.shape)
    err = np.linalg.norm(pred - gt, axis=1)
    surface = ellipsoid_surface()
    verts = ns.vtk_to_numpy(surface.GetPoints().GetData()).astype(np.float64)
    point_arrays = {"error_mm": err} if with_error else {}
    unc = None
    if uncertainty is not None:
        unc = np.asarray(uncertainty(pred), dtype=np.float64)
        point_arrays["uncertainty_mm"] = unc
    for name, values in point_arrays.items():
        arr = ns.numpy_to_vtk(interpolate_to_vertices(pred, values, verts), deep=True)
        arr.SetName(name)
        surface.GetPointData().AddArray(arr)
    io.write_particles(out_dir / "particles.csv", pred)
    io.write_particles(out_dir / "ground_truth.particles", gt)
    io.write_mesh(surface, out_dir / "surface.vtk")
    return {
        "kind": "prediction",
        "coordinates": "LPS",
        "particles": str(out_dir / "particles.csv"),
        "mesh": str(out_dir / "surface.vtk"),
        "descriptor": [3.5, -1.25, 0.5],
        "descriptor_kind": "pca",
        "severity": 2.75,
        "point_arrays": {k: v.tolist() for k, v in point_arrays.items()},
        "uncertainty": None
        if unc is None
        else {"mean_mm": float(unc.mean()), "max_mm": float(unc.max()), "method": "ensemble"},
        "ood": ood,
    }


class ResultProcess:
    """A worker stand-in: reads ``--out`` from the command line, writes a synthetic prediction
    there (as ``worker.run_predict`` would) and reports it as the result line."""

    def __init__(self, **result_options: Any) -> None:
        self.lines: list[str] = []
        self.done = False
        self.args: list[str] = []
        self.result_options = result_options  # passed to write_fake_result

    def start(self, args, env, cwd):
        self.args = list(args)
        out = Path(args[args.index("--out") + 1])
        result = write_fake_result(out, **self.result_options)
        import json

        self.lines = [json.dumps({"type": "result", **result})]

    def read_lines(self):
        lines, self.lines = self.lines, []
        if not lines:
            self.done = True
        return lines

    def poll(self):
        return 0 if self.done else None

    def kill_tree(self):
        self.done = True


def build_result_scene(ctx: SceneContext, work_dir: Path) -> dict[str, Any]:
    """Volume + the outputs of :func:`DeepSSMLib.mrml.show_prediction` for a synthetic result."""
    from DeepSSMLib import mrml

    image = ellipsoid_image()
    volume = mrml.add_volume_from_sitk(ctx.scene, image, "demo image")
    display = volume.GetDisplayNode()
    display.SetAutoWindowLevel(False)
    display.SetWindowLevel(260.0, 100.0)
    result = write_fake_result(work_dir)
    nodes = mrml.show_prediction(ctx.scene, volume, result)
    nodes.particles.GetDisplayNode().SetGlyphScale(2.0)
    return {"volume": volume, "nodes": nodes, "result": result}


# -- offscreen 3D view ----------------------------------------------------------------------------
class OffscreenThreeDView:
    """Slicer's 3D view displayable managers on an offscreen EGL window.

    Create it BEFORE adding the nodes to show: the colour-legend manager only picks up legend
    nodes added after it is initialised (as in the application, where views exist first).
    """

    MANAGERS = (
        "vtkMRMLCameraDisplayableManager",
        "vtkMRMLViewDisplayableManager",
        "vtkMRMLModelDisplayableManager",
        "vtkMRMLMarkupsDisplayableManager",
        "vtkMRMLColorLegendDisplayableManager",
    )

    def __init__(self, ctx: SceneContext, size=(960, 640)) -> None:
        import slicer
        import vtk

        self.ctx = ctx
        factory = slicer.vtkMRMLThreeDViewDisplayableManagerFactory.GetInstance()
        factory.SetMRMLApplicationLogic(ctx.app_logic)
        for dm in self.MANAGERS:
            if not factory.IsDisplayableManagerRegistered(dm):
                factory.RegisterDisplayableManager(dm)
        self.renderer = vtk.vtkRenderer()
        self.window = vtk.vtkRenderWindow()
        self.window.SetOffScreenRendering(1)
        self.window.SetSize(*size)
        self.window.AddRenderer(self.renderer)
        self.interactor = vtk.vtkRenderWindowInteractor()
        self.interactor.SetRenderWindow(self.window)
        self.interactor.Initialize()
        self.group = slicer.vtkMRMLDisplayableManagerGroup()
        self.group.SetRenderer(self.renderer)
        self.group.Initialize(factory, self.renderer)
        self.view_logic = slicer.vtkMRMLViewLogic()
        self.view_logic.SetMRMLApplicationLogic(ctx.app_logic)
        ctx.app_logic.GetViewLogics().AddItem(self.view_logic)
        self.view_logic.SetMRMLScene(ctx.scene)
        self.view_node = self.view_logic.AddViewNode("1")
        self.view_node.SetBoxVisible(False)
        self.view_node.SetAxisLabelsVisible(False)
        self.group.SetMRMLDisplayableNode(self.view_node)

    def show_slice(self, volume: Any, offset_mm: float = 0.0) -> Any:
        """Show an axial slice of ``volume`` in 3D (Slicer's red slice); returns the slice node."""
        import slicer

        logic = slicer.vtkMRMLSliceLogic()
        logic.SetMRMLApplicationLogic(self.ctx.app_logic)
        logic.SetMRMLScene(self.ctx.scene)
        slice_node = logic.AddSliceNode("Red")
        self.ctx.app_logic.GetSliceLogics().AddItem(logic)
        logic.GetSliceCompositeNode().SetBackgroundVolumeID(volume.GetID())
        slice_node.SetOrientation("Axial")
        logic.FitSliceToAll()
        slice_node.SetSliceVisible(True)
        logic.SetSliceOffset(offset_mm)
        self._slice_logic = logic  # keep the pipeline alive until the render
        return slice_node

    def set_camera(self, position, focal_point=(0.0, 0.0, 0.0), view_up=(0.0, 0.0, 1.0)) -> None:
        camera = self.group.GetDisplayableManagerByClassName(
            "vtkMRMLCameraDisplayableManager"
        ).GetCameraNode()
        camera.SetFocalPoint(*focal_point)
        camera.SetPosition(*position)
        camera.SetViewUp(*view_up)

    def capture(self, path: Path) -> Path:
        """Render and write a PNG atomically."""
        from DeepSSMLogic.analysis.render import capture_png

        return capture_png(self.window, path)

    def close(self) -> None:
        self.window.Finalize()


def render_result_png(path: Path, work_dir: Path, size=(960, 640)) -> Path:
    """Build the synthetic result scene and render it (3D view with an axial slice) to ``path``."""
    ctx = make_scene()
    view = OffscreenThreeDView(ctx, size)
    try:
        built = build_result_scene(ctx, work_dir)
        view.show_slice(built["volume"], offset_mm=-2.0)
        view.set_camera(position=(-55.0, 75.0, 48.0), focal_point=(0.0, 0.0, -2.0))
        return view.capture(path)
    finally:
        view.close()


def predict_demo(out_dir: Path) -> tuple[int, list[dict[str, Any]], dict[str, Path]]:
    """Run the worker's ``predict`` on the shipped demo (its real bundle, CPU, with the ground truth)
    into ``out_dir``. Returns the exit code, the JSON-lines messages it wrote (the result or the error
    last) and the demo files by role: "image", "ground_truth", "bundle"."""
    import io as _io
    import json

    from DeepSSMLib import worker
    from DeepSSMLib.bundles import verified_sample_file

    files = {role: verified_sample_file(role, DEMO_MANIFEST) for role in ("image", "ground_truth", "bundle")}
    stream = _io.StringIO()
    code = worker.main(
        [
            "predict",
            "--bundle",
            str(files["bundle"]),
            "--image",
            str(files["image"]),
            "--out",
            str(out_dir),
            "--device",
            "cpu",
            "--ground-truth",
            str(files["ground_truth"]),
            "--aligned",  # the demo image is in the model frame, as the module's "Load demo" declares
        ],
        stream=stream,
    )
    return code, [json.loads(line) for line in stream.getvalue().splitlines()], files


def render_demo_png(path: Path, work_dir: Path, size=(960, 640)) -> Path:
    """Predict the shipped demo image with the demo bundle (the worker, CPU) and render the real
    result: image slice, predicted particles, surface coloured by the error vs ground truth."""
    from DeepSSMLib import mrml

    from DeepSSMLogic import io

    code, messages, files = predict_demo(work_dir)
    result = messages[-1]
    if code != 0:
        raise RuntimeError(f"demo prediction failed: {result.get('message')}")
    ctx = make_scene()
    view = OffscreenThreeDView(ctx, size)
    try:
        volume = mrml.add_volume_from_sitk(ctx.scene, io.read_image(files["image"]), "demo image")
        nodes = mrml.show_prediction(ctx.scene, volume, result)
        nodes.particles.GetDisplayNode().SetGlyphScale(2.0)
        ras = mrml.lps_to_ras(io.read_particles(result["particles"]))
        centre, extent = ras.mean(axis=0), float(np.ptp(ras, axis=0).max())
        view.show_slice(volume, offset_mm=float(ras[:, 2].min() + 0.15 * np.ptp(ras[:, 2])))
        eye = centre + extent * np.array([-1.2, 1.4, 1.1])
        view.set_camera(position=tuple(eye), focal_point=tuple(centre))
        return view.capture(path)
    finally:
        view.close()


def demo_bundle() -> Path:
    """The shipped demo bundle (SHA256-checked)."""
    from DeepSSMLib.bundles import verified_sample_file

    return verified_sample_file("bundle", DEMO_MANIFEST)


def render_explorer_png(path: Path, bundle: Path | None = None, mode: int = 1, size=(1080, 400)) -> Path:
    """The shape-model explorer of ``bundle`` (default: the demo bundle) along ``mode``: the
    template warped to -3 SD, the mean and +3 SD, side by side (moved apart along R by parent
    transforms), coloured by the distance to the mean (one shared range, one legend)."""
    import slicer
    import vtk
    from DeepSSMLib import explorer as ex
    from DeepSSMLib import mrml

    ctx = make_scene()
    view = OffscreenThreeDView(ctx, size)
    try:
        exp = ex.ShapeModelExplorer(ex.load_shape_model(bundle or demo_bundle()))
        nodes = ex.show_explorer(ctx.scene, exp)
        extent = float(np.ptp(exp.mean_vertices, axis=0).max())
        step = 1.25 * extent
        surfaces = []
        for i, sd in enumerate((-3.0, 0.0, 3.0)):
            sigmas = [0.0] * exp.n_modes
            sigmas[mode - 1] = sd
            if i == 1:
                node = nodes.surface
            else:
                node = mrml.add_mesh_model(ctx.scene, ex.surface_polydata(exp, []), f"explorer {sd:+.0f} SD")
                mrml.show_scalar_heatmap(
                    node, ex.DISPLACEMENT_ARRAY, "viridis", scalar_range=(0.0, exp.max_displacement())
                )
                node.GetDisplayNode().SetScalarVisibility(True)
            ex.update_surface(node, exp, sigmas)
            shift = ctx.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", f"explorer offset {i}")
            m = vtk.vtkMatrix4x4()
            m.SetElement(0, 3, (i - 1) * step)
            shift.SetMatrixTransformToParent(m)
            node.SetAndObserveTransformNodeID(shift.GetID())
            surfaces.append(node)
        for legend in slicer.util.getNodesByClass("vtkMRMLColorLegendDisplayNode"):
            legend.SetVisibility(legend.GetDisplayableNode() is nodes.surface)
        centre = mrml.lps_to_ras(exp.mean_vertices.mean(axis=0)[None])[0]
        view.set_camera(
            position=tuple(centre + np.array([0.0, -3.9 * extent, 0.35 * extent])),
            focal_point=tuple(centre),
        )
        return view.capture(path)
    finally:
        view.close()


def main(argv: list[str] | None = None) -> int:
    """Write the README's pictures: docs/screenshot.png (the real demo prediction when the demo is
    present, else the synthetic result scene; ``--synthetic`` forces the latter) and, with the demo,
    docs/explorer.png (the demo bundle's shape-model explorer along mode 1)."""
    import tempfile

    args = sys.argv[1:] if argv is None else argv
    synthetic = "--synthetic" in args
    paths = [a for a in args if not a.startswith("--")]
    target = Path(paths[0]) if paths else REPO / "docs" / "screenshot.png"
    explorer_target = Path(paths[1]) if len(paths) > 1 else REPO / "docs" / "explorer.png"
    demo = DEMO_MANIFEST.is_file()
    with tempfile.TemporaryDirectory() as tmp:
        if demo and not synthetic:
            render_demo_png(target, Path(tmp))
        else:
            render_result_png(target, Path(tmp))
    print(target)
    if demo:
        print(render_explorer_png(explorer_target))
    return 0


if __name__ == "__main__":
    sys.exit(main())
