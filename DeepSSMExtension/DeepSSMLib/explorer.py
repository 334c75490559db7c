"""Shape-model explorer: the bundle's mean surface warped live along its leading PCA modes.

As ShapeWorks Studio's Analysis tab and SlicerMorph's GPA do: a slider per leading mode moves the
shape between -3 and +3 standard deviations, a plot gives the variance each mode explains, and a
predicted subject's PCA descriptor is marked on each mode's range.

Reads only ``model.json`` (the PCA), the template mesh and its particles from the bundle: no torch,
so it runs inside Slicer's GUI process. The template is warped with the thin-plate spline of
:class:`DeepSSMLogic.mesh.MeshWarper`, which is linear in the particle displacements; so the
vertex displacement of one standard deviation along each mode is computed once, and a slider move
is a weighted sum of those fields (live at any mesh size).

Frames: everything here is LPS mm in the model frame; :mod:`.mrml` converts to RAS for the nodes.
"""

from __future__ import annotations

import shutil
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from DeepSSMLogic.errors import BundleError, InputError

from . import mrml

#: how far the sliders go, in standard deviations of each mode
SIGMA_LIMIT = 3.0
#: bundle members the explorer reads (names as in DeepSSMLogic.bundle)
TEMPLATE_MESH = "template_mesh.vtk"
TEMPLATE_PARTICLES = "template.particles"
MEAN_PARTICLES = "mean.particles"


@dataclass
class ShapeModelSource:
    """What the explorer needs from a bundle: the PCA and a template surface with its particles.

    ``vertices`` ``(V, 3)`` and ``particles`` ``(M, 3)`` are LPS mm (model frame); ``triangles``
    ``(T, 3)`` int.
    """

    path: Path
    model: Any  # DeepSSMLogic.shape_model.ShapeModel
    vertices: np.ndarray
    triangles: np.ndarray
    particles: np.ndarray


def _read_member(bundle: Path, name: str, digest: str | None, tmp: Path) -> Path | None:
    """Path of the bundle member ``name`` (extracted from a zip into ``tmp``), its sha256 checked
    against model.json; None when the bundle lacks it."""
    from DeepSSMLogic.fileutil import sha256_file

    if bundle.is_dir():
        path = bundle / name
        if not path.is_file():
            return None
    else:
        with zipfile.ZipFile(bundle) as zf:
            if name not in zf.namelist():
                return None
            path = tmp / name
            path.write_bytes(zf.read(name))
    if digest is not None and sha256_file(path) != digest:
        raise BundleError(f"{bundle}: sha256 mismatch for {name}; the file was modified or corrupted")
    return path


def load_shape_model(bundle_path: str | Path) -> ShapeModelSource:
    """The PCA and template surface of a bundle (folder or .zip). Raises BundleError when the bundle
    has no PCA (a TL-DeepSSM bundle) or no template mesh."""
    from DeepSSMLogic import io
    from DeepSSMLogic.bundle import read_bundle_meta
    from DeepSSMLogic.shape_model import ShapeModel

    src = Path(bundle_path)
    meta = read_bundle_meta(src)
    pca = meta.get("pca")
    if not pca:
        raise BundleError(f"{src}: the bundle has no PCA shape model ('pca' in model.json) to explore")
    try:
        arrays = {k: np.asarray(v, dtype=np.float64) for k, v in pca.items() if k != "meta"}
        model = ShapeModel.from_arrays(arrays, pca.get("meta"))
    except (InputError, ValueError, TypeError, AttributeError) as e:
        raise BundleError(f"{src}/model.json: invalid 'pca' section ({e})") from None
    digests = meta.get("files") or {}
    tmp = Path(tempfile.mkdtemp(prefix="deepssm-explorer-"))
    try:
        mesh_path = _read_member(src, TEMPLATE_MESH, digests.get(TEMPLATE_MESH), tmp)
        if mesh_path is None:
            raise BundleError(
                f"{src}: the bundle has no {TEMPLATE_MESH}; the explorer needs a template surface"
            )
        pts_path = _read_member(
            src, TEMPLATE_PARTICLES, digests.get(TEMPLATE_PARTICLES), tmp
        ) or _read_member(src, MEAN_PARTICLES, digests.get(MEAN_PARTICLES), tmp)
        if pts_path is None:
            raise BundleError(f"{src}: the bundle has neither {TEMPLATE_PARTICLES} nor {MEAN_PARTICLES}")
        vertices, triangles = io.arrays_from_polydata(io.read_mesh(mesh_path))
        particles = io.read_particles(pts_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if particles.shape != model.mean.shape:
        raise BundleError(
            f"{src}: template particles {particles.shape} do not match the PCA mean {model.mean.shape}"
        )
    return ShapeModelSource(src, model, np.asarray(vertices, np.float64), np.asarray(triangles), particles)


class ShapeModelExplorer:
    """Mean surface plus ``n_modes`` leading modes, warped in units of each mode's standard deviation.

    ``sigma`` ``(K,)`` mm: the standard deviation of each mode's scores (sqrt of its eigenvalue).
    """

    def __init__(self, source: ShapeModelSource, n_modes: int = 3) -> None:
        from DeepSSMLogic.mesh import MeshWarper

        self.source = source
        model = source.model
        self.n_modes = int(min(n_modes, model.n_modes))
        if self.n_modes < 1:
            raise InputError("shape-model explorer: the model has no modes")
        self.sigma = np.sqrt(model.eigenvalues[: self.n_modes])
        warper = MeshWarper(source.vertices, source.triangles, source.particles)
        shapes = [model.mean]
        for k in range(self.n_modes):
            shapes.append(model.mean + self.sigma[k] * model.components[k].reshape(-1, 3))
        warped = warper.warp_many(np.stack(shapes))
        self.mean_vertices = warped[0]
        # (n_modes, V, 3): vertex displacement of +1 SD along each mode (the warp is linear)
        self.mode_fields = warped[1:] - warped[0][None]
        self.triangles = source.triangles

    @property
    def variance_explained(self) -> np.ndarray:
        """``(K,)`` fraction of the total variance per mode (all modes of the model)."""
        return self.source.model.explained_variance_ratio

    def _weights(self, sigmas: Sequence[float]) -> np.ndarray:
        w = np.zeros(self.n_modes)
        given = np.asarray(list(sigmas)[: self.n_modes], dtype=np.float64)
        if not np.all(np.isfinite(given)):
            raise InputError(f"mode weights must be finite, found {list(sigmas)}")
        w[: len(given)] = np.clip(given, -SIGMA_LIMIT, SIGMA_LIMIT)
        return w

    def vertices_at(self, sigmas: Sequence[float]) -> np.ndarray:
        """Template vertices ``(V, 3)`` LPS mm for the shape ``mean + Σ sigmas[k]·SD_k·mode_k``
        (``sigmas`` in standard deviations, clipped to ±3; missing modes are 0)."""
        return self.mean_vertices + np.tensordot(self._weights(sigmas), self.mode_fields, axes=1)

    def particles_at(self, sigmas: Sequence[float]) -> np.ndarray:
        """Particles ``(M, 3)`` LPS mm of the same shape."""
        w = self._weights(sigmas) * self.sigma
        return self.source.model.reconstruct(w)

    def max_displacement(self) -> float:
        """Largest vertex displacement (mm) of one mode at ±3 SD: the fixed heatmap range, so a
        colour means the same distance whatever the sliders (combined modes may saturate)."""
        per_mode = np.linalg.norm(self.mode_fields, axis=2).max(axis=1) * SIGMA_LIMIT
        return float(per_mode.max()) or 1.0

    def descriptor_sigmas(self, descriptor: Sequence[float]) -> np.ndarray:
        """A PCA descriptor (scores in mm) in standard deviations of the leading modes ``(n_modes,)``."""
        d = np.asarray(descriptor, dtype=np.float64).ravel()
        if d.size < self.n_modes:
            raise InputError(f"descriptor has {d.size} scores, the explorer shows {self.n_modes} modes")
        sd = np.where(self.sigma > 0, self.sigma, 1.0)
        return d[: self.n_modes] / sd


# -- MRML ------------------------------------------------------------------------------------------
DISPLACEMENT_ARRAY = "displacement_mm"


@dataclass
class ExplorerNodes:
    """Nodes of the explorer: the warped surface, the variance plot and the subject's marks."""

    surface: Any
    variance_table: Any
    variance_chart: Any
    subject_table: Any | None = None
    subject_chart: Any | None = None


def surface_polydata(explorer: ShapeModelExplorer, sigmas: Sequence[float]) -> Any:
    from vtk.util import numpy_support as ns

    from DeepSSMLogic import io

    verts = explorer.vertices_at(sigmas)
    pd = io.polydata_from_arrays(verts, explorer.triangles)
    disp = np.linalg.norm(verts - explorer.mean_vertices, axis=1)
    arr = ns.numpy_to_vtk(np.ascontiguousarray(disp), deep=True)
    arr.SetName(DISPLACEMENT_ARRAY)
    pd.GetPointData().AddArray(arr)
    return pd


def update_surface(node: Any, explorer: ShapeModelExplorer, sigmas: Sequence[float]) -> Any:
    """Warp the explorer surface ``node`` to ``sigmas`` (SD per mode), keeping its display."""
    node.SetAndObservePolyData(mrml.polydata_lps_to_ras(surface_polydata(explorer, sigmas)))
    return node


def _table(scene: Any, existing: Any, name: str, columns: dict[str, list[float]]) -> Any:
    table = mrml.in_scene(existing, scene) or scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    return mrml.update_table(table, columns)


def _chart(
    scene: Any, existing: Any, table: Any, name: str, y_columns: list[str], title: str, y_label: str
) -> Any:
    """The chart ``existing`` if still in the scene (its series follow the updated table), else a
    new one: showing the explorer again does not pile up charts."""
    chart = mrml.in_scene(existing, scene)
    if chart is not None:
        return chart
    return mrml.plot_chart(scene, name, "mode", y_columns, title=title, y_label=y_label, table=table)


def show_explorer(
    scene: Any,
    explorer: ShapeModelExplorer,
    descriptor: Sequence[float] | None = None,
    nodes: ExplorerNodes | None = None,
) -> ExplorerNodes:
    """The mean surface (coloured by displacement from the mean, fixed range so colours compare
    while sliding), the variance-explained plot (bars per mode, cumulative line) and the subject's
    PCA ``descriptor`` in SD on each mode's ±3 SD range. Reuses ``nodes`` still in the scene."""
    import slicer

    old = nodes or ExplorerNodes(None, None, None)
    surface = mrml.add_mesh_model(
        scene, surface_polydata(explorer, []), "DeepSSM shape model", node=mrml.in_scene(old.surface, scene)
    )
    mrml.show_scalar_heatmap(
        surface,
        DISPLACEMENT_ARRAY,
        "viridis",
        scalar_range=(0.0, explorer.max_displacement()),
        title="Distance to mean (mm)",
    )
    ratios = explorer.variance_explained
    shown = min(len(ratios), 10)
    variance_table = _table(
        scene,
        old.variance_table,
        "DeepSSM variance explained",
        {
            "mode": [float(k + 1) for k in range(shown)],
            "variance explained (%)": (100.0 * ratios[:shown]).tolist(),
            "cumulative (%)": (100.0 * np.cumsum(ratios)[:shown]).tolist(),
        },
    )
    variance = _chart(
        scene,
        old.variance_chart,
        variance_table,
        "DeepSSM variance explained",
        ["variance explained (%)", "cumulative (%)"],
        "Variance explained per mode",
        "%",
    )
    if isinstance(variance, mrml.Chart):
        variance.series["variance explained (%)"].SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeBar)
        variance = variance.chart
    out = ExplorerNodes(surface, variance_table, variance)
    if descriptor is None or len(descriptor) < explorer.n_modes:
        return out
    n = explorer.n_modes
    out.subject_table = _table(
        scene,
        old.subject_table,
        "DeepSSM subject on modes",
        {
            "mode": [float(k + 1) for k in range(n)],
            "subject (SD)": explorer.descriptor_sigmas(descriptor).tolist(),
            "-3 SD": [-SIGMA_LIMIT] * n,
            "+3 SD": [SIGMA_LIMIT] * n,
        },
    )
    subject = _chart(
        scene,
        old.subject_chart,
        out.subject_table,
        "DeepSSM subject on modes",
        ["subject (SD)", "-3 SD", "+3 SD"],
        "Predicted subject on each mode's range",
        "standard deviations",
    )
    if isinstance(subject, mrml.Chart):
        marker = subject.series["subject (SD)"]
        marker.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle)
        marker.SetLineStyle(slicer.vtkMRMLPlotSeriesNode.LineStyleNone)
        subject = subject.chart
    out.subject_chart = subject
    return out
