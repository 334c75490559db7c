"""``deepssm validate COHORT``: check a cohort manifest or ShapeWorks project and summarise it.

Exit 0 with a summary when the cohort is usable; otherwise every problem is printed and the exit code
is 2 (the dispatcher turns the :class:`~DeepSSMLogic.errors.ValidationError` into that).
"""

from __future__ import annotations

import argparse
from collections import Counter
from typing import Any

from ..cohort import SPLITS, Cohort, load_cohort


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "validate",
        help="check a cohort (CSV manifest or ShapeWorks .swproj/.xlsx) and print a summary",
        description=(
            "Check every file a cohort names (images readable, 3D and scalar; particle files finite and "
            "with one point count; ids unique; splits train/val/test) and print a summary. All problems "
            "are listed at once; the exit code is 0 when there are none and 2 otherwise."
        ),
        epilog="example: deepssm validate data/cohort.csv",
    )
    parser.add_argument("cohort", help="cohort.csv, or a ShapeWorks project (.swproj or .xlsx)")
    parser.add_argument(
        "--no-check-images",
        action="store_true",
        help="only check that image files exist (skip reading headers)",
    )
    parser.add_argument(
        "--allow-image-only",
        action="store_true",
        help="accept subjects without particles (new images to predict); they count as the test split",
    )
    parser.add_argument(
        "--particles",
        choices=("local", "world"),
        default="local",
        help="ShapeWorks projects: which particle files to use (default: local = the image's own space)",
    )
    parser.add_argument("--domain", help="ShapeWorks projects with several domains: the one to use")
    parser.add_argument(
        "--image-column", help="ShapeWorks projects with several image_* columns: the one to use"
    )
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    cohort = load_cohort(
        args.cohort,
        check_images=not args.no_check_images,
        require_particles=not args.allow_image_only,
        particles=args.particles,
        domain=args.domain,
        image_column=args.image_column,
    )
    print(summary(cohort))
    return 0


def summary(cohort: Cohort) -> str:
    """A few lines for a person: subjects per split, particle count, groups, metadata columns."""
    counts = cohort.split_counts()
    lines = [
        f"Cohort: {cohort.source}",
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
    lines.append("OK: no problems found")
    return "\n".join(lines)
