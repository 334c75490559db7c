"""K-fold networks for the out-of-fold variance-head probe (issue 13): train, for each of ``--folds``
folds of an ``uncertainty_study.py --out DIR`` cohort's training subjects, the study's ``none``
network (same options: augment, epochs, grid spacing, encoder, seed) **without that fold**, with its
own augmented set (drawn from the remaining training subjects only, so the fold's shapes do not leak
in through augmentation). Fold k = the training subjects at positions ``i % folds == k`` in the
cohort's order; the fold's subjects become ``test`` rows of ``OUT/fold-k/cohort.csv`` (validation
subjects unchanged). Resumable: a fold whose bundle exists is skipped.

    python benchmarks/variance_oof_folds.py --study /tmp/i13w/full --out /tmp/oof --folds 4 --epochs 8

``benchmarks/variance_oof_probe.py`` reads the result.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def fold_of(index: int, folds: int) -> int:
    return index % folds


def write_fold_cohort(src: Path, dst: Path, fold: int, folds: int) -> list[str]:
    """``src`` (a cohort CSV) with fold ``fold``'s training subjects marked ``test`` and every path
    absolute; returns those subjects' ids."""
    with src.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    held, i = [], 0
    for row in rows:
        for col in ("image", "particles", "mesh", "segmentation"):
            if row.get(col):
                row[col] = str((src.parent / row[col]).resolve())
        if (row.get("split") or "train").lower() == "train":
            if fold_of(i, folds) == fold:
                row["split"] = "test"
                held.append(row["id"])
            i += 1
    dst.parent.mkdir(parents=True, exist_ok=True)
    with dst.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return held


def main(argv: list[str] | None = None) -> int:
    import warnings

    import torch

    from DeepSSMLogic.errors import IntensityRangeWarning
    from DeepSSMLogic.pipeline import TrainingOptions, train_model

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study", required=True, help="an uncertainty_study.py --out folder (read only)")
    p.add_argument("--out", required=True)
    p.add_argument("--folds", type=int, default=4)
    p.add_argument("--only", type=int, nargs="*", help="train these folds only")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--augment", type=int, default=100)
    p.add_argument("--grid-spacing", type=float, default=3.0)
    p.add_argument("--encoder", default="light")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    warnings.simplefilter("ignore", IntensityRangeWarning)
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    for k in a.only if a.only else range(a.folds):
        folder = out / f"fold-{k}"
        held = write_fold_cohort(Path(a.study) / "cohort" / "cohort.csv", folder / "cohort.csv", k, a.folds)
        if (folder / "model" / "model.json").exists():
            print(f"fold {k}: bundle exists, skipped")
            continue
        opts = TrainingOptions(
            augment=a.augment,
            epochs=a.epochs,
            device="cpu",
            seed=a.seed,
            restart=True,
            spacing=a.grid_spacing,
            encoder=a.encoder,
            uncertainty="none",
        )
        t0 = time.perf_counter()
        outcome = train_model(folder / "cohort.csv", folder / "model", opts, work_dir=folder / "work")
        s = time.perf_counter() - t0
        (folder / "fold.json").write_text(json.dumps({"fold": k, "held_out": held, "seconds": s}, indent=1))
        print(
            f"fold {k}: {len(held)} held out, trained in {s:.0f} s, best val RMSE "
            f"{outcome.summary.get('best_val_rmse_mm')}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
