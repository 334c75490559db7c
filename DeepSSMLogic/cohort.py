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
import json
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
        arrays = [self._read(path) for path in paths]
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


@dataclass
class _Table:
    """What a reader found: the rows, file-level problems, and required fields whose column is absent
    (already reported once, so not again for every row)."""

    rows: list[_Row]
    problems: list[str]
    absent: set[str]


def load_cohort(
    path: PathLike,
    check_images: bool = True,
    *,
    require_particles: bool = True,
    particles: str = "local",
    domain: str | None = None,
    image_column: str | None = None,
) -> Cohort:
    """Load and validate a cohort from a ``.csv`` manifest or a ShapeWorks ``.swproj``/``.xlsx`` project.

    ``check_images`` reads every image's header (not its voxels) to check that it is readable, 3D and
    scalar. ``require_particles=False`` admits image-only subjects (see the module docstring).
    ``particles``, ``domain`` and ``image_column`` apply to ShapeWorks projects only
    (:func:`load_shapeworks_project`). Raises :class:`ValidationError` listing every problem found.
    """
    p = Path(path)
    suffix = suffix_of(p)
    if suffix not in COHORT_SUFFIXES:
        raise InputError(f"{p}: unsupported cohort file {suffix!r}; expected one of {COHORT_SUFFIXES}")
    if not p.is_file():
        raise InputError(f"cohort file not found: {p}")
    if suffix == ".csv":
        table = _read_manifest_csv(p, require_particles)
    else:
        table = _read_shapeworks_rows(p, particles, domain, image_column, require_particles)
    return _build_cohort(p, table, check_images, require_particles)


def load_shapeworks_project(
    path: PathLike,
    particles: str = "local",
    *,
    domain: str | None = None,
    image_column: str | None = None,
    check_images: bool = True,
    require_particles: bool = True,
) -> Cohort:
    """Import a ShapeWorks project (``.swproj`` JSON or ``.xlsx`` spreadsheet) as a :class:`Cohort`.

    ShapeWorks keeps one row per subject (the ``"data"`` list of a ``.swproj``, the ``data`` sheet, or
    the first sheet, of an ``.xlsx``) with these columns:

    - ``name`` → :attr:`Subject.id` (default: the image file name without suffix);
    - ``shape_<domain>`` / ``segmentation_<domain>`` / ``mesh_<domain>``: the input shape, which
      becomes :attr:`Subject.mesh` or :attr:`Subject.segmentation` by its file suffix;
    - ``image_<name>``: the image; ``image_<domain>`` if present, else the only ``image_*`` column,
      else the one named by ``image_column`` (e.g. ``"image_ct"`` or ``"ct"``);
    - ``local_particles_<domain>`` / ``world_particles_<domain>``: the particle files, chosen by
      ``particles="local"`` (default) or ``"world"``;
    - ``group_<name>`` → :attr:`Subject.group` (the first such column; any others go to metadata);
    - any other column ("extra values", such as DeepSSM's ``split``) → ``split`` or metadata.
      Grooming and optimisation bookkeeping (``groomed_*``, ``alignment_*``, ``procrustes_*``,
      ``landmarks_file_*``, ``constraints_*``, ``feature_*``) is dropped.

    ShapeWorks' naming is the inverse of the usual imaging one: its **local** particles are in the
    subject's *original* space, the physical space of the input shape and so of the image, which is
    what a DeepSSM network must predict from that image. Its **world** particles are those points
    moved by the grooming alignment and Procrustes transforms into the shared, aligned model frame; they
    no longer overlay the image. Hence the default ``"local"``. Coordinates are taken as stored:
    ShapeWorks uses ITK physical space, i.e. mm, LPS.

    Relative paths are resolved against the project file's folder (backslashes are read as ``/``).
    A project with several domains (anatomies) needs ``domain=``; DeepSSM models one at a time.
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


# ShapeWorks project columns (Libs/Project/ProjectUtils.h): input shape prefixes, in the order that
# decides a domain's shape file, and bookkeeping prefixes that carry nothing DeepSSM needs.
_SW_SHAPE_PREFIXES = ("shape_", "segmentation_", "mesh_")
_SW_DROPPED_PREFIXES = (
    "contour_",
    "groomed_",
    "alignment_",
    "procrustes_",
    "landmarks_file_",
    "constraints_",
    "feature_",
    "transform_",
)
_SW_PARTICLE_PREFIXES = ("local_particles_", "world_particles_")


def _read_shapeworks_table(p: Path) -> list[tuple[str, dict[str, str]]]:
    """The subject rows of a ShapeWorks project as (where, {column: value string})."""
    if suffix_of(p) == ".swproj":
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"{p}: cannot read the ShapeWorks project as JSON ({e})") from None
        data = doc.get("data") if isinstance(doc, dict) else None
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise InputError(f"{p}: a .swproj file needs a 'data' list of subject objects")
        return [(f"subject {i + 1}", {str(k): _cell(v) for k, v in r.items()}) for i, r in enumerate(data)]

    import openpyxl

    try:
        wb = openpyxl.load_workbook(p, read_only=True, data_only=True)
    except Exception as e:  # openpyxl raises zipfile/KeyError/ValueError variants for bad files
        raise InputError(f"{p}: cannot read the ShapeWorks spreadsheet ({type(e).__name__}: {e})") from None
    try:
        ws = wb["data"] if "data" in wb.sheetnames else wb.worksheets[0]
        table = [[_cell(v) for v in r] for r in ws.iter_rows(values_only=True)]
    finally:
        wb.close()
    if not table:
        raise InputError(f"{p}: the spreadsheet's {ws.title!r} sheet is empty")
    header = [h.strip() for h in table[0]]
    rows = []
    for n, values in enumerate(table[1:], start=2):
        if any(v.strip() for v in values):  # ShapeWorks skips blank rows too
            rows.append((f"row {n}", {h: v for h, v in zip(header, values) if h}))
    return rows


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # spreadsheets store 3 as 3.0
    return str(value).strip()


def _read_shapeworks_rows(
    p: Path, particles: str, domain: str | None, image_column: str | None, require_particles: bool
) -> _Table:
    kind = str(particles).strip().lower()
    if kind not in ("local", "world"):
        raise InputError(f"particles must be 'local' or 'world', found {particles!r}")
    table = _read_shapeworks_table(p)
    if not table:
        raise ValidationError(f"{p}: invalid ShapeWorks project", [f"{p}: the project has no subjects"])
    keys = list(dict.fromkeys(k for _, r in table for k in r))

    domains = list(
        dict.fromkeys(k[len(pre) :] for k in keys for pre in _SW_SHAPE_PREFIXES if k.startswith(pre))
    )
    if not domains:  # a particles-only project still names its domains in the particle columns
        domains = list(
            dict.fromkeys(k[len(pre) :] for k in keys for pre in _SW_PARTICLE_PREFIXES if k.startswith(pre))
        )
    if domain is not None:
        if domain not in domains:
            raise InputError(f"{p}: no domain {domain!r} in the project; its domains are {domains}")
        chosen = domain
    elif len(domains) == 1:
        chosen = domains[0]
    elif not domains:
        raise InputError(
            f"{p}: no shape_<domain>, segmentation_<domain>, mesh_<domain> or particle column; found {keys}"
        )
    else:
        raise InputError(
            f"{p}: the project has {len(domains)} domains ({', '.join(domains)}); DeepSSM models one "
            "anatomy at a time, so name one (domain=..., or --domain on the command line)"
        )

    image_cols = [k for k in keys if k.startswith("image_")]
    if image_column is not None:
        col = image_column if image_column in image_cols else f"image_{image_column}"
        if col not in image_cols:
            raise InputError(f"{p}: no image column {image_column!r}; the image columns are {image_cols}")
        image_col: str | None = col
    elif f"image_{chosen}" in image_cols:
        image_col = f"image_{chosen}"
    elif len(image_cols) == 1:
        image_col = image_cols[0]
    elif not image_cols:
        image_col = None  # reported per row as a missing image, with the columns found
    else:
        raise InputError(f"{p}: several image columns {image_cols}; name one with image_column=...")

    particle_col = f"{kind}_particles_{chosen}"
    other_col = f"{'world' if kind == 'local' else 'local'}_particles_{chosen}"
    problems: list[str] = []
    absent: set[str] = set()
    if image_col is None:
        absent.add("image")
        problems.append(f"{p}: the project has no image_<name> column; DeepSSM needs an image per subject")
    if particle_col not in keys and other_col in keys:
        absent.add("particles")
        problems.append(
            f"{p}: the project has {other_col!r} but no {particle_col!r}; "
            f"load it with particles={other_col.split('_')[0]!r}"
        )
    elif particle_col not in keys and require_particles:
        absent.add("particles")
        problems.append(
            f"{p}: the project has no {particle_col!r} column (no optimised particles); expected one "
            "for every subject, or require_particles=False to load the images for prediction"
        )
    group_cols = [k for k in keys if k.startswith("group_")]
    domain_cols = {f"{pre}{chosen}" for pre in _SW_SHAPE_PREFIXES + _SW_PARTICLE_PREFIXES}

    rows = []
    for where, r in table:
        fields = {"id": r.get("name", ""), "image": r.get(image_col, "") if image_col else ""}
        fields["particles"] = r.get(particle_col, "")
        for pre in _SW_SHAPE_PREFIXES:
            shape = r.get(f"{pre}{chosen}", "")
            if shape:
                target = "mesh" if suffix_of(shape) in MESH_SUFFIXES or pre == "mesh_" else "segmentation"
                fields[target] = shape
                break
        if group_cols:
            fields["group"] = r.get(group_cols[0], "")
        metadata: dict[str, str] = {}
        for k, v in r.items():
            if k == "name" or k in domain_cols or k.startswith(("image_",) + _SW_DROPPED_PREFIXES):
                continue
            if k.startswith(_SW_SHAPE_PREFIXES + _SW_PARTICLE_PREFIXES):
                continue  # another domain's files
            if k.lower() == "split":
                fields["split"] = v
            elif k != (group_cols[0] if group_cols else None):
                metadata[k] = v
        for key in ("image", "particles", "mesh", "segmentation"):
            if fields.get(key):
                fields[key] = fields[key].replace("\\", "/")
        rows.append(_Row(where, fields, metadata))
    return _Table(rows, problems, absent)


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
            )
        )
    problems.extend(_count_problems(counts))
    if problems:
        raise ValidationError(f"{source}: invalid cohort", problems)
    return Cohort(subjects, source.absolute(), cache)


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
