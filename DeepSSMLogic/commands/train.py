"""``deepssm train COHORT --out MODEL``: cohort → augmented set → trained network → model bundle.

Also runs under ``torchrun --nproc_per_node N -m DeepSSMLogic.cli train ...`` (DDP; rank 0 writes
the augmented set and the bundle, the other ranks wait for it).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from . import add_device_option, add_overwrite_option, progress_bars
from . import tqdm_progress as tqdm_progress  # re-exported: it lived here before commands/__init__
from ._cohort_args import (
    PROJECT_SETTINGS,
    add_cohort_options,
    apply_project_settings,
    cohort_from_args,
    cohort_header,
    track_defaults,
)


def _is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train",
        help="train Base- or TL-DeepSSM on a cohort and write a model bundle",
        description=(
            "Train DeepSSM on a cohort (CSV manifest or ShapeWorks project): the training particles define "
            "the reference grid (bounding box + margin), images are resampled onto it, intensities are "
            "normalised with training-set statistics, a PCA shape model drives model-based augmentation, "
            "and the network is trained with a validation split of the training pool (real + augmented). "
            "The result is a self-contained, verified bundle (directory, or one file when MODEL ends in .zip)."
        ),
        epilog=(
            "examples:\n"
            "  deepssm train data/cohort.csv --out models/femur --augment 500 --loss focal\n"
            "  deepssm train data/cohort.csv --out models/atrium.zip --variant tl --augment-online\n"
            "  torchrun --nproc_per_node 2 -m DeepSSMLogic.cli train data/cohort.csv --out models/m"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("cohort", help="cohort.csv, or a ShapeWorks project (.swproj or .xlsx)")
    parser.add_argument("--out", required=True, help="model bundle to write (directory, or .zip)")
    parser.add_argument("--variant", choices=("base", "tl"), default="base", help="network (default: base)")
    parser.add_argument("--loss", choices=("l2", "focal"), default="l2", help="loss (default: l2)")
    aug = parser.add_mutually_exclusive_group()
    aug.add_argument(
        "--augment", type=int, default=0, metavar="N", help="N offline augmented samples (default 0)"
    )
    aug.add_argument(
        "--augment-online", action="store_true", help="warp fresh augmented samples every epoch instead"
    )
    parser.add_argument(
        "--online-samples", type=int, default=0, metavar="N", help="with --augment-online: samples per epoch"
    )
    parser.add_argument(
        "--sampler",
        choices=("kde", "gaussian", "gmm"),
        default="kde",
        help="augmentation sampler (default kde)",
    )
    parser.add_argument(
        "--epochs",
        type=_epochs,
        default="auto",
        help="Base training epochs, or auto (default): 30 for the light encoders, 100 for the paper "
        "network (TL: see --extra)",
    )
    parser.add_argument("--batch-size", type=int, default=8)
    add_device_option(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--resume", action="store_true", help="continue an interrupted run from its checkpoint"
    )
    parser.add_argument(
        "--restart", action="store_true", help="discard an existing checkpoint and train from the start"
    )
    add_overwrite_option(parser)
    parser.add_argument(
        "--spacing",
        type=spacing_arg,
        help="reference grid spacing in mm, 'image' (the first training image's) or 'auto' (default: the "
        "images' spacing unless the anatomy's box then exceeds a voxel budget of 48^3 on a CPU, 128^3 on "
        "CUDA; then the finest spacing that fits; the training summary says what was chosen and why)",
    )
    parser.add_argument(
        "--downsample",
        type=float,
        default=1.0,
        help="multiply the spacing by this factor (paper: 1-4; without --spacing: the images' spacing times it)",
    )
    parser.add_argument("--margin", type=float, default=10.0, help="grid margin around the particles, mm")
    parser.add_argument("--conv-padding", choices=("auto", "valid", "same"), default="auto")
    parser.add_argument(
        "--encoder",
        choices=("paper", "light", "light2", "light3"),
        default="light2",
        help="image encoder: light2 (default: 3x3x3 residual convs with max pooling, for CPU training; "
        "same PCA/TL heads, always 'same' padding), light (stride-2 convs: cheaper, less accurate on noisy "
        "images), light3 (light2 with a 1x1x1 reduction to 16 channels before the FC layer: ~4x smaller "
        "weights and checkpoint) or paper (the paper's 5x5x5 conv stack); see BENCHMARKS.md, time to accuracy",
    )
    parser.add_argument(
        "--uncertainty",
        choices=("none", "mc-dropout", "ensemble", "variance"),
        default="none",
        help="per-particle uncertainty: none (the paper networks, default), mc-dropout (dropout in the FC "
        "head, --mc-samples passes at prediction), ensemble (--ensemble-size networks in the bundle, "
        "that many times the training) or variance (the paper network unchanged plus a small head "
        "predicting its error variance, fitted after training on --variance-corruptions corrupted "
        "copies of each training image); see BENCHMARKS.md, uncertainty",
    )
    parser.add_argument("--ensemble-size", type=int, default=3, help="networks of an ensemble (default 3)")
    parser.add_argument("--mc-dropout", type=float, default=0.2, help="MC dropout rate (default 0.2)")
    parser.add_argument("--mc-samples", type=int, default=30, help="MC dropout passes (default 30)")
    parser.add_argument(
        "--variance-corruptions",
        type=int,
        default=12,
        help="variance: corrupted copies (noise, blur or a cut field of view at random levels) of each "
        "training image the variance head is fitted on (default 12)",
    )
    parser.add_argument(
        "--variance-folds",
        type=int,
        default=None,
        help="variance: fit the head on out-of-fold residuals of K extra networks, each trained like the "
        "main one without one fold of the training subjects (K times the training time; 4 raised the "
        "per-image uncertainty/error rank correlation from 0.53 to 0.68 and 0.63 to 0.79 on two "
        "30-epoch femur cohorts, nothing at 8 epochs; BENCHMARKS.md). Default: 4 (fewer with under 8 "
        "training subjects); 0 = the main network's own residuals (no extra training)",
    )
    parser.add_argument(
        "--bundle-weights",
        choices=("float16", "float32"),
        default="float16",
        help="how the bundle stores the image encoder's weights (default float16: half the size; kept "
        "float32 when that would move a predicted particle by more than 0.01 mm); they load as float32",
    )
    parser.add_argument("--val-fraction", type=float, default=0.15, help="validation share of the pool")
    parser.add_argument("--n-modes", type=int, help="PCA modes (Base; default: 99%% of the variance)")
    parser.add_argument(
        "--extra",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="any other training setting, e.g. --extra lr=5e-4 --extra patience=10 (JSON values)",
    )
    parser.add_argument("--work-dir", help="intermediate files (default: MODEL.work next to MODEL)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_cohort_options(
        parser, image_only_help="accept image-only rows (test subjects); they are never trained on"
    )
    # a ShapeWorks project's deepssm settings fill the options not typed on the command line
    track_defaults(parser, [dest for dest, _ in PROJECT_SETTINGS.values()])
    parser.set_defaults(run=run)
    return parser


def _best_epoch_text(summary: dict) -> str:
    """``epoch 7`` (Base), ``tflank epoch 7`` (TL: the stage whose weights were kept)."""
    stage = summary.get("best_stage")
    prefix = f"{stage} " if stage and stage != "base" else ""
    return f"{prefix}epoch {summary.get('best_epoch')}"


def _memory_text(summary: dict[str, Any]) -> str:
    mem = summary.get("peak_memory") or {}
    text = (
        f"{summary.get('peak_rss_mb_total', mem.get('rss_mb', float('nan'))):.0f} MiB resident (process peak)"
    )
    if mem.get("cuda_max_allocated_mb") is not None:
        text += f", {mem['cuda_max_allocated_mb']:.0f} MiB allocated on the GPU"
    return text


def spacing_arg(text: str) -> float | str | None:
    """``--spacing``: a positive number of mm, "image" or "auto" (None)."""
    value = text.strip().lower()
    if value in ("auto", "image"):
        return None if value == "auto" else value
    try:
        mm = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number of mm, 'image' or 'auto', found {text!r}"
        ) from None
    if not mm > 0 or mm == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive spacing in mm, found {text!r}")
    return mm


def _epochs(text: str) -> int | str:
    """``--epochs``: a whole number ≥ 1, or "auto" (the encoder's default)."""
    value = text.strip().lower()
    if value == "auto":
        return value
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number ≥ 1 or 'auto', found {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number ≥ 1 or 'auto', found {text!r}")
    return n


def parse_extra(items: list[str]) -> dict[str, Any]:
    import json

    from ..errors import InputError

    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise InputError(f"--extra {item!r}: expected FIELD=VALUE")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def run(args: argparse.Namespace) -> int:
    from ..pipeline import TrainingOptions, train_model

    cohort = cohort_from_args(args)
    settings_report = apply_project_settings(args, cohort)
    if _is_rank0():
        print("\n".join([*cohort_header(cohort), "Settings:", *settings_report]))
    extra = parse_extra(args.extra)
    options = TrainingOptions(
        variant=args.variant,
        loss=args.loss,
        augment=args.online_samples if args.augment_online else args.augment,
        augment_online=args.augment_online,
        sampler=args.sampler,
        epochs=args.epochs,
        batch_size=args.batch_size,
        device=args.device,
        seed=args.seed,
        resume=args.resume,
        restart=args.restart,
        overwrite=args.overwrite,
        spacing=args.spacing,
        downsample=args.downsample,
        margin_mm=args.margin,
        conv_padding=args.conv_padding,
        encoder=args.encoder,
        val_fraction=args.val_fraction,
        n_modes=args.n_modes,
        extra=extra,
        uncertainty=args.uncertainty,
        ensemble_size=args.ensemble_size,
        mc_dropout=args.mc_dropout,
        mc_samples=args.mc_samples,
        variance_corruptions=args.variance_corruptions,
        variance_folds=args.variance_folds,
        bundle_weights=args.bundle_weights,
    )
    with progress_bars(disable=args.quiet or not _is_rank0()) as report:
        outcome = train_model(cohort, args.out, options, report, work_dir=args.work_dir)
    if outcome.bundle is not None:
        s = outcome.summary
        print(
            f"model: {outcome.bundle}\n"
            f"grid: {'x'.join(str(v) for v in s['grid']['size'])} voxels; {s['grid']['reason']}\n"
            f"best validation RMSE: {s.get('best_val_rmse_mm', float('nan')):.3f} mm "
            f"({_best_epoch_text(s)}, {s.get('epochs_run')} epochs, {s.get('seconds_total', 0):.0f} s)\n"
            f"epochs: {s['epochs']['n']} ({s['epochs']['source']})\n"
            f"peak memory: {_memory_text(s)}\n"
            f"intermediate files: {outcome.work_dir}"
        )
        head = s.get("variance_head")
        if head:
            print(
                f"variance head: {head.get('folds', 0)} out-of-fold networks ({head.get('folds_source', 'given')})"
            )
    return 0
