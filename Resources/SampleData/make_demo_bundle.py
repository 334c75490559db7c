"""Regenerate the one-click demo: a trained bundle, one held-out image with its ground-truth
particles, and manifest.json with SHA256 checksums.

    python Resources/SampleData/make_demo_bundle.py [--family femur] [--seed 0]

Runs the public ``deepssm demo`` command, so the shipped bundle is exactly what a user's demo trains:
its settings (``DemoSettings``: 40 synthetic subjects of 64³ at 1.5 mm, 256 particles, a 3 mm
reference grid, 80 KDE-augmented samples, 15 epochs, the light encoder, float16 bundle weights).
Ships the bundle (3.1 MB), the first held-out test image and its ground truth. Everything is
seeded and the training runs on one CPU thread (``--threads``), so a rerun on the same torch and CPU
kind gives the same weights. Takes a few minutes.

When a demo bundle is already in ``--out``, the script first predicts the new demo's held-out test
images with it as well and prints both held-out RMSEs (pre-aligned, as the demo predicts), so a
regeneration that loses accuracy is visible (the bundle is replaced either way: compare, then commit
or not).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
BUNDLE = "demo_bundle.zip"
IMAGE = "demo_image.nrrd"
TRUTH = "demo_ground_truth.particles"
REGENERATE = "python Resources/SampleData/make_demo_bundle.py"


def deepssm(*args: str, threads: int) -> None:
    cmd = [sys.executable, "-m", "DeepSSMLogic.cli", *args]
    print(f"+ OMP_NUM_THREADS={threads}", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": str(threads)})


def heldout_rmse(bundle: Path, tests: list[dict[str, str]], cohort_dir: Path) -> list[float]:
    """Per-subject RMSE (paper eq. 12, mm) of ``bundle`` on the test subjects, pre-aligned like the demo."""
    import numpy as np

    from DeepSSMLogic import io
    from DeepSSMLogic.analysis.metrics import rmse
    from DeepSSMLogic.predict import Predictor

    predictor = Predictor(bundle, device="cpu", align=False)
    preds = predictor.predict_many([cohort_dir / t["image"] for t in tests], batch_size=8)
    pred = np.stack([p.particles for p in preds])
    truth = np.stack([io.read_particles(cohort_dir / t["particles"]) for t in tests])
    return [float(v) for v in np.atleast_1d(rmse(pred, truth))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", default="femur")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(HERE), help="where the demo files and manifest go")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads of the training (default 1: the float sums, so the weights, do not depend "
        "on the machine's core count; also the fastest on a busy machine)",
    )
    args = p.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from DeepSSMLogic.bundle import pack_bundle
    from DeepSSMLogic.commands.demo import DemoSettings
    from DeepSSMLogic.fileutil import atomic_write_json, sha256_file

    out = Path(args.out)
    s = DemoSettings(family=args.family, seed=args.seed)
    with tempfile.TemporaryDirectory(prefix="deepssm-demo-") as tmp:
        demo_dir = Path(tmp) / "demo"
        deepssm(
            "demo", "--family", args.family, "--seed", str(args.seed), "--out", str(demo_dir), "--quiet",
            threads=args.threads,
        )  # fmt: skip
        result = json.loads((demo_dir / "demo_result.json").read_text(encoding="utf-8"))
        cohort_dir = demo_dir / "cohort"
        rows = list(csv.DictReader((cohort_dir / "cohort.csv").open(encoding="utf-8")))
        tests = [r for r in rows if r.get("split") == "test"]
        new = heldout_rmse(Path(result["bundle"]), tests, cohort_dir)
        report = {
            "new": {"heldout_rmse_mm": sum(new) / len(new)},
            "mean_shape_rmse_mm": result["baseline_rmse_mm"],
            "n_test": len(tests),
        }
        if (out / BUNDLE).is_file():
            old = heldout_rmse(out / BUNDLE, tests, cohort_dir)
            report["previous"] = {
                "bytes": (out / BUNDLE).stat().st_size,
                "heldout_rmse_mm": sum(old) / len(old),
            }
        out.mkdir(parents=True, exist_ok=True)
        pack_bundle(result["bundle"], out / BUNDLE)  # the demo writes a bundle folder
        report["new"]["bytes"] = (out / BUNDLE).stat().st_size
        print("held-out RMSE on the new demo's test subjects:", json.dumps(report, indent=1), flush=True)
        shutil.copyfile(cohort_dir / tests[0]["image"], out / IMAGE)
        shutil.copyfile(cohort_dir / tests[0]["particles"], out / TRUTH)
    files = {
        BUNDLE: {
            "role": "bundle",
            "description": f"{args.family} DeepSSM bundle (deepssm demo: {s.encoder} encoder, {s.epochs} epochs, "
            f"{s.augment} augmented samples; held-out RMSE {report['new']['heldout_rmse_mm']:.3f} mm vs "
            f"mean shape {report['mean_shape_rmse_mm']:.3f} mm over {len(tests)} test subjects)",
        },
        IMAGE: {"role": "image", "description": f"held-out synthetic {args.family} image (LPS)"},
        TRUTH: {"role": "ground_truth", "description": "its ground-truth particles (LPS mm)"},
    }
    for name, info in files.items():
        info["sha256"] = sha256_file(out / name)
        info["bytes"] = (out / name).stat().st_size
    atomic_write_json(
        out / "manifest.json",
        {
            "format": "deepssm-sample-data",
            "regenerate": f"{REGENERATE} --family {args.family} --seed {args.seed} --threads {args.threads}",
            "files": files,
        },
    )
    print(json.dumps(files, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
