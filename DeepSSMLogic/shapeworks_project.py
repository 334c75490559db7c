"""Reading ShapeWorks project files (``.swproj`` JSON, ``.xlsx`` spreadsheet) the way ShapeWorks does.

Pure parsing, no validation of the files a project names (that is ``cohort``'s job):

- :func:`read_project` → the subject rows (``{column: text}``) and the ``deepssm`` settings;
- :func:`parse_transform` → a 4x4 matrix from an ``alignment_*`` / ``procrustes_*`` cell, exactly as
  ShapeWorks' ``ProjectUtils::convert_transform`` reads it (16 numbers: a row-major 4x4 matrix; 12
  numbers: the legacy ITK parameters, of which ShapeWorks keeps only the translation, values 10-12);
- :func:`domain_names`, :func:`image_columns`, :func:`subject_name`, :func:`is_true`: ShapeWorks'
  rules for domains, the image column, display names and boolean cells (``excluded``, ``fixed``).

A point ``p`` of a subject's original ("local") space goes to the shared ("world") frame as
``procrustes @ alignment @ p`` (homogeneous, mm, LPS).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError
from .io import suffix_of

# Libs/Project/ProjectUtils.h prefixes: input shapes (their order decides a subject's shape file),
# particles, image-like columns, and the per-domain transforms
SHAPE_PREFIXES = ("shape_", "segmentation_", "mesh_", "contour_")
PARTICLE_PREFIXES = ("local_particles_", "world_particles_")
GROOMED_PREFIX = "groomed_"
IMAGE_PREFIXES = ("image_", "feature_")
ALIGNMENT_PREFIXES = ("alignment_", "transform_")  # transform_ : version-1 spreadsheets
PROCRUSTES_PREFIX = "procrustes_"
BOOKKEEPING_PREFIXES = ("landmarks_file_", "constraints_")
SETTINGS_SHEET = "deepssm"

_LFS_MAGIC = b"version https://git-lfs.github.com/spec/"


def is_lfs_pointer(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a Git LFS pointer text file (the real content was never pulled)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(_LFS_MAGIC)) == _LFS_MAGIC
    except OSError:
        return False


def read_project(path: Path) -> tuple[list[tuple[str, dict[str, str]]], dict[str, str]]:
    """``(rows, settings)``: each row ``(where, {column: text})`` in file order (blank rows skipped,
    as ShapeWorks does) and the project's ``deepssm`` key/value settings (empty when absent)."""
    if suffix_of(path) == ".swproj":
        return _read_swproj(path)
    return _read_xlsx(path)


def _read_swproj(p: Path) -> tuple[list[tuple[str, dict[str, str]]], dict[str, str]]:
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{p}: cannot read the ShapeWorks project as JSON ({e})") from None
    data = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise InputError(f"{p}: a .swproj file needs a 'data' list of subject objects")
    rows = [(f"subject {i + 1}", {str(k): cell(v) for k, v in r.items()}) for i, r in enumerate(data)]
    raw = doc.get(SETTINGS_SHEET) or {}
    settings = {str(k): cell(v) for k, v in raw.items()} if isinstance(raw, dict) else {}
    return rows, settings


def _read_xlsx(p: Path) -> tuple[list[tuple[str, dict[str, str]]], dict[str, str]]:
    try:
        import openpyxl
    except ModuleNotFoundError:
        raise InputError(
            f"{p}: reading .xlsx projects needs the openpyxl package (pip install openpyxl), "
            "or save the project as .swproj"
        ) from None
    try:
        wb = openpyxl.load_workbook(p, read_only=True, data_only=True)
    except Exception as e:  # openpyxl raises zipfile/KeyError/ValueError variants for bad files
        raise InputError(f"{p}: cannot read the ShapeWorks spreadsheet ({type(e).__name__}: {e})") from None
    try:
        ws = wb["data"] if "data" in wb.sheetnames else wb.worksheets[0]
        title = ws.title
        table = [[cell(v) for v in r] for r in ws.iter_rows(values_only=True)]
        settings: dict[str, str] = {}
        if SETTINGS_SHEET in wb.sheetnames:
            for r in list(wb[SETTINGS_SHEET].iter_rows(values_only=True))[1:]:  # header: key, value
                if r and r[0] is not None and len(r) > 1:
                    settings[cell(r[0])] = cell(r[1])
    finally:
        wb.close()
    if not table:
        raise InputError(f"{p}: the spreadsheet's {title!r} sheet is empty")
    header = [h.strip() for h in table[0]]
    rows = []
    for n, values in enumerate(table[1:], start=2):
        if any(v.strip() for v in values):  # ShapeWorks skips blank rows too
            rows.append((f"row {n}", {h: v for h, v in zip(header, values) if h}))
    return rows, settings


def cell(value: Any) -> str:
    """A spreadsheet/JSON cell as text (``3.0`` → ``"3"``, None → ``""``)."""
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # spreadsheets store 3 as 3.0
    return str(value).strip()


def is_true(text: str) -> bool:
    """ShapeWorks' reading of a boolean cell (``excluded``, ``fixed``)."""
    return text.strip().lower() in ("true", "1", "yes", "on")


def parse_transform(text: str) -> np.ndarray:
    """4x4 matrix of a transform cell. Raises :class:`InputError` on anything but 12 or 16 numbers."""
    try:
        values = [float(v) for v in re.split(r"[\s,;]+", text.strip()) if v]
    except ValueError:
        raise InputError(f"expected 16 (or legacy 12) numbers, found {text[:80]!r}") from None
    m = np.eye(4)
    if len(values) == 16:
        m[:] = np.asarray(values).reshape(4, 4)  # vtkMatrix4x4 data: row-major
    elif len(values) == 12:
        m[:3, 3] = values[9:12]  # ITK parameters; ShapeWorks keeps the translation only
    else:
        raise InputError(f"expected 16 (or legacy 12) numbers, found {len(values)}")
    if not np.all(np.isfinite(m)):
        raise InputError("the transform has NaN or Inf values")
    if not np.allclose(m[3], [0.0, 0.0, 0.0, 1.0]):
        raise InputError(f"the last row is {m[3].tolist()}, expected [0, 0, 0, 1] (an affine transform)")
    if abs(np.linalg.det(m[:3, :3])) < 1e-9:
        raise InputError("the transform's 3x3 part is singular")
    return m


def domain_names(keys: Sequence[str]) -> list[str]:
    """The project's domains, from its input-shape columns (else its particle columns), in column order."""
    found = [k[len(pre) :] for k in keys for pre in SHAPE_PREFIXES if k.startswith(pre)]
    if not found:
        found = [k[len(pre) :] for k in keys for pre in PARTICLE_PREFIXES if k.startswith(pre)]
    return list(dict.fromkeys(found))


def image_columns(keys: Sequence[str]) -> list[str]:
    """ShapeWorks' candidate image columns: every ``image_*`` column, then every ``feature_*`` one."""
    return [k for pre in IMAGE_PREFIXES for k in keys if k.startswith(pre)]


def subject_name(row: dict[str, str], domains: Sequence[str]) -> str:
    """ShapeWorks' display name: ``name``, else the first domain's input shape file stem, else the
    groomed file's, else the local particle file's."""
    name = row.get("name", "").strip()
    if name:
        return name
    for prefixes in (SHAPE_PREFIXES, (GROOMED_PREFIX,), ("local_particles_",)):
        for d in domains:
            for pre in prefixes:
                value = row.get(f"{pre}{d}", "").strip()
                if value:
                    return file_stem(value)
    return ""


def file_stem(value: str) -> str:
    """File name without directory and suffix (``a/b/c.nii.gz`` → ``c``)."""
    name = value.replace("\\", "/").rsplit("/", 1)[-1]
    suffix = suffix_of(Path(name))
    return name[: -len(suffix)] if suffix and name.lower().endswith(suffix) else name.rsplit(".", 1)[0]


def world_transform(
    row: dict[str, str], domain: str, keys: Sequence[str]
) -> tuple[np.ndarray | None, list[str]]:
    """``(procrustes @ alignment, problems)`` for ``domain`` in ``row``: None when the project has no
    transform column for it. An empty cell counts as the identity (ShapeWorks' default)."""
    problems: list[str] = []
    found = False
    total = np.eye(4)
    for col in transform_columns(domain, keys):
        found = True
        text = row.get(col, "").strip()
        if not text:
            continue
        try:
            m = parse_transform(text)
        except InputError as e:
            problems.append(f"column {col!r}: {e}")
            continue
        total = m @ total  # alignment first, then procrustes (the columns come in that order)
    return (total if found else None), problems


def transform_columns(domain: str, keys: Sequence[str]) -> list[str]:
    """The transform columns of ``domain`` that ``keys`` holds, in application order."""
    cols = [f"{pre}{domain}" for pre in ALIGNMENT_PREFIXES if f"{pre}{domain}" in keys][:1]
    if f"{PROCRUSTES_PREFIX}{domain}" in keys:
        cols.append(f"{PROCRUSTES_PREFIX}{domain}")
    return cols
