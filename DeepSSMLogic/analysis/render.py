"""Offscreen VTK renders of meshes coloured by a per-vertex scalar (heatmaps), with a colour bar.

Uses EGL (no display): ``VTK_DEFAULT_OPENGL_WINDOW`` is set to ``vtkEGLRenderWindow`` before the
first render window unless the caller chose another. Surfaces are opaque (translucency does not
render in software EGL). PNGs are written atomically.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..fileutil import atomic_path

# the camera looks along -direction, from the side named (LPS: anterior = -y, left = +x, superior = +z)
VIEWS = {
    "anterior": (0.0, -1.0, 0.0),
    "posterior": (0.0, 1.0, 0.0),
    "left": (1.0, 0.0, 0.0),
    "right": (-1.0, 0.0, 0.0),
    "superior": (0.0, 0.0, 1.0),
    "inferior": (0.0, 0.0, -1.0),
    "oblique": (0.6, -0.8, 0.45),
}


@dataclass
class MeshView:
    """One panel: ``vertices`` ``(V, 3)`` mm, ``triangles`` ``(T, 3)`` (None: draw points),
    ``scalars`` ``(V,)`` (None: plain grey), a title and optionally its own camera direction."""

    vertices: np.ndarray
    triangles: np.ndarray | None = None
    scalars: np.ndarray | None = None
    title: str = ""
    camera: str | Sequence[float] | None = None  # None: the call's camera


_ASCII = {
    "λ": "lambda",
    "→": "->",
    "−": "-",
    "·": ".",
    "\u0303": "~",
    "σ": "sigma",
    "±": "+/-",
    "–": "-",
    "—": "-",
}


def _ascii(text: str) -> str:
    """VTK's built-in fonts lack most non-ASCII glyphs: spell them out."""
    for k, v in _ASCII.items():
        text = text.replace(k, v)
    return text.encode("ascii", "replace").decode("ascii")


def _lookup_table(cmap: str, lo: float, hi: float) -> Any:
    import vtk
    from matplotlib import colormaps

    try:
        cm = colormaps[cmap]
    except KeyError:
        raise InputError(f"render: unknown colour map {cmap!r}") from None
    lut = vtk.vtkLookupTable()
    lut.SetNumberOfTableValues(256)
    lut.SetRange(lo, hi)
    for i, rgba in enumerate(cm(np.linspace(0.0, 1.0, 256))):
        lut.SetTableValue(i, float(rgba[0]), float(rgba[1]), float(rgba[2]), 1.0)
    lut.Build()
    return lut


def _polydata(view: MeshView) -> Any:
    import vtk
    from vtk.util import numpy_support as ns

    from ..io import polydata_from_arrays

    verts = np.asarray(view.vertices, dtype=np.float64)
    if verts.ndim != 2 or verts.shape[1] != 3 or len(verts) == 0:
        raise InputError(f"render: vertices must have shape (V, 3), found {verts.shape}")
    if view.triangles is not None:
        poly = polydata_from_arrays(verts, view.triangles)
    else:
        poly = vtk.vtkPolyData()
        pts = vtk.vtkPoints()
        pts.SetData(ns.numpy_to_vtk(np.ascontiguousarray(verts), deep=True))
        poly.SetPoints(pts)
        cells = vtk.vtkCellArray()
        for i in range(len(verts)):
            cells.InsertNextCell(1)
            cells.InsertCellPoint(i)
        poly.SetVerts(cells)
    if view.scalars is not None:
        s = np.asarray(view.scalars, dtype=np.float64).ravel()
        if s.shape != (len(verts),):
            raise InputError(f"render: {len(verts)} vertices but {s.size} scalars")
        arr = ns.numpy_to_vtk(np.ascontiguousarray(s), deep=True)
        arr.SetName("scalars")
        poly.GetPointData().SetScalars(arr)
    if view.triangles is not None:
        normals = vtk.vtkPolyDataNormals()
        normals.SetInputData(poly)
        normals.SplittingOff()
        normals.Update()
        poly = normals.GetOutput()
    return poly


def _direction(camera: str | Sequence[float]) -> np.ndarray:
    try:
        d = np.asarray(VIEWS[camera] if isinstance(camera, str) else camera, dtype=np.float64)
    except KeyError:
        d = np.zeros(0)
    if d.shape != (3,) or not np.linalg.norm(d) > 0:
        raise InputError(f"render: camera must be one of {sorted(VIEWS)} or a 3-vector, found {camera!r}")
    return d / np.linalg.norm(d)


def scalar_range(values: Sequence[np.ndarray], symmetric: bool = False) -> tuple[float, float]:
    """A shared colour range over several scalar arrays (robust: 1st-99th percentile of the pooled
    values; symmetric about 0 for signed maps)."""
    pooled = np.concatenate([np.asarray(v, dtype=np.float64).ravel() for v in values if v is not None])
    pooled = pooled[np.isfinite(pooled)]
    if pooled.size == 0:
        return 0.0, 1.0
    if symmetric:
        m = float(np.percentile(np.abs(pooled), 99)) or 1.0
        return -m, m
    lo, hi = float(np.percentile(pooled, 1)), float(np.percentile(pooled, 99))
    if hi <= lo:
        hi = lo + 1.0
    return lo, hi


def render_meshes(
    views: Sequence[MeshView],
    out_png: str | os.PathLike[str],
    *,
    cmap: str = "viridis",
    value_range: tuple[float, float] | None = None,
    symmetric: bool = False,
    scalar_title: str = "mm",
    camera: str | Sequence[float] = "oblique",
    panel_size: tuple[int, int] = (360, 360),
    title: str = "",
) -> Path:
    """Render panels side by side (one shared colour scale and bar) to ``out_png``; returns the path."""
    os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
    import vtk

    if not views:
        raise InputError("render: nothing to render")
    _direction(camera)
    has_scalars = any(v.scalars is not None for v in views)
    lo, hi = value_range or scalar_range([v.scalars for v in views], symmetric=symmetric)
    lut = _lookup_table(cmap, lo, hi) if has_scalars else None

    n = len(views)
    bar_w = 110 if has_scalars else 0
    title_h = 34 if title else 0
    width = panel_size[0] * n + bar_w
    height = panel_size[1] + title_h
    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetSize(width, height)
    window.SetMultiSamples(0)
    top = panel_size[1] / height
    for i, view in enumerate(views):
        poly = _polydata(view)
        mapper = vtk.vtkPolyDataMapper()
        mapper.SetInputData(poly)
        actor = vtk.vtkActor()
        actor.SetMapper(mapper)
        if view.scalars is not None and lut is not None:
            mapper.SetLookupTable(lut)
            mapper.SetScalarRange(lo, hi)
            mapper.SetScalarModeToUsePointData()
            mapper.ScalarVisibilityOn()
        else:
            mapper.ScalarVisibilityOff()
            actor.GetProperty().SetColor(0.85, 0.82, 0.75)
        if view.triangles is None:
            actor.GetProperty().SetPointSize(6)
            actor.GetProperty().RenderPointsAsSpheresOn()
        actor.GetProperty().SetOpacity(1.0)
        actor.GetProperty().SetSpecular(0.15)
        ren = vtk.vtkRenderer()
        ren.SetBackground(1.0, 1.0, 1.0)
        ren.SetViewport(i * panel_size[0] / width, 0.0, (i + 1) * panel_size[0] / width, top)
        ren.AddActor(actor)
        if view.title:
            text = vtk.vtkTextActor()
            text.SetInput(_ascii(view.title))
            text.GetTextProperty().SetColor(0.1, 0.1, 0.1)
            text.GetTextProperty().SetFontSize(14)
            text.SetPosition(8, panel_size[1] - 24)
            ren.AddViewProp(text)
        direction = _direction(view.camera if view.camera is not None else camera)
        bounds = np.asarray(poly.GetBounds()).reshape(3, 2)
        centre = bounds.mean(axis=1)
        radius = float(np.linalg.norm(bounds[:, 1] - bounds[:, 0])) / 2 or 1.0
        cam = ren.GetActiveCamera()
        cam.SetFocalPoint(*centre)
        cam.SetPosition(*(centre + direction * radius * 4.0))
        up = np.array([0.0, 0.0, 1.0]) if abs(direction[2]) < 0.9 else np.array([0.0, -1.0, 0.0])
        cam.SetViewUp(*up)
        cam.SetViewAngle(30)
        ren.ResetCameraClippingRange()
        window.AddRenderer(ren)
    if has_scalars:
        ren = vtk.vtkRenderer()
        ren.SetBackground(1.0, 1.0, 1.0)
        ren.SetViewport(n * panel_size[0] / width, 0.0, 1.0, top)
        bar = vtk.vtkScalarBarActor()
        bar.SetLookupTable(lut)
        bar.SetTitle(_ascii(scalar_title))
        bar.SetNumberOfLabels(5)
        bar.SetLabelFormat("%.3g")
        bar.UnconstrainedFontSizeOn()
        for prop in (bar.GetTitleTextProperty(), bar.GetLabelTextProperty()):
            prop.SetColor(0.1, 0.1, 0.1)
            prop.SetFontSize(13)
            prop.ShadowOff()
            prop.ItalicOff()
        bar.SetPosition(0.15, 0.08)
        bar.SetWidth(0.5)
        bar.SetHeight(0.84)
        ren.AddViewProp(bar)
        window.AddRenderer(ren)
    if title:
        ren = vtk.vtkRenderer()
        ren.SetBackground(1.0, 1.0, 1.0)
        ren.SetViewport(0.0, top, 1.0, 1.0)
        text = vtk.vtkTextActor()
        text.SetInput(_ascii(title))
        text.GetTextProperty().SetColor(0.0, 0.0, 0.0)
        text.GetTextProperty().SetFontSize(16)
        text.GetTextProperty().BoldOn()
        text.SetPosition(10, 8)
        ren.AddViewProp(text)
        window.AddRenderer(ren)
    target = capture_png(window, out_png)
    window.Finalize()
    return target


def capture_png(window: Any, out_png: str | os.PathLike[str]) -> Path:
    """Render ``window`` (an offscreen ``vtkRenderWindow``) and write its back buffer to ``out_png``
    atomically; returns the path."""
    import vtk

    window.Render()
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(window)
    grab.ReadFrontBufferOff()
    grab.Update()
    target = Path(out_png)
    with atomic_path(target) as tmp:
        writer = vtk.vtkPNGWriter()
        writer.SetFileName(str(tmp))
        writer.SetInputConnection(grab.GetOutputPort())
        writer.Write()
    return target


def render_mesh(
    vertices: np.ndarray,
    triangles: np.ndarray | None,
    scalars: np.ndarray | None,
    out_png: str | os.PathLike[str],
    **kwargs: Any,
) -> Path:
    """One mesh (or point set when ``triangles`` is None) with an optional per-vertex heatmap."""
    return render_meshes([MeshView(vertices, triangles, scalars)], out_png, **kwargs)
