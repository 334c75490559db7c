"""Severity on synthetic cranium cohorts (paper Table 2 protocol): the numbers docs/ACCURACY.md quotes.

Ground truth (default): for each of ``--seeds``, a cohort like the severity test's
(``Testing/helpers_analysis.trained_cranium_bundle``: 40 subjects, 48³ @ 2 mm, 128 particles, split
0.6/0.1/0.3); ``analyze_cohort`` on the ground-truth particles gives the AUC (normal vs metopic) and
the Pearson / Spearman correlation with the true severity; also |r| between the true severity and
each PCA mode's scores (PCA of all subjects' particles), which says which mode carries the pathology.

With ``--model M --cohort C``: the per-mode correlation of predicted with true PCA scores on the test
split (PCA of the cohort's training particles), i.e. which modes a trained network has learned, and
the severity from its predictions.

    .venv/bin/python benchmarks/severity_study.py --seeds 0 1 2 3
    .venv/bin/python benchmarks/severity_study.py --model MODEL --cohort cohort.csv --modes 6
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from DeepSSMLogic import io
from DeepSSMLogic.analysis.downstream import analyze_cohort
from DeepSSMLogic.cohort import load_cohort
from DeepSSMLogic.shape_model import ShapeModel
from DeepSSMLogic.synthetic import generate_cohort


def _severity_row(cohort: Path, out: Path, model: str | None = None) -> dict:
    res = analyze_cohort(cohort, out, model=model, device="cpu", align=False, n_permutations=10, render=False)
    return res["severity"]


def ground_truth(seeds: list[int], n_modes: int) -> None:
    print(
        "| seed | AUC | Pearson | Spearman | "
        + " | ".join(f"|r| mode {k + 1}" for k in range(n_modes))
        + " |"
    )
    print("|---" * (4 + n_modes) + "|")
    aucs, pears = [], []
    for seed in seeds:
        with tempfile.TemporaryDirectory() as d:
            csv = generate_cohort(
                "cranium", 40, Path(d) / "c", seed=seed, image_size=(48, 48, 48), spacing=2.0,
                n_particles=128, split=(0.6, 0.1, 0.3),
            )  # fmt: skip
            sev = _severity_row(csv, Path(d) / "a")
            coh = load_cohort(csv)
            parts = coh.particles()
            truth = np.array([float(s.metadata.get("severity") or 0.0) for s in coh.subjects])
            scores = ShapeModel.fit(parts).project(parts, n_modes)
            r = [abs(float(np.corrcoef(scores[:, k], truth)[0, 1])) for k in range(n_modes)]
        aucs.append(sev["auc"])
        pears.append(sev["pearson"])
        print(
            f"| {seed} | {sev['auc']:.3f} | {sev['pearson']:.3f} | {sev['spearman']:.3f} | "
            + " | ".join(f"{v:.2f}" for v in r)
            + " |",
            flush=True,
        )
    print(
        f"\nmean over {len(seeds)} seeds: AUC {np.mean(aucs):.3f} (worst {min(aucs):.3f}), "
        f"Pearson {np.mean(pears):.3f} (worst {min(pears):.3f})"
    )


def trained(model: str, cohort: str, n_modes: int) -> None:
    from DeepSSMLogic.predict import Predictor

    coh = load_cohort(cohort)
    train, test = coh.by_split("train"), coh.by_split("test")
    sm = ShapeModel.fit(coh.particles(train))
    truth = sm.project(np.stack([io.read_particles(s.particles) for s in test]), n_modes)
    preds = Predictor(model, device="cpu", align=False).predict_many([s.image for s in test])
    pred = sm.project(np.stack([p.particles for p in preds]), n_modes)
    r = [float(np.corrcoef(pred[:, k], truth[:, k])[0, 1]) for k in range(n_modes)]
    print(
        "per-mode correlation of predicted with true PCA scores (test split): "
        + " / ".join(f"{v:.2f}" for v in r)
    )
    with tempfile.TemporaryDirectory() as d:
        sev = _severity_row(Path(cohort), Path(d), model)
    print(f"severity from predictions: AUC {sev['auc']:.3f}, Pearson {sev.get('pearson', float('nan')):.3f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--modes", type=int, default=6, help="PCA modes to report")
    ap.add_argument("--model", help="a trained bundle (with --cohort): per-mode learning")
    ap.add_argument("--cohort", help="the bundle's cohort.csv")
    args = ap.parse_args()
    if bool(args.model) != bool(args.cohort):
        ap.error("--model and --cohort go together")
    if args.model:
        trained(args.model, args.cohort, args.modes)
    else:
        ground_truth(args.seeds, args.modes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
