"""MRML adapters: the only place where DeepSSM data meets Slicer nodes (and LPS meets RAS).

Uses only APIs that exist in the Qt-free ``slicer-core`` wheel (no ``slicer.app``, ``qt``,
``sitkUtils``), so every function here runs both inside 3D Slicer and in a plain pytest venv.

Frames: DeepSSMLogic, SimpleITK and every file are LPS mm; MRML nodes hold RAS mm.
All node coordinates here are *local* (before any parent transform): outputs are put under
the input volume's parent transform, so they line up with it in the views whatever that
transform is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from DeepSSMLogic.errors import InputError
from DeepSSMLogic.geometry import Grid, lps_to_ras, ras_to_lps

LPS_TO_RAS_4 = np.diag([-1.0, -1.0, 1.0, 1.0])

#: Slicer's point-list rendering slows down beyond about this many points; above it a glyph
#: point-cloud model is shown instead and the point list is hidden in 3D.
POINT_CLOUD_THRESHOLD = 1000


def _slicer() -> Any:
    import slicer

    return slicer


def _vtk() -> Any:
    import vtk

    return vtk


def _matrix_to_array(m: Any) -> np.ndarray:
    return np.array([[m.GetElement(i, j) for j in range(4)] for i in range(4)], dtype=np.float64)


def _array_to_matrix(a: np.ndarray) -> Any:
    m = _vtk().vtkMatrix4x4()
    for i in range(4):
        for j in range(4):
            m.SetElement(i, j, float(a[i, j]))
    return m


def _scene_of(node: Any) -> Any:
    scene = node.GetScene()
    if scene is None:
        raise InputError(f"node {node.GetName()!r} is not in a MRML scene")
    return scene


def in_scene(node: Any, scene: Any) -> Any:
    """``node`` if it is (still) in ``scene``, else None. Nodes removed by the user or by Close
    Scene have no scene; node IDs restart after a close, so an ID alone proves nothing."""
    if node is None or scene is None or node.GetScene() is not scene:
        return None
    return node if scene.IsNodePresent(node) else None


# -- volumes ------------------------------------------------------------------------------------
def grid_from_volume(volume_node: Any) -> Grid:
    """The volume's geometry as a :class:`Grid` (LPS mm), from its IJK-to-RAS matrix."""
    image = volume_node.GetImageData()
    if image is None:
        raise InputError(f"volume {volume_node.GetName()!r} has no image data")
    m = _vtk().vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    ijk_to_lps = LPS_TO_RAS_4 @ _matrix_to_array(m)  # the flip is its own inverse
    axes = ijk_to_lps[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    if np.any(spacing <= 0):
        raise InputError(f"volume {volume_node.GetName()!r} has a degenerate IJK-to-RAS matrix")
    direction = axes / spacing
    size = image.GetDimensions()
    return Grid(
        tuple(float(v) for v in ijk_to_lps[:3, 3]),
        tuple(float(v) for v in spacing),
        (int(size[0]), int(size[1]), int(size[2])),
        tuple(float(v) for v in direction.ravel()),
    )


def array_from_volume(volume_node: Any) -> np.ndarray:
    """A copy of the voxels as ``(K, J, I)`` = ``(Z, Y, X)``, the SimpleITK order."""
    from vtk.util import numpy_support as ns

    image = volume_node.GetImageData()
    if image is None or image.GetPointData().GetScalars() is None:
        raise InputError(f"volume {volume_node.GetName()!r} has no voxels")
    scalars = image.GetPointData().GetScalars()
    if scalars.GetNumberOfComponents() != 1:
        raise InputError(
            f"volume {volume_node.GetName()!r} has {scalars.GetNumberOfComponents()} components per voxel; "
            "DeepSSM needs a scalar (grey-level) image"
        )
    dims = image.GetDimensions()
    return ns.vtk_to_numpy(scalars).reshape(dims[2], dims[1], dims[0]).copy()


def volume_to_sitk(volume_node: Any) -> Any:
    """The volume as a SimpleITK image (LPS physical space; parent transforms not applied)."""
    from DeepSSMLogic.preprocess import image_from_array

    return image_from_array(array_from_volume(volume_node), grid_from_volume(volume_node))


def update_volume_from_sitk(volume_node: Any, image: Any) -> Any:
    """Put a 3D scalar SimpleITK image (LPS) into ``volume_node`` (RAS); returns the node."""
    import SimpleITK as sitk
    from vtk.util import numpy_support as ns

    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError("update_volume_from_sitk: expected a 3D scalar image")
    grid = Grid.from_sitk(image)
    arr = np.ascontiguousarray(sitk.GetArrayFromImage(image))
    vtk = _vtk()
    data = vtk.vtkImageData()
    data.SetDimensions(*grid.size)
    vtk_arr = ns.numpy_to_vtk(arr.ravel(), deep=True)
    data.GetPointData().SetScalars(vtk_arr)
    volume_node.SetAndObserveImageData(data)
    volume_node.SetIJKToRASMatrix(_array_to_matrix(LPS_TO_RAS_4 @ grid.index_to_physical_matrix()))
    return volume_node


def add_volume_from_sitk(
    scene: Any, image: Any, name: str, class_name: str = "vtkMRMLScalarVolumeNode"
) -> Any:
    """A new volume node (with default display) holding ``image``."""
    node = scene.AddNewNodeByClass(class_name, name)
    update_volume_from_sitk(node, image)
    node.CreateDefaultDisplayNodes()
    return node


# -- subject hierarchy and transforms --------------------------------------------------------------
def place_next_to(node: Any, reference: Any) -> None:
    """Make ``node`` a sibling of ``reference`` in the Subject Hierarchy and give it the same
    parent transform, so it sits over the same anatomy."""
    slicer = _slicer()
    scene = _scene_of(reference)
    if node.IsA("vtkMRMLTransformableNode"):  # tables are not transformable
        node.SetAndObserveTransformNodeID(reference.GetTransformNodeID())
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if sh is None:
        return
    # Inside Slicer the plugin logic has created the items already; headless it has not.
    ref_item = sh.GetItemByDataNode(reference) or sh.CreateItem(sh.GetSceneItemID(), reference)
    parent = sh.GetItemParent(ref_item)
    item = sh.GetItemByDataNode(node)
    if not item:
        sh.CreateItem(parent, node)
    else:
        sh.SetItemParent(item, parent)


# -- particles -----------------------------------------------------------------------------------
def _as_points(points: Any, what: str) -> np.ndarray:
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 3 or len(pts) == 0:
        raise InputError(f"{what}: expected points of shape (M, 3), found {pts.shape}")
    if not np.all(np.isfinite(pts)):
        raise InputError(f"{what}: points contain NaN or Inf")
    return pts


def update_markups_from_particles(node: Any, particles_lps: np.ndarray, locked: bool = True) -> Any:
    """Set the control points of a point list from ``(M, 3)`` LPS mm particles (stored as RAS)."""
    vtk = _vtk()
    ras = lps_to_ras(_as_points(particles_lps, node.GetName()))
    was = node.StartModify()
    try:
        node.SetFixedNumberOfControlPoints(False)
        node.RemoveAllControlPoints()
        node.SetControlPointLabelFormat("")  # replaces the deprecated markup label format call
        for p in ras:
            node.AddControlPoint(vtk.vtkVector3d(float(p[0]), float(p[1]), float(p[2])), "")
        node.SetLocked(locked)
        # a locked, fixed-size list cannot be edited by a stray click in the views
        node.SetFixedNumberOfControlPoints(locked)
    finally:
        node.EndModify(was)
    return node


def particles_to_markups(
    scene: Any,
    particles_lps: np.ndarray,
    name: str,
    reference: Any | None = None,
    node: Any | None = None,
    color: tuple[float, float, float] = (1.0, 0.5, 0.2),
) -> Any:
    """A locked, unlabeled point list of ``(M, 3)`` LPS particles (RAS in the node), placed next
    to ``reference`` (Subject Hierarchy + parent transform) when given."""
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
    update_markups_from_particles(node, particles_lps)
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    if display is not None:
        display.SetPointLabelsVisibility(False)
        display.SetPropertiesLabelVisibility(False)
        display.SetSelectedColor(*color)
        display.SetColor(*color)
        display.SetGlyphScale(1.5)
    if reference is not None:
        place_next_to(node, reference)
    return node


def markups_to_particles(node: Any, world: bool = False) -> np.ndarray:
    """Control points as ``(M, 3)`` LPS mm. ``world=False``: the node's local frame (the frame of
    the volume it sits next to); ``world=True``: after its parent transforms."""
    n = node.GetNumberOfControlPoints()
    if n == 0:
        raise InputError(f"point list {node.GetName()!r} has no control points")
    ras = np.zeros((n, 3))
    p = [0.0, 0.0, 0.0]
    for i in range(n):
        if world:
            node.GetNthControlPointPositionWorld(i, p)
        else:
            node.GetNthControlPointPosition(i, p)
        ras[i] = p
    return ras_to_lps(ras)


def markups_to_particles_in_frame_of(node: Any, reference: Any) -> np.ndarray:
    """Control points of ``node`` as ``(M, 3)`` LPS mm in the *local* frame of ``reference``
    (e.g. the volume a prediction is made on): world positions (after ``node``'s parent
    transforms) mapped through the inverse of ``reference``'s parent transforms. Whatever
    transforms the two nodes sit under, the points compare with predictions on ``reference``."""
    slicer = _slicer()
    vtk = _vtk()
    world_lps = markups_to_particles(node, world=True)
    parent = reference.GetParentTransformNode()
    if parent is None:
        return world_lps
    world_to_local = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(None, parent, world_to_local)
    local_ras = np.array([world_to_local.TransformPoint(*map(float, p)) for p in lps_to_ras(world_lps)])
    return ras_to_lps(local_ras)


def point_cloud_polydata(particles_lps: np.ndarray, radius: float, resolution: int = 6) -> Any:
    """Sphere glyphs at each particle, in RAS (``vtkPolyData``). Each glyph carries its particle
    index in the point array ``particle_id`` so per-particle scalars can be mapped onto it."""
    vtk = _vtk()
    from vtk.util import numpy_support as ns

    ras = lps_to_ras(_as_points(particles_lps, "point cloud"))
    pts = vtk.vtkPoints()
    pts.SetData(ns.numpy_to_vtk(np.ascontiguousarray(ras), deep=True))
    src_pd = vtk.vtkPolyData()
    src_pd.SetPoints(pts)
    ids = ns.numpy_to_vtk(np.arange(len(ras), dtype=np.int32), deep=True)
    ids.SetName("particle_id")
    src_pd.GetPointData().AddArray(ids)
    sphere = vtk.vtkSphereSource()
    sphere.SetRadius(radius)
    sphere.SetThetaResolution(resolution)
    sphere.SetPhiResolution(resolution)
    glyph = vtk.vtkGlyph3D()
    glyph.SetInputData(src_pd)
    glyph.SetSourceConnection(sphere.GetOutputPort())
    glyph.ScalingOff()
    glyph.OrientOff()
    glyph.Update()
    out = vtk.vtkPolyData()
    out.DeepCopy(glyph.GetOutput())
    return out


def add_point_cloud_model(
    scene: Any,
    particles_lps: np.ndarray,
    name: str,
    reference: Any | None = None,
    radius: float | None = None,
    node: Any | None = None,
    particle_values: Mapping[str, np.ndarray] | None = None,
) -> Any:
    """A glyph model of the particles (fast for thousands of points). ``radius`` defaults to a
    third of the median nearest-neighbour distance. ``particle_values`` (name -> ``(M,)``) become
    point arrays on the glyphs, ready for :func:`show_scalar_heatmap`."""
    pts = _as_points(particles_lps, name)
    if radius is None:
        from scipy.spatial import cKDTree

        if len(pts) > 1:
            d = cKDTree(pts).query(pts, k=2)[0][:, 1]
            radius = max(float(np.median(d)) / 3.0, 1e-3)
        else:
            radius = 1.0
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLModelNode", name)
    pd = point_cloud_polydata(pts, radius)
    if particle_values:
        from vtk.util import numpy_support as ns

        ids = ns.vtk_to_numpy(pd.GetPointData().GetArray("particle_id"))
        for arr_name, values in particle_values.items():
            vals = np.asarray(values, dtype=np.float64)
            if vals.shape != (len(pts),):
                raise InputError(
                    f"{name}: {arr_name!r} needs one value per particle ({len(pts)}), found {vals.shape}"
                )
            arr = ns.numpy_to_vtk(np.ascontiguousarray(vals[ids]), deep=True)
            arr.SetName(arr_name)
            pd.GetPointData().AddArray(arr)
    node.SetAndObservePolyData(pd)
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    node.GetDisplayNode().SetColor(1.0, 0.5, 0.2)
    if reference is not None:
        place_next_to(node, reference)
    return node


# -- meshes and heatmaps ---------------------------------------------------------------------------
def _flip_vector_arrays(data: Any) -> None:
    """Flip, in place, every floating-point 3-component array of a point/cell data object
    (vectors, normals): the arrays stay the same objects, so the ``Normals``/``Vectors`` and
    active-scalar attributes are kept. Integer 3-component arrays (RGB colours) are left alone."""
    from vtk.util import numpy_support as ns

    for i in range(data.GetNumberOfArrays()):
        arr = data.GetArray(i)
        if arr is None or arr.GetNumberOfComponents() != 3 or arr.GetDataTypeSize() < 4:
            continue
        if arr.GetDataType() not in (_vtk().VTK_FLOAT, _vtk().VTK_DOUBLE):
            continue
        view = ns.vtk_to_numpy(arr)  # shares memory with the VTK array
        view[:, :2] *= -1.0
        arr.Modified()


def polydata_lps_to_ras(mesh: Any) -> Any:
    """A deep copy of ``mesh`` with points and 3-component float point/cell arrays (normals,
    vectors) flipped LPS -> RAS, each exactly once; array attributes (active normals, scalars)
    are kept. (The flip is a rotation by 180° about z, so triangle winding and orientation are
    kept.) The flip is its own inverse, so this is also RAS -> LPS."""
    vtk = _vtk()
    from vtk.util import numpy_support as ns

    out = vtk.vtkPolyData()
    out.DeepCopy(mesh)
    if out.GetPoints() is not None and out.GetNumberOfPoints():
        pts = ns.vtk_to_numpy(out.GetPoints().GetData()).astype(np.float64)
        new = vtk.vtkPoints()
        new.SetData(ns.numpy_to_vtk(np.ascontiguousarray(lps_to_ras(pts)), deep=True))
        out.SetPoints(new)
    _flip_vector_arrays(out.GetPointData())
    _flip_vector_arrays(out.GetCellData())
    out.Modified()
    return out


polydata_ras_to_lps = polydata_lps_to_ras


def add_mesh_model(
    scene: Any,
    mesh_lps: Any,
    name: str,
    reference: Any | None = None,
    point_arrays: Mapping[str, np.ndarray] | None = None,
    node: Any | None = None,
    color: tuple[float, float, float] = (0.9, 0.85, 0.75),
) -> Any:
    """A model node from an LPS ``vtkPolyData`` (stored in RAS), with extra per-vertex scalar
    arrays ``point_arrays`` (``(V,)`` each)."""
    vtk = _vtk()
    from vtk.util import numpy_support as ns

    ras = polydata_lps_to_ras(mesh_lps)
    for arr_name, values in (point_arrays or {}).items():
        vals = np.asarray(values, dtype=np.float64)
        if vals.shape != (ras.GetNumberOfPoints(),):
            raise InputError(
                f"model {name!r}: array {arr_name!r} has shape {vals.shape}, "
                f"expected ({ras.GetNumberOfPoints()},) (one value per vertex)"
            )
        arr = ns.numpy_to_vtk(np.ascontiguousarray(vals), deep=True, array_type=vtk.VTK_DOUBLE)
        arr.SetName(arr_name)
        ras.GetPointData().AddArray(arr)
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLModelNode", name)
    node.SetAndObservePolyData(ras)
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    node.GetDisplayNode().SetColor(*color)
    if reference is not None:
        place_next_to(node, reference)
    return node


def model_to_polydata_lps(node: Any) -> Any:
    """The model's mesh in LPS mm (local frame), as a new ``vtkPolyData``."""
    pd = node.GetPolyData()
    if pd is None or pd.GetNumberOfPoints() == 0:
        raise InputError(f"model {node.GetName()!r} has no mesh")
    return polydata_ras_to_lps(pd)


def surface_to_segmentation(
    scene: Any,
    model_node: Any,
    name: str,
    reference: Any | None = None,
    node: Any | None = None,
    color: tuple[float, float, float] = (0.9, 0.85, 0.75),
) -> Any:
    """A segmentation whose single segment is the model's surface as its closed-surface source
    representation (editable in Segment Editor, measurable in Segment Statistics). The mesh is
    copied without its scalar arrays; ``node`` is reused (its segments replaced) when given."""
    vtk = _vtk()
    pd = model_node.GetPolyData()
    if pd is None or pd.GetNumberOfPoints() == 0:
        raise InputError(f"model {model_node.GetName()!r} has no mesh to turn into a segmentation")
    surface = vtk.vtkPolyData()
    surface.SetPoints(pd.GetPoints())
    surface.SetPolys(pd.GetPolys())
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    segmentation = node.GetSegmentation()
    segmentation.RemoveAllSegments()
    # Slicer >= 5.4 names it "source" representation; older releases "master"
    to_closed = (
        getattr(node, "SetSourceRepresentationToClosedSurface", None)
        or node.SetMasterRepresentationToClosedSurface
    )
    to_closed()
    node.AddSegmentFromClosedSurfaceRepresentation(surface, name, list(color))
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    node.GetDisplayNode().SetVisibility(False)  # the coloured model shows the same surface
    if reference is not None:
        place_next_to(node, reference)
    return node


def show_surface_over_slices(model_node: Any, opacity: float = 0.7) -> None:
    """Semi-transparent in 3D (the image slices show through) and drawn as an outline in the
    slice views, so the prediction can be checked against the image."""
    display = model_node.GetDisplayNode()
    if display is None:
        model_node.CreateDefaultDisplayNodes()
        display = model_node.GetDisplayNode()
    display.SetOpacity(float(opacity))
    display.SetVisibility2D(True)
    display.SetSliceIntersectionThickness(2)


# Perceptually uniform viridis (sequential: errors, magnitudes), magma (predicted uncertainty) and a
# blue-white-red diverging map
# (signed values: inward < 0 < outward). slicer-core ships no colour files, so the control points
# live here; inside Slicer the same procedural nodes are used for identical pictures.
_COLORMAPS: dict[str, list[tuple[float, float, float, float]]] = {
    "viridis": [
        (0.000, 0.267, 0.005, 0.329),
        (0.125, 0.283, 0.141, 0.458),
        (0.250, 0.254, 0.265, 0.530),
        (0.375, 0.207, 0.372, 0.553),
        (0.500, 0.164, 0.471, 0.558),
        (0.625, 0.128, 0.567, 0.551),
        (0.750, 0.135, 0.659, 0.518),
        (0.875, 0.478, 0.821, 0.318),
        (1.000, 0.993, 0.906, 0.144),
    ],
    "magma": [  # predicted uncertainty: a different map from the error's, same conventions
        (0.000, 0.001, 0.000, 0.014),
        (0.125, 0.113, 0.065, 0.277),
        (0.250, 0.317, 0.072, 0.485),
        (0.375, 0.513, 0.148, 0.508),
        (0.500, 0.716, 0.215, 0.475),
        (0.625, 0.904, 0.320, 0.388),
        (0.750, 0.987, 0.536, 0.382),
        (0.875, 0.997, 0.770, 0.535),
        (1.000, 0.987, 0.991, 0.750),
    ],
    "coolwarm": [
        (0.00, 0.230, 0.299, 0.754),
        (0.25, 0.552, 0.690, 0.996),
        (0.50, 0.865, 0.865, 0.865),
        (0.75, 0.958, 0.603, 0.482),
        (1.00, 0.706, 0.016, 0.150),
    ],
}


def color_node(scene: Any, colormap: str, n_colors: int = 256) -> Any:
    """The shared colour table ``DeepSSM <colormap>`` (created once per scene, ``n_colors``
    entries sampled from the control points above; the display node's scalar range maps onto it)."""
    if colormap not in _COLORMAPS:
        raise InputError(f"unknown colour map {colormap!r}; expected one of {sorted(_COLORMAPS)}")
    name = f"DeepSSM {colormap}"
    existing = scene.GetFirstNodeByName(name)
    if existing is not None and existing.IsA("vtkMRMLColorTableNode"):
        return existing
    stops = np.asarray(_COLORMAPS[colormap])
    x = np.linspace(0.0, 1.0, n_colors)
    rgb = np.stack([np.interp(x, stops[:, 0], stops[:, c]) for c in (1, 2, 3)], axis=1)
    node = scene.AddNewNodeByClass("vtkMRMLColorTableNode", name)
    node.SetTypeToUser()
    node.SetNumberOfColors(n_colors)
    node.GetLookupTable().SetTableRange(0, n_colors - 1)
    for i, (r, g, b) in enumerate(rgb):
        node.SetColor(i, f"{colormap} {i}", float(r), float(g), float(b), 1.0)
    node.SetAttribute("Category", "DeepSSM")
    return node


def robust_range(values: np.ndarray, symmetric: bool = False) -> tuple[float, float]:
    """Colour range of a heatmap: the 2nd-98th percentiles of the finite ``values`` (one outlier
    vertex must not wash the whole map into one colour); ``symmetric`` gives ``(-m, m)`` with ``m``
    the 98th percentile of ``|values|``, so 0 sits at the centre of a diverging map. A constant
    map (to rounding) gets ``(value, value + 1)``: one colour, the low end."""
    vals = np.asarray(values, dtype=np.float64).ravel()
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        return (-1.0, 1.0) if symmetric else (0.0, 1.0)
    if symmetric:
        m = float(np.percentile(np.abs(vals), 98)) or 1.0
        return (-m, m)
    lo, hi = float(np.percentile(vals, 2)), float(np.percentile(vals, 98))
    # a constant map (up to rounding: interpolated onto vertices) is one colour, not amplified noise
    return (lo, hi) if hi - lo > 1e-9 * max(1.0, abs(lo), abs(hi)) else (lo, lo + 1.0)


def show_scalar_heatmap(
    model_node: Any,
    array_name: str,
    colormap: str = "viridis",
    scalar_range: tuple[float, float] | None = None,
    symmetric: bool = False,
    title: str | None = None,
) -> Any:
    """Colour ``model_node`` by its point array ``array_name`` and add a colour legend; returns
    the legend display node. The default range spans the 2nd-98th percentiles (values beyond are
    clamped to the end colours); ``symmetric`` centres it on 0 (for signed maps)."""
    slicer = _slicer()
    from vtk.util import numpy_support as ns

    pd = model_node.GetPolyData()
    arr = pd.GetPointData().GetArray(array_name) if pd is not None else None
    if arr is None:
        raise InputError(f"model {model_node.GetName()!r} has no point array {array_name!r}")
    if scalar_range is None:
        scalar_range = robust_range(ns.vtk_to_numpy(arr), symmetric)
    scene = _scene_of(model_node)
    cnode = color_node(scene, colormap)
    display = model_node.GetDisplayNode()
    if display is None:
        model_node.CreateDefaultDisplayNodes()
        display = model_node.GetDisplayNode()
    display.SetActiveScalar(array_name, _vtk().vtkAssignAttribute.POINT_DATA)
    display.SetAndObserveColorNodeID(cnode.GetID())
    display.SetScalarRangeFlag(slicer.vtkMRMLDisplayNode.UseManualScalarRange)
    display.SetScalarRange(float(scalar_range[0]), float(scalar_range[1]))
    display.SetScalarVisibility(True)
    legend = slicer.vtkSlicerColorLogic.AddDefaultColorLegendDisplayNode(model_node)
    if legend is None:
        raise InputError(f"could not create a colour legend for {model_node.GetName()!r}")
    legend.SetTitleText(title or array_name)
    legend.SetSize(0.12, 0.45)  # fraction of the view: readable without covering the anatomy
    legend.SetLabelFormat("%.3g")  # the default %.1f repeats labels on sub-millimetre ranges
    legend.SetVisibility(True)
    return legend


# -- tables and plots -----------------------------------------------------------------------------
def update_table(table_node: Any, columns: Mapping[str, Sequence[Any]]) -> Any:
    """Replace the table's content with ``columns`` (name -> equal-length values; numbers become
    double columns, anything else string columns)."""
    vtk = _vtk()
    lengths = {name: len(values) for name, values in columns.items()}
    if len(set(lengths.values())) > 1:
        raise InputError(f"table {table_node.GetName()!r}: columns differ in length {lengths}")
    table = vtk.vtkTable()
    for name, values in columns.items():
        vals = list(values)
        numeric = all(isinstance(v, int | float | np.integer | np.floating) for v in vals)
        arr = vtk.vtkDoubleArray() if numeric else vtk.vtkStringArray()
        arr.SetName(name)
        arr.SetNumberOfValues(len(vals))
        for i, v in enumerate(vals):
            arr.SetValue(i, float(v) if numeric else str(v))
        table.AddColumn(arr)
    table_node.SetAndObserveTable(table)
    return table_node


def table_columns(table_node: Any) -> dict[str, list[Any]]:
    """The table as ``{column name: list of values}``."""
    table = table_node.GetTable()
    out: dict[str, list[Any]] = {}
    for c in range(table.GetNumberOfColumns()):
        col = table.GetColumn(c)
        out[col.GetName()] = [col.GetValue(r) for r in range(table.GetNumberOfRows())]
    return out


def append_table_row(table_node: Any, row: Mapping[str, float]) -> None:
    """Append one row (missing columns get NaN) — used for live training curves."""
    table = table_node.GetTable()
    n = table.GetNumberOfRows()
    table.InsertNextBlankRow(float("nan"))
    for c in range(table.GetNumberOfColumns()):
        col = table.GetColumn(c)
        if col.GetName() in row:
            col.SetValue(n, float(row[col.GetName()]))
    table.Modified()
    table_node.Modified()


def descriptor_table(
    scene: Any,
    descriptor: Sequence[float],
    kind: str,
    name: str,
    severity: float | None = None,
    reference: Any | None = None,
    node: Any | None = None,
) -> Any:
    """A two-column table (quantity, value): PCA scores (mm) or latent values, then the
    Mahalanobis severity when known."""
    label = "PC" if kind == "pca" else "z"
    names = [f"{label}{i + 1}" for i in range(len(descriptor))]
    values = [float(v) for v in descriptor]
    if severity is not None:
        names.append("severity (Mahalanobis)")
        values.append(float(severity))
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    update_table(node, {"quantity": names, "value": values})
    node.SetAttribute("DeepSSM.descriptorKind", kind)
    if reference is not None:
        place_next_to(node, reference)
    return node


def point_value_table(
    scene: Any,
    particles_lps: np.ndarray,
    values: Mapping[str, Sequence[float]],
    name: str,
    reference: Any | None = None,
    node: Any | None = None,
) -> Any:
    """One row per particle: its index, R, A, S (mm, the node frame) and each of ``values``
    (column name with units -> ``(M,)``), so a heatmap can be read as numbers and sorted."""
    pts = _as_points(particles_lps, name)
    ras = lps_to_ras(pts)
    columns: dict[str, Sequence[Any]] = {
        "particle": [float(i) for i in range(len(pts))],
        "R (mm)": ras[:, 0].tolist(),
        "A (mm)": ras[:, 1].tolist(),
        "S (mm)": ras[:, 2].tolist(),
    }
    for col, vals in values.items():
        arr = np.asarray(vals, dtype=np.float64)
        if arr.shape != (len(pts),):
            raise InputError(f"{name}: {col!r} needs one value per particle ({len(pts)}), found {arr.shape}")
        columns[col] = arr.tolist()
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    update_table(node, columns)
    if reference is not None:
        place_next_to(node, reference)
    return node


def _table_layouts() -> tuple[int, ...]:
    L = _slicer().vtkMRMLLayoutNode
    return (L.SlicerLayoutFourUpTableView, L.SlicerLayout3DTableView, L.SlicerLayoutFourUpPlotTableView)


def show_table_in_layout(app_logic: Any, table_node: Any) -> None:
    """Show ``table_node`` in a table view: switch to the four-up table layout unless the current
    layout already has a table view (selecting a table shows nothing in a layout without one)."""
    scene = _scene_of(table_node)
    layout = scene.GetFirstNodeByClass("vtkMRMLLayoutNode")
    if layout is not None and layout.GetViewArrangement() not in _table_layouts():
        layout.SetViewArrangement(_slicer().vtkMRMLLayoutNode.SlicerLayoutFourUpTableView)
    selection = app_logic.GetSelectionNode()
    if selection is not None:
        selection.SetActiveTableID(table_node.GetID())
        app_logic.PropagateTableSelection()


@dataclass
class Chart:
    """A plot chart fed by one table: the series share the table's x column."""

    table: Any
    chart: Any
    series: dict[str, Any]


def plot_chart(
    scene: Any,
    name: str,
    x_column: str,
    y_columns: Sequence[str],
    title: str = "",
    y_label: str = "",
    table: Any | None = None,
) -> Chart:
    """Table + one line series per ``y_columns`` + a chart (reuses ``table`` when given, else
    creates an empty one with those columns)."""
    slicer = _slicer()
    if table is None:
        table = scene.AddNewNodeByClass("vtkMRMLTableNode", f"{name} table")
        update_table(table, {c: [] for c in [x_column, *y_columns]})
    chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", name)
    chart.SetTitle(title or name)
    chart.SetXAxisTitle(x_column)
    chart.SetYAxisTitle(y_label)
    series: dict[str, Any] = {}
    for col in y_columns:
        s = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", f"{name} {col}")
        s.SetAndObserveTableNodeID(table.GetID())
        s.SetXColumnName(x_column)
        s.SetYColumnName(col)
        s.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
        s.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone)
        chart.AddAndObservePlotSeriesNodeID(s.GetID())
        series[col] = s
    return Chart(table, chart, series)


# -- prediction results ----------------------------------------------------------------------------
@dataclass
class PredictionNodes:
    """The nodes that show one prediction (any may be None when not produced)."""

    particles: Any = None
    point_cloud: Any = None
    surface: Any = None
    segmentation: Any = None
    descriptor: Any = None
    values: Any = None
    legends: dict[str, Any] | None = None

    NODE_FIELDS = ("particles", "point_cloud", "surface", "segmentation", "descriptor", "values")

    def only_in(self, scene: Any) -> PredictionNodes:
        """A copy that keeps only the nodes still in ``scene`` (removed ones become None)."""
        return PredictionNodes(**{f: in_scene(getattr(self, f), scene) for f in self.NODE_FIELDS})


HEATMAPS = {
    # array name -> (colour map, symmetric range, legend title with units); the order is the
    # default preference when the user asks for "auto"
    "error_mm": ("viridis", False, "Error (mm)"),
    "uncertainty_mm": ("magma", False, "Uncertainty (mm)"),
    "severity_signed": ("coolwarm", True, "Severity (SD, + outward)"),
}

#: the module's "Colour by" choices -> array name (None: the first available of HEATMAPS)
HEATMAP_CHOICES = {
    "auto": None,
    "error": "error_mm",
    "uncertainty": "uncertainty_mm",
    "severity": "severity_signed",
}

#: table column (with units) for each per-particle array of a result
VALUE_COLUMNS = {
    "error_mm": "error (mm)",
    "uncertainty_mm": "uncertainty (mm)",
    "severity_signed": "severity (SD, signed)",
}


def _point_arrays(node: Any) -> set[str]:
    pd = node.GetPolyData() if node is not None else None
    if pd is None:
        return set()
    data = pd.GetPointData()
    return {data.GetArrayName(i) for i in range(data.GetNumberOfArrays())}


def apply_heatmap(nodes: PredictionNodes, choice: str | None = None) -> str | None:
    """Colour the prediction's surface and point cloud by the heatmap ``choice`` (a key of
    :data:`HEATMAP_CHOICES` or an array name of :data:`HEATMAPS`; None/"auto": the first
    available). A choice the result lacks (uncertainty from a bundle without it) falls back to the
    first available one. Returns the array shown, or None when there is none (plain colours).

    The surface gets the legend; the point cloud uses the same colour map and range, so a glyph
    and the surface under it show the same colour for the same value."""
    if choice is not None and choice not in HEATMAP_CHOICES and choice not in HEATMAPS:
        raise InputError(f"unknown heatmap {choice!r}; expected one of {sorted(HEATMAP_CHOICES)}")
    wanted = HEATMAP_CHOICES.get(choice, choice) if choice is not None else None
    carriers = [n for n in (nodes.surface, nodes.point_cloud) if n is not None]
    available = [a for a in HEATMAPS if carriers and a in _point_arrays(carriers[0])]
    chosen = wanted if wanted in available else (available[0] if available else None)
    nodes.legends = {}
    for node in carriers:
        display = node.GetDisplayNode()
        if chosen is None:
            if display is not None:
                display.SetScalarVisibility(False)
            legend = _existing_legend(node)
            if legend is not None:
                legend.SetVisibility(False)
    if chosen is None:
        return None
    cmap, symmetric, title = HEATMAPS[chosen]
    from vtk.util import numpy_support as ns

    first = carriers[0]
    value_range = robust_range(
        ns.vtk_to_numpy(first.GetPolyData().GetPointData().GetArray(chosen)), symmetric
    )
    for node in carriers:
        legend = show_scalar_heatmap(node, chosen, cmap, value_range, symmetric, title)
        if node is first:
            nodes.legends[chosen] = legend
        else:
            legend.SetVisibility(False)  # one legend per view: the surface's
    return chosen


def _existing_legend(node: Any) -> Any:
    slicer = _slicer()
    return slicer.vtkSlicerColorLogic.GetColorLegendDisplayNode(node)


def show_prediction(
    scene: Any,
    volume_node: Any,
    result: Mapping[str, Any],
    nodes: PredictionNodes | None = None,
    heatmap: str | None = None,
) -> PredictionNodes:
    """Load a worker result (``result.json`` content, LPS files) into nodes next to ``volume_node``.

    Reuses those of ``nodes`` that are still in ``scene`` (re-running updates in place; nodes
    deleted by the user or by Close Scene are created anew). ``heatmap`` picks the array shown on
    the surface and the point cloud (see :func:`apply_heatmap`; default: the first available).

    Outputs: a locked point list of the particles (plus a glyph model when there are many), the
    surface model (heatmap, semi-transparent, outlined in the slice views) and the same surface as
    a closed-surface segmentation, the descriptor table and a per-particle value table.
    """
    from DeepSSMLogic import io

    nodes = nodes.only_in(scene) if nodes is not None else PredictionNodes()
    base = volume_node.GetName()
    particles = io.read_particles(result["particles"])
    nodes.particles = particles_to_markups(
        scene, particles, f"{base} DeepSSM particles", reference=volume_node, node=nodes.particles
    )
    arrays = {
        k: np.asarray(v, dtype=np.float64)
        for k, v in (result.get("point_arrays") or {}).items()
        if len(v) == len(particles)
    }
    # glyphs for many particles, or to carry a heatmap when there is no surface to show it on
    if len(particles) >= POINT_CLOUD_THRESHOLD or (
        not result.get("mesh") and any(a in HEATMAPS for a in arrays)
    ):
        nodes.point_cloud = add_point_cloud_model(
            scene,
            particles,
            f"{base} DeepSSM point cloud",
            reference=volume_node,
            node=nodes.point_cloud,
            particle_values=arrays,
        )
        nodes.particles.GetDisplayNode().SetVisibility3D(False)
    nodes.legends = {}
    if result.get("mesh"):
        nodes.surface = add_mesh_model(
            scene,
            io.read_mesh(result["mesh"]),
            f"{base} DeepSSM surface",
            reference=volume_node,
            node=nodes.surface,
        )
        show_surface_over_slices(nodes.surface)
        nodes.segmentation = surface_to_segmentation(
            scene,
            nodes.surface,
            f"{base} DeepSSM segmentation",
            reference=volume_node,
            node=nodes.segmentation,
        )
    apply_heatmap(nodes, heatmap)
    per_particle = {VALUE_COLUMNS.get(k, k): v for k, v in arrays.items()}
    nodes.values = point_value_table(
        scene, particles, per_particle, f"{base} DeepSSM values", reference=volume_node, node=nodes.values
    )
    nodes.descriptor = descriptor_table(
        scene,
        result.get("descriptor") or [],
        str(result.get("descriptor_kind", "pca")),
        f"{base} DeepSSM descriptor",
        severity=result.get("severity"),
        reference=volume_node,
        node=nodes.descriptor,
    )
    return nodes
