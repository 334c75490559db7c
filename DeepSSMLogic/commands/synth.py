"""``deepssm synth``: write a synthetic cohort with exact ground-truth correspondences.

Exit 0 with a summary; bad options (unknown family, fewer than 2 subjects, an image smaller than
16 voxels per axis, ...) raise :class:`~DeepSSMLogic.errors.InputError`, which the dispatcher turns
into one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import csv
from collections import Counter
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..progress import ProgressEvent


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "synth",
        help="generate a synthetic cohort (cranium, femur or atrium) with exact ground truth",
        description=(
            "Generate a synthetic cohort that mirrors one of the paper's datasets: images, "
            "segmentations, dense meshes and ground-truth correspondence particles (LPS mm), plus "
            "cohort.csv with groups, a train/val/test split and the family's metadata. "
            "Families: cranium (metopic craniosynostosis: severity), femur (cam-FAI: cam_height, "
            "shaft_length), atrium (AF recurrence: from the body size and roundness; bimodal appendage orientation). "
            "The same seed gives byte-identical files."
        ),
        epilog="example: deepssm synth --family femur --n 40 --out data/femur --seed 0",
    )
    parser.add_argument("--family", required=True, help="cranium, femur or atrium")
    parser.add_argument("--n", type=int, required=True, help="number of subjects (at least 2)")
    parser.add_argument("--out", required=True, type=Path, help="output directory (created or replaced)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--size",
        type=int,
        nargs=3,
        default=(64, 64, 64),
        metavar=("X", "Y", "Z"),
        help="image size in voxels (default 64 64 64; the paper's atrium: 118 69 88)",
    )
    parser.add_argument(
        "--spacing", type=float, default=1.5, help="isotropic voxel spacing in mm (default 1.5)"
    )
    parser.add_argument(
        "--particles", type=int, default=512, help="correspondence points per shape (default 512)"
    )
    parser.add_argument(
        "--pose-jitter", action="store_true", help="small random rotation and translation per subject"
    )
    parser.add_argument(
        "--truncate-fov", action="store_true", help="shift each shape so ~20%% of it leaves the image"
    )
    parser.add_argument(
        "--split",
        type=float,
        nargs=3,
        default=(0.7, 0.1, 0.2),
        metavar=("TRAIN", "VAL", "TEST"),
        help="split fractions (default 0.7 0.1 0.2; stratified by group)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from .. import synthetic

    if args.family not in synthetic.FAMILIES:
        raise InputError(
            f"--family: unknown family {args.family!r}; expected one of {', '.join(synthetic.FAMILIES)}"
        )
    if args.n < 2:
        raise InputError(f"--n: a cohort needs at least 2 subjects, found {args.n}")
    if min(args.size) < synthetic.MIN_IMAGE_SIZE:
        raise InputError(
            f"--size: at least {synthetic.MIN_IMAGE_SIZE} voxels per axis expected, found {' '.join(map(str, args.size))}"
        )
    if not args.spacing > 0:
        raise InputError(f"--spacing: a positive spacing in mm expected, found {args.spacing}")
    if not 3 <= args.particles <= synthetic.MAX_PARTICLES:
        raise InputError(f"--particles: expected 3 to {synthetic.MAX_PARTICLES}, found {args.particles}")

    bar = None
    if not args.quiet:
        from tqdm import tqdm

        bar = tqdm(total=args.n, desc=f"synth {args.family}", unit="subject")

    def progress(event: ProgressEvent) -> None:
        if bar is not None:
            bar.update(event.done - bar.n)

    try:
        csv_path = synthetic.generate_cohort(
            args.family,
            args.n,
            args.out,
            args.seed,
            image_size=tuple(args.size),
            spacing=args.spacing,
            n_particles=args.particles,
            pose_jitter=args.pose_jitter,
            truncate_fov=args.truncate_fov,
            split=tuple(args.split),
            progress=progress,
        )
    finally:
        if bar is not None:
            bar.close()
    print(summary(csv_path, args))
    return 0


def summary(csv_path: Path, args: argparse.Namespace) -> str:
    """A few lines: subjects per split and group, particles, image geometry, output paths."""
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    table = Counter((r["split"], r["group"]) for r in rows)
    groups = sorted({r["group"] for r in rows})
    lines = [f"synthetic {args.family} cohort: {len(rows)} subjects (seed {args.seed})"]
    for split in ("train", "val", "test"):
        parts = ", ".join(f"{table[(split, g)]} {g}" for g in groups)
        lines.append(f"  {split:<5} {sum(table[(split, g)] for g in groups):>4}  ({parts})")
    x, y, z = args.size
    lines.append(f"  particles: {args.particles} per shape (LPS mm)")
    lines.append(f"  images: {x}x{y}x{z} voxels at {args.spacing:g} mm")
    out = csv_path.parent
    lines.append(f"  manifest: {csv_path}")
    lines.append(f"  files: {out}/images, segmentations, meshes, particles")
    return "\n".join(lines)
