"""Augmented training sets: offline (written to disk, memory-mapped) and online (warped on the fly).

Offline layout of ``out_dir`` (all arrays ``.npy``; sample ``i`` is row ``i`` everywhere):

* ``images.npy`` ``(n, Z, Y, X)`` float32, raw intensities (memory-mapped; written in chunks)
* ``particles.npy`` ``(n, M, 3)`` float64, mm, LPS: the generated correspondences
* ``scores.npy`` ``(n, K)`` float64 mm; ``source.npy`` ``(n,)`` int64 index of the warped subject
* ``segmentations.npy`` ``(n, Z, Y, X)`` uint8, optional (nearest-neighbour warps)
* ``augmentation.json``: parameters, grid, sampler description, ``count`` and ``completed``.

All shapes are drawn from the seed before any warp, and completion advances in whole chunks whose
boundaries depend only on the chunk size stored in ``augmentation.json``; an interrupted run resumed
later therefore produces the same bytes as an uninterrupted one (same device and torch build).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import InputError, OutputExistsError
from ..fileutil import (
    atomic_path,
    atomic_write_json,
    check_output_dir,
    is_augmented_set,
    preallocate,
    require_free_space,
    write_at,
)
from ..geometry import Grid
from ..progress import CancelToken, ProgressCallback, ProgressEvent, null_progress
from .tps import DEFAULT_BAND, DEFAULT_COARSE, fit_warp, resample, sampling_positions, warp_images

FORMAT = "deepssm-augmented-set"
FORMAT_VERSION = 1
META = "augmentation.json"


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"``/None -> CUDA when available, else CPU; otherwise the named device."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device: 'cuda' requested but torch sees no CUDA device; use --device cpu or auto")
    return dev


def _fingerprint(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str((a.dtype.str, a.shape)).encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def _check_inputs(
    images: np.ndarray, particles: np.ndarray, grid: Grid, segmentations: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    imgs = np.asarray(images)
    pts = np.asarray(particles, dtype=np.float64)
    if imgs.ndim != 4 or tuple(imgs.shape[1:]) != grid.shape_zyx:
        raise InputError(
            f"images: expected (N, Z, Y, X) with (Z, Y, X) = {grid.shape_zyx}, found {imgs.shape}"
        )
    if pts.ndim != 3 or pts.shape[-1] != 3 or pts.shape[0] != imgs.shape[0]:
        raise InputError(
            f"particles: expected ({imgs.shape[0]}, M, 3) to match {imgs.shape[0]} images, found {pts.shape}"
        )
    if not np.all(np.isfinite(pts)):
        raise InputError("particles: contain NaN or Inf coordinates")
    if segmentations is not None and np.asarray(segmentations).shape != imgs.shape:
        raise InputError(
            f"segmentations: expected the images' shape {imgs.shape}, found {np.asarray(segmentations).shape}"
        )
    return imgs, pts


def _describe_sampler(sampler: Any) -> dict[str, Any]:
    describe = getattr(sampler, "describe", None)
    if callable(describe):
        return json.loads(json.dumps(describe(), default=float))
    return {"sampler": type(sampler).__name__}


def _label_dtype(segmentations: np.ndarray) -> np.dtype:
    lo, hi = int(np.min(segmentations)), int(np.max(segmentations))
    if lo >= 0 and hi <= 255:
        return np.dtype(np.uint8)
    if lo >= -32768 and hi <= 32767:
        return np.dtype(np.int16)
    return np.dtype(np.int32)


def estimate_set_bytes(n: int, grid: Grid, n_particles: int, segmentations: bool = False) -> int:
    """Disk space of an offline set of ``n`` samples on ``grid``: images (float32), optional labels
    (uint8), particles (float64) and a margin for scores, sources and metadata. Bytes."""
    voxels = int(np.prod(grid.size))
    per_sample = voxels * (4 + (1 if segmentations else 0)) + n_particles * 3 * 8 + 1024
    return int(n) * per_sample + (64 << 10)


_SET_FILES = {"images.npy", "segmentations.npy", "particles.npy", "scores.npy", "source.npy"}


def check_set_location(
    out_dir: str | os.PathLike[str], n: int, grid: Grid, n_particles: int, segmentations: bool = False
) -> None:
    """Before any work: ``out_dir`` is absent, empty, an augmented set (resumed) or the files of an
    interrupted set-up; anything else is refused (:class:`OutputExistsError`: nothing in it is ever
    deleted). A new set must fit in the free space (:class:`DiskFullError`)."""
    out = Path(out_dir)
    check_output_dir(out, writes=[META, *sorted(_SET_FILES), "nrrd/"], owned=lambda p: True)
    if is_augmented_set(out):
        return
    if out.is_dir():
        leftovers = sorted(p.name for p in out.iterdir() if p.name != "nrrd" and not p.name.startswith("."))
        if not set(leftovers) <= _SET_FILES:  # files without augmentation.json: an interrupted set-up
            raise OutputExistsError(
                out,
                f"--out exists and is not an augmented set (it holds {', '.join(leftovers[:5])})",
                "deepssm never deletes a folder it did not write: choose another --out",
            )
    need = estimate_set_bytes(n, grid, n_particles, segmentations)
    require_free_space(out, need, f"the augmented set of {n} samples")


def write_augmented_set(
    out_dir: str | os.PathLike[str],
    images: np.ndarray,
    particles: np.ndarray,
    grid: Grid,
    shape_model: Any,
    sampler: Any,
    n: int,
    seed: int,
    device: str | torch.device | None = "auto",
    progress: ProgressCallback = null_progress,
    cancel: CancelToken | None = None,
    segmentations: np.ndarray | None = None,
    chunk: int = 8,
    coarse: int = DEFAULT_COARSE,
    band: float = DEFAULT_BAND,
    landmarks: int | None = None,
    export_nrrd: int = 0,
) -> Path:
    """Sample ``n`` shapes and warp source images onto them (the paper's offline protocol).

    ``images`` ``(N, Z, Y, X)`` raw intensities and ``particles`` ``(N, M, 3)`` mm (LPS) are the training
    subjects on ``grid``; ``shape_model`` (``ShapeModel``) and ``sampler`` (fitted on
    ``shape_model.project(particles)``) generate scores; each sample warps its source subject's image
    (and segmentation) so its correspondences land on the generated ones. Resumes a partial set in
    ``out_dir`` written with the same parameters; refuses one written with others. Peak memory is one
    chunk of volumes plus the inputs. ``export_nrrd`` writes the first k samples as .nrrd + .particles
    under ``out_dir/nrrd`` (needs SimpleITK). Returns ``out_dir``.
    """
    out = Path(out_dir)
    imgs, pts = _check_inputs(images, particles, grid, segmentations)
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise InputError(f"n: expected a positive number of samples, found {n!r}")
    if chunk < 1:
        raise InputError(f"chunk: expected a positive batch size, found {chunk}")
    n = int(n)
    dev = resolve_device(device)
    params = {
        "n": n,
        "seed": int(seed),
        "grid": grid.to_dict(),
        "sampler": _describe_sampler(sampler),
        "coarse": int(coarse),
        "band": float(band),
        "landmarks": None if landmarks is None else int(landmarks),
        "inputs_sha256": _fingerprint(imgs.astype(np.float32, copy=False), pts),
        "segmentations": segmentations is not None,
    }
    meta_path = out / META
    check_set_location(out, n, grid, pts.shape[1], segmentations is not None)
    if meta_path.exists():
        meta = _read_meta(out)
        diff = [k for k in params if meta.get("parameters", {}).get(k) != params[k]]
        if diff:
            raise InputError(
                f"{out}: holds an augmented set made with different parameters ({', '.join(diff)}); "
                "choose another --out directory or delete this one"
            )
        chunk = int(meta["chunk"])
        done = int(meta["completed"])
        if done < int(meta["count"]):
            _reserve(out)  # a set begun by an older version may be sparse: reserve its space now
    else:
        meta = _initialise(out, imgs, pts, shape_model, sampler, n, seed, params, chunk, segmentations)
        done = 0

    gen_particles = np.load(out / "particles.npy", mmap_mode="r")
    source = np.load(out / "source.npy")
    seg_dtype = np.load(out / "segmentations.npy", mmap_mode="r").dtype if segmentations is not None else None
    progress(ProgressEvent("augment", done, n, "resuming" if done else "warping"))
    for start in range(done, n, chunk):
        if cancel is not None:
            cancel.check()
        stop = min(start + chunk, n)
        src = source[start:stop]
        spline = fit_warp(pts[src], np.array(gen_particles[start:stop]), landmarks=landmarks, device=dev)
        batch = torch.as_tensor(imgs[src].astype(np.float32, copy=False), device=dev)[:, None]
        positions = sampling_positions(spline, grid, coarse=coarse, band=band)
        warped = resample(batch, grid, positions)
        _write_rows(out / "images.npy", start, warped[:, 0].cpu().numpy())
        if segmentations is not None:
            seg = torch.as_tensor(np.asarray(segmentations)[src], device=dev)[:, None]
            wseg = resample(seg, grid, positions, mode="nearest")
            _write_rows(out / "segmentations.npy", start, wseg[:, 0].cpu().numpy().astype(seg_dtype))
        meta["completed"] = stop
        atomic_write_json(meta_path, meta)
        progress(ProgressEvent("augment", stop, n, f"warped {stop}/{n}"))
    if export_nrrd:
        export_samples(out, int(export_nrrd))
    return out


def _initialise(
    out: Path,
    imgs: np.ndarray,
    pts: np.ndarray,
    shape_model: Any,
    sampler: Any,
    n: int,
    seed: int,
    params: dict[str, Any],
    chunk: int,
    segmentations: np.ndarray | None,
) -> dict[str, Any]:
    """Draw every shape up front and create the (empty) arrays; ``augmentation.json`` comes last."""
    out.mkdir(parents=True, exist_ok=True)
    batch = sampler.sample(n, np.random.default_rng(int(seed)))
    scores = np.asarray(batch.scores, dtype=np.float64)
    source = np.asarray(batch.source, dtype=np.int64)
    if scores.shape[0] != n or source.shape != (n,):
        raise InputError(f"sampler returned {scores.shape[0]} scores / {source.shape} sources for n={n}")
    if source.min() < 0 or source.max() >= imgs.shape[0]:
        raise InputError(f"sampler source indices out of range 0..{imgs.shape[0] - 1}")
    gen = np.asarray(shape_model.reconstruct(scores), dtype=np.float64)
    if gen.shape != (n,) + pts.shape[1:]:
        raise InputError(
            f"shape_model reconstructs {gen.shape}, expected {(n,) + pts.shape[1:]} (the particles' M)"
        )
    for name, arr in (("scores", scores), ("source", source), ("particles", gen)):
        with atomic_path(out / f"{name}.npy") as tmp:
            np.save(tmp, arr)
    shape = (n,) + tuple(imgs.shape[1:])
    with atomic_path(out / "images.npy") as tmp:
        _create_array_file(tmp, np.dtype(np.float32), shape)
    if segmentations is not None:
        with atomic_path(out / "segmentations.npy") as tmp:
            _create_array_file(tmp, _label_dtype(np.asarray(segmentations)), shape)
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "parameters": params,
        "grid": params["grid"],
        "sampler": params["sampler"],
        "seed": int(seed),
        "count": n,
        "chunk": int(chunk),
        "completed": 0,
        "n_particles": int(pts.shape[1]),
        "n_modes": int(scores.shape[1]),
        "n_source_subjects": int(imgs.shape[0]),
        "image_dtype": "float32",
    }
    atomic_write_json(out / META, meta)
    return meta


def _create_array_file(path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> None:
    """An ``.npy`` file of zeros with its disk space reserved (a full disk fails here, at set-up,
    with :class:`DiskFullError`, not later as SIGBUS in a write through a sparse memory map)."""
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
        )
        offset = f.tell()
    preallocate(path, offset + int(np.prod(shape)) * dtype.itemsize)


def _reserve(out: Path) -> None:
    for name in ("images.npy", "segmentations.npy"):
        if (out / name).exists():
            offset, shape, dtype = _array_layout(out / name)
            preallocate(out / name, offset + int(np.prod(shape)) * dtype.itemsize)


def _array_layout(path: Path) -> tuple[int, tuple[int, ...], np.dtype]:
    """``(data offset in bytes, shape, dtype)`` of a C-ordered ``.npy`` file."""
    mm = np.load(path, mmap_mode="r")
    layout = (int(mm.offset), tuple(mm.shape), mm.dtype)
    del mm
    return layout


def _write_rows(path: Path, start: int, rows: np.ndarray) -> None:
    # Ordinary writes at the rows' offset, not a writable memory map: a full disk is then an
    # ENOSPC (DiskFullError) and never a SIGBUS; resident memory stays one chunk.
    offset, shape, dtype = _array_layout(path)
    if tuple(rows.shape[1:]) != shape[1:] or start + rows.shape[0] > shape[0]:
        raise InputError(f"{path}: rows {start}..{start + rows.shape[0]} of {rows.shape} do not fit {shape}")
    data = np.ascontiguousarray(rows, dtype=dtype)
    write_at(path, offset + start * int(np.prod(shape[1:])) * dtype.itemsize, memoryview(data).cast("B"))


def _read_meta(out: Path) -> dict[str, Any]:
    path = out / META
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{out}: not an augmented set (no {META}); run `deepssm augment` first") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None
    if meta.get("format") != FORMAT:
        raise InputError(f"{path}: format is {meta.get('format')!r}, expected {FORMAT!r}")
    for key in ("count", "completed", "chunk", "grid"):
        if key not in meta:
            raise InputError(f"{path}: lacks the field {key!r}")
    return meta


def export_samples(out_dir: str | os.PathLike[str], k: int) -> list[Path]:
    """Write the first ``k`` completed samples as ``nrrd/sample_XXXXX.nrrd`` (+ ``.particles``, and
    ``_seg.nrrd`` when segmentations exist) for inspection in Slicer. Needs SimpleITK."""
    from ..io import write_image, write_particles
    from ..preprocess import image_from_array

    out = Path(out_dir)
    ds = AugmentedSet(out, allow_partial=True)
    k = min(int(k), len(ds))
    folder = out / "nrrd"
    folder.mkdir(exist_ok=True)
    written = []
    segs = np.load(out / "segmentations.npy", mmap_mode="r") if (out / "segmentations.npy").exists() else None
    for i in range(k):
        img_path = folder / f"sample_{i:05d}.nrrd"
        write_image(image_from_array(np.asarray(ds.images[i]), ds.grid), img_path)
        write_particles(folder / f"sample_{i:05d}.particles", np.asarray(ds.particles[i]))
        if segs is not None:
            write_image(image_from_array(np.asarray(segs[i]), ds.grid), folder / f"sample_{i:05d}_seg.nrrd")
        written.append(img_path)
    return written


class AugmentedSet(torch.utils.data.Dataset):
    """The completed samples of an offline set; item ``i`` -> ``(image (1, Z, Y, X) float32 raw,
    particles (M, 3) float32 mm)``.

    ``transform`` maps the raw ``(Z, Y, X)`` float32 numpy image (e.g. an ``IntensityNormalizer``).
    Arrays are memory-mapped lazily per process, so the set is safe for multi-worker DataLoaders.
    An unfinished set is refused unless ``allow_partial``.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        transform: Callable[[np.ndarray], np.ndarray] | None = None,
        allow_partial: bool = False,
    ) -> None:
        self.root = Path(out_dir)
        self.meta = _read_meta(self.root)
        self.count = int(self.meta["count"])
        self.completed = int(self.meta["completed"])
        if self.completed < self.count and not allow_partial:
            raise InputError(
                f"{self.root}: the augmented set is unfinished ({self.completed} of {self.count} samples); "
                "rerun `deepssm augment` with the same options to finish it"
            )
        self.grid = Grid.from_dict(self.meta["grid"])
        self.transform = transform
        self._images: np.ndarray | None = None
        self._particles: np.ndarray | None = None
        self._layout: tuple[int, tuple[int, ...], np.dtype] | None = None
        for name in ("images.npy", "particles.npy", "scores.npy", "source.npy"):
            if not (self.root / name).exists():
                raise InputError(f"{self.root}: the augmented set lacks {name}")

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_images"] = state["_particles"] = None  # never pickle a memmap (it would copy the data)
        return state

    @property
    def images(self) -> np.ndarray:
        """``(n, Z, Y, X)`` float32 memmap (rows beyond ``completed`` are unwritten)."""
        if self._images is None:
            self._images = np.load(self.root / "images.npy", mmap_mode="r")
            if self._images.shape[0] != self.count or tuple(self._images.shape[1:]) != self.grid.shape_zyx:
                raise InputError(
                    f"{self.root / 'images.npy'}: shape {self._images.shape}, expected "
                    f"({self.count}, {', '.join(map(str, self.grid.shape_zyx))})"
                )
        return self._images

    @property
    def particles(self) -> np.ndarray:
        """``(n, M, 3)`` float64 mm, LPS."""
        if self._particles is None:
            self._particles = np.load(self.root / "particles.npy", mmap_mode="r")
        return self._particles

    @property
    def scores(self) -> np.ndarray:
        return np.load(self.root / "scores.npy")[: self.completed]

    @property
    def source(self) -> np.ndarray:
        return np.load(self.root / "source.npy")[: self.completed]

    def __len__(self) -> int:
        return self.completed

    def _read_image(self, i: int) -> np.ndarray:
        """Row ``i`` of images.npy read with an ordinary file read, not through the memory map:
        pages of a mapped file count in the process's resident set, so streaming every sample each
        epoch through the map would grow the peak RSS with the set's size (issue 16)."""
        if self._layout is None:
            offset, shape, dtype = _array_layout(self.root / "images.npy")
            if shape[0] != self.count or tuple(shape[1:]) != self.grid.shape_zyx:
                raise InputError(
                    f"{self.root / 'images.npy'}: shape {shape}, expected "
                    f"({self.count}, {', '.join(map(str, self.grid.shape_zyx))})"
                )
            self._layout = (offset, shape, dtype)
        offset, shape, dtype = self._layout
        row = int(np.prod(shape[1:])) * dtype.itemsize
        with open(self.root / "images.npy", "rb") as f:  # seek + read: os.pread is not on Windows
            f.seek(offset + i * row)
            data = f.read(row)
        if len(data) != row:
            raise InputError(f"{self.root / 'images.npy'}: truncated at sample {i}")
        return np.frombuffer(data, dtype=dtype).reshape(shape[1:]).astype(np.float32)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -self.completed <= i < self.completed:
            raise IndexError(f"sample {i} out of range for {self.completed} samples")
        img = self._read_image(i % self.completed)
        if self.transform is not None:
            img = np.asarray(self.transform(img), dtype=np.float32)
        pts = np.asarray(self.particles[i], dtype=np.float32)
        return torch.from_numpy(img)[None], torch.from_numpy(pts)


class OnlineAugmentedDataset(torch.utils.data.IterableDataset):
    """Fresh augmented samples every epoch, warped on ``device``; nothing is written to disk.

    Each iteration (epoch) draws ``samples_per_epoch`` shapes with ``sampler`` seeded by
    ``(seed, epoch)`` (the epoch counter advances at every ``iter()``, or set it with ``set_epoch``),
    warps the source images in batches of ``batch_size`` and yields ``(image (1, Z, Y, X) float32,
    particles (M, 3) float32 mm)`` on ``device``. ``transform`` maps a batch ``(B, 1, Z, Y, X)`` torch
    tensor (e.g. intensity normalisation on the GPU). Use with ``DataLoader(..., num_workers=0)``.

    ``ds[i]`` (and ``ds.__getitems__(indices)``, which warps them as one batch) give sample ``i`` of
    the current epoch without advancing it: the trainer indexes the set like a map-style one (so a
    ``DistributedSampler`` can shard an epoch across ranks) and calls ``set_epoch`` every epoch.
    """

    def __init__(
        self,
        images: np.ndarray,
        particles: np.ndarray,
        grid: Grid,
        shape_model: Any,
        sampler: Any,
        samples_per_epoch: int,
        seed: int = 0,
        device: str | torch.device | None = "auto",
        batch_size: int = 8,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        coarse: int = DEFAULT_COARSE,
        band: float = DEFAULT_BAND,
        landmarks: int | None = None,
    ) -> None:
        super().__init__()
        imgs, pts = _check_inputs(images, particles, grid, None)
        if samples_per_epoch < 1 or batch_size < 1:
            raise InputError(
                f"samples_per_epoch and batch_size must be positive, found {samples_per_epoch}, {batch_size}"
            )
        self.device = resolve_device(device)
        self.images = torch.as_tensor(imgs.astype(np.float32, copy=False), device=self.device)
        self.particles = pts
        self.grid = grid
        self.shape_model = shape_model
        self.sampler = sampler
        self.samples_per_epoch = int(samples_per_epoch)
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self.transform = transform
        self.coarse, self.band, self.landmarks = coarse, band, landmarks
        self.epoch = 0
        self._draw_cache: tuple[int, np.ndarray, np.ndarray] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.samples_per_epoch

    def draw(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The epoch's shapes before any warp: targets ``(n, M, 3)`` float64 mm and source subject
        indices ``(n,)`` int64; a pure function of ``(seed, epoch)`` (cached for the last epoch)."""
        if self._draw_cache is None or self._draw_cache[0] != int(epoch):
            rng = np.random.default_rng([self.seed, int(epoch)])
            d = self.sampler.sample(self.samples_per_epoch, rng)
            gen = np.asarray(self.shape_model.reconstruct(d.scores), dtype=np.float64)
            self._draw_cache = (int(epoch), gen, np.asarray(d.source, dtype=np.int64))
        return self._draw_cache[1], self._draw_cache[2]

    def _warp(self, epoch: int, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples ``rows`` of ``epoch`` as one batch: ``(B, 1, Z, Y, X)`` and ``(B, M, 3)`` float32."""
        gen, src = self.draw(epoch)
        idx = src[rows]
        spline = fit_warp(self.particles[idx], gen[rows], self.landmarks, device=self.device)
        warped = warp_images(
            self.images[torch.as_tensor(idx, device=self.device)][:, None],
            self.grid,
            None,
            None,
            coarse=self.coarse,
            band=self.band,
            spline=spline,
        )
        if self.transform is not None:
            warped = self.transform(warped)
        return warped, torch.as_tensor(gen[rows], dtype=torch.float32, device=self.device)

    def batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The epoch's samples in batches: ``(B, 1, Z, Y, X)`` float32 and ``(B, M, 3)`` float32."""
        for s in range(0, self.samples_per_epoch, self.batch_size):
            yield self._warp(epoch, np.arange(s, min(s + self.batch_size, self.samples_per_epoch)))

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Samples ``indices`` of the current epoch (one batched warp); the epoch does not advance."""
        rows = np.asarray(indices, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.samples_per_epoch):
            raise IndexError(f"samples {indices} out of range for {self.samples_per_epoch} samples per epoch")
        images, particles = self._warp(self.epoch, rows)
        return [(images[i], particles[i]) for i in range(len(rows))]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.__getitems__([int(i)])[0]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self.epoch
        self.epoch += 1
        for images, particles in self.batches(epoch):
            for i in range(images.shape[0]):
                yield images[i], particles[i]
