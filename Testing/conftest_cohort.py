"""Helpers that write tiny cohorts on disk (8³ images, a few particles) for the cohort and CLI tests.

Imported explicitly (``from conftest_cohort import ...``); not a pytest conftest.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from DeepSSMLogic.io import write_image, write_particles


def tiny_image(size: int = 8, dim: int = 3, components: int = 1) -> sitk.Image:
    """A small float image with a non-trivial geometry."""
    shape = (size,) * dim
    if components == 1:
        image = sitk.GetImageFromArray(np.arange(np.prod(shape), dtype=np.float32).reshape(shape))
    else:
        image = sitk.GetImageFromArray(np.zeros(shape + (components,), np.float32), isVector=True)
    image.SetSpacing((1.5,) * dim)
    image.SetOrigin((-5.0,) * dim)
    return image


def write_tiny_cohort(
    root: Path,
    n: int = 4,
    m: int = 10,
    splits: list[str] | None = None,
    seed: int = 0,
    extra_columns: dict[str, list[str]] | None = None,
) -> tuple[Path, np.ndarray]:
    """Write ``n`` subjects (image, particles, segmentation) and ``root/cohort.csv``.

    Returns the manifest path and the particles ``(n, m, 3)`` that were written.
    """
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "particles").mkdir(exist_ok=True)
    (root / "segmentations").mkdir(exist_ok=True)
    particles = rng.normal(scale=10.0, size=(n, m, 3))
    splits = splits or (["train", "train", "val", "test"] * n)[:n]
    extra_columns = extra_columns or {}
    rows = []
    for i in range(n):
        sid = f"s{i:02d}"
        write_image(tiny_image(), root / "images" / f"{sid}.nrrd")
        write_image(sitk.Cast(tiny_image() > 100, sitk.sitkUInt8), root / "segmentations" / f"{sid}.nii.gz")
        write_particles(root / "particles" / f"{sid}.particles", particles[i])
        row = {
            "id": sid,
            "image": f"images/{sid}.nrrd",
            "particles": f"particles/{sid}.particles",
            "segmentation": f"segmentations/{sid}.nii.gz",
            "group": "a" if i % 2 == 0 else "b",
            "split": splits[i],
        }
        row.update({k: v[i] for k, v in extra_columns.items()})
        rows.append(row)
    manifest = root / "cohort.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return manifest, particles


def rewrite_manifest(manifest: Path, edit) -> None:
    """Apply ``edit(rows: list[dict]) -> list[dict]`` to a manifest's rows and write it back."""
    with open(manifest, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    rows = edit(rows)
    fieldnames = list(dict.fromkeys(k for r in rows for k in r))
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)
