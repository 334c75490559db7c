"""Bundle + image → particles in the INPUT image's physical space (LPS mm) and a shape descriptor.

Steps per image: validate → align to the model frame (rigid or similarity registration of the
input onto the bundle's reference image, in memory, multi-resolution, no clamp on translation; the
metric compares high-passed intensities in a band around the bundle's mean shape; skippable with
``align=False``) → resample onto the reference grid through that transform →
normalise with the TRAINING normaliser stored in the bundle → forward → map the particles back
through the transform.

The alignment transform ``T`` maps model-frame points (the reference grid's physical space) to
input-image points; it is what ITK resampling needs (grid point → input point) and what maps the
predicted particles back (``p_input = T(p_model)``). ``Prediction.alignment.matrix`` is ``T`` as
a 4x4 homogeneous matrix.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .bundle import Bundle, load_bundle
from .errors import BundleError, InputError, IntensityRangeWarning
from .geometry import Grid
from .progress import CancelToken, ProgressCallback, ProgressEvent, null_progress

PathLike = str | os.PathLike[str]
TRANSFORMS = ("rigid", "similarity")
METRICS = ("correlation", "mattes")


@dataclass
class Alignment:
    """``matrix`` 4x4 maps model-frame LPS mm → input-image LPS mm; ``transform`` is the same as a
    SimpleITK ``AffineTransform``; ``kind`` is "rigid", "similarity" or "none"."""

    matrix: np.ndarray
    transform: Any
    kind: str
    metric_value: float | None = None
    initialisation: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "matrix_model_to_input": np.asarray(self.matrix, dtype=np.float64).tolist(),
            "metric_value": self.metric_value,
            "initialisation": self.initialisation,
        }


@dataclass
class Prediction:
    """``particles`` ``(M, 3)`` float64 mm, LPS, input image space; ``particles_model`` the same in
    the model frame; ``descriptor`` ``(K,)`` (PCA scores in mm, or the TL latent code)."""

    particles: np.ndarray
    descriptor: np.ndarray
    descriptor_kind: str
    alignment: Alignment
    timings: dict[str, float] = field(default_factory=dict)
    particles_model: np.ndarray | None = None
    source: str = ""
    #: ``(M,)`` mm per particle (None: the bundle has no uncertainty); see ``uncertainty.py``
    uncertainty: np.ndarray | None = None
    uncertainty_method: str | None = None
    #: ``{"score", "threshold", "flag", "reasons", "components"}`` (None: the bundle has no calibration)
    ood: dict[str, Any] | None = None

    def uncertainty_dict(self) -> dict[str, Any] | None:
        if self.uncertainty is None:
            return None
        u = np.asarray(self.uncertainty, dtype=np.float64)
        return {"per_particle_mm": u.tolist(), "mean_mm": float(u.mean()), "method": self.uncertainty_method}

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "n_particles": int(self.particles.shape[0]),
            "descriptor_kind": self.descriptor_kind,
            "descriptor": np.asarray(self.descriptor, dtype=np.float64).tolist(),
            "alignment": self.alignment.to_dict(),
            "timings_s": {k: round(float(v), 6) for k, v in self.timings.items()},
            "uncertainty": self.uncertainty_dict(),
            "ood": self.ood,
        }


# -- geometry helpers -------------------------------------------------------------------------------
def transform_to_matrix(transform: Any) -> np.ndarray:
    """4x4 homogeneous matrix of an affine SimpleITK transform (exact for rigid/similarity/affine)."""
    basis = np.vstack([np.zeros(3), np.eye(3)])
    mapped = np.asarray([transform.TransformPoint(tuple(float(v) for v in p)) for p in basis])
    m = np.eye(4)
    m[:3, 3] = mapped[0]
    m[:3, :3] = (mapped[1:] - mapped[0]).T
    return m


def matrix_to_transform(matrix: np.ndarray) -> Any:
    """SimpleITK ``AffineTransform`` of a 4x4 homogeneous matrix."""
    import SimpleITK as sitk

    m = np.asarray(matrix, dtype=np.float64)
    tx = sitk.AffineTransform(3)
    tx.SetMatrix(tuple(m[:3, :3].ravel()))
    tx.SetTranslation(tuple(m[:3, 3]))
    return tx


def apply_matrix(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 4x4 matrix to points ``(..., 3)``."""
    p = np.asarray(points, dtype=np.float64)
    return p @ matrix[:3, :3].T + matrix[:3, 3]


def _physical_extent(grid: Grid) -> np.ndarray:
    return np.asarray(grid.size, dtype=np.float64) * np.asarray(grid.spacing)


def _foreground_centroid(image: Any) -> np.ndarray | None:
    """Physical centroid of the Otsu foreground of a (shrunk) image, or None when empty."""
    import SimpleITK as sitk

    small = image
    shrink = [max(1, int(s // 32)) for s in image.GetSize()]
    if max(shrink) > 1:
        small = sitk.Shrink(image, shrink)
    mask = sitk.OtsuThreshold(small, 0, 1)
    arr = sitk.GetArrayViewFromImage(mask)
    idx = np.argwhere(arr > 0)
    if idx.size == 0:
        return None
    grid = Grid.from_sitk(small)
    return grid.index_to_physical(idx[:, ::-1].astype(np.float64).mean(axis=0))


def _axis_aligned_array(image: Any, spacing: float, pad_mm: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """``image`` resampled (linear) onto the axis-aligned grid at ``spacing`` mm covering its physical
    extent plus ``pad_mm`` (filled with its minimum): ``(array (Z, Y, X) float32, grid origin (3,) mm)``."""
    import SimpleITK as sitk

    g = Grid.from_sitk(image)
    corners = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], dtype=np.float64)
    phys = g.index_to_physical(corners * (np.asarray(g.size, dtype=np.float64) - 1))
    lo, hi = phys.min(axis=0) - pad_mm, phys.max(axis=0) + pad_mm
    size = [int(v) for v in np.ceil((hi - lo) / spacing).astype(int) + 1]
    background = float(sitk.GetArrayViewFromImage(image).min())
    out = sitk.Resample(
        image,
        size,
        sitk.Transform(),
        sitk.sitkLinear,
        tuple(lo),
        (spacing,) * 3,
        (1, 0, 0, 0, 1, 0, 0, 0, 1),
        background,
    )
    return sitk.GetArrayFromImage(out).astype(np.float32), lo


def content_translation(fixed: Any, moving: Any, max_voxels: int = 64**3) -> np.ndarray | None:
    """Translation ``t`` (mm, LPS; a fixed point ``p`` lies at ``p + t`` in ``moving``) that best
    matches ``fixed`` inside ``moving`` by normalised cross-correlation over every shift (FFT), at a
    coarse spacing. Finds the anatomy from the image content wherever the scanner put it (origins
    hundreds of mm away, large fields of view); small rotations (a few degrees) barely lower the peak.
    None when the images are too small or flat to correlate."""
    from scipy.signal import fftconvolve

    fg, mg = Grid.from_sitk(fixed), Grid.from_sitk(moving)
    f_extent = np.asarray(fg.size, dtype=np.float64) * np.asarray(fg.spacing)
    m_extent = np.asarray(mg.size, dtype=np.float64) * np.asarray(mg.spacing)
    spacing = max(max(fg.spacing), max(mg.spacing), float(np.cbrt(np.prod(m_extent + f_extent) / max_voxels)))
    f, f_origin = _axis_aligned_array(fixed, spacing)
    # pad the input by half the reference so an anatomy cut by the field of view still matches
    m, m_origin = _axis_aligned_array(moving, spacing, pad_mm=float(f_extent.max()) / 2.0)
    if min(f.shape) < 2 or any(a < b for a, b in zip(m.shape, f.shape)):
        return None
    f0 = f - f.mean()
    f_norm = float(np.sqrt((f0**2).sum()))
    if f_norm == 0.0:
        return None
    n = f.size
    ones = np.ones_like(f)
    num = fftconvolve(m, f0[::-1, ::-1, ::-1], mode="valid")
    s1 = fftconvolve(m, ones, mode="valid")
    s2 = fftconvolve(m * m, ones, mode="valid")
    var = np.maximum(s2 - s1 * s1 / n, 1e-6 * max(float(s2.max()), 1e-12))
    ncc = num / (f_norm * np.sqrt(var))
    z, y, x = np.unravel_index(int(np.argmax(ncc)), ncc.shape)
    return m_origin + np.array([x, y, z], dtype=np.float64) * spacing - f_origin


def _highpass(image: Any, sigma_mm: float) -> Any:
    """``image`` minus its Gaussian blur (σ mm): drops smooth intensity bias, keeps the edges."""
    import SimpleITK as sitk

    return image - sitk.SmoothingRecursiveGaussian(image, sigma_mm)


def anatomy_mask(points: np.ndarray, reference: Any, margin_mm: float) -> Any:
    """uint8 mask on ``reference``'s grid of the voxels whose centre lies within ``margin_mm`` of
    ``points`` ``(M, 3)`` (mm, LPS; the model's mean shape): the band around the anatomy's surface,
    where its edges are, without neighbouring structures and most of the background."""
    import SimpleITK as sitk
    from scipy.spatial import cKDTree

    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 3 or not np.all(np.isfinite(pts)):
        raise InputError(f"anatomy mask: points must be finite (M, 3) mm, found shape {pts.shape}")
    grid = Grid.from_sitk(reference)
    # distances in index space scaled by the spacing equal physical ones (the direction is a rotation)
    sp = np.asarray(grid.spacing, dtype=np.float64)
    tree = cKDTree(grid.physical_to_index(pts) * sp)
    xyz = np.indices(grid.size, dtype=np.float64).reshape(3, -1).T * sp
    dist, _ = tree.query(xyz, k=1, distance_upper_bound=margin_mm * (1 + 1e-9))
    inside = (dist <= margin_mm).reshape(grid.size).transpose(2, 1, 0)  # (X, Y, Z) → (Z, Y, X)
    if not inside.any():
        raise InputError("anatomy mask: the mean shape does not lie on the reference grid")
    mask = sitk.GetImageFromArray(inside.astype(np.uint8))
    mask.CopyInformation(reference)
    return mask


def _crop_to_reach(moving: Any, fixed_grid: Grid, transform: Any, margin_mm: float) -> Any:
    """``moving`` cropped to the box that ``transform`` maps the fixed grid to, plus ``margin_mm``."""
    import SimpleITK as sitk

    corners_idx = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], dtype=np.float64)
    corners_idx *= np.asarray(fixed_grid.size, dtype=np.float64) - 1
    corners = fixed_grid.index_to_physical(corners_idx)
    mapped = np.asarray([transform.TransformPoint(tuple(float(v) for v in c)) for c in corners])
    lo, hi = mapped.min(axis=0) - margin_mm, mapped.max(axis=0) + margin_mm
    box = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    mg = Grid.from_sitk(moving)
    idx = mg.physical_to_index(box)
    size = np.asarray(mg.size)
    start = np.clip(np.floor(idx.min(axis=0)).astype(int), 0, size - 1)
    stop = np.clip(np.ceil(idx.max(axis=0)).astype(int) + 1, 1, size)
    extent = stop - start
    if np.any(extent < 4) or np.prod(extent) > 0.8 * np.prod(size):
        return moving
    return sitk.RegionOfInterest(moving, [int(v) for v in extent], [int(v) for v in start])


# -- registration -----------------------------------------------------------------------------------
@dataclass
class RegistrationSettings:
    """Multi-resolution settings; defaults favour speed (≈0.2–0.5 s on 2 cores for ~10⁵–10⁶ voxels)."""

    transform: str = "rigid"
    metric: str = "correlation"
    shrink_factors: tuple[int, ...] = (4, 2, 1)
    smoothing_sigmas: tuple[float, ...] = (2.0, 1.0, 0.0)  # voxels at each level
    iterations: int = 200
    max_samples: int = 20_000  # metric samples per level (all voxels when fewer)
    min_step: float = 1e-4
    max_voxels: int = 60_000  # larger references are block-averaged to about this size
    crop_margin_mm: float = 25.0  # input kept around the reference's reach (translation search room)
    seed: int = 7
    # both images minus their Gaussian blur of this σ (mm) before the metric: a smooth intensity bias
    # (MR/CT shading) otherwise pulls the pose by millimetres; None: raw intensities
    highpass_mm: float | None = 6.0
    # the metric only sees voxels within this distance (mm) of the model's mean shape when the caller
    # passes the mean shape (Predictor does): neighbouring structures and background are ignored
    anatomy_margin_mm: float | None = 6.0


def register_to_reference(
    moving: Any,
    fixed: Any,
    settings: RegistrationSettings | None = None,
    anatomy: np.ndarray | None = None,
) -> Alignment:
    """Register ``moving`` (the input) onto ``fixed`` (the bundle's reference image).

    Initial pose: the best (by the metric on the coarsest level) of the identity (data already
    in the model frame), a translation matching Otsu-foreground centroids (moments) and the
    translation found by correlating the reference over the whole input (content; see
    :func:`content_translation`). Any offset is handled: there is no clamp. ``anatomy``: the model's mean shape ``(M, 3)`` (mm, LPS, the
    fixed image's frame); with ``settings.anatomy_margin_mm`` the metric is restricted to the band
    around it (see :func:`anatomy_mask`). Returns the fixed→moving transform as an :class:`Alignment`.
    """
    import SimpleITK as sitk

    s = settings or RegistrationSettings()
    if s.transform not in TRANSFORMS:
        raise InputError(f"alignment transform must be one of {TRANSFORMS}, found {s.transform!r}")
    if s.metric not in METRICS:
        raise InputError(f"alignment metric must be one of {METRICS}, found {s.metric!r}")
    fixed = sitk.Cast(fixed, sitk.sitkFloat32)
    moving = sitk.Cast(moving, sitk.sitkFloat32)
    n_voxels = float(np.prod(fixed.GetSize()))
    if n_voxels > s.max_voxels:
        # a rigid pose is found as precisely on a block-averaged reference (sub-voxel with linear
        # interpolation) and ITK's per-iteration cost scales with the fixed image
        f = int(np.ceil((n_voxels / s.max_voxels) ** (1.0 / 3.0)))
        fixed = sitk.BinShrink(fixed, [f] * 3)
    fixed_mask = None
    if anatomy is not None and s.anatomy_margin_mm is not None:
        fixed_mask = anatomy_mask(anatomy, fixed, s.anatomy_margin_mm)

    def make_tx(centre: np.ndarray, translation: np.ndarray) -> Any:
        tx = sitk.Euler3DTransform() if s.transform == "rigid" else sitk.Similarity3DTransform()
        tx.SetCenter(tuple(float(v) for v in centre))
        tx.SetTranslation(tuple(float(v) for v in translation))
        return tx

    n_fixed = float(np.prod(fixed.GetSize()))

    def fraction(shrink: int) -> float:
        return min(1.0, s.max_samples / max(1.0, n_fixed / shrink**3))

    def method(shrinks: Sequence[int], masked: bool = True) -> Any:
        r = sitk.ImageRegistrationMethod()
        if s.metric == "correlation":
            r.SetMetricAsCorrelation()
        else:
            r.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
        fractions = [fraction(f) for f in shrinks]
        if min(fractions) < 1.0:
            # regular (not random) sampling: a noisy gradient stalls the step-size optimiser early
            r.SetMetricSamplingStrategy(r.REGULAR)
            r.SetMetricSamplingPercentagePerLevel(fractions, s.seed)
        r.SetInterpolator(sitk.sitkLinear)
        if masked and fixed_mask is not None:
            r.SetMetricFixedMask(fixed_mask)
        return r

    fixed_grid = Grid.from_sitk(fixed)
    c_fixed = _foreground_centroid(fixed)
    if c_fixed is None:
        c_fixed = fixed_grid.index_to_physical((np.asarray(fixed_grid.size) - 1) / 2.0)
    c_moving = _foreground_centroid(moving)
    candidates = {"identity": make_tx(c_fixed, np.zeros(3))}
    if c_moving is not None:
        candidates["moments"] = make_tx(c_fixed, c_moving - c_fixed)
    t_content = content_translation(fixed, moving)
    if t_content is not None:
        candidates["content"] = make_tx(c_fixed, t_content)

    # no level coarser than ~8 voxels per axis of the (already coarse) reference grid
    levels = [
        (f, sg)
        for f, sg in zip(s.shrink_factors, s.smoothing_sigmas, strict=True)
        if min(fixed.GetSize()) / f >= 8
    ]
    shrinks = [f for f, _ in levels] or [1]
    sigmas = [sg for _, sg in levels] or [0.0]
    coarse = max(shrinks)
    fixed_c = sitk.Shrink(fixed, [coarse] * 3) if coarse > 1 else fixed
    moving_c = sitk.Shrink(moving, [coarse] * 3) if coarse > 1 else moving
    scores: dict[str, float] = {}
    for name, tx in candidates.items():
        # unmasked: far from the fit, the few band samples inside the input can score spuriously well
        r = method([coarse], masked=False)
        r.SetInitialTransform(tx, inPlace=False)
        try:
            scores[name] = float(r.MetricEvaluate(fixed_c, moving_c))
        except RuntimeError:  # no overlap at all with this start
            scores[name] = float("inf")
    start = min(scores, key=lambda k: scores[k])
    if not np.isfinite(scores[start]):
        raise InputError(
            "alignment: the image does not overlap the model's reference image from any starting pose; "
            "is it the right anatomy and a 3D image in physical units (mm)?"
        )

    # only the part of the input the reference can reach matters; cropping it keeps ITK's
    # per-level pyramid and gradient images small for large fields of view
    moving = _crop_to_reach(moving, fixed_grid, candidates[start], margin_mm=s.crop_margin_mm)
    target = min(fixed.GetSpacing())
    factors = [max(1, int(target // sp)) for sp in moving.GetSpacing()]
    if max(factors) > 1:
        moving = sitk.BinShrink(moving, factors)
    if s.highpass_mm is not None:
        fixed, moving = (_highpass(im, s.highpass_mm) for im in (fixed, moving))
    r = method(shrinks)
    r.SetOptimizerAsRegularStepGradientDescent(
        learningRate=2.0,
        minStep=s.min_step,
        numberOfIterations=s.iterations,
        relaxationFactor=0.6,
        gradientMagnitudeTolerance=1e-8,
    )
    r.SetOptimizerScalesFromPhysicalShift()
    r.SetShrinkFactorsPerLevel(shrinks)
    r.SetSmoothingSigmasPerLevel(sigmas)
    r.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    r.SetInitialTransform(candidates[start], inPlace=False)
    try:
        result = r.Execute(fixed, moving)
    except RuntimeError as e:
        raise InputError(f"alignment failed: {str(e).strip().splitlines()[-1]}") from None
    matrix = transform_to_matrix(result)
    return Alignment(
        matrix=matrix,
        transform=matrix_to_transform(matrix),
        kind=s.transform,
        metric_value=float(r.GetMetricValue()),
        initialisation=start,
    )


# -- batching with out-of-memory fallback -------------------------------------------------------------
ForwardFn = Callable[[Any, Any], tuple[Any, ...]]


def run_batched(
    forward: ForwardFn,
    inputs: np.ndarray,
    batch_size: int,
    device: Any,
) -> tuple[Any, ...]:
    """Run ``forward(x (B, 1, Z, Y, X) CPU tensor, device) -> (descriptor (B, K), particles (B, M, 3))``
    over ``inputs`` ``(N, 1, Z, Y, X)`` float32 in batches.

    A CUDA out-of-memory error halves the batch and retries; at batch 1 it falls back to the CPU
    with a warning. Returns ``(descriptors (N, K), particles (N, M, 3), device finally used)``; a
    ``forward`` with further outputs (the per-particle uncertainty ``(B, M)``) gets them concatenated
    too, before the device: ``(descriptors, particles, uncertainty, device)``.
    """
    import torch

    device = torch.device(device)
    n = int(inputs.shape[0])
    bs = max(1, int(batch_size))
    outputs: list[list[np.ndarray]] = []
    i = 0
    while i < n:
        x = torch.from_numpy(np.ascontiguousarray(inputs[i : i + bs]))
        try:
            result = forward(x, device)
        except RuntimeError as err:
            if device.type == "cpu" or not is_out_of_memory(err):
                raise
            out_of_memory = True
        else:
            out_of_memory = False
        if out_of_memory:
            # outside the except clause: the failed batch's tensors (held by the traceback) are
            # released, so the cache can actually be emptied before the retry
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if bs > 1:
                bs //= 2
                continue
            warnings.warn(
                f"out of GPU memory on {device} even at batch size 1; continuing on the CPU (slower)",
                RuntimeWarning,
                stacklevel=2,
            )
            device = torch.device("cpu")
            continue
        if not outputs:
            outputs = [[] for _ in result]
        for store, t in zip(outputs, result, strict=True):
            store.append(np.asarray(t.detach().float().cpu().numpy(), dtype=np.float64))
        i += x.shape[0]
    return (*(np.concatenate(o) for o in outputs), device)


def is_out_of_memory(err: BaseException) -> bool:
    """True for a GPU out-of-memory error: ``torch.cuda.OutOfMemoryError`` from the caching allocator,
    or the plain ``RuntimeError`` that cuBLAS / cuDNN / the CUDA runtime raise when their own
    allocation fails ("CUDA error: out of memory", "CUBLAS_STATUS_ALLOC_FAILED", ...)."""
    import torch

    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    text = str(err)
    return "out of memory" in text.lower() or "ALLOC_FAILED" in text


@contextlib.contextmanager
def exact_fp32_convolutions(device: Any) -> Iterator[None]:
    """On CUDA, cuDNN convolutions in full fp32 for the duration (TF32, PyTorch's default there,
    keeps 10 mantissa bits and moved particles by up to 2e-2 mm in a CPU emulation); elsewhere a no-op.
    Prediction is one or a few volumes, so exactness (CUDA equals CPU within 1e-3 mm) wins."""
    import torch

    if torch.device(device).type != "cuda":
        yield
        return
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = saved


def resolve_device(device: str | Any = "auto") -> Any:
    """``"auto"`` → CUDA when available, else CPU; ``"cuda"`` without a GPU is an InputError."""
    import torch

    if isinstance(device, torch.device):
        return device
    name = str(device).lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device {device!r} requested but no CUDA GPU is available (use --device cpu)")
    try:
        return torch.device(name)
    except RuntimeError:
        raise InputError(f"unknown device {device!r}; expected auto, cpu or cuda[:N]") from None


# -- the predictor ----------------------------------------------------------------------------------
def prediction_files(stem: str, mesh: bool = False) -> list[str]:
    """The files ``deepssm predict`` writes for one image: particles, description, mesh."""
    return [f"{stem}.particles", f"{stem}.json"] + ([f"{stem}.vtk"] if mesh else [])


def is_own_prediction(path: Path) -> bool:
    """Whether ``path`` (``<stem>.particles|.json|.vtk``) belongs to a prediction this command wrote:
    its ``<stem>.json`` names ``<stem>.particles`` as its particles file."""
    from .fileutil import read_json_object

    for suffix in (".particles", ".json", ".vtk"):
        if path.name.endswith(suffix):
            stem = path.name[: -len(suffix)]
            doc = read_json_object(path.parent / f"{stem}.json")
            return doc is not None and doc.get("particles_file") == f"{stem}.particles"
    return False


def check_prediction_outputs(
    out: PathLike, stems: Sequence[str], mesh: bool, overwrite: bool = False
) -> Path:
    """The output-path policy for ``predict`` (before the bundle is loaded): ``out`` is a folder
    (or absent); each image's files may replace earlier predictions, foreign files only with
    ``overwrite``, folders in their way never."""
    from .fileutil import check_output_dir

    names = [name for stem in stems for name in prediction_files(stem, mesh)]
    return check_output_dir(
        out, names, is_own_prediction, overwrite=overwrite, needed_bytes=len(names) * 4096
    )


def warn_if_outside_training_range(array: np.ndarray, normalizer: Any, label: str) -> bool:
    """Warn (:class:`IntensityRangeWarning`) when the image on the reference grid looks unlike the
    training images: its median lies outside the training clip range (the 0.5-99.5 percentiles),
    or its 1-99 percentile range overlaps less than a quarter of that range (different modality,
    units or rescaling). Returns whether it warned."""
    lo, hi = float(normalizer.clip_low), float(normalizer.clip_high)
    sample = np.asarray(array, dtype=np.float32).ravel()[:: max(1, array.size // 1_000_000)]
    p1, med, p99 = (float(v) for v in np.percentile(sample, (1, 50, 99)))
    span = max(hi - lo, 1e-12)
    overlap = max(0.0, min(p99, hi) - max(p1, lo)) / span
    if lo <= med <= hi and overlap >= 0.25:
        return False
    warnings.warn(
        f"{label}: intensities (1-99% {p1:.4g}..{p99:.4g}, median {med:.4g}) lie far outside the "
        f"training range ({lo:.4g}..{hi:.4g}); check the modality and units (the prediction may be poor)",
        IntensityRangeWarning,
        stacklevel=2,
    )
    return True


class Predictor:
    """A resident model: load the bundle once, then predict any number of images.

    ``bundle``: a loaded :class:`Bundle` or a path (directory or .zip); ``device``: "auto", "cpu",
    "cuda"; ``align``: register each input to the reference image (False for images already in
    the model frame); ``registration``: :class:`RegistrationSettings` (rigid by default);
    ``channels_last``: run the network in channels-last 3D memory format (identical results).
    """

    #: inputs whose physical extent along an axis is below this fraction of the reference grid's
    #: are refused: the anatomy cannot be inside them.
    min_extent_fraction = 0.35

    def __init__(
        self,
        bundle: Bundle | PathLike,
        device: str | Any = "auto",
        align: bool = True,
        registration: RegistrationSettings | None = None,
        channels_last: bool = True,
        require_uncertainty: bool = False,
    ) -> None:
        import SimpleITK as sitk
        import torch

        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle, map_location="cpu")
        self.device = resolve_device(device)
        self.align = bool(align)
        self.registration = registration or RegistrationSettings()
        self.grid = self.bundle.grid
        self.normalizer = self.bundle.normalizer
        self.descriptor_kind = self.bundle.descriptor_kind
        self._reference = sitk.Cast(self.bundle.reference_image(), sitk.sitkFloat32)
        self._network = self.bundle.network.eval()
        # channels-last 3D lets oneDNN/cuDNN pick faster conv kernels (same numbers, ~2x on CPU)
        self.channels_last = bool(channels_last)
        if self.channels_last:
            self._network.to(memory_format=torch.channels_last_3d)
        self._network_device = torch.device("cpu")
        self._move_network(self.device)
        self.forward: ForwardFn = self._network_forward
        self._init_trust(require_uncertainty)

    # -- uncertainty and out-of-distribution score (issue 13) -------------------------------------
    def _init_trust(self, require_uncertainty: bool) -> None:
        """What the bundle offers for judging a prediction: its uncertainty method and OOD calibration."""
        import SimpleITK as sitk

        self.uncertainty = self.bundle.uncertainty
        if require_uncertainty and not self.uncertainty.enabled:
            raise InputError(
                f"{self.bundle.path}: this model has no per-particle uncertainty (it was trained with "
                "--uncertainty none or before uncertainty existed); retrain it with --uncertainty "
                "variance, mc-dropout or ensemble, or predict without asking for uncertainty"
            )
        self.ood_calibration = self.bundle.ood_calibration
        self._reference_x = self.normalizer(sitk.GetArrayFromImage(self._reference))

    def image_components(self, raw: np.ndarray, x: np.ndarray) -> dict[str, float]:
        """The image-side OOD components of one prepared image (``ood.image_components``): intensity
        statistics of the resampled raw array, registration quality of the normalised one."""
        from . import ood

        return ood.image_components(
            raw, x, self._reference_x, self.normalizer, self.ood_calibration.intensity
        )

    def assess_ood(
        self, image_parts: dict[str, Any], particles_model: np.ndarray, uncertainty: np.ndarray | None
    ) -> dict[str, Any] | None:
        """The ``"ood"`` verdict of one prediction (None when the bundle has no calibration)."""
        from . import ood

        cal = self.ood_calibration
        if cal is None or self.bundle.shape_model is None:
            return None
        values = image_parts | ood.prediction_components(
            particles_model, uncertainty, self.bundle.shape_model, cal.n_modes
        )
        return cal.assess(values)

    # -- network ----------------------------------------------------------------------------------
    def _move_network(self, device: Any) -> Any:
        import torch

        device = torch.device(device)
        if device != self._network_device:
            self._network.to(device)
            self._network_device = device
        return self._network

    def _network_forward(self, x: Any, device: Any) -> tuple[Any, Any]:
        import torch

        net = self._move_network(device)
        x = x.to(device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        with torch.inference_mode(), exact_fp32_convolutions(device):
            if self.uncertainty.enabled:
                from .uncertainty import predict_with_uncertainty

                return predict_with_uncertainty(net, x, self.uncertainty)
            return net(x)

    # -- input handling ---------------------------------------------------------------------------
    def load_image(self, image: Any, name: str | None = None) -> tuple[Any, str]:
        """A validated SimpleITK float32 image from a path or a SimpleITK image."""
        import SimpleITK as sitk

        from . import io

        if isinstance(image, str | os.PathLike):
            label = name or str(image)
            img = io.read_image(image)
        elif isinstance(image, sitk.Image):
            label = name or "image"
            if image.GetDimension() != 3:
                raise InputError(f"{label}: expected a 3D image, found {image.GetDimension()}D")
            if image.GetNumberOfComponentsPerPixel() != 1:
                raise InputError(f"{label}: expected a scalar image, found a vector image")
            img = image
        else:
            raise InputError(
                f"{name or 'image'}: expected a file path or a SimpleITK image, found {type(image).__name__} "
                "(a bare array has no physical geometry)"
            )
        img = sitk.Cast(img, sitk.sitkFloat32)
        self.check_image(img, label)
        return img, label

    def check_image(self, img: Any, label: str) -> None:
        """Refuse NaN/Inf, constant images and images far smaller than the reference grid."""
        import SimpleITK as sitk

        from .preprocess import check_image_values

        size = np.asarray(img.GetSize())
        if size.min() < 4:
            raise InputError(
                f"{label}: image size {tuple(size.tolist())} voxels is too small (need ≥ 4 per axis)"
            )
        check_image_values(sitk.GetArrayViewFromImage(img), label)
        extent = np.sort(_physical_extent(Grid.from_sitk(img)))
        ref = np.sort(_physical_extent(self.grid))
        if np.any(extent < self.min_extent_fraction * ref):
            raise InputError(
                f"{label}: the image covers {extent.round(1).tolist()} mm but the model's reference grid "
                f"covers {ref.round(1).tolist()} mm (sorted axes); the anatomy cannot fit in it"
            )

    def alignment_for(self, img: Any) -> Alignment:
        """The model-frame → input transform (identity with ``align=False``)."""
        if not self.align:
            eye = np.eye(4)
            return Alignment(eye, matrix_to_transform(eye), "none")
        return register_to_reference(img, self._reference, self.registration, self.bundle.mean_particles)

    def prepare(
        self, image: Any, name: str | None = None
    ) -> tuple[np.ndarray, Alignment, str, dict[str, float]]:
        """Load, check, align, resample and normalise: ``(Z, Y, X)`` float32 network input."""
        x, alignment, label, timings, _ = self._prepare(image, name)
        return x, alignment, label, timings

    def _prepare(
        self, image: Any, name: str | None = None
    ) -> tuple[np.ndarray, Alignment, str, dict[str, float], dict[str, Any]]:
        """:meth:`prepare` plus the image-side OOD inputs (:meth:`image_components`)."""
        from .preprocess import resample_to_grid

        t0 = time.perf_counter()
        img, label = self.load_image(image, name)
        t1 = time.perf_counter()
        alignment = self.alignment_for(img)
        t2 = time.perf_counter()
        arr = resample_to_grid(img, self.grid, transform=alignment.transform)
        warn_if_outside_training_range(arr, self.normalizer, label)
        x = self.normalizer(arr)
        t3 = time.perf_counter()
        parts = {}
        if self.ood_calibration is not None:
            # the intensity statistics see only the grid voxels inside the input (NaN outside)
            raw = arr
            if alignment.kind != "none":
                raw = resample_to_grid(
                    img, self.grid, transform=alignment.transform, default_value=float("nan")
                )
            parts = self.image_components(raw, x)
        timings = {"read_check": t1 - t0, "align": t2 - t1, "resample_normalise": t3 - t2}
        if parts:
            timings["ood_inputs"] = time.perf_counter() - t3
        return x, alignment, label, timings, parts

    # -- prediction -------------------------------------------------------------------------------
    def predict(self, image: Any, name: str | None = None) -> Prediction:
        """Predict one image (path or SimpleITK image); see :class:`Prediction`."""
        return self.predict_many([image], batch_size=1, names=[name] if name else None)[0]

    def predict_many(
        self,
        images: Sequence[Any],
        batch_size: int = 8,
        names: Sequence[str] | None = None,
        progress: ProgressCallback = null_progress,
        cancel: CancelToken | None = None,
    ) -> list[Prediction]:
        """Predict several images; preprocessing is per image, the network runs in batches of
        ``batch_size`` (halved on CUDA out-of-memory, then CPU fallback)."""
        n = len(images)
        if n == 0:
            return []
        bs = max(1, int(batch_size))
        out: list[Prediction] = []
        for start in range(0, n, bs):
            # preprocess one batch at a time so memory stays bounded for long image lists
            chunk = list(range(start, min(n, start + bs)))
            xs = np.empty((len(chunk), 1) + self.grid.shape_zyx, dtype=np.float32)
            aligns: list[Alignment] = []
            labels: list[str] = []
            timings: list[dict[str, float]] = []
            image_parts: list[dict[str, Any]] = []
            for j, i in enumerate(chunk):
                if cancel is not None:
                    cancel.check()
                x, al, label, t, ip = self._prepare(images[i], names[i] if names else None)
                xs[j, 0] = x
                aligns.append(al)
                labels.append(label)
                timings.append(t)
                image_parts.append(ip)
                progress(ProgressEvent("predict", i, n, f"prepared {Path(label).name}"))
            if cancel is not None:
                cancel.check()
            t0 = time.perf_counter()
            desc, parts, *extra, used = run_batched(self.forward, xs, bs, self.device)
            spread = extra[0] if extra else None
            t_fwd = (time.perf_counter() - t0) / len(chunk)
            self.device = used  # after a CPU fallback, stay on the CPU
            for j in range(len(chunk)):
                if not np.all(np.isfinite(parts[j])):
                    raise BundleError(
                        f"{labels[j]}: the network produced NaN or Inf particles; the model bundle "
                        f"{self.bundle.path} is damaged (weights or normaliser): retrain or restore it"
                    )
                t1 = time.perf_counter()
                p_in = apply_matrix(aligns[j].matrix, parts[j])
                t = dict(timings[j], forward=t_fwd, map_back=time.perf_counter() - t1)
                unc = self._particle_uncertainty(spread, j, labels[j], aligns[j])
                t2 = time.perf_counter()
                verdict = self.assess_ood(image_parts[j], parts[j], unc)
                if verdict is not None:
                    t["ood"] = time.perf_counter() - t2
                t["total"] = float(sum(t.values()))
                out.append(
                    Prediction(
                        particles=p_in,
                        descriptor=desc[j],
                        descriptor_kind=self.descriptor_kind,
                        alignment=aligns[j],
                        timings=t,
                        particles_model=parts[j],
                        source=labels[j],
                        uncertainty=unc,
                        uncertainty_method=self.uncertainty.method if unc is not None else None,
                        ood=verdict,
                    )
                )
        progress(ProgressEvent("predict", n, n, "done"))
        return out

    def _particle_uncertainty(
        self, spread: np.ndarray | None, j: int, label: str, alignment: Alignment
    ) -> np.ndarray | None:
        """Image ``j``'s per-particle uncertainty (mm) in the input's space (a rigid or similarity
        alignment scales distances by its scale factor), checked finite and non-negative."""
        if spread is None:
            return None
        from .uncertainty import check_uncertainty_values

        u = np.asarray(spread[j], dtype=np.float64)
        check_uncertainty_values(u, label)
        scale = float(abs(np.linalg.det(np.asarray(alignment.matrix)[:3, :3])) ** (1.0 / 3.0))
        return u * scale
