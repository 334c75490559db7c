"""How much the ``variance`` method's per-subject ρ depends on the head's training draw (issue 13).

A diagnostic on the held-out set of an ``uncertainty_study.py --out DIR`` run, *not* a way to choose
settings: it takes that run's frozen ``none`` network (``DIR/model-none``) and refits the variance
head for several seeds. Variant ``product`` is ``variance_head.fit_variance_head`` itself (every MLP
on its own corruption draw of the training subjects, on the grid); the others fit
``variance_head.fit_heads`` with one corruption draw shared by the MLPs (the fit before the draw
study), corrupted on the reference grid or at the images' own resolution and then resampled (as the
earlier probe did), on the training subjects only or the training + validation subjects. Prints
ρ subject (Spearman, per-image mean predicted uncertainty vs per-image RMSE over the study's 80
held-out images, the study's definition; the scale factor does not change a rank correlation), its
mean and SD over the seeds, and two oracles that bound what an image-quality signal can reach: ρ of
the true mean RMSE per corruption condition, and of each subject's clean-image RMSE.

    python benchmarks/variance_head_draws.py --out /tmp/i13v/full --variants product --seeds 0 1 2 3 4 5
    python benchmarks/variance_head_draws.py --out /tmp/i13v/full --variants grid-train --heads 3 \
        --seeds 0 1 2 3 4 5                                     # the fit before: 3 MLPs, one shared draw
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent
for p in (REPO, REPO.parent):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import uncertainty_study as us  # noqa: E402

VARIANTS = ("product", "grid-train", "native-train", "grid-trainval", "native-trainval")


def main(argv: list[str] | None = None) -> int:
    import SimpleITK as sitk
    import torch

    from DeepSSMLogic import io
    from DeepSSMLogic.augment.corruption import random_corruption
    from DeepSSMLogic.cohort import load_cohort, subject_particles
    from DeepSSMLogic.errors import IntensityRangeWarning
    from DeepSSMLogic.predict import Predictor
    from DeepSSMLogic.preprocess import resample_to_grid
    from DeepSSMLogic.variance_head import (
        DEFAULT_HEADS,
        decoder_jacobian,
        features_and_prediction,
        fit_heads,
        fit_variance_head,
        particle_uncertainty,
        true_descriptors,
    )

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="an uncertainty_study.py --out folder")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--heads", type=int, default=DEFAULT_HEADS, help="MLPs per head (product: one draw each)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--corruptions", type=int, default=12)
    a = p.parse_args(argv)
    warnings.simplefilter("ignore", IntensityRangeWarning)
    out = Path(a.out)
    images = us.build_images(
        us.parse_args(["--out", str(out)]), out / "cohort" / "cohort.csv", out / "other" / "cohort.csv"
    )
    held = images["held"]
    pr = Predictor(out / "model-none", device="cpu", align=False)
    net, grid, norm = pr._network, pr.bundle.grid, pr.bundle.normalizer
    cap: list[Any] = []
    hook = net.encoder.conv.register_forward_hook(
        lambda m, i, o: cap.append(o.detach().float().mean((2, 3, 4)))
    )
    preds = pr.predict_many([h["image"] for h in held], batch_size=8)
    hook.remove()
    held_feats = torch.cat(cap)
    held_desc = torch.tensor(np.array([q.descriptor for q in preds]), dtype=torch.float32)
    rmse = [
        float(np.sqrt(((q.particles - h["truth"]) ** 2).sum(-1).mean()))
        for h, q in zip(held, preds, strict=True)
    ]
    cohort = load_cohort(out / "cohort" / "cohort.csv")

    def training_set(subjects: list[Any], native: bool, seed: int) -> tuple[Any, Any]:
        rng = np.random.default_rng(seed)
        arrays, truths = [], []
        for s in subjects:
            img = sitk.Cast(io.read_image(s.image), sitk.sitkFloat32)
            on_grid, own = resample_to_grid(img, grid), sitk.GetArrayFromImage(img)
            arrays.append(on_grid)
            for _ in range(a.corruptions):
                if native:
                    arr, _, _ = random_corruption(own, img.GetSpacing()[::-1], rng)
                    corrupted = sitk.GetImageFromArray(arr)
                    corrupted.CopyInformation(img)
                    arrays.append(resample_to_grid(corrupted, grid))
                else:
                    arrays.append(random_corruption(on_grid, grid.spacing[::-1], rng)[0])
            truths += [subject_particles(s)] * (a.corruptions + 1)
        feats, descs = [], []
        for i in range(0, len(arrays), 8):
            x = torch.from_numpy(np.stack([norm(v) for v in arrays[i : i + 8]])[:, None].astype(np.float32))
            with torch.no_grad():
                f, d, _ = features_and_prediction(net, x)
            feats.append(f)
            descs.append(d.double().numpy())
        residuals = np.concatenate(descs) - true_descriptors(net, np.array(truths))
        return torch.cat(feats), torch.from_numpy(residuals)

    # what the per-image error is made of: ρ of two oracles that know the answer per condition (the
    # mean RMSE of each corruption kind and level) or per subject (its clean image's RMSE)
    cond = [f"{h['kind']}{h['level']}" for h in held]
    by_cond = {c: np.mean([e for e, k in zip(rmse, cond, strict=True) if k == c]) for c in set(cond)}
    clean = {h["id"]: e for h, e in zip(held, rmse, strict=True) if h["kind"] == "clean"}
    print(
        f"oracles: ρ(condition's mean RMSE) {us.spearman([by_cond[c] for c in cond], rmse):.3f}, "
        f"ρ(subject's clean RMSE) {us.spearman([clean[h['id']] for h in held], rmse):.3f}"
    )
    print(f"ρ subject over {len(held)} held-out images, {a.corruptions} corruptions per subject")
    print("| head training images | " + " | ".join(f"seed {s}" for s in a.seeds) + " | mean ± SD |")
    print("|---|" + "---|" * (len(a.seeds) + 1))
    t0 = time.perf_counter()

    def fit_one(variant: str, subjects: list[Any], seed: int) -> Any:
        if variant == "product":  # fit_variance_head itself: every MLP on its own corruption draw
            grids = [
                resample_to_grid(sitk.Cast(io.read_image(s.image), sitk.sitkFloat32), grid) for s in subjects
            ]
            truths = np.array([subject_particles(s) for s in subjects])
            return fit_variance_head(
                net, np.stack(grids), truths, norm, grid.spacing[::-1], corruptions=a.corruptions, seed=seed,
                heads=a.heads,
            )[0]  # fmt: skip
        where = variant.split("-")[0]
        feats, residuals = training_set(subjects, where == "native", seed)
        return fit_heads(feats, residuals, seed=seed, heads=a.heads)[0]

    for variant in a.variants:
        who = "train" if variant == "product" else variant.split("-")[1]
        subjects = cohort.by_split("train") + (cohort.by_split("val") if who == "trainval" else [])
        rhos = []
        for seed in a.seeds:
            head = fit_one(variant, subjects, seed)
            with torch.no_grad():
                u = particle_uncertainty(
                    decoder_jacobian(net, held_desc), torch.exp(head(held_feats))
                ).numpy()
            rhos.append(us.spearman(u.mean(1), rmse))
        how = "each MLP on its own draw" if variant == "product" else "one draw shared by the MLPs"
        print(
            f"| {len(subjects)} subjects, {variant}, {a.heads} MLPs, {how} | "
            + " | ".join(f"{r:.3f}" for r in rhos)
            + f" | {np.mean(rhos):.3f} ± {np.std(rhos):.3f} |",
            flush=True,
        )
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
