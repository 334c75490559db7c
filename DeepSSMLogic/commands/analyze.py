"""``deepssm analyze COHORT --out DIR``: the paper's downstream analyses from a cohort's labels."""

from __future__ import annotations

import argparse
from typing import Any

from . import add_device_option, add_overwrite_option, progress_bars
from ._cohort_args import add_cohort_options, cohort_from_args, cohort_header


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "analyze",
        help="severity, group differences, latent swim and descriptor classification from cohort labels",
        description=(
            "Downstream shape analysis (paper section 4): a Mahalanobis severity score from a PPCA of the "
            "normal group (eq. 13-15; AUC against the labels, Pearson/Spearman against a severity column), "
            "the difference of group means with point-wise and global Hotelling T² (and the norm of the mean "
            "difference) under label permutations with FDR, a latent swim between the "
            "group means, and a descriptor classifier (top-k trimmed descriptors, held-out accuracy; the "
            "Table 3 protocol). Uses the cohort's ground-truth particles, or the particles and descriptors "
            "a model predicts from the images with --model. Writes analysis.json, subjects.csv, figures/ "
            "and report.html into DIR."
        ),
        epilog=(
            "examples:\n"
            "  deepssm analyze data/cranium/cohort.csv --out results/cranium-gt\n"
            "  deepssm analyze data/cranium/cohort.csv --model models/cranium --out results/cranium-pred\n"
            "  deepssm analyze data/atrium/cohort.csv --normal-group no_recurrence --severity-column none --out r/"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("cohort", help="cohort.csv or ShapeWorks project with a label column")
    parser.add_argument("--out", required=True, help="output directory (created; files in it are replaced)")
    parser.add_argument(
        "--model", help="analyse particles predicted by this bundle instead of the ground truth"
    )
    parser.add_argument(
        "--normal-group", default="normal", help="label of the normal/control group (default: normal)"
    )
    parser.add_argument("--label-column", default="group", help="column holding the labels (default: group)")
    parser.add_argument(
        "--severity-column",
        default="severity",
        help="numeric column to correlate the severity with (default: severity; 'none' to skip)",
    )
    parser.add_argument("--variance", type=float, default=0.95, help="PPCA variance fraction (default 0.95)")
    parser.add_argument("--permutations", type=int, default=1000, help="permutations per test (default 1000)")
    parser.add_argument(
        "--k", type=int, default=10, help="descriptor dimensions kept by trimming (default 10)"
    )
    parser.add_argument("--classifier", choices=("logistic", "mlp"), default="logistic")
    parser.add_argument("--swim-steps", type=int, default=5, help="λ values in the latent swim (default 5)")
    parser.add_argument("--seed", type=int, default=0)
    add_device_option(parser, help="with --model: auto (default), cpu, cuda")
    parser.add_argument("--no-align", action="store_true", help="with --model: images are in the model frame")
    parser.add_argument("--no-figures", action="store_true", help="numbers only: no renders, no report.html")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_overwrite_option(parser)
    add_cohort_options(parser)
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..fileutil import check_output_dir, json_marker

    outputs = ["analysis.json", "subjects.csv", "report.html", "figures/"]
    check_output_dir(
        args.out, outputs, json_marker("analysis.json", "severity", "classifier"), overwrite=args.overwrite
    )
    from ..analysis.downstream import analyze_cohort
    from ..errors import InputError

    if args.permutations < 1:
        raise InputError(f"--permutations: expected ≥ 1, found {args.permutations}")
    if not 0 < args.variance < 1:
        raise InputError(f"--variance: expected a fraction in (0, 1), found {args.variance}")
    if args.swim_steps < 2:
        raise InputError(f"--swim-steps: expected ≥ 2, found {args.swim_steps}")
    severity_column = None if str(args.severity_column).lower() in ("", "none") else args.severity_column
    cohort = cohort_from_args(args, check_images=args.model is not None)
    print("\n".join(cohort_header(cohort)))
    with progress_bars(disable=args.quiet) as report:
        result = analyze_cohort(
            cohort,
            args.out,
            model=args.model,
            normal_group=args.normal_group,
            label_column=args.label_column,
            severity_column=severity_column,
            variance_fraction=args.variance,
            n_permutations=args.permutations,
            k=args.k,
            classifier_model=args.classifier,
            swim_steps=args.swim_steps,
            seed=args.seed,
            device=args.device,
            align=not args.no_align,
            render=not args.no_figures,
            progress=report,
        )
    sev = result["severity"]
    line = f"severity AUC {sev['auc']:.3f}"
    if "pearson" in sev:
        line += f", Pearson {sev['pearson']:.3f}, Spearman {sev['spearman']:.3f}"
    print(line)
    for name, r in result["classifier"]["results"].items():
        print(f"classifier [{name}]: held-out accuracy {r['accuracy']:.3f} (chance {r['chance']:.3f})")
    print(
        f"results: {args.out}/analysis.json"
        + ("" if args.no_figures else f", report: {args.out}/report.html")
    )
    return 0
