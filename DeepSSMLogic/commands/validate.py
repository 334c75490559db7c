"""``deepssm validate COHORT``: check a cohort manifest or ShapeWorks project and summarise it.

Exit 0 with a summary when the cohort is usable; otherwise every problem is printed and the exit code
is 2 (the dispatcher turns the :class:`~DeepSSMLogic.errors.ValidationError` into that).
"""

from __future__ import annotations

import argparse
from collections import Counter
from typing import Any

from ..cohort import SPLITS, Cohort, check_cohort_content
from ..errors import ValidationError
from ._cohort_args import PROJECT_SETTINGS, add_cohort_options, cohort_from_args, cohort_header


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "validate",
        help="check a cohort (CSV manifest or ShapeWorks .swproj/.xlsx) and print a summary",
        description=(
            "Check every file a cohort names (images readable, 3D and scalar, with finite, non-constant "
            "values; particle files finite, with one point count, and lying on their image; ids unique; "
            "splits train/val/test; a reference grid of sane size) and print a summary, with the frame "
            "a ShapeWorks project is used in and why (docs/SHAPEWORKS.md). All problems are listed at "
            "once; the exit code is 0 when there are none and 2 otherwise."
        ),
        epilog="example: deepssm validate data/cohort.csv",
    )
    parser.add_argument("cohort", help="cohort.csv, or a ShapeWorks project (.swproj or .xlsx)")
    parser.add_argument(
        "--no-check-images",
        action="store_true",
        help="only check that image files exist (skip reading their headers and voxels)",
    )
    parser.add_argument(
        "--spacing",
        type=float,
        help="reference grid spacing (mm) for the grid-size check (default: the project's, else the images')",
    )
    add_cohort_options(parser)
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    cohort = cohort_from_args(args, check_images=not args.no_check_images)
    if not args.no_check_images:
        # what training would reject (image values, particles off their image, grid size), before any work
        spacing = args.spacing
        if spacing is None and cohort.settings.get("spacing"):
            try:
                spacing = PROJECT_SETTINGS["spacing"][1](cohort.settings["spacing"])
            except ValueError:
                spacing = None
        problems = check_cohort_content(cohort, spacing)
        if problems:
            raise ValidationError(f"{cohort.source}: the files load, but training would fail", problems)
    print(summary(cohort))
    return 0


def summary(cohort: Cohort) -> str:
    """A few lines for a person: subjects per split, particle count, groups, metadata columns."""
    counts = cohort.split_counts()
    lines = [
        f"Cohort: {cohort.source}",
        *cohort_header(cohort),
        f"Subjects: {len(cohort)} (" + ", ".join(f"{name} {counts[name]}" for name in SPLITS) + ")",
    ]
    n_particles = cohort.n_particles()
    image_only = sum(s.particles is None for s in cohort.subjects)
    line = f"Particles: {n_particles} per subject (mm, LPS)" if n_particles else "Particles: none"
    if image_only:
        line += f"; {image_only} image-only subject(s) (test)"
    lines.append(line)
    groups = Counter(s.group for s in cohort.subjects if s.group is not None)
    lines.append("Groups: " + (", ".join(f"{g} ({groups[g]})" for g in cohort.groups) or "none"))
    lines.append("Metadata columns: " + (", ".join(cohort.metadata_columns) or "none"))
    if cohort.settings:
        lines.append(
            "Project deepssm settings (defaults for train; the command line wins): "
            + ", ".join(f"{k}={v}" for k, v in cohort.settings.items())
        )
    lines.append("OK: no problems found")
    return "\n".join(lines)
