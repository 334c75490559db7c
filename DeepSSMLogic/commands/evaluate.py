"""``deepssm evaluate MODEL COHORT --out DIR``: accuracy of a trained bundle on a cohort's test split."""

from __future__ import annotations

import argparse
from typing import Any

from . import add_device_option, add_overwrite_option, progress_bars
from ._cohort_args import add_cohort_options, cohort_from_args, cohort_header


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "evaluate",
        help="measure a trained model on held-out subjects and write an HTML report",
        description=(
            "Predict the test split of a cohort with a model bundle and compare with the ground truth "
            "(paper section 4): RMSE (eq. 12, mean of per-axis RMSEs), per-point RMSE mean/std "
            "heatmaps on the mean shape, and the surface-to-surface distance (both ways: mean, 95th "
            "percentile, Hausdorff; mm) between each ground-truth mesh and the mesh reconstructed from "
            "the predicted particles. Writes metrics.json, subjects.csv, per_point_rmse.csv, "
            "predictions/ (particles and meshes), figures/ and report.html into DIR."
        ),
        epilog="example:\n  deepssm evaluate models/femur data/femur/cohort.csv --out results/femur-eval",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", help="model bundle (directory or .zip) written by `deepssm train`")
    parser.add_argument(
        "cohort", help="cohort.csv or ShapeWorks project with images and ground-truth particles"
    )
    parser.add_argument("--out", required=True, help="output directory (created; files in it are replaced)")
    parser.add_argument(
        "--split",
        action="append",
        choices=("train", "val", "test"),
        help="split(s) to evaluate (repeatable; default: test)",
    )
    add_device_option(parser)
    parser.add_argument(
        "--no-align",
        action="store_true",
        help="images are already in the model frame: skip the rigid registration to the reference",
    )
    parser.add_argument(
        "--train-log", help="train_log.jsonl for the training curves (default: found next to MODEL)"
    )
    parser.add_argument("--no-figures", action="store_true", help="metrics only: no renders, no report.html")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_overwrite_option(parser)
    add_cohort_options(parser, image_only_help="also predict image-only rows (written, without metrics)")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..fileutil import check_output_dir, json_marker

    outputs = [
        "metrics.json",
        "subjects.csv",
        "per_point_rmse.csv",
        "report.html",
        "predictions/",
        "figures/",
    ]
    check_output_dir(
        args.out, outputs, json_marker("metrics.json", "model", "rmse_mm"), overwrite=args.overwrite
    )
    from ..analysis.evaluation import evaluate_model

    cohort = cohort_from_args(args)
    print("\n".join(cohort_header(cohort)))
    with progress_bars(disable=args.quiet) as report:
        summary = evaluate_model(
            args.model,
            cohort,
            args.out,
            splits=tuple(args.split or ("test",)),
            device=args.device,
            align=not args.no_align,
            train_log=args.train_log,
            render=not args.no_figures,
            progress=report,
        )
    line = f"{summary['n_subjects']} subject(s): RMSE {summary['rmse_mm']['mean']:.3f} ± {summary['rmse_mm']['std']:.3f} mm"
    if "surface_mean_mm" in summary:
        line += f", surface distance {summary['surface_mean_mm']['mean']:.3f} mm"
    print(line)
    for extra in uncertainty_lines(summary):
        print(extra)
    print(
        f"results: {args.out}/metrics.json" + ("" if args.no_figures else f", report: {args.out}/report.html")
    )
    return 0


def _rho(result: dict[str, Any]) -> str:
    return "undefined" if result["rho"] is None else f"{result['rho']:.3f}"


def uncertainty_lines(summary: dict[str, Any]) -> list[str]:
    """The console lines for the calibration and OOD sections of ``summary`` (none without them)."""
    lines = []
    cal = summary.get("calibration") or {}
    if cal.get("available"):
        lines.append(
            f"uncertainty ({cal['method']}): Spearman ρ predicted vs actual per-particle error "
            f"{_rho(cal['particle_spearman_pooled'])} pooled, median per subject "
            + (
                "undefined"
                if cal["particle_spearman_per_subject"]["median"] is None
                else f"{cal['particle_spearman_per_subject']['median']:.3f}"
            )
            + f"; per-subject mean uncertainty vs RMSE {_rho(cal['subject_spearman_mean_uncertainty_vs_rmse'])}"
        )
    elif cal:
        lines.append(cal.get("reason", "no uncertainty"))
    ood = summary.get("ood") or {}
    if ood.get("available"):
        flagged = ", ".join(f["id"] for f in ood["flagged"])
        lines.append(
            f"out of distribution: {ood['n_flagged']} of {ood['n_checked']} image(s) flagged"
            + (f" ({flagged})" if flagged else "")
        )
    return lines
