"""``deepssm demo``: the whole pipeline on a synthetic cohort in a few minutes on a laptop CPU.

synth → augment → train → predict the held-out test subjects (with alignment) → print their
RMSE (paper eq. 12) next to the baseline of predicting the training mean shape.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..progress import ProgressCallback, null_progress
from . import add_device_option, progress_bars


@dataclass
class DemoSettings:
    """Small settings: one family runs end to end in about 2 minutes on 2 idle CPU cores.

    The light encoder (``networks``, issue 16) with 80 augmented samples and 15 epochs: held-out
    RMSE ≤ 0.5 × the mean-shape baseline on all three families (docs/ACCURACY.md; gated by
    Testing/test_accuracy.py), where the paper's network at 200 samples and 20 epochs took
    2.5–7 minutes and left the cranium at 0.79.
    """

    family: str = "femur"
    n_subjects: int = 40
    image_size: tuple[int, int, int] = (64, 64, 64)
    image_spacing: float = 1.5
    n_particles: int = 256
    grid_spacing: float = 3.0  # reference grid: ~20-30 voxels per axis, conv_padding "same"
    augment: int = 80
    sampler: str = "kde"
    epochs: int = 15
    batch_size: int = 8
    loss: str = "l2"
    variant: str = "base"
    encoder: str = "light"  # "paper": the paper's network (slower on a CPU, less accurate at this budget)
    seed: int = 0
    device: str = "cpu"
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class DemoResult:
    family: str
    heldout_rmse_mm: float  # mean over held-out subjects of paper eq. 12
    baseline_rmse_mm: float  # the training mean shape as the prediction
    per_subject_rmse_mm: list[float]
    n_test: int
    bundle: Path
    seconds: dict[str, float]
    train_summary: dict[str, Any]

    @property
    def ratio(self) -> float:
        return self.heldout_rmse_mm / self.baseline_rmse_mm


def run_demo(
    out: str | Path,
    settings: DemoSettings | None = None,
    progress: ProgressCallback = null_progress,
    test_subjects: int | None = None,
) -> DemoResult:
    """Run the demo into ``out`` (cohort/, model/, predictions/) and return the held-out numbers."""
    from .. import io, synthetic
    from ..analysis.metrics import rmse
    from ..cohort import load_cohort
    from ..pipeline import TrainingOptions, train_model
    from ..predict import Predictor

    s = settings or DemoSettings()
    out = Path(out)
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    csv = synthetic.generate_cohort(
        s.family,
        s.n_subjects,
        out / "cohort",
        seed=s.seed,
        image_size=s.image_size,
        spacing=s.image_spacing,
        n_particles=s.n_particles,
        progress=progress,
    )
    seconds["synth"] = time.perf_counter() - t
    cohort = load_cohort(csv)

    t = time.perf_counter()
    options = TrainingOptions(
        variant=s.variant,
        loss=s.loss,
        augment=s.augment,
        sampler=s.sampler,
        epochs=s.epochs,
        batch_size=s.batch_size,
        device=s.device,
        seed=s.seed,
        spacing=s.grid_spacing,
        conv_padding="same",
        encoder=s.encoder,
        restart=True,  # the demo folder is the demo's own: a rerun starts over
        extra=dict(s.extra),
    )
    outcome = train_model(cohort, out / "model", options, progress)
    seconds["augment_train"] = time.perf_counter() - t
    assert outcome.bundle is not None

    t = time.perf_counter()
    test = cohort.by_split("test")[: test_subjects or None]
    # The synthetic test images share the training frame (no pose jitter), so they are predicted
    # as pre-aligned data; the registration path is exercised by the pose-jitter accuracy test.
    predictor = Predictor(outcome.bundle, device=s.device, align=False)
    preds = predictor.predict_many([x.image for x in test], batch_size=8, progress=progress)
    seconds["predict"] = time.perf_counter() - t
    gt = np.stack([io.read_particles(x.particles) for x in test])
    pred = np.stack([p.particles for p in preds])
    mean_shape = cohort.particles(cohort.by_split("train")).mean(axis=0)
    per_subject = np.atleast_1d(rmse(pred, gt))
    baseline = np.atleast_1d(rmse(np.broadcast_to(mean_shape, gt.shape), gt))
    pred_dir = out / "predictions"
    pred_dir.mkdir(parents=True, exist_ok=True)
    for x, p in zip(test, preds, strict=True):
        io.write_particles(pred_dir / f"{x.id}.particles", p.particles)
    return DemoResult(
        family=s.family,
        heldout_rmse_mm=float(per_subject.mean()),
        baseline_rmse_mm=float(baseline.mean()),
        per_subject_rmse_mm=[float(v) for v in per_subject],
        n_test=len(test),
        bundle=outcome.bundle,
        seconds=seconds,
        train_summary=outcome.summary,
    )


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "demo",
        help="synthetic cohort → augment → train → predict held-out subjects, with RMSE vs the mean shape",
        description=(
            "Run DeepSSM end to end on a synthetic cohort with exact ground truth and print the held-out "
            "RMSE (paper eq. 12) next to the baseline of predicting the training mean shape. Small settings: "
            "a few minutes on 2 CPU cores."
        ),
        epilog="example: deepssm demo --out demo --family femur",
    )
    parser.add_argument("--out", type=Path, default=Path("deepssm-demo"), help="output directory")
    parser.add_argument("--family", default="femur", help="cranium, femur (default) or atrium")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, help="override the demo's training epochs")
    parser.add_argument("--augment", type=int, help="override the number of augmented samples")
    parser.add_argument(
        "--encoder",
        choices=("light", "light2", "light3", "paper"),
        default="light",
        help="image encoder: light (default), light2 or the paper's network (slower on a CPU)",
    )
    add_device_option(parser, default="cpu", help="cpu (default), auto or cuda")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..errors import InputError
    from ..fileutil import atomic_write_json
    from ..synthetic import FAMILIES

    if args.family not in FAMILIES:
        raise InputError(f"--family: unknown family {args.family!r}; expected one of {', '.join(FAMILIES)}")
    settings = DemoSettings(family=args.family, seed=args.seed, device=args.device, encoder=args.encoder)
    if args.epochs is not None:
        settings.epochs = args.epochs
    if args.augment is not None:
        settings.augment = args.augment
    if args.out.exists() and any(args.out.iterdir()) and not (args.out / "cohort" / "cohort.csv").exists():
        raise InputError(f"{args.out}: exists and is not a previous demo output; choose another --out")
    t0 = time.perf_counter()
    with progress_bars(disable=args.quiet) as report:
        result = run_demo(args.out, settings, report)
    total = time.perf_counter() - t0
    s = result.train_summary
    print(
        f"DeepSSM demo ({result.family}, {settings.n_subjects} subjects, {settings.augment} augmented, "
        f"{settings.epochs} epochs, {settings.encoder} encoder)\n"
        f"  best validation RMSE   {s.get('best_val_rmse_mm', float('nan')):.3f} mm\n"
        f"  held-out RMSE (eq. 12) {result.heldout_rmse_mm:.3f} mm over {result.n_test} test subjects\n"
        f"  mean-shape baseline    {result.baseline_rmse_mm:.3f} mm  (ratio {result.ratio:.2f})\n"
        f"  time: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in result.seconds.items())
        + f", total {total:.0f} s\n"
        f"  model: {result.bundle}\n  predictions: {args.out / 'predictions'}"
    )
    doc = {**asdict(result), "bundle": str(result.bundle), "settings": asdict(settings)}
    atomic_write_json(args.out / "demo_result.json", json.loads(json.dumps(doc, default=str)))
    return 0
