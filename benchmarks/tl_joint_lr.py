"""TL-DeepSSM's joint stage at another learning rate, on cohorts a paper-claims run already made.

The paper-claims study (``benchmarks/paper_claims.py``) found the joint stage at the paper's lr
(0.001, both parts trained together) never beating the image-to-latent (T-flank) stage on
validation; the trainer then keeps the T-flank's weights. This retrains TL-L2 with the joint stage at
``--joint-lr`` on the same cohorts, seeds and budget, and prints the test RMSE next to the study's
TL (default lr) and Base rows. Example (2026-12-07, BENCHMARKS.md)::

    python benchmarks/tl_joint_lr.py --study /tmp/i14/full --family atrium --seeds 0 1 2 --out /tmp/jlr
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--study", type=Path, required=True, help="a paper_claims --out-dir with finished seeds")
    p.add_argument("--family", default="atrium")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--joint-lr", type=float, default=1e-4)
    p.add_argument("--out", type=Path, required=True, help="new folder for the retrained models")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    import torch

    from DeepSSMLogic import training
    from DeepSSMLogic.analysis.evaluation import evaluate_model
    from DeepSSMLogic.pipeline import TrainingOptions, train_model

    torch.set_num_threads(args.threads)
    stages = training._stages

    def with_joint_lr(config: training.TrainConfig) -> list:
        return [dataclasses.replace(s, lr=args.joint_lr) if s.name == "joint" else s for s in stages(config)]

    training._stages = with_joint_lr
    print(f"| seed | TL, joint lr {args.joint_lr:g} | stage kept | TL, study (lr 0.001) | Base, study |")
    print("|---|---|---|---|---|")
    for seed in args.seeds:
        seed_dir = args.study / args.family / f"seed{seed}"
        done = json.loads((seed_dir / "seed.json").read_text())
        s = done["settings"]
        cohort = seed_dir / "cohort" / "cohort.csv"
        model = args.out / f"{args.family}-seed{seed}"
        if not (model / "model.json").exists():
            train_model(
                cohort,
                model,
                TrainingOptions(
                    variant="tl",
                    loss="l2",
                    augment=s["augment"],
                    epochs=s["epochs"],
                    batch_size=s["batch_size"],
                    device="cpu",
                    seed=seed,
                    encoder=s["encoder"],
                    restart=True,
                    extra={
                        "ae_epochs": s["ae_epochs"],
                        "tf_epochs": s["epochs"],
                        "joint_epochs": max(1, s["epochs"] // 4),
                    },
                ),
            )
        ev = evaluate_model(
            model,
            cohort,
            args.out / f"eval-{args.family}-seed{seed}",
            device="cpu",
            align=False,
            render=False,
        )
        by_id = {r["id"]: r["rmse_mm"] for r in ev["subjects"]}
        new = float(np.mean([by_id[i] for i in done["test_ids"]]))
        kept = json.loads((model / "model.json").read_text())["training_summary"]["best_stage"]
        old = float(np.mean(done["models"]["tl-l2"]["rmse_mm"]))
        base = float(np.mean(done["models"]["base-l2"]["rmse_mm"]))
        print(f"| {seed} | {new:.3f} | {kept} | {old:.3f} | {base:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
