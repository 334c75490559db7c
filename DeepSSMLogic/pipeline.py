"""From a cohort to network-ready arrays: the reference grid and the resampled training set.

The reference grid is the axis-aligned bounding box of all training particles plus a margin (the
paper's crop), at a chosen spacing, optionally coarsened by a downsampling factor. Training images
are already in the particles' physical frame (world particles), so they are resampled onto that
grid with the identity transform. Intensities are kept RAW here: the normaliser is fitted on the
training arrays afterwards and stored in the bundle (see ``preprocess.IntensityNormalizer``).

SimpleITK is imported lazily (through ``io`` / ``preprocess``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError, ValidationError
from .geometry import CPU_VOXEL_BUDGET, MAX_GRID_VOXELS, Grid, auto_grid_spacing, grid_size_problem
from .progress import CancelToken, ProgressCallback, ProgressEvent, null_progress


@dataclass
class TrainingArrays:
    """Training data on the reference grid.

    ``images`` ``(N, Z, Y, X)`` float32, raw intensities; ``particles`` ``(N, M, 3)`` float64, mm,
    LPS; ``segmentations`` ``(N, Z, Y, X)`` uint8 (nearest-neighbour) or None when any subject lacks one.
    """

    ids: list[str]
    images: np.ndarray
    particles: np.ndarray
    grid: Grid
    segmentations: np.ndarray | None = None


def reference_grid(
    particles: np.ndarray,
    spacing: float | Sequence[float],
    margin_mm: float = 10.0,
    min_size: int | Sequence[int] | None = None,
    downsample: float = 1.0,
    *,
    ids: Sequence[str] | None = None,
    spacing_source: str = "--spacing",
    max_voxels: int | None = None,
) -> Grid:
    """Reference grid: bounding box of ``particles`` ``(N, M, 3)`` (mm, LPS) plus ``margin_mm``.

    ``spacing`` (mm, scalar or x,y,z) is multiplied by ``downsample`` (the paper's downsampling
    factor: 2 halves the voxels per axis). ``min_size`` (voxels, scalar or x,y,z) grows the grid
    symmetrically about the box centre so small anatomies still fit a network's receptive field.
    The direction is the identity. A grid over the budget (``max_voxels``, default
    :data:`~DeepSSMLogic.geometry.MAX_GRID_VOXELS`, or 512 voxels on an axis) is refused with the
    :func:`~DeepSSMLogic.geometry.grid_size_problem` message naming the farthest-out subject
    (``ids``, in the order of ``particles``) and where the spacing came from (``spacing_source``).
    """
    pts = np.asarray(particles, dtype=np.float64)
    if pts.ndim < 2 or pts.shape[-1] != 3 or pts.size == 0:
        raise InputError(f"reference_grid: particles must have shape (N, M, 3), found {pts.shape}")
    if not np.all(np.isfinite(pts)):
        raise InputError("reference_grid: particles contain NaN or Inf coordinates")
    if not downsample > 0:
        raise InputError(f"reference_grid: downsample factor must be positive, found {downsample}")
    if margin_mm < 0:
        raise InputError(f"reference_grid: margin_mm must be >= 0, found {margin_mm}")
    sp = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,)) * float(downsample)
    if not np.all(sp > 0):
        raise InputError(f"reference_grid: spacing must be positive, found {tuple(sp)}")
    problem = grid_size_problem(pts, sp, margin_mm, ids, spacing_source, max_voxels or MAX_GRID_VOXELS)
    if problem:
        raise InputError(problem)
    grid = Grid.bounding(pts, tuple(float(s) for s in sp), margin_mm)
    if min_size is not None:
        want = np.broadcast_to(np.asarray(min_size, dtype=np.int64), (3,))
        size = np.asarray(grid.size, dtype=np.int64)
        new_size = np.maximum(size, want)
        # keep the box centred on the particles when it grows
        origin = np.asarray(grid.origin) - (new_size - size) * sp / 2.0
        grid = Grid(tuple(origin.tolist()), grid.spacing, tuple(int(s) for s in new_size))
    return grid


# -- the automatic default spacing ------------------------------------------------------------------
CUDA_VOXEL_BUDGET = 128**3


def default_voxel_budget(device: str) -> tuple[int, str]:
    """``(voxels, device kind)``: the automatic grid's budget for training on ``device`` ("auto",
    "cpu", "cuda", "cuda:N"): :data:`CPU_VOXEL_BUDGET` on a CPU (BENCHMARKS.md, grid budget),
    :data:`CUDA_VOXEL_BUDGET` on a GPU (the paper's 118×69×88 grids stay at full resolution)."""
    kind = "cpu" if device == "cpu" else "cuda" if device.startswith("cuda") else None
    if kind is None:
        import torch

        kind = "cuda" if torch.cuda.is_available() else "cpu"
    return (CUDA_VOXEL_BUDGET if kind == "cuda" else CPU_VOXEL_BUDGET), kind


# Base-DeepSSM epochs by encoder when none are given (issue 16): the paper network's 100; the light
# encoders were measured against the converged paper network with a 30-epoch cosine schedule
# (BENCHMARKS.md, time to accuracy: light2 reached the paper's accuracy by epoch 5-15 of 30 on every
# family), and 100 epochs would triple a CPU training for no measured gain.
DEFAULT_EPOCHS = {"paper": 100, "light": 30, "light2": 30, "light3": 30}


def resolve_epochs(epochs: int | str, encoder: str) -> tuple[int, str]:
    """``(epochs, source)``: the given count, or the encoder's default for "auto"."""
    if isinstance(epochs, str):
        if epochs != "auto":
            raise InputError(f"--epochs: expected a number ≥ 1 or 'auto', found {epochs!r}")
        n = DEFAULT_EPOCHS.get(encoder, DEFAULT_EPOCHS["paper"])
        return n, f"auto: the default for the {encoder} encoder"
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise InputError(f"--epochs: expected a number ≥ 1 or 'auto', found {epochs!r}")
    return epochs, "given"


# The variance head fitted on the main network's own residuals learns too little about unseen
# subjects once the network memorises them (30 epochs): out-of-fold residuals from 4 fold networks
# met the per-image rank target on two femur cohorts (BENCHMARKS.md, "Out-of-fold head").
DEFAULT_VARIANCE_FOLDS = 4


def resolve_variance_folds(requested: int | None, n_train: int) -> tuple[int, str]:
    """``(K, source)`` for ``--uncertainty variance``: the requested K (0 = in-sample residuals), or
    for None ("auto") :data:`DEFAULT_VARIANCE_FOLDS` folds, fewer when there are too few training
    subjects for 2 per fold, none below 4 subjects."""
    if requested is not None:
        return requested, "given"
    k = min(DEFAULT_VARIANCE_FOLDS, n_train // 2)
    if k < 2:
        return 0, f"auto: {n_train} training subjects are too few for out-of-fold residuals"
    return k, f"auto: {k} folds of {n_train} training subjects"


def resolve_spacing(
    opts: TrainingOptions, particles: np.ndarray, first: Any, ids: Sequence[str] | None = None
) -> tuple[float | tuple[float, float, float], dict[str, Any]]:
    """The grid spacing before ``opts.downsample`` and how it was chosen (``{"source", "reason",
    ...}`` for the training summary): ``opts.spacing`` mm when given; the first training image's
    spacing for ``"image"`` or with a ``downsample`` factor; else :func:`auto_grid_spacing` for
    ``opts.voxel_budget`` (default: :func:`default_voxel_budget` of ``opts.device``), after the grid
    at the images' spacing passed :func:`~DeepSSMLogic.geometry.grid_size_problem` (subjects in
    different frames are refused as before, not hidden by a coarse spacing; ``ids`` name them)."""
    from . import io

    if isinstance(opts.spacing, int | float) and not isinstance(opts.spacing, bool):
        return float(opts.spacing), {"source": "--spacing", "reason": f"--spacing {opts.spacing:g} mm"}
    if opts.spacing not in (None, "auto", "image"):
        raise InputError(f"--spacing: expected a number of mm, 'auto' or 'image', found {opts.spacing!r}")
    image_spacing = tuple(float(v) for v in io.read_image(first.image).GetSpacing())
    if opts.spacing == "image" or opts.downsample != 1.0:
        why = "--spacing image" if opts.spacing == "image" else f"--downsample {opts.downsample:g}"
        return image_spacing, {"source": "image", "reason": f"the images' spacing ({why})"}
    budget, kind = default_voxel_budget(opts.device)
    if opts.voxel_budget is not None:
        if not int(opts.voxel_budget) >= 1:
            raise InputError(f"voxel budget: expected a positive number of voxels, found {opts.voxel_budget}")
        budget, kind = int(opts.voxel_budget), "given"
    source = spacing_source(None, first) + " (checked before the automatic choice)"
    problem = grid_size_problem(particles, image_spacing, opts.margin_mm, ids, source)
    if problem:
        raise InputError(problem)
    spacing, reason = auto_grid_spacing(particles, image_spacing, opts.margin_mm, budget)
    return spacing, {"source": "auto", "reason": reason, "voxel_budget": budget, "budget_for": kind}


def _subject_field(subject: Any, name: str) -> Any:
    return getattr(subject, name, None)


def _grid_transform(subject: Any) -> Any:
    """The SimpleITK transform taking training-frame points (the grid) to the subject's image points:
    the inverse of ``subject.image_transform`` (None: the image already is in the training frame)."""
    matrix = _subject_field(subject, "image_transform")
    if matrix is None:
        return None
    from .predict import matrix_to_transform

    return matrix_to_transform(np.linalg.inv(np.asarray(matrix, dtype=np.float64)))


def prepare_training_arrays(
    subjects: Sequence[Any],
    grid: Grid,
    progress: ProgressCallback = null_progress,
    cancel: CancelToken | None = None,
) -> TrainingArrays:
    """Read every subject's image and particles and resample the image onto ``grid``.

    ``subjects`` are ``cohort.Subject`` objects (``id``, ``image``, ``particles``, optional
    ``segmentation``, ``image_transform``, ``particles_transform``): particles are moved into the
    training frame and images resampled through the same transform, so the two stay overlaid. Checks that every subject has an image and particles, that all particle
    counts agree, that coordinates are finite and that images have usable values (no NaN/Inf,
    not constant, and not empty on the grid). All problems are reported together in one
    :class:`ValidationError`.
    """
    from . import io
    from .cohort import subject_particles
    from .preprocess import check_image_values, resample_to_grid

    if len(subjects) == 0:
        raise InputError("prepare_training_arrays: no subjects given")
    n = len(subjects)
    shape = grid.shape_zyx
    images = np.empty((n,) + shape, dtype=np.float32)
    all_seg = all(_subject_field(s, "segmentation") is not None for s in subjects)
    segs = np.empty((n,) + shape, dtype=np.uint8) if all_seg else None
    particles: list[np.ndarray | None] = []
    problems: list[str] = []
    ids: list[str] = []
    for i, s in enumerate(subjects):
        if cancel is not None:
            cancel.check()
        sid = str(_subject_field(s, "id") or f"subject {i}")
        ids.append(sid)
        img_path = _subject_field(s, "image")
        pts_path = _subject_field(s, "particles")
        pts = None
        if pts_path is None:
            problems.append(f"{sid}: no particles file (training needs ground-truth correspondences)")
        else:
            try:
                pts = subject_particles(s)
                if not np.all(np.isfinite(pts)):
                    problems.append(f"{pts_path}: particles contain NaN or Inf coordinates")
                    pts = None
            except InputError as e:
                problems.append(str(e))
        particles.append(pts)
        if img_path is None:
            problems.append(f"{sid}: no image file")
        else:
            try:
                image = io.read_image(img_path)
                check_image_values(_sitk_view(image), str(img_path))
                to_image = _grid_transform(s)
                arr = resample_to_grid(image, grid, transform=to_image)
                if float(arr.max()) == float(arr.min()):
                    problems.append(
                        f"{img_path}: the image is constant on the reference grid "
                        "(it does not overlap the training particles' bounding box)"
                    )
                images[i] = arr
                if segs is not None:
                    seg = io.read_image(_subject_field(s, "segmentation"))
                    segs[i] = (
                        resample_to_grid(seg, grid, to_image, interpolator="nearest", default_value=0.0) > 0.5
                    ).astype(np.uint8)
            except InputError as e:
                problems.append(str(e))
        progress(ProgressEvent("prepare", i + 1, n, f"resampled {sid}"))

    counts = {p.shape[0] for p in particles if p is not None}
    if len(counts) > 1:
        detail = ", ".join(
            f"{sid}: {p.shape[0]}" for sid, p in zip(ids, particles, strict=True) if p is not None
        )
        problems.append(f"particle files have differing point counts ({detail}); expected one count for all")
    if problems:
        raise ValidationError("cannot prepare the training arrays", problems)
    return TrainingArrays(
        ids=ids,
        images=images,
        particles=np.stack([p for p in particles if p is not None]).astype(np.float64),
        grid=grid,
        segmentations=segs,
    )


def _sitk_view(image: Any) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayViewFromImage(image)


# -- cohort → trained bundle ------------------------------------------------------------------------
@dataclass
class TrainingOptions:
    """What ``deepssm train`` exposes; everything else comes from ``training.TrainConfig`` defaults.

    ``spacing`` mm, or None / "auto": chosen from the anatomy's size for a voxel budget
    (:func:`resolve_spacing`), or "image": the first training image's; ``downsample`` multiplies it
    (and, without a spacing, starts from the image's);
    ``augment`` number of offline augmented samples (0: none); ``augment_online`` warps fresh
    samples every epoch instead; ``val_fraction`` of the training pool (real + augmented) held out
    for validation (the cohort's own ``val`` subjects are added to it).
    """

    variant: str = "base"
    loss: str = "l2"
    augment: int = 0
    augment_online: bool = False
    sampler: str = "kde"
    # Base epochs, or "auto": :data:`DEFAULT_EPOCHS` for the encoder (see :func:`resolve_epochs`)
    epochs: int | str = "auto"
    batch_size: int = 8
    device: str = "auto"
    seed: int = 0
    resume: bool = False
    restart: bool = False  # discard an existing checkpoint (without it, one is refused unless resume)
    overwrite: bool = False  # replace a file at ``out`` that is not a bundle (a folder never)
    spacing: float | str | None = None  # mm, None / "auto" (from the anatomy's size) or "image"
    voxel_budget: int | None = None  # automatic spacing's budget (None: 48³ on a CPU, 128³ on CUDA)
    downsample: float = 1.0
    margin_mm: float = 10.0
    conv_padding: str = "auto"  # "auto": "valid" (the paper) when the grid allows it, else "same"
    # "light2" (issue 16: as accurate as the paper's network on every synthetic family and much faster
    # on a CPU; BENCHMARKS.md time to accuracy) | "light" | "paper"; light ones always pad ("same")
    encoder: str = "light2"
    val_fraction: float = 0.15
    n_modes: int | None = None
    # Register training images to the reference like the predictor does. Off by default: a training
    # cohort is expected in one frame (as ShapeWorks' groomed images and world particles are), and
    # image registration to the mean image still moves un-posed synthetic subjects by 1-3 mm, noise
    # that would land in the training targets.
    align: bool = False
    extra: dict[str, Any] | None = None  # further TrainConfig fields (e.g. lr, patience, ae_epochs)
    # per-particle uncertainty (issue 13): "none" (the paper networks), "mc-dropout", "ensemble",
    # "variance" (a predicted-variance head fitted after training on the frozen network)
    uncertainty: str = "none"
    ensemble_size: int = 3
    mc_dropout: float = 0.2
    mc_samples: int = 30
    variance_corruptions: int = 12  # corrupted copies of each training image the variance head sees
    # K ≥ 2: fit the variance head on out-of-fold residuals: K extra networks, each trained like the
    # main one without one fold of the training subjects (K × the training time); 0: the main
    # network's own (in-sample) residuals; None: auto (resolve_variance_folds).
    # BENCHMARKS.md, uncertainty: "Out-of-fold head"
    variance_folds: int | None = None
    # "float16": the image encoder's large tensors stored as float16 when that moves no predicted
    # particle of the reference image by more than 0.01 mm (bundle.half_precision_weights); loaded as float32
    bundle_weights: str = "float16"


@dataclass
class TrainOutcome:
    bundle: Path | None  # None on ranks other than 0 under torchrun
    work_dir: Path
    summary: dict[str, Any]


class _ArrayDataset:
    """``(image (1, Z, Y, X) float32 raw, particles (M, 3) float32)`` from in-memory arrays."""

    def __init__(self, images: np.ndarray, particles: np.ndarray):
        self.images = images
        self.particles = particles.astype(np.float32)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.images[i][None], self.particles[i]


class _Subset:
    def __init__(self, base: Any, indices: Sequence[int]):
        self.base, self.indices = base, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.base[self.indices[i]]


class _Concat:
    def __init__(self, parts: Sequence[Any]):
        self.parts = [p for p in parts if p is not None and len(p) > 0]
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> Any:
        k = int(np.searchsorted(self.offsets, i, side="right") - 1)
        return self.parts[k][i - int(self.offsets[k])]


def default_work_dir(out: Path) -> Path:
    """Where intermediate files (augmented set, checkpoints, logs) of a bundle ``out`` live."""
    return out.with_name(out.name.removesuffix(".zip") + ".work")


def choose_conv_padding(grid: Grid, requested: str = "auto", encoder: str = "paper") -> str:
    """ "valid" (the paper's convolutions) when every axis is large enough, else "same"; the light
    encoder always pads ("same")."""
    from .networks import is_light, minimum_grid_size

    if requested != "auto":
        return requested
    if is_light(encoder):
        return "same"
    return "valid" if min(grid.size) >= minimum_grid_size("valid") else "same"


def mean_reference_image(images: np.ndarray, grid: Grid) -> Any:
    """The voxel-wise mean of the training images ``(N, Z, Y, X)`` on ``grid`` (SimpleITK image).

    Registering new images to this atlas (rather than to one subject) aligns them to the
    training population's average pose, where the network has seen the most data.
    """
    from .preprocess import image_from_array

    return image_from_array(images.mean(axis=0, dtype=np.float64).astype(np.float32), grid)


def template_mesh_for(
    subjects: Sequence[Any],
    particles: np.ndarray,
    mean: np.ndarray,
    model_particles: np.ndarray | None = None,
) -> tuple[Any, np.ndarray] | None:
    """The mesh of the training subject closest to the mean shape, warped onto the mean particles.

    ``particles`` ``(N, M, 3)`` are in the meshes' own frames; ``model_particles`` (default: the
    same) in the frame of ``mean``, used to pick the subject. Returns ``(vtkPolyData,
    template_particles (M, 3))`` or None when no subject has a mesh. The warp is
    ``mesh.MeshWarper`` (thin-plate spline), so ``template_particles`` is ``mean``.
    """
    from . import io
    from .mesh import MeshWarper

    ref = particles if model_particles is None else model_particles
    rmse = np.sqrt(((ref - mean[None]) ** 2).sum(-1).mean(-1))
    for i in np.argsort(rmse):
        mesh_path = _subject_field(subjects[int(i)], "mesh")
        if mesh_path is None:
            continue
        mesh = io.read_mesh(mesh_path)
        warper = MeshWarper.from_polydata(mesh, particles[int(i)])
        return warper.polydata(mean), mean
    return None


def align_training_arrays(
    subjects: Sequence[Any],
    arrays: TrainingArrays,
    reference: Any,
    settings: Any = None,
    progress: ProgressCallback = null_progress,
    cancel: CancelToken | None = None,
) -> tuple[TrainingArrays, np.ndarray]:
    """Register every subject's image to ``reference`` exactly as the predictor will at inference,
    and express images and particles in that model frame.

    Training on aligned images makes the network see the same kind of input it gets at inference
    (the registration's residual pose bias is identical), which matters when the shape variation is
    small. Returns the new arrays and the ``(N, 4, 4)`` model → subject transforms.
    """
    from . import io
    from .predict import apply_matrix, register_to_reference
    from .preprocess import resample_to_grid

    grid = arrays.grid
    n = len(subjects)
    images = np.empty_like(arrays.images)
    particles = np.empty_like(arrays.particles)
    segs = None if arrays.segmentations is None else np.empty_like(arrays.segmentations)
    matrices = np.empty((n, 4, 4))
    mean_shape = arrays.particles.mean(axis=0)  # the predictor passes the bundle's mean shape likewise
    for i, s in enumerate(subjects):
        if cancel is not None:
            cancel.check()
        image = io.read_image(_subject_field(s, "image"))
        al = register_to_reference(image, reference, settings, mean_shape)
        matrices[i] = al.matrix
        images[i] = resample_to_grid(image, grid, transform=al.transform)
        particles[i] = apply_matrix(np.linalg.inv(al.matrix), arrays.particles[i])
        if segs is not None:
            seg = io.read_image(_subject_field(s, "segmentation"))
            segs[i] = resample_to_grid(seg, grid, al.transform, "nearest", 0.0) > 0.5
        progress(ProgressEvent("align", i + 1, n, f"aligned {arrays.ids[i]}"))
    return TrainingArrays(list(arrays.ids), images, particles, grid, segs), matrices


def _distributed_context(device: str) -> tuple[int, int, Any, Any]:
    """(rank, world, barrier, release) under torchrun; the process group is shared with
    ``training.train``. ``release`` destroys the group when this call created it (NCCL warns
    about, and can hang on, groups left alive at exit)."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, lambda: None, lambda: None
    import torch
    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:
        use_cuda = torch.cuda.is_available() and device != "cpu"
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")

    def release() -> None:
        if created and dist.is_initialized():
            dist.destroy_process_group()

    return dist.get_rank(), world, dist.barrier, release


def train_model(
    cohort: Any,
    out: str | Path,
    options: TrainingOptions | None = None,
    progress: ProgressCallback = null_progress,
    cancel: CancelToken | None = None,
    work_dir: str | Path | None = None,
) -> TrainOutcome:
    """Cohort → reference grid → arrays → normaliser → shape model → augmentation → training →
    bundle (written atomically to ``out``, a directory or ``.zip``; by rank 0 only under torchrun).

    ``cohort``: a ``cohort.Cohort`` or a manifest path. The normaliser is fitted on the real
    training images only and travels unchanged in the bundle.
    """
    import time

    from .bundle import save_bundle
    from .cohort import (
        Cohort,
        load_cohort,
        particles_in_image_space,
        subject_particles,
    )
    from .preprocess import IntensityNormalizer
    from .shape_model import ShapeModel
    from .training import TrainConfig, peak_memory

    opts = options or TrainingOptions()
    t0 = time.perf_counter()
    out = Path(out)
    work = Path(work_dir) if work_dir is not None else default_work_dir(out)
    if not isinstance(cohort, Cohort):
        cohort = load_cohort(cohort)
    train_subjects = cohort.by_split("train")
    val_subjects = [s for s in cohort.by_split("val") if s.particles is not None]
    if len(train_subjects) < 3:
        raise InputError(
            f"{cohort.source}: training needs at least 3 training subjects, found {len(train_subjects)}"
        )
    if opts.augment < 0:
        raise InputError(f"--augment: expected a number ≥ 0, found {opts.augment}")
    if not 0.0 < opts.val_fraction < 0.9:
        raise InputError(f"validation fraction: expected a value in (0, 0.9), found {opts.val_fraction}")
    epochs, epochs_source = resolve_epochs(opts.epochs, opts.encoder)
    rank, world, barrier, release_group = _distributed_context(opts.device)

    # -- geometry and arrays (in the cohort's training frame: ShapeWorks' world frame when it has one)
    particles = np.stack([subject_particles(s) for s in train_subjects])
    spacing, spacing_info = resolve_spacing(
        opts, particles, train_subjects[0], [s.id for s in train_subjects]
    )
    grid = reference_grid(
        particles,
        spacing,
        opts.margin_mm,
        downsample=opts.downsample,
        ids=[s.id for s in train_subjects],
        spacing_source=spacing_source(opts.spacing, train_subjects[0], opts.downsample, spacing_info),
    )
    check_training_outputs(out, work, opts, grid, particles.shape[1])
    padding = choose_conv_padding(grid, opts.conv_padding, opts.encoder)
    arrays = prepare_training_arrays(train_subjects, grid, progress, cancel)
    val_arrays = prepare_training_arrays(val_subjects, grid, progress, cancel) if val_subjects else None
    if val_arrays is not None and val_arrays.particles.shape[1] != arrays.particles.shape[1]:
        raise InputError(
            f"validation subjects have {val_arrays.particles.shape[1]} particles, training subjects "
            f"{arrays.particles.shape[1]}"
        )
    reference = mean_reference_image(arrays.images, grid)
    # meshes are in their subjects' image space: the template is warped from the particles there
    mesh_particles = np.stack([particles_in_image_space(s) for s in train_subjects])
    if opts.align:
        arrays, _ = align_training_arrays(train_subjects, arrays, reference, None, progress, cancel)
        if val_arrays is not None:
            val_arrays, _ = align_training_arrays(val_subjects, val_arrays, reference, None, progress, cancel)
    normalizer = IntensityNormalizer.fit(arrays.images)
    shape_model = ShapeModel.fit(arrays.particles)

    # -- augmentation, then the validation split of the pool (real + offline augmented)
    real = _ArrayDataset(arrays.images, arrays.particles)
    augmented, aug_info = _augment(
        arrays, grid, shape_model, opts, work / "augmentation", rank, barrier, progress, cancel
    )
    train_set, val_set = _split_pool(real, augmented, opts, val_arrays)

    fields: dict[str, Any] = dict(opts.extra or {})
    fields.update(
        variant=opts.variant,
        loss=opts.loss,
        epochs=epochs,
        batch_size=opts.batch_size,
        device=opts.device,
        seed=opts.seed,
        conv_padding=padding,
        encoder=opts.encoder,
        n_modes=opts.n_modes,
    )
    spec = uncertainty_spec(opts)
    if spec.method == "mc-dropout":
        fields["head_dropout"] = spec.dropout
    config = TrainConfig.from_dict(fields)
    result = _train_networks(
        config, spec, train_set, val_set, work, opts, progress, cancel, shape_model, normalizer
    )

    summary: dict[str, Any] = {
        **result.summary(),
        "n_train_subjects": len(train_subjects),
        "n_val_subjects": len(val_subjects),
        "train_ids": arrays.ids,
        "n_train_samples": len(train_set),
        "n_val_samples": len(val_set),
        "augmentation": aug_info,
        "cohort": str(cohort.source),
        "frame": {"name": cohort.frame, "reason": cohort.frame_reason},
        "excluded_subjects": list(cohort.excluded),
        "world_size": world,
        "grid": {**spacing_info, "spacing_mm": list(grid.spacing), "size": list(grid.size)},
        "epochs": {"n": epochs, "source": epochs_source},
        # the whole run's peak (reading, augmentation, training); the trainer's own is in peak_memory
        "peak_rss_mb_total": peak_memory()["rss_mb"],
        "seconds_total": time.perf_counter() - t0,
    }
    if rank != 0:
        release_group()
        return TrainOutcome(None, work, summary)

    bundle_sm = shape_model
    net = result.model
    if result.architecture.get("variant") == "base":
        # the PCA the network decodes with: the first K modes and its score whitening
        k = int(result.architecture["n_modes"])
        bundle_sm = shape_model.truncated(k)
        single = net.members[0] if hasattr(net, "members") else net  # ensemble members share the PCA
        bundle_sm.score_mean = single.score_mean.detach().cpu().double().numpy()
        bundle_sm.score_std = single.score_std.detach().cpu().double().numpy()
    summary["training_images_aligned"] = opts.align
    if spec.method == "variance":
        t_folds = time.perf_counter()
        n_folds, folds_source = resolve_variance_folds(opts.variance_folds, len(arrays.images))
        folds = _fold_networks(config, arrays, grid, normalizer, opts, n_folds, work, world, progress, cancel)
        spec, summary["variance_head"] = _fit_variance_head(
            net, spec, arrays, normalizer, opts, progress, cancel, folds
        )
        summary["variance_head"]["folds_source"] = folds_source
        if folds:  # the fold networks' training, before the head's own seconds
            summary["variance_head"]["fold_networks_seconds"] = (
                time.perf_counter() - t_folds - summary["variance_head"]["seconds"]
            )
    calibration = _calibrate(net, spec, val_set, normalizer, reference, bundle_sm, arrays.images)
    summary["calibration"] = calibration.summary
    template = template_mesh_for(train_subjects, mesh_particles, shape_model.mean, arrays.particles)
    summary["template_mesh"] = "closest-to-mean training mesh warped to the mean" if template else "none"
    path = save_bundle(
        out,
        net,
        result.architecture,
        grid,
        normalizer,
        bundle_sm,
        reference,
        template[0] if template else None,
        summary,
        template_particles=template[1] if template else None,
        hyperparameters={"train_config": config.to_dict(), "options": _options_dict(opts)},
        uncertainty=calibration.spec.to_dict(),
        ood=calibration.ood.to_dict() if calibration.ood is not None else None,
        weights_dtype=opts.bundle_weights,
    )
    release_group()
    return TrainOutcome(path, work, summary)


def _augment(
    arrays: TrainingArrays,
    grid: Grid,
    shape_model: Any,
    opts: TrainingOptions,
    aug_dir: Path,
    rank: int = 0,
    barrier: Callable[[], None] = lambda: None,
    progress: ProgressCallback = null_progress,
    cancel: CancelToken | None = None,
) -> tuple[Any, dict[str, Any]]:
    """The augmented set of ``arrays`` (``(dataset or None, info)``): offline samples written to
    ``aug_dir`` (by rank 0), or an online stream, as ``opts`` asks; ``(None, {"kind": "none"})``
    without augmentation."""
    if not (opts.augment_online or opts.augment > 0):
        return None, {"kind": "none"}
    from .augment import dataset as aug_dataset
    from .augment import make_sampler

    sampler = make_sampler(opts.sampler)
    sampler.fit(shape_model.project(arrays.particles))
    if opts.augment_online:
        n_online = opts.augment or 4 * len(arrays.images)
        augmented = aug_dataset.OnlineAugmentedDataset(
            arrays.images,
            arrays.particles,
            grid,
            shape_model,
            sampler,
            samples_per_epoch=n_online,
            seed=opts.seed,
            device=opts.device,
        )
        return augmented, {"kind": "online", "sampler": opts.sampler, "samples_per_epoch": n_online}
    if rank == 0:
        aug_dataset.write_augmented_set(
            aug_dir,
            arrays.images,
            arrays.particles,
            grid,
            shape_model,
            sampler,
            opts.augment,
            seed=opts.seed,
            device=opts.device,
            progress=progress,
            cancel=cancel,
        )
    barrier()
    info = {"kind": "offline", "sampler": opts.sampler, "n": opts.augment, "dir": str(aug_dir)}
    return aug_dataset.AugmentedSet(aug_dir), info


def _split_pool(
    real: Any, augmented: Any, opts: TrainingOptions, val_arrays: TrainingArrays | None
) -> tuple[Any, Any]:
    """``(train_set, val_set)``: ``opts.val_fraction`` of the pool (real + offline augmented, drawn
    from ``opts.seed``) plus the cohort's own validation subjects ``val_arrays`` validate; online
    samples stay in training (the trainer streams fresh warps of the real images every epoch)."""
    rng = np.random.default_rng(opts.seed)
    pool = _Concat([real, augmented if not opts.augment_online else None])
    order = rng.permutation(len(pool))
    n_val = max(1, round(opts.val_fraction * len(pool)))
    val_parts: list[Any] = [_Subset(pool, sorted(order[:n_val]))]
    if val_arrays is not None:
        val_parts.append(_ArrayDataset(val_arrays.images, val_arrays.particles))
    train_set = augmented if opts.augment_online else _Concat([_Subset(pool, sorted(order[n_val:]))])
    return train_set, _Concat(val_parts)


def uncertainty_spec(opts: TrainingOptions) -> Any:
    """The :class:`~DeepSSMLogic.uncertainty.UncertaintySpec` the options ask for (validated)."""
    from .uncertainty import UncertaintySpec

    spec = UncertaintySpec(
        method=opts.uncertainty, dropout=opts.mc_dropout, samples=opts.mc_samples, members=opts.ensemble_size
    )
    spec.validate("--uncertainty options")
    n = opts.variance_corruptions
    if spec.method == "variance" and (isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= 1000):
        raise InputError(f"--variance-corruptions: expected an integer in 0..1000, found {n!r}")
    k = opts.variance_folds
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not (k == 0 or 2 <= k <= 20)):
        raise InputError(f"--variance-folds: expected 0 (off) or an integer in 2..20, found {k!r}")
    if k and spec.method != "variance":
        raise InputError(f"--variance-folds {k} needs --uncertainty variance, found {spec.method!r}")
    return spec


def _train_networks(
    config: Any,
    spec: Any,
    train_set: Any,
    val_set: Any,
    work: Path,
    opts: TrainingOptions,
    progress: ProgressCallback,
    cancel: CancelToken | None,
    shape_model: Any,
    normalizer: Any,
) -> Any:
    """One network (``training.train``), or for an ensemble ``spec.members`` networks trained from
    seeds ``seed, seed+1, ...`` on the same data (member k ≥ 1 in ``training/member-k``, each
    resumable); the result's ``model`` is then an ``EnsembleDeepSSM``."""
    import dataclasses

    from .training import train

    def one(cfg: Any, folder: Path) -> Any:
        return train(
            cfg,
            train_set,
            val_set,
            folder,
            progress,
            cancel,
            resume=opts.resume,
            shape_model=shape_model,
            image_transform=normalizer,
        )

    first = one(config, work / "training")
    if spec.method != "ensemble":
        return first
    from .uncertainty import EnsembleDeepSSM

    results = [first]
    for k in range(1, spec.members):
        cfg = dataclasses.replace(config, seed=config.seed + k)
        results.append(one(cfg, work / "training" / f"member-{k}"))
    first.model = EnsembleDeepSSM([r.model for r in results]).eval()
    first.seconds = sum(r.seconds for r in results)
    first.history = [h | {"member": k} for k, r in enumerate(results) for h in r.history]
    return first


def _fold_networks(
    config: Any,
    arrays: TrainingArrays,
    grid: Grid,
    normalizer: Any,
    opts: TrainingOptions,
    k: int,
    work: Path,
    world: int,
    progress: ProgressCallback,
    cancel: CancelToken | None,
) -> list[tuple[Any, np.ndarray]] | None:
    """``k`` ≥ 2 folds: ``[(network, held-out subject indices)]``, fold k = the training
    subjects at positions ``i % K == k``; each network is trained like the main one (same config,
    seed and augmentation settings) on the other folds only, with its own shape model and augmented
    set (``work/variance-folds/fold-k``, resumable), so the fold's subjects reach it neither as
    images nor through augmentation (the intensity normaliser is the main one's). None when off."""
    import dataclasses

    from .shape_model import ShapeModel
    from .training import train

    if not k:
        return None
    n = len(arrays.images)
    if world > 1:
        raise InputError(
            "--variance-folds: not supported under torchrun (several processes); run on one device"
        )
    if n < 2 * k:
        raise InputError(f"--variance-folds {k}: needs at least {2 * k} training subjects, found {n}")
    folds = []
    for fold in range(k):
        held = np.flatnonzero(np.arange(n) % k == fold)
        keep = np.flatnonzero(np.arange(n) % k != fold)
        sub = dataclasses.replace(
            arrays,
            images=arrays.images[keep],
            particles=arrays.particles[keep],
            ids=[arrays.ids[i] for i in keep],
            segmentations=None if arrays.segmentations is None else arrays.segmentations[keep],
        )
        shape_model = ShapeModel.fit(sub.particles)
        folder = work / "variance-folds" / f"fold-{fold}"
        augmented, _ = _augment(
            sub, grid, shape_model, opts, folder / "augmentation", progress=progress, cancel=cancel
        )
        train_set, val_set = _split_pool(_ArrayDataset(sub.images, sub.particles), augmented, opts, None)
        progress(ProgressEvent("variance-folds", fold, k, f"training fold network {fold + 1} of {k}"))
        result = train(
            config,
            train_set,
            val_set,
            folder / "training",
            progress,
            cancel,
            resume=opts.resume,
            shape_model=shape_model,
            image_transform=normalizer,
        )
        folds.append((result.model.eval(), held))
    return folds


def _fit_variance_head(
    net: Any,
    spec: Any,
    arrays: TrainingArrays,
    normalizer: Any,
    opts: TrainingOptions,
    progress: ProgressCallback,
    cancel: CancelToken | None,
    folds: Sequence[tuple[Any, np.ndarray]] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """The ``variance`` stage: fit the variance head on the frozen trained ``net`` from the real
    training arrays, each clean and, for each of the head's MLPs, ``opts.variance_corruptions`` times
    corrupted (``variance_head.fit_variance_head``; with ``folds``, the residuals are those of the
    fold network that did not see the subject), attach it to ``net`` and return the spec with its
    config and the stage's summary. The network's particles (hence its accuracy) do not change."""
    import dataclasses
    import time

    from .variance_head import DEFAULT_HEADS, attach_variance_head, fit_variance_head

    t0 = time.perf_counter()
    n = len(arrays.images) * (1 + DEFAULT_HEADS * opts.variance_corruptions)
    progress(ProgressEvent("variance-head", 0, n, "fitting the variance head on corrupted training images"))
    head, summary = fit_variance_head(
        net,
        arrays.images,
        arrays.particles,
        normalizer,
        arrays.grid.spacing[::-1],
        corruptions=opts.variance_corruptions,
        seed=opts.seed,
        check_cancel=cancel.check if cancel is not None else (lambda: None),
        fold_networks=folds,
    )
    attach_variance_head(net, head.to(next(net.parameters()).device))
    summary["seconds"] = time.perf_counter() - t0
    progress(ProgressEvent("variance-head", n, n, "variance head fitted"))
    return dataclasses.replace(spec, head=head.config), summary


def _calibrate(
    net: Any, spec: Any, val_set: Any, normalizer: Any, reference: Any, shape_model: Any, images: np.ndarray
) -> Any:
    """Uncertainty scale and OOD calibration on the validation split (``calibration.calibrate_model``)."""
    import SimpleITK as sitk

    from .trust_calibration import calibrate_model

    return calibrate_model(
        net,
        spec,
        val_set,
        normalizer=normalizer,
        reference=sitk.GetArrayFromImage(reference),
        shape_model=shape_model,
        train_images=images,
    )


def spacing_source(
    spacing: float | str | None, first: Any, downsample: float = 1.0, info: dict[str, Any] | None = None
) -> str:
    """Where the grid spacing came from, for messages: ``--spacing``, the first training image, or
    the automatic choice (``info`` from :func:`resolve_spacing`)."""
    if info is not None and info.get("source") == "auto":
        src = f"the automatic choice for a {info['voxel_budget']} voxel budget; set --spacing"
    elif isinstance(spacing, int | float):
        src = "--spacing"
    else:
        src = f"the image of {first.id!r} ({first.image}); set --spacing"
    return src + (f", times --downsample {downsample:g}" if downsample != 1.0 else "")


def check_training_outputs(
    out: Path, work: Path, opts: TrainingOptions, grid: Grid, n_particles: int
) -> None:
    """The output-path policy for ``train``, before any image is read (see ``docs/ERRORS.md``).

    ``out`` must be absent, an empty folder or an earlier bundle (a foreign file only with
    ``overwrite``); ``work`` a folder; an existing checkpoint needs ``resume`` or ``restart``; and
    the free space must cover the estimates: the bundle (reference image, mean shape) and, in
    ``work``, the offline augmented set (n x grid voxels x 4 bytes + particles).
    """
    from .augment.dataset import estimate_set_bytes
    from .errors import OutputExistsError
    from .fileutil import check_output_dir, check_replace_target, is_augmented_set, is_bundle
    from .training import CHECKPOINT_NAME

    if opts.resume and opts.restart:
        raise InputError("--resume and --restart exclude each other: continue the checkpoint, or start over")
    voxels = int(np.prod(grid.size))
    bundle_bytes = 2 * voxels * 4 + n_particles * 3 * 8 * 4
    check_replace_target(
        out, is_bundle, "DeepSSM model bundle", overwrite=opts.overwrite, needed_bytes=bundle_bytes
    )
    if work.resolve() == out.resolve():
        raise InputError(f"--work-dir {work}: must differ from --out (the bundle replaces its folder)")
    check_output_dir(work, writes=["augmentation/", "training/"], flag="--work-dir")
    checkpoint = work / "training" / CHECKPOINT_NAME
    if checkpoint.exists() and not (opts.resume or opts.restart):
        raise OutputExistsError(
            checkpoint,
            "a training checkpoint of an earlier run is there",
            "pass --resume to continue that run, or --restart to discard the checkpoint and start over",
        )
    aug_dir = work / "augmentation"
    if opts.augment > 0 and not opts.augment_online and not is_augmented_set(aug_dir):
        from .fileutil import require_free_space

        need = estimate_set_bytes(opts.augment, grid, n_particles, segmentations=True)
        require_free_space(work, need, f"the augmented set of {opts.augment} samples")


def _options_dict(opts: TrainingOptions) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(opts)
