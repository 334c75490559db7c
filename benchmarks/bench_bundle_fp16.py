"""float16 storage of bundle weights (issue 16): size before/after and the change in predicted
particles on held-out images, in one run.

Re-saves a trained bundle twice with ``save_bundle`` — float32 weights (the baseline, as written
before schema 2) and float16 (``weights_dtype="float16"``) — then predicts every held-out image of
a cohort with both and reports the per-particle change (mm). Default: the shipped demo bundle and
the held-out (test split) subjects of the synthetic cohort it was trained on (``deepssm demo``'s
femur cohort, seed 0, regenerated here). Since issue 16 the shipped demo bundle itself stores
float16 weights, so re-saving it measures no rounding (change 0 by construction; the script says
so): pass ``--bundle`` a float32 bundle (``deepssm train --bundle-weights float32``) to measure it.
The numbers recorded in BENCHMARKS.md are from the first, float32 demo bundle.

    .venv/bin/python benchmarks/bench_bundle_fp16.py [--bundle B] [--cohort cohort.csv]
"""

from __future__ import annotations

import argparse
import csv
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from DeepSSMLogic import io  # noqa: E402
from DeepSSMLogic.bundle import load_bundle, save_bundle  # noqa: E402
from DeepSSMLogic.predict import Predictor  # noqa: E402

DEMO = ROOT / "Resources" / "SampleData" / "demo_bundle.zip"


def resave(src: Path, dst: Path, weights_dtype: str) -> Path:
    b = load_bundle(src)
    return save_bundle(
        dst,
        b.network,
        b.architecture,
        b.grid,
        b.normalizer,
        b.shape_model,
        b.reference_image(),
        io.read_mesh(b.template_mesh_path) if b.template_mesh_path else None,
        b.meta.get("training_summary"),
        template_particles=b.template_particles,
        hyperparameters=b.meta.get("hyperparameters"),
        mean_particles=b.mean_particles,
        weights_dtype=weights_dtype,
    )


def demo_cohort(tmp: Path) -> Path:
    from DeepSSMLogic import synthetic
    from DeepSSMLogic.commands.demo import DemoSettings

    s = DemoSettings()
    return Path(
        synthetic.generate_cohort(
            s.family, s.n_subjects, tmp / "cohort", s.seed, image_size=s.image_size, spacing=s.image_spacing,
            n_particles=s.n_particles,
        )
    )  # fmt: skip


def state_bytes(path: Path) -> int:
    state = torch.load(path, map_location="cpu", weights_only=True)
    return sum(v.numel() * v.element_size() for v in state.values())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", default=str(DEMO))
    p.add_argument("--cohort", help="cohort.csv whose test (else all) subjects are predicted")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory(prefix="bench-fp16-") as t:
        tmp = Path(t)
        cohort = Path(args.cohort) if args.cohort else demo_cohort(tmp)
        rows = list(csv.DictReader(cohort.open(encoding="utf-8")))
        held_out = [r for r in rows if r.get("split") == "test"] or rows
        storage = load_bundle(args.bundle).meta.get("weights", {}).get("storage", "float32")
        if storage == "float16":
            print(
                f"note: {args.bundle} already stores float16 weights: the change below is 0 by construction"
            )
        b32 = resave(Path(args.bundle), tmp / "fp32.zip", "float32")
        b16 = resave(Path(args.bundle), tmp / "fp16.zip", "float16")
        meta16 = load_bundle(b16).meta
        # the synthetic images are in the model frame: predicted as pre-aligned, as the demo does
        p32, p16 = Predictor(b32, device="cpu", align=False), Predictor(b16, device="cpu", align=False)
        changes, errors32, errors16 = [], [], []
        for r in held_out:
            image = io.read_image(cohort.parent / r["image"])
            a, b = p32.predict(image).particles, p16.predict(image).particles
            changes.append(np.linalg.norm(a - b, axis=1))
            if r.get("particles"):
                truth = io.read_particles(cohort.parent / r["particles"])
                errors32.append(np.sqrt(((a - truth) ** 2).sum(1).mean()))
                errors16.append(np.sqrt(((b - truth) ** 2).sum(1).mean()))
        ch = np.concatenate(changes)
        print(f"bundle: {args.bundle}\ncohort: {cohort} ({len(held_out)} held-out images)")
        print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}")
        print(f"weights section: { {k: v for k, v in meta16['weights'].items() if k != 'float32_kept'} }")
        print(f"kept float32: {meta16['weights'].get('float32_kept')}")
        print()
        print("| storage | bundle (bytes) | weights.pt tensors (bytes) | held-out RMSE (mm) |")
        print("|---|---:|---:|---:|")
        for name, path, err in (("float32", b32, errors32), ("float16", b16, errors16)):
            rmse = f"{np.mean(err):.4f}" if err else "n/a"
            with tempfile.TemporaryDirectory() as x:
                import zipfile

                zipfile.ZipFile(path).extract("weights.pt", x)
                sb = state_bytes(Path(x) / "weights.pt")
            print(f"| {name} | {path.stat().st_size} | {sb} | {rmse} |")
        print(
            f"\nper-particle change float16 vs float32 over {ch.size} particles: max {ch.max():.2e} mm, "
            f"mean {ch.mean():.2e} mm"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
