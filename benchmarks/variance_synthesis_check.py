"""Does analysis-by-synthesis see a subject's error (issue 13, ρ subject)? A diagnostic, not a head.

For an image and its predicted particles, the training images (on the bundle's grid, normalised)
are thin-plate-spline warped from their true particles onto the *predicted* particles
(``augment.tps.warp_images``, the augmentation's warp) and compared with the image: if the
prediction is wrong, no warped training image should match it well. Scores (log mean squared
difference of normalised intensities): ``nn3`` = the mean of the 3 best-matching training images,
``median`` = the median over them, ``ref`` = the bundle's reference (mean) image warped from the
PCA mean onto the prediction. Printed: ρ(score, RMSE) on

* the 28 training subjects' clean images predicted by the fold network that did not see them
  (``variance_oof_folds.py``; the fold's own subjects left out of the warped set), with the
  fraction of subjects whose score would be lower for the *true* particles (a sanity check: a
  useful score should be lower at the truth);
* the study's 80 held-out images (final network), the 8 clean ones, and within each corruption
  kind and level.

    python benchmarks/variance_synthesis_check.py --study /tmp/i13w/full --folds-dir /tmp/oof
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
for p in (HERE, HERE.parent):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import uncertainty_study as us  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    import SimpleITK as sitk
    import torch

    from DeepSSMLogic import io
    from DeepSSMLogic.augment.tps import warp_images
    from DeepSSMLogic.cohort import load_cohort, subject_particles
    from DeepSSMLogic.predict import Predictor
    from DeepSSMLogic.preprocess import resample_to_grid

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--study", required=True)
    ap.add_argument("--folds-dir", required=True)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    warnings.simplefilter("ignore")  # the corrupted images trigger intensity-range warnings by design
    torch.set_num_threads(a.threads)
    study = Path(a.study)
    t0 = time.perf_counter()
    final = Predictor(study / "model-none", device="cpu", align=False)
    grid, norm = final.bundle.grid, final.bundle.normalizer
    cohort = load_cohort(study / "cohort" / "cohort.csv")
    by_id = {s.id: s for s in cohort.subjects}
    train = cohort.by_split("train")
    ids = [s.id for s in train]

    def on_grid(img: Any) -> np.ndarray:
        return norm(resample_to_grid(img, grid)).astype(np.float32)

    def read(s: Any) -> Any:
        return sitk.Cast(io.read_image(s.image), sitk.sitkFloat32)

    images = torch.from_numpy(np.stack([on_grid(read(s)) for s in train]))
    particles = torch.from_numpy(np.stack([subject_particles(s) for s in train]))
    ref = torch.from_numpy(norm(sitk.GetArrayFromImage(final.bundle.reference_image()).astype(np.float32)))
    mean_p = torch.from_numpy(np.asarray(final.bundle.mean_particles))

    def scores(
        x: np.ndarray, pred: np.ndarray, exclude: set[str] = frozenset()
    ) -> tuple[float, float, float]:
        keep = [i for i, s in enumerate(ids) if s not in exclude]
        target = torch.from_numpy(np.repeat(pred[None], len(keep), 0))
        warped = warp_images(images[keep], grid, particles[keep], target)[:, 0].numpy()
        d = ((warped - x[None]) ** 2).mean((1, 2, 3))
        wr = warp_images(ref[None], grid, mean_p[None], torch.from_numpy(pred[None]))[0, 0].numpy()
        return (
            float(np.log(np.sort(d)[:3].mean())),
            float(np.log(np.median(d))),
            float(np.log(((wr - x) ** 2).mean())),
        )

    rows = []
    for f in sorted(Path(a.folds_dir).glob("fold-*/fold.json")):
        info = json.loads(f.read_text())
        pr = Predictor(f.parent / "model", device="cpu", align=False)
        subs = [by_id[i] for i in info["held_out"]]
        imgs = [read(s) for s in subs]
        for s, im, q in zip(subs, imgs, pr.predict_many(imgs, batch_size=8), strict=True):
            truth = subject_particles(s)
            x = on_grid(im)
            rmse = float(np.sqrt(((q.particles - truth) ** 2).sum(-1).mean()))
            out = set(info["held_out"])
            rows.append((rmse, *scores(x, q.particles, out), scores(x, truth, out)[0]))
    r = np.array(rows)
    names = ("nn3", "median", "ref")
    print(
        f"OOF clean ({len(r)} subjects, fold networks): "
        + ", ".join(f"ρ(RMSE, {n}) {us.spearman(r[:, 0], r[:, i + 1]):.3f}" for i, n in enumerate(names))
        + f"; nn3 lower at the true particles for {100 * (r[:, 4] < r[:, 1]).mean():.0f} % "
        f"[{time.perf_counter() - t0:.0f} s]",
        flush=True,
    )
    held = us.build_images(
        us.parse_args(["--out", str(study)]), study / "cohort" / "cohort.csv", study / "other" / "cohort.csv"
    )["held"]
    preds = final.predict_many([h["image"] for h in held], batch_size=16)
    h = np.array(
        [
            (
                float(np.sqrt(((q.particles - x["truth"]) ** 2).sum(-1).mean())),
                *scores(on_grid(x["image"]), q.particles),
            )
            for x, q in zip(held, preds, strict=True)
        ]
    )
    clean = np.array([x["kind"] == "clean" for x in held])
    for label, m in (("held-out 80 images", slice(None)), ("held-out 8 clean", clean)):
        print(
            f"{label}: "
            + ", ".join(f"ρ(RMSE, {n}) {us.spearman(h[m, 0], h[m, i + 1]):.3f}" for i, n in enumerate(names))
        )
    print("| kind level | mean RMSE mm | mean nn3 | ρ(RMSE, nn3) within (8 subjects) |\n|---|---|---|---|")
    for kind in us.CORRUPTIONS:
        for level in (1, 2, 3):
            m = np.array([x["kind"] == kind and x["level"] == level for x in held])
            print(
                f"| {kind} {level} | {h[m, 0].mean():.3f} | {h[m, 1].mean():.2f} | {us.spearman(h[m, 0], h[m, 1]):.2f} |"
            )
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
