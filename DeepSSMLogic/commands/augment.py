"""``deepssm augment COHORT --n N --out DIR``: the paper's offline model-based augmentation.

Training split → reference grid → images resampled onto it → PCA shape model → sampler fitted on the
training scores → ``N`` generated shapes, each source image TPS-warped onto its shape, written as a
memory-mapped set (resumable) → augmentation quality report.
"""

from __future__ import annotations

import argparse
from typing import Any

from . import add_device_option, progress_bars
from ._cohort_args import add_cohort_options, cohort_from_args, cohort_header


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "augment",
        help="generate a model-based augmented training set (PCA sampler + TPS image warps)",
        description=(
            "Fit a PCA shape model to the training subjects' correspondences, sample N new shapes "
            "(KDE as in the paper, Gaussian or GMM), and warp each sample's source image (and "
            "segmentation) with a thin-plate spline so its correspondences land on the new shape. "
            "Writes DIR/images.npy (memory-mapped, (N, Z, Y, X) float32), particles.npy, scores.npy, "
            "source.npy, augmentation.json and the quality report. Rerunning with the same options "
            "resumes an interrupted run and yields the same set."
        ),
        epilog="example:\n  deepssm augment data/cohort.csv --n 5000 --sampler kde --out work/aug",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("cohort", help="cohort.csv, or a ShapeWorks project (.swproj or .xlsx)")
    parser.add_argument("--n", type=int, required=True, help="number of augmented samples")
    parser.add_argument("--out", required=True, help="output directory (resumed if it holds a partial set)")
    parser.add_argument("--sampler", choices=("kde", "gaussian", "gmm"), default="kde", help="default kde")
    add_device_option(parser)
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--spacing", type=float, help="reference grid spacing in mm (default: the images')")
    parser.add_argument("--margin", type=float, default=10.0, help="grid margin around the particles, mm")
    parser.add_argument("--batch-size", type=int, default=8, help="volumes warped at once (default 8)")
    parser.add_argument(
        "--coarse", type=int, default=None, help="TPS lattice coarsening (1 = exact; default: the fast path)"
    )
    parser.add_argument(
        "--landmarks", type=int, default=None, help="subsample the correspondences to this many TPS landmarks"
    )
    parser.add_argument(
        "--export-nrrd", type=int, default=0, metavar="K", help="also write the first K samples as .nrrd"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_cohort_options(parser)
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from .. import io
    from ..augment import make_sampler, quality_report
    from ..augment.dataset import check_set_location, write_augmented_set
    from ..augment.tps import DEFAULT_COARSE
    from ..cohort import subject_particles
    from ..errors import InputError
    from ..pipeline import prepare_training_arrays, reference_grid
    from ..shape_model import ShapeModel

    if args.n < 1:
        raise InputError(f"--n: expected a positive number of samples, found {args.n}")
    cohort = cohort_from_args(args)
    print("\n".join(cohort_header(cohort)))
    subjects = cohort.by_split("train")
    if len(subjects) < 2:
        raise InputError(
            f"{args.cohort}: augmentation needs at least 2 training subjects, found {len(subjects)}"
        )
    with progress_bars(disable=args.quiet) as report:
        particles = np.stack([subject_particles(s) for s in subjects])
        spacing = args.spacing
        if spacing is None:
            spacing = tuple(float(v) for v in io.read_image(subjects[0].image).GetSpacing())
        grid = reference_grid(particles, spacing, args.margin, ids=[s.id for s in subjects])
        check_set_location(
            args.out,
            args.n,
            grid,
            particles.shape[1],
            all(getattr(s, "segmentation", None) for s in subjects),
        )
        arrays = prepare_training_arrays(subjects, grid, report)
        shape_model = ShapeModel.fit(arrays.particles)
        real_scores = shape_model.project(arrays.particles)
        sampler = make_sampler(args.sampler).fit(real_scores)
        out = write_augmented_set(
            args.out,
            arrays.images,
            arrays.particles,
            grid,
            shape_model,
            sampler,
            args.n,
            seed=args.seed,
            device=args.device,
            progress=report,
            segmentations=arrays.segmentations,
            chunk=args.batch_size,
            coarse=DEFAULT_COARSE if args.coarse is None else args.coarse,
            landmarks=args.landmarks,
            export_nrrd=args.export_nrrd,
        )
    summary = quality_report(real_scores, np.load(out / "scores.npy"), out, shape_model)
    print(f"wrote {args.n} augmented samples of {len(subjects)} training subjects to {out}")
    total = summary.get("variance_ratio_summary", {}).get("total")
    if total is not None:
        print(f"total variance ratio (augmented/real): {total:.3f}; report: {out}")
    return 0
