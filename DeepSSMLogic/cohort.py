"""A cohort: the subjects (image, correspondence particles, optional mesh/segmentation, labels) a
shape model and a network are built from.

Three sources give the same :class:`Cohort`:

- a CSV manifest (:func:`load_cohort` on ``.csv``), columns

  ========================  ==================================================================
  ``image``                 required; the subject's image (.nrrd .nii .nii.gz .mha .mhd)
  ``particles``             required (see ``require_particles``); .particles / .csv / .mrk.json
  ``id``                    optional; default: the image file name without its suffix
  ``mesh``                  optional; surface (.vtk .vtp .stl .ply)
  ``segmentation``          optional; label image
  ``group``                 optional; a free-text group label
  ``split``                 optional; ``train`` / ``val`` / ``test`` (any case); empty = train
  anything else             kept verbatim in :attr:`Subject.metadata` (labels, severity, ...)
  ========================  ==================================================================

  Column names are matched case-insensitively; paths are relative to the CSV's folder (absolute
  paths are allowed).
- a ShapeWorks project, ``.swproj`` (JSON) or ``.xlsx`` (spreadsheet); see
  :func:`load_shapeworks_project`.

Every source goes through one validation pass that collects *all* problems (missing files, unreadable
or non-3D images, particle files with NaN/Inf or a point count that differs from the rest, duplicate
ids, unknown splits, missing columns) into one :class:`~DeepSSMLogic.errors.ValidationError`.

Image-only subjects (no particles: new images to predict) are refused unless the caller passes
``require_particles=False``. Then a row without particles must be a test subject: an empty split
becomes ``"test"`` (as ShapeWorks does for subjects without a shape) and an explicit ``train``/``val``
split without particles is a problem, so the training and validation sets always have ground truth.

Particles are ``(M, 3)`` float64, mm, LPS (``DeepSSMLogic.io``).
"""

from __future__ import annotations

import csv
import io as _io
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError, ValidationError
from .fileutil import atomic_write_text
from .io import IMAGE_SUFFIXES, MESH_SUFFIXES, PARTICLE_SUFFIXES, read_particles, suffix_of
from .shapeworks_project import is_lfs_pointer

PathLike = str | os.PathLike[str]

SPLITS = ("train", "val", "test")
RESERVED_COLUMNS = ("id", "image", "particles", "mesh", "segmentation", "group", "split")
COHORT_SUFFIXES = (".csv", ".swproj", ".xlsx")
_LABEL_IMAGE_SUFFIXES = IMAGE_SUFFIXES + (".seg.nrrd",)


@dataclass
class Subject:
    """One subject. Paths are absolute; ``split`` None counts as ``"train"``."""

    id: str
    image: Path | None
    particles: Path | None
    mesh: Path | None = None
    segmentation: Path | None = None
    group: str | None = None
    split: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    # 4x4 maps from the image's / the particle file's physical space (mm, LPS) into the cohort's
    # training frame; None = identity. A ShapeWorks project trained in its world frame has
    # image_transform = procrustes @ alignment (and the same for local particles).
    image_transform: np.ndarray | None = None
    particles_transform: np.ndarray | None = None

    @property
    def split_name(self) -> str:
        """The split with the default applied: ``"train"``, ``"val"`` or ``"test"``."""
        return self.split or "train"


@dataclass
class Cohort:
    """The subjects of a manifest or project, in file order."""

    subjects: list[Subject]
    source: Path
    # particle arrays already read (by validation), keyed by absolute path: saves reading them twice
    _particle_cache: dict[Path, np.ndarray] = field(default_factory=dict, repr=False, compare=False)
    frame: str = "local"  # "local" (each image's own space) or "world" (ShapeWorks' aligned frame)
    frame_reason: str = ""
    excluded: list[str] = field(default_factory=list)  # ids of the rows skipped as excluded
    settings: dict[str, str] = field(default_factory=dict)  # the project's deepssm settings (text)
    notes: list[str] = field(default_factory=list)  # warnings for the person (chosen columns, ...)

    def __len__(self) -> int:
        return len(self.subjects)

    def __iter__(self) -> Iterator[Subject]:
        return iter(self.subjects)

    @property
    def ids(self) -> list[str]:
        return [s.id for s in self.subjects]

    def subject(self, subject_id: str) -> Subject:
        for s in self.subjects:
            if s.id == subject_id:
                return s
        raise InputError(f"{self.source}: no subject with id {subject_id!r}")

    def by_split(self, *splits: str) -> list[Subject]:
        """Subjects whose split is one of ``splits`` (case-insensitive); a None split counts as train."""
        if not splits:
            raise InputError(f"by_split needs at least one split name out of {SPLITS}")
        wanted = set()
        for name in splits:
            key = str(name).strip().lower()
            if key not in SPLITS:
                raise InputError(f"unknown split {name!r}; expected one of {SPLITS}")
            wanted.add(key)
        return [s for s in self.subjects if s.split_name in wanted]

    def split_counts(self) -> dict[str, int]:
        """Number of subjects per split, every split listed (zero included)."""
        counts = Counter(s.split_name for s in self.subjects)
        return {name: counts.get(name, 0) for name in SPLITS}

    @property
    def groups(self) -> list[str]:
        """The distinct group labels, in order of first appearance."""
        return list(dict.fromkeys(s.group for s in self.subjects if s.group is not None))

    @property
    def metadata_columns(self) -> list[str]:
        """Every metadata key of any subject, in order of first appearance."""
        return list(dict.fromkeys(k for s in self.subjects for k in s.metadata))

    def _read(self, path: Path) -> np.ndarray:
        if path not in self._particle_cache:
            self._particle_cache[path] = read_particles(path)
        return self._particle_cache[path]

    def n_particles(self) -> int | None:
        """Points per subject (M), from the first subject that has particles; None if none has."""
        for s in self.subjects:
            if s.particles is not None:
                return len(self._read(s.particles))
        return None

    def particles(self, subjects: Iterable[Subject | str] | None = None) -> np.ndarray:
        """Stacked correspondences ``(N, M, 3)`` float64, mm, LPS, of ``subjects`` (objects or ids;
        default: every subject). Raises :class:`InputError` if one has no particles file and
        :class:`ValidationError` if their point counts differ."""
        chosen = (
            self.subjects
            if subjects is None
            else [self.subject(s) if isinstance(s, str) else s for s in subjects]
        )
        if not chosen:
            raise InputError(f"{self.source}: no subjects selected, so there are no particles to stack")
        missing = [s.id for s in chosen if s.particles is None]
        if missing:
            raise InputError(f"{self.source}: these subjects have no particles file: {', '.join(missing)}")
        paths = [s.particles for s in chosen if s.particles is not None]
        arrays = [_to_frame(s.particles_transform, self._read(path)) for s, path in zip(chosen, paths)]
        problems = _count_problems(
            [(f"subject {s.id!r}", q, len(a)) for s, q, a in zip(chosen, paths, arrays)]
        )
        if problems:
            raise ValidationError(f"{self.source}: particle files differ in point count", problems)
        return np.stack(arrays).astype(np.float64, copy=False)


# -- loading ----------------------------------------------------------------------------------------
@dataclass
class _Row:
    """One subject as read from a file, before validation: raw strings, paths not yet resolved."""

    where: str  # "row 3" / "subject 2", for messages
    fields: dict[str, str]  # reserved columns (id, image, particles, mesh, segmentation, group, split)
    metadata: dict[str, str]
    image_transform: np.ndarray | None = None  # see Subject
    particles_transform: np.ndarray | None = None


@dataclass
class _Table:
    """What a reader found: the rows, file-level problems, and required fields whose column is absent
    (already reported once, so not again for every row)."""

    rows: list[_Row]
    problems: list[str]
    absent: set[str]
    frame: str = "local"
    frame_reason: str = "a CSV manifest: particles are in each image's own physical space"
    excluded: list[str] = field(default_factory=list)
    settings: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def load_cohort(
    path: PathLike,
    check_images: bool = True,
    *,
    require_particles: bool = True,
    particles: str = "local",
    domain: str | None = None,
    image_column: str | None = None,
    frame: str = "auto",
) -> Cohort:
    """Load and validate a cohort from a ``.csv`` manifest or a ShapeWorks ``.swproj``/``.xlsx`` project.

    ``check_images`` reads every image's header (not its voxels) to check that it is readable, 3D and
    scalar. ``require_particles=False`` admits image-only subjects (see the module docstring).
    ``particles``, ``domain``, ``image_column`` and ``frame`` apply to ShapeWorks projects only
    (:func:`load_shapeworks_project`); a CSV manifest has no transforms (``frame`` other than
    ``auto``/``local`` is refused). Raises :class:`ValidationError` listing every problem found.
    """
    p = Path(path)
    suffix = suffix_of(p)
    if suffix not in COHORT_SUFFIXES:
        raise InputError(f"{p}: unsupported cohort file {suffix!r}; expected one of {COHORT_SUFFIXES}")
    if not p.is_file():
        raise InputError(f"cohort file not found: {p}")
    if suffix == ".csv":
        if str(frame).lower() not in ("auto", "local"):
            raise InputError(f"{p}: --frame {frame}: a CSV manifest has no transforms; use auto or local")
        table = _read_manifest_csv(p, require_particles)
    else:
        table = _read_shapeworks_rows(p, particles, domain, image_column, require_particles, frame)
    return _build_cohort(p, table, check_images, require_particles)


def load_shapeworks_project(
    path: PathLike,
    particles: str = "local",
    *,
    domain: str | None = None,
    image_column: str | None = None,
    check_images: bool = True,
    require_particles: bool = True,
    frame: str = "auto",
) -> Cohort:
    """Import a ShapeWorks project (``.swproj`` JSON or ``.xlsx`` spreadsheet) as a :class:`Cohort`,
    read as ShapeWorks reads it (the full column mapping: ``docs/SHAPEWORKS.md``):

    - ``excluded`` rows are skipped (their ids in :attr:`Cohort.excluded`); ``fixed`` stays metadata;
    - the id is ``name``, else the first domain's shape file stem, then the groomed, then the local
      particle file's;
    - ``shape_/segmentation_/mesh_/contour_<domain>``: the input shape (mesh or segmentation by suffix);
    - the image is the first ``image_*`` column, else the first ``feature_*`` one, or the column
      ``image_column`` names (also a segmentation/groomed column, with a note);
    - ``local_particles_<domain>`` / ``world_particles_<domain>`` by ``particles``;
    - ``alignment_<domain>`` (v1 ``transform_<domain>``) and ``procrustes_<domain>``: each subject's
      transform ``world = procrustes @ alignment @ local``. ``frame="auto"`` trains in that world
      frame when a transform is not the identity (:attr:`Subject.image_transform` and
      ``particles_transform`` carry it), ``"local"`` in each image's own space, ``"world"`` forces it;
    - ``split``, ``group_*`` (the first → group) and other columns → split / group / metadata;
    - the ``deepssm`` sheet (object in ``.swproj``) → :attr:`Cohort.settings`.

    ShapeWorks' **local** particles are in the subject's original space, the physical space of the input
    shape and its image; its **world** particles are those moved by the transforms. Coordinates are ITK
    physical space (mm, LPS). Relative paths are resolved against the project file's folder
    (backslashes read as ``/``). A project with several domains needs ``domain=``.
    """
    p = Path(path)
    if suffix_of(p) not in (".swproj", ".xlsx"):
        raise InputError(f"{p}: not a ShapeWorks project; expected a .swproj or .xlsx file")
    return load_cohort(
        p,
        check_images,
        require_particles=require_particles,
        particles=particles,
        domain=domain,
        image_column=image_column,
        frame=frame,
    )


def _read_manifest_csv(p: Path, require_particles: bool) -> _Table:
    try:
        text = p.read_text(encoding="utf-8-sig")  # -sig: spreadsheets often write a BOM
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{p}: cannot read the cohort manifest ({e})") from None
    records = [
        (n, r) for n, r in enumerate(csv.reader(_io.StringIO(text)), start=1) if any(v.strip() for v in r)
    ]
    if not records:
        raise ValidationError(
            f"{p}: invalid cohort manifest", [f"{p}: the file is empty; expected a header row"]
        )
    problems: list[str] = []
    header = records[0][1]
    names = [h.strip() for h in header]
    columns: dict[int, str] = {}  # column index -> reserved name, or the metadata key
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        key = name.lower() if name.lower() in RESERVED_COLUMNS else name
        if not name:
            continue  # an unnamed column (e.g. a trailing comma): checked per row below
        if key in seen:
            problems.append(f"{p}: column {name!r} appears twice (columns {seen[key] + 1} and {i + 1})")
            continue
        seen[key] = i
        columns[i] = key
    required = ("image", "particles") if require_particles else ("image",)
    absent = {col for col in required if col not in seen}
    for col in sorted(absent):
        problems.append(f"{p}: required column {col!r} is missing; found columns {[n for n in names if n]}")

    rows = []
    for line, values in records[1:]:
        where = f"row {line}"
        if len(values) > len(names) and any(v.strip() for v in values[len(names) :]):
            problems.append(f"{p} {where}: {len(values)} values but the header has {len(names)} columns")
        for i in range(min(len(values), len(names))):
            if i not in columns and not names[i] and values[i].strip():
                problems.append(f"{p} {where}: value {values[i]!r} in column {i + 1}, which has no name")
        fields: dict[str, str] = {}
        metadata: dict[str, str] = {}
        for i, key in columns.items():
            value = values[i].strip() if i < len(values) else ""
            (fields if key in RESERVED_COLUMNS else metadata)[key] = value
        rows.append(_Row(where, fields, metadata))
    return _Table(rows, problems, absent)


FRAMES = ("auto", "local", "world")


def _read_shapeworks_rows(
    p: Path,
    particles: str,
    domain: str | None,
    image_column: str | None,
    require_particles: bool,
    frame: str = "auto",
) -> _Table:
    from . import shapeworks_project as swp

    kind = str(particles).strip().lower()
    if kind not in ("local", "world"):
        raise InputError(f"particles must be 'local' or 'world', found {particles!r}")
    frame_req = str(frame).strip().lower()
    if frame_req not in FRAMES:
        raise InputError(f"frame must be one of {FRAMES}, found {frame!r}")
    all_rows, settings = swp.read_project(p)
    if not all_rows:
        raise ValidationError(f"{p}: invalid ShapeWorks project", [f"{p}: the project has no subjects"])
    keys = list(dict.fromkeys(k for _, r in all_rows for k in r))
    domains = swp.domain_names(keys)
    if domain is not None:
        if domain not in domains:
            raise InputError(f"{p}: no domain {domain!r} in the project; its domains are {domains}")
        chosen = domain
    elif len(domains) == 1:
        chosen = domains[0]
    elif not domains:
        raise InputError(
            f"{p}: no shape_<domain>, segmentation_<domain>, mesh_<domain>, contour_<domain> or particle "
            f"column; found {keys}"
        )
    else:
        raise InputError(
            f"{p}: the project has {len(domains)} domains ({', '.join(domains)}); DeepSSM models one "
            "anatomy at a time, so name one (domain=..., or --domain on the command line)"
        )

    # excluded subjects are skipped before anything else, as ShapeWorks skips them (their files may be gone)
    excluded = [
        swp.subject_name(r, domains) or where for where, r in all_rows if swp.is_true(r.get("excluded", ""))
    ]
    table = [(where, r) for where, r in all_rows if not swp.is_true(r.get("excluded", ""))]
    notes: list[str] = []
    problems: list[str] = []
    absent: set[str] = set()
    sample = table[0][1] if table else {}
    image_col = _choose_image_column(p, keys, sample, chosen, image_column, notes, problems, absent)

    particle_col = f"{kind}_particles_{chosen}"
    other_col = f"{'world' if kind == 'local' else 'local'}_particles_{chosen}"
    if particle_col not in keys and other_col in keys:
        absent.add("particles")
        problems.append(
            f"{p}: the project has {other_col!r} but no {particle_col!r}; "
            f"load it with particles={other_col.split('_')[0]!r} (--particles {other_col.split('_')[0]})"
        )
    elif particle_col not in keys and require_particles:
        absent.add("particles")
        problems.append(
            f"{p}: the project has no {particle_col!r} column (no optimised particles); expected one "
            "for every subject, or require_particles=False (--allow-image-only) to load the images for "
            "prediction"
        )

    # frames: world = procrustes @ alignment @ local, per subject
    transforms: list[np.ndarray | None] = []
    for where, r in table:
        w, bad = swp.world_transform(r, chosen, keys)
        problems.extend(f"{p.name} {where}: {b}" for b in bad)
        transforms.append(w)
    tx_cols = swp.transform_columns(chosen, keys)
    moved = any(w is not None and not np.allclose(w, np.eye(4)) for w in transforms)
    if frame_req == "auto":
        used = "world" if moved else "local"
        reason = (
            f"auto: the project has {'/'.join(tx_cols)} transforms, so the model is trained in ShapeWorks' "
            "world frame (procrustes @ alignment @ local; each image resampled with its subject's transform)"
            if moved
            else "auto: the project has no non-identity alignment/procrustes transforms, so world = local "
            "(each subject's own image space)"
        )
    else:
        used = frame_req
        reason = f"--frame {frame_req}"
        if used == "world" and not tx_cols:
            reason += (
                "; the project has no alignment/procrustes columns, so images are taken as already aligned"
            )
    rows = []
    for (where, r), w in zip(table, transforms, strict=True):
        fields = {"id": swp.subject_name(r, domains)}
        fields["image"] = r.get(image_col, "") if image_col else ""
        fields["particles"] = r.get(particle_col, "")
        metadata: dict[str, str] = {}
        for pre in swp.SHAPE_PREFIXES:
            shape = r.get(f"{pre}{chosen}", "")
            if not shape:
                continue
            if pre == "contour_":
                metadata["contour"] = shape
            else:
                is_mesh = suffix_of(Path(shape)) in MESH_SUFFIXES or pre == "mesh_"
                fields["mesh" if is_mesh else "segmentation"] = shape
            break
        for k, v in r.items():
            if k in ("name", "excluded", image_col) or k.startswith(_SW_SKIPPED_PREFIXES):
                continue
            if k.lower() == "split":
                fields["split"] = v
            elif k.startswith("group_") and "group" not in fields:
                fields["group"] = v
            else:
                metadata[k] = v
        for key in ("image", "particles", "mesh", "segmentation"):
            if fields.get(key):
                fields[key] = fields[key].replace("\\", "/")
        image_tx: np.ndarray | None = None
        particles_tx: np.ndarray | None = None
        if used == "world" and w is not None:
            image_tx = w
            particles_tx = w if kind == "local" else None
        elif used == "local" and kind == "world" and w is not None:
            particles_tx = np.linalg.inv(w)
        rows.append(_Row(where, fields, metadata, image_tx, particles_tx))
    return _Table(rows, problems, absent, used, reason, excluded, settings, notes)


# every domain's files, transforms and ShapeWorks' own bookkeeping: not subject metadata
_SW_SKIPPED_PREFIXES = (
    "shape_",
    "segmentation_",
    "mesh_",
    "contour_",
    "local_particles_",
    "world_particles_",
    "groomed_",
    "alignment_",
    "transform_",
    "procrustes_",
    "landmarks_file_",
    "constraints_",
    "image_",
    "feature_",
)


def _choose_image_column(
    p: Path,
    keys: list[str],
    sample: dict[str, str],
    domain: str,
    requested: str | None,
    notes: list[str],
    problems: list[str],
    absent: set[str],
) -> str | None:
    """The project column holding each subject's image (ShapeWorks: the first ``image_*``, else the
    first ``feature_*`` column); ``requested`` names one, also a non-image column such as a
    segmentation (with a note saying what that means)."""
    from . import shapeworks_project as swp

    candidates = swp.image_columns(keys)
    if requested is not None:
        for col in (requested, f"image_{requested}", f"feature_{requested}"):
            if col in keys:
                break
        else:
            raise InputError(
                f"{p}: no column {requested!r} to take the images from; image columns: {candidates}, "
                f"all columns: {keys}"
            )
        if not col.startswith(swp.IMAGE_PREFIXES):
            notes.append(
                f"using column {col!r} as the image (opted in with --image-column): the network learns from "
                "these label/groomed images and must be given the same kind of image at prediction"
            )
        return col
    if candidates:
        if len(candidates) > 1:
            notes.append(
                f"image column {candidates[0]!r} (ShapeWorks' first image column; others: "
                f"{', '.join(candidates[1:])}; choose with --image-column)"
            )
        return candidates[0]
    image_like = [
        k
        for k in keys
        if k in (f"shape_{domain}", f"segmentation_{domain}", f"groomed_{domain}")
        and suffix_of(Path(sample.get(k, ""))) in _LABEL_IMAGE_SUFFIXES
    ]
    hint = (
        f"to learn from a segmentation or groomed image instead (the model then needs that kind of image at "
        f"prediction), opt in with --image-column COLUMN, one of {image_like}"
        if image_like
        else "add an image_<name> column naming each subject's scan"
    )
    absent.add("image")
    problems.append(
        f"{p}: no image column: DeepSSM learns from an image per subject, which ShapeWorks keeps in "
        f"image_<name> or feature_<name> columns, and this project has none (columns found: {keys}); {hint}"
    )
    return None


# -- validation ---------------------------------------------------------------------------------------
def _build_cohort(source: Path, table: _Table, check_images: bool, require_particles: bool) -> Cohort:
    base = source.absolute().parent
    rows, problems = table.rows, list(table.problems)
    if not rows:
        problems.append(f"{source}: no subjects (the file has a header but no rows)")
    subjects: list[Subject] = []
    cache: dict[Path, np.ndarray] = {}
    counts: list[tuple[str, Path, int]] = []
    first_row_of_id: dict[str, str] = {}
    for row in rows:
        f = row.fields
        image = _resolve(base, f.get("image", ""))
        sid = f.get("id", "") or (_stem(image) if image else "")
        where = f"{source.name} {row.where}" + (f" (id {sid!r})" if sid else "")

        def check_file(path: Path | None, what: str, suffixes: Sequence[str], *, where: str = where) -> bool:
            if path is None:
                return False
            if not path.is_file():
                problems.append(f"{where}: {what} file not found: {path}")
                return False
            if is_lfs_pointer(path):
                problems.append(
                    f"{where}: {what} file {path} is a Git LFS pointer, not the data; run `git lfs pull` "
                    "in its repository"
                )
                return False
            if suffix_of(path) not in suffixes:
                problems.append(
                    f"{where}: {what} file {path} has suffix {suffix_of(path)!r}; expected one of {suffixes}"
                )
                return False
            return True

        if not sid:
            problems.append(f"{where}: no id and no image to name the subject after")
        elif sid in first_row_of_id:
            problems.append(f"{where}: duplicate id {sid!r} (already used by {first_row_of_id[sid]})")
        else:
            first_row_of_id[sid] = row.where

        split_raw = f.get("split", "")
        split = split_raw.strip().lower() or None
        if split is not None and split not in SPLITS:
            problems.append(
                f"{where}: unknown split {split_raw!r}; expected one of {', '.join(SPLITS)} or empty (= train)"
            )
            split = None

        if image is None:
            if "image" not in table.absent:
                problems.append(f"{where}: no image given; every subject needs an image")
        elif check_file(image, "image", IMAGE_SUFFIXES) and check_images:
            problem = _image_header_problem(image, "image")
            if problem:
                problems.append(f"{where}: {problem}")

        particles = _resolve(base, f.get("particles", ""))
        if particles is None:
            if require_particles:
                if "particles" not in table.absent:
                    problems.append(
                        f"{where}: no particles file; expected one for every subject "
                        "(image-only subjects for prediction need require_particles=False / --allow-image-only)"
                    )
            elif split in ("train", "val"):
                problems.append(
                    f"{where}: split {split!r} needs a particles file; only test subjects may be image-only"
                )
            else:
                split = "test"
        elif check_file(particles, "particles", PARTICLE_SUFFIXES):
            try:
                pts = read_particles(particles)
            except InputError as e:
                problems.append(f"{where}: {e}")
            else:
                cache[particles] = pts
                counts.append((where, particles, len(pts)))

        mesh = _resolve(base, f.get("mesh", ""))
        check_file(mesh, "mesh", MESH_SUFFIXES)
        segmentation = _resolve(base, f.get("segmentation", ""))
        if check_file(segmentation, "segmentation", _LABEL_IMAGE_SUFFIXES) and check_images:
            problem = _image_header_problem(segmentation, "segmentation")
            if problem:
                problems.append(f"{where}: {problem}")

        subjects.append(
            Subject(
                id=sid,
                image=image,
                particles=particles,
                mesh=mesh,
                segmentation=segmentation,
                group=f.get("group", "") or None,
                split=split,
                metadata=dict(row.metadata),
                image_transform=row.image_transform,
                particles_transform=row.particles_transform,
            )
        )
    problems.extend(_count_problems(counts))
    if problems:
        raise ValidationError(f"{source}: invalid cohort", problems)
    return Cohort(
        subjects,
        source.absolute(),
        cache,
        frame=table.frame,
        frame_reason=table.frame_reason,
        excluded=list(table.excluded),
        settings=dict(table.settings),
        notes=list(table.notes),
    )


def _to_frame(matrix: np.ndarray | None, points: np.ndarray) -> np.ndarray:
    """``points`` ``(..., 3)`` moved by the 4x4 ``matrix`` (None: unchanged)."""
    if matrix is None:
        return points
    return np.asarray(points, dtype=np.float64) @ matrix[:3, :3].T + matrix[:3, 3]


def subject_particles(subject: Any) -> np.ndarray:
    """A subject's particles ``(M, 3)`` float64, mm, LPS, in the cohort's training frame."""
    return _to_frame(getattr(subject, "particles_transform", None), read_particles(subject.particles))


def particles_in_image_space(subject: Any) -> np.ndarray:
    """A subject's particles ``(M, 3)`` in its image's own physical space (mm, LPS): where a
    prediction from that image lands, whatever frame the model was trained in."""
    pts = subject_particles(subject)
    image_tx = getattr(subject, "image_transform", None)
    return pts if image_tx is None else _to_frame(np.linalg.inv(image_tx), pts)


def check_cohort_content(
    cohort: Cohort,
    spacing: float | None = None,
    margin_mm: float = 10.0,
    progress: Any = None,
) -> list[str]:
    """What training would reject, found before any work (reads every image's voxels):
    images with NaN/Inf or constant values; particles outside their image's physical extent (a
    local/world mix-up); a reference grid too large (see :func:`geometry.grid_size_problem`). ``spacing`` mm
    (None: the first training image's). Returns the problems (empty: none)."""
    import SimpleITK as sitk

    from .geometry import Grid, grid_size_problem

    problems: list[str] = []
    train_pts: list[np.ndarray] = []
    train_ids: list[str] = []
    first_spacing: tuple[float, ...] | None = None
    for i, s in enumerate(cohort.subjects):
        if progress is not None:
            progress(i, len(cohort.subjects), s.id)
        pts = None
        if s.particles is not None:
            try:
                pts = particles_in_image_space(s)
            except InputError as e:
                problems.append(f"subject {s.id!r}: {e}")
        if s.particles is not None and pts is not None and s.split_name == "train":
            train_pts.append(_to_frame(s.image_transform, pts))
            train_ids.append(s.id)
        if s.image is None:
            continue
        try:
            image = sitk.ReadImage(str(s.image))
        except RuntimeError as e:
            problems.append(
                f"subject {s.id!r}: cannot read image {s.image} ({str(e).strip().splitlines()[-1]})"
            )
            continue
        if first_spacing is None and s.split_name == "train":
            first_spacing = tuple(float(v) for v in image.GetSpacing())
        values = sitk.GetArrayViewFromImage(image)
        finite = np.isfinite(values)
        if not finite.all():
            problems.append(
                f"subject {s.id!r}: image {s.image} has {int((~finite).sum())} NaN/Inf voxel(s); "
                "training needs finite intensities"
            )
        elif values.size and float(values.max()) == float(values.min()):
            problems.append(
                f"subject {s.id!r}: image {s.image} is constant ({float(values.min()):g} everywhere); "
                "it shows no anatomy"
            )
        if pts is not None:
            grid = Grid.from_sitk(image)
            # generous: a frame mix-up puts the particles tens to hundreds of mm away, while a tight
            # field of view may legitimately clip some of them. Test: the particles' centre must lie
            # in the image's extent grown by max(20 mm, a quarter of the extent) on every side.
            extent = np.asarray(grid.size, dtype=np.float64) * np.asarray(grid.spacing)
            margin_vox = np.maximum(20.0, 0.25 * extent) / np.asarray(grid.spacing)
            centre_idx = grid.physical_to_index(pts.mean(axis=0))
            inside_box = np.all(
                (centre_idx >= -margin_vox) & (centre_idx <= np.asarray(grid.size) - 1 + margin_vox)
            )
            outside = 1.0 - float(grid.contains(pts).mean())
            if not inside_box:
                lo = grid.index_to_physical(np.zeros(3))
                hi = grid.index_to_physical(np.asarray(grid.size, dtype=np.float64) - 1)
                problems.append(
                    f"subject {s.id!r}: {100 * outside:.0f}% of its particles (centre "
                    f"{np.round(pts.mean(axis=0), 1).tolist()} mm) lie outside its image's physical extent "
                    f"({np.round(np.minimum(lo, hi), 1).tolist()} to {np.round(np.maximum(lo, hi), 1).tolist()} "
                    "mm): the particles and the image are in different frames. For a ShapeWorks project, "
                    "local particles overlay the original images (--particles local) and world particles "
                    "the aligned ones; see --frame"
                )
    if len(train_pts) >= 1:
        sp = spacing if spacing is not None else first_spacing
        if sp is not None:
            stacked = np.stack(train_pts) if len({len(p) for p in train_pts}) == 1 else None
            if stacked is not None:
                source = "--spacing" if spacing is not None else "the first training image; set --spacing"
                problem = grid_size_problem(stacked, sp, margin_mm, train_ids, source)
                if problem:
                    problems.append(problem)
    return problems


def _count_problems(counts: list[tuple[str, Path, int]]) -> list[str]:
    """One message per particle file whose point count differs from the most common one."""
    if not counts:
        return []
    tally = Counter(n for _, _, n in counts)
    majority, votes = tally.most_common(1)[0]
    return [
        f"{where}: particles file {path} has {n} points, but {votes} of {len(counts)} files have {majority}"
        for where, path, n in counts
        if n != majority
    ]


def _image_header_problem(path: Path, what: str) -> str | None:
    """Why the image at ``path`` is unusable (unreadable, not 3D, not scalar), or None; reads the header only."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        lines = str(e).strip().splitlines()
        return f"cannot read {what} {path} ({lines[-1] if lines else 'unknown error'})"
    if reader.GetDimension() != 3:
        size = "x".join(str(v) for v in reader.GetSize())
        return f"{what} {path} is {reader.GetDimension()}D (size {size}); expected a 3D image"
    if reader.GetNumberOfComponents() != 1:
        return f"{what} {path} has {reader.GetNumberOfComponents()} components per voxel; expected a scalar image"
    return None


def _resolve(base: Path, value: str) -> Path | None:
    if not value:
        return None
    return Path(os.path.normpath(base / Path(value).expanduser()))


def _stem(path: Path) -> str:
    suffix = suffix_of(path)
    name = path.name
    return name[: -len(suffix)] if suffix and name.lower().endswith(suffix) else path.stem


# -- writing -------------------------------------------------------------------------------------------
def write_cohort_csv(cohort: Cohort, path: PathLike) -> None:
    """Write ``cohort`` as a CSV manifest; paths relative to the CSV's folder where possible.

    Checks ids, splits and metadata keys first and raises :class:`ValidationError` (writing nothing)
    on any problem; the file appears atomically.
    """
    target = Path(path)
    if suffix_of(target) != ".csv":
        raise InputError(f"{target}: a cohort manifest must be a .csv file")
    problems: list[str] = []
    seen: set[str] = set()
    for i, s in enumerate(cohort.subjects, start=1):
        if not s.id:
            problems.append(f"subject {i}: empty id")
        elif s.id in seen:
            problems.append(f"subject {i}: duplicate id {s.id!r}")
        seen.add(s.id)
        if s.split is not None and s.split not in SPLITS:
            problems.append(f"subject {i} ({s.id!r}): unknown split {s.split!r}; expected one of {SPLITS}")
        for key in s.metadata:
            if key.strip().lower() in RESERVED_COLUMNS or not key.strip():
                problems.append(
                    f"subject {i} ({s.id!r}): metadata key {key!r} clashes with a manifest column"
                )
    if problems:
        raise ValidationError(f"{target}: cannot write the cohort manifest", problems)

    base = target.absolute().parent
    optional = [
        c
        for c in ("mesh", "segmentation", "group")
        if any(getattr(s, c) is not None for s in cohort.subjects)
    ]
    header = ["id", "image", "particles", *optional, "split", *cohort.metadata_columns]
    out = _io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    for s in cohort.subjects:
        values = {
            "id": s.id,
            "image": _relative(base, s.image),
            "particles": _relative(base, s.particles),
            "mesh": _relative(base, s.mesh),
            "segmentation": _relative(base, s.segmentation),
            "group": s.group or "",
            "split": s.split or "",
        }
        writer.writerow([values[c] if c in values else s.metadata.get(c, "") for c in header])
    atomic_write_text(target, out.getvalue())


def _relative(base: Path, path: Path | None) -> str:
    if path is None:
        return ""
    absolute = Path(os.path.abspath(path))
    try:
        return Path(os.path.relpath(absolute, base)).as_posix()
    except ValueError:  # another drive on Windows
        return absolute.as_posix()
