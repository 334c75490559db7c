"""Regenerate the one-click demo: a small synthetic cohort, a small trained bundle, one held-out
image with its ground-truth particles, and manifest.json with SHA256 checksums.

    .venv/bin/python Resources/SampleData/make_demo_bundle.py [--epochs 30] [--n 24]

Uses only the public `deepssm` command line (synth + train), so the demo is exactly what a user
gets from the documented workflow. Everything is seeded; the bundle is about 15 MB (the paper's
conv stack, ~3.1 M weights, dominates) and the rest ~0.15 MB. Takes about 5 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import csv
import json
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


def deepssm(*args: str) -> None:
    cmd = [sys.executable, "-m", "DeepSSMLogic.cli", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", default="femur")
    p.add_argument("--n", type=int, default=24, help="synthetic subjects")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--particles", type=int, default=256)
    p.add_argument("--augment", type=int, default=64, help="offline augmented samples")
    p.add_argument("--downsample", type=float, default=2.0, help="grid coarsening (keeps the bundle small)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(HERE), help="where the demo files and manifest go")
    args = p.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from DeepSSMLogic.fileutil import atomic_write_json, sha256_file

    out = Path(args.out)
    with tempfile.TemporaryDirectory(prefix="deepssm-demo-") as tmp:
        cohort_dir = Path(tmp) / "cohort"
        deepssm(
            "synth",
            "--family",
            args.family,
            "--n",
            str(args.n),
            "--out",
            str(cohort_dir),
            "--seed",
            str(args.seed),
            "--size",
            "48",
            "48",
            "48",
            "--spacing",
            "2.0",
            "--particles",
            str(args.particles),
            "--quiet",
        )
        manifest = cohort_dir / "cohort.csv"
        rows = list(csv.DictReader(manifest.open(encoding="utf-8")))
        test = [r for r in rows if r.get("split") == "test"] or rows[-1:]
        deepssm(
            "train",
            str(manifest),
            "--out",
            str(Path(tmp) / BUNDLE),
            "--epochs",
            str(args.epochs),
            "--batch-size",
            "4",
            "--augment",
            str(args.augment),
            "--downsample",
            str(args.downsample),
            "--device",
            "cpu",
            "--seed",
            str(args.seed),
            "--quiet",
            "--extra",
            "pool_size=2",  # the FC input no longer scales with the grid (the conv layers still ~12 MB)
            "--work-dir",
            str(Path(tmp) / "work"),
        )
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(tmp) / BUNDLE, out / BUNDLE)
        shutil.copyfile(cohort_dir / test[0]["image"], out / IMAGE)
        shutil.copyfile(cohort_dir / test[0]["particles"], out / TRUTH)
    files = {
        BUNDLE: {"role": "bundle", "description": f"{args.family} DeepSSM bundle, {args.epochs} epochs"},
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
            "regenerate": f"{REGENERATE} --family {args.family} --n {args.n} --epochs {args.epochs} "
            f"--particles {args.particles} --augment {args.augment} --downsample {args.downsample} "
            f"--seed {args.seed}",
            "files": files,
        },
    )
    print(json.dumps(files, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
