"""Uncertainty and OOD study (issue 13): the same cohort and data trained with ``--uncertainty``
none / variance / ensemble / mc-dropout, side by side.

One synthetic family (default femur) is generated with exact ground truth; every method trains with
``pipeline.train_model`` on the same arrays and augmented set (one work folder, ``restart``), with
the same seed, encoder and epochs. Held-out = the cohort's ``test`` split. Each held-out image is
also corrupted at three levels of three kinds: Gaussian noise (σ = 0.1 / 0.3 / 1.0 × the image's
intensity SD), Gaussian blur (σ = 1.5 / 3 / 6 mm) and a cut field of view (the last 20 / 35 / 50 % of
the x axis set to the background). "Strong" = the third level of each kind.

Printed per method:

* held-out clean RMSE (mm, mean over subjects) and its ratio to ``none`` (target ≤ 1.05);
* Spearman ρ between per-image mean predicted uncertainty and per-image RMSE over clean + corrupted
  held-out images (target ≥ 0.6), and between per-particle uncertainty and per-particle error pooled
  over those images (target ≥ 0.3);
* OOD flag rates: clean held-out (≤ 5 %), strongly corrupted, pure-noise images, and another anatomy
  (images of a second synthetic family shown to this model) (≥ 95 % each);
* (saved in the JSON) every image's OOD component values and the bundle's validation values, so
  ``benchmarks/ood_recalibrate.py`` can recompute the flags under other calibration rules;
* CPU prediction time per image (``Predictor.predict_many``, batch 8, warm) and the ratio to none
  (target ≤ 3×), total and forward-only.

Ensemble member 0 and the ``variance`` network have the same seed, data and configuration as the
``none`` network, so those runs resume none's finished checkpoint (the ensemble trains members 1..;
variance fits its head on corrupted copies of the training images and calibrates); "train s" of
those rows therefore counts only the extra work. The corruptions (held-out set here, head training
in ``variance``) are one function, ``DeepSSMLogic.augment.corruption.corrupt_array``.

Images are predicted as pre-aligned (``align=False``), as the demo does for synthetic images.

    python benchmarks/uncertainty_study.py --out /tmp/unc          # ~20-30 min on 2 CPU cores
    python benchmarks/uncertainty_study.py --out /tmp/unc-q --quick  # tiny smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

METHODS = ("none", "variance", "ensemble", "mc-dropout")
REUSES_NONE = ("variance", "ensemble")  # same first network as none: resume its finished checkpoint
CORRUPTIONS = {
    "noise": (0.1, 0.3, 1.0),  # × intensity SD
    "blur": (1.5, 3.0, 6.0),  # mm
    "fov": (0.2, 0.35, 0.5),  # fraction of the x axis cut
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--family", default="femur", choices=("femur", "atrium", "cranium"))
    p.add_argument("--other", default="atrium", choices=("femur", "atrium", "cranium"))
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--n-subjects", type=int, default=40)
    p.add_argument("--n-other", type=int, default=10)
    p.add_argument("--n-noise", type=int, default=10)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--particles", type=int, default=256)
    p.add_argument("--grid-spacing", type=float, default=3.0)
    p.add_argument("--augment", type=int, default=100)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--encoder", default="light", choices=("light", "paper"))
    p.add_argument("--ensemble-size", type=int, default=3)
    p.add_argument("--mc-samples", type=int, default=30)
    p.add_argument("--variance-corruptions", type=int, default=12)
    p.add_argument(
        "--variance-folds", type=int, default=0, help="variance: out-of-fold head (K fold networks)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--align", action="store_true", help="predict with registration (CLI default) instead")
    p.add_argument(
        "--reuse", action="store_true", help="evaluate the bundles an earlier run left in --out (no training)"
    )
    a = p.parse_args(argv)
    if a.quick:
        a.n_subjects, a.n_other, a.n_noise, a.image_size, a.particles = 12, 3, 3, 32, 64
        a.grid_spacing, a.augment, a.epochs, a.ensemble_size = 4.0, 6, 2, 2
        a.variance_corruptions = 3
    return a


def spearman(a: Any, b: Any) -> float:
    from scipy.stats import spearmanr

    r = spearmanr(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)).statistic
    return float(r)


def corrupt(image: Any, kind: str, level: float, rng: np.random.Generator) -> Any:
    """``image`` (SimpleITK) corrupted by ``augment.corruption.corrupt_array`` (the function the
    ``variance`` head is trained with), at the image's own spacing."""
    import SimpleITK as sitk

    from DeepSSMLogic.augment.corruption import corrupt_array

    spacing_zyx = tuple(image.GetSpacing())[::-1]
    arr = corrupt_array(sitk.GetArrayFromImage(image), kind, level, spacing_zyx, rng)
    new = sitk.GetImageFromArray(arr)
    new.CopyInformation(image)
    return new


def build_images(args: argparse.Namespace, cohort_csv: Path, other_csv: Path) -> dict[str, Any]:
    """Held-out clean + corrupted images (with truths), pure noise and other-anatomy images."""
    import SimpleITK as sitk

    from DeepSSMLogic import io
    from DeepSSMLogic.cohort import load_cohort, subject_particles

    rng = np.random.default_rng(args.seed + 99)
    cohort = load_cohort(cohort_csv)
    test = cohort.by_split("test") or cohort.by_split("val")
    held: list[dict[str, Any]] = []
    for s in test:
        img = sitk.Cast(io.read_image(s.image), sitk.sitkFloat32)
        truth = subject_particles(s)
        held.append({"id": s.id, "kind": "clean", "level": 0, "image": img, "truth": truth})
        for kind, levels in CORRUPTIONS.items():
            for li, level in enumerate(levels, start=1):
                held.append(
                    {
                        "id": s.id,
                        "kind": kind,
                        "level": li,
                        "image": corrupt(img, kind, level, rng),
                        "truth": truth,
                    }
                )
    ref = held[0]["image"]
    base = sitk.GetArrayFromImage(ref)
    noise = []
    for _ in range(args.n_noise):
        arr = rng.normal(float(base.mean()), float(base.std()), base.shape).astype(np.float32)
        im = sitk.GetImageFromArray(arr)
        im.CopyInformation(ref)
        noise.append(im)
    other = [sitk.Cast(io.read_image(s.image), sitk.sitkFloat32) for s in load_cohort(other_csv).subjects]
    return {"held": held, "noise": noise, "other": other[: args.n_other]}


def evaluate(bundle_path: Path, images: dict[str, Any], align: bool = False) -> dict[str, Any]:
    from DeepSSMLogic.predict import Predictor

    pr = Predictor(bundle_path, device="cpu", align=align)
    held = images["held"]
    clean = [h for h in held if h["kind"] == "clean"]
    pr.predict_many([clean[0]["image"]], batch_size=1)  # warm-up
    t0 = time.perf_counter()
    clean_preds = pr.predict_many([h["image"] for h in clean], batch_size=8)
    per_image = (time.perf_counter() - t0) / len(clean)
    forward = float(np.mean([p.timings["forward"] for p in clean_preds]))
    preds = pr.predict_many([h["image"] for h in held], batch_size=8)
    rows = []
    for h, p in zip(held, preds, strict=True):
        err = np.sqrt(((p.particles - h["truth"]) ** 2).sum(-1))
        rows.append(
            {
                "id": h["id"],
                "kind": h["kind"],
                "level": h["level"],
                "rmse": float(np.sqrt((err**2).mean())),
                "err": err,
                "unc": None if p.uncertainty is None else np.asarray(p.uncertainty),
                "flag": bool(p.ood["flag"]) if p.ood else None,
                "score": float(p.ood["score"]) if p.ood else None,
                "components": p.ood["components"] if p.ood else None,
            }
        )
    noise = pr.predict_many(images["noise"], batch_size=8)
    other = pr.predict_many(images["other"], batch_size=8)
    res: dict[str, Any] = {
        "clean_rmse": float(np.mean([r["rmse"] for r in rows if r["kind"] == "clean"])),
        "seconds_per_image": per_image,
        "forward_per_image": forward,
        "threshold": pr.ood_calibration.threshold if pr.ood_calibration else None,
    }

    def rate(flags: list[Any]) -> float | None:
        return None if not flags or flags[0] is None else float(np.mean(flags))

    res["flag_clean"] = rate([r["flag"] for r in rows if r["kind"] == "clean"])
    res["flag_strong"] = rate([r["flag"] for r in rows if r["level"] == 3])
    res["flag_strong_by_kind"] = {
        k: rate([r["flag"] for r in rows if r["level"] == 3 and r["kind"] == k]) for k in CORRUPTIONS
    }
    res["flag_noise"] = rate([bool(p.ood["flag"]) if p.ood else None for p in noise])
    res["flag_other"] = rate([bool(p.ood["flag"]) if p.ood else None for p in other])
    if rows[0]["unc"] is not None:
        res["rho_subject"] = spearman([r["unc"].mean() for r in rows], [r["rmse"] for r in rows])
        res["rho_particle"] = spearman(
            np.concatenate([r["unc"] for r in rows]), np.concatenate([r["err"] for r in rows])
        )
        res["rho_particle_clean"] = spearman(
            np.concatenate([r["unc"] for r in rows if r["kind"] == "clean"]),
            np.concatenate([r["err"] for r in rows if r["kind"] == "clean"]),
        )
        res["mean_unc_clean"] = float(np.mean([r["unc"].mean() for r in rows if r["kind"] == "clean"]))
        res["mean_unc_noise"] = float(np.mean([p.uncertainty.mean() for p in noise]))
    res["scores"] = {
        "clean": [r["score"] for r in rows if r["kind"] == "clean"],
        "strong": [r["score"] for r in rows if r["level"] == 3],
        "noise": [p.ood["score"] if p.ood else None for p in noise],
        "other": [p.ood["score"] if p.ood else None for p in other],
    }
    # the component values, so flags can be recomputed under another calibration rule
    res["components"] = {
        "clean": [r["components"] for r in rows if r["kind"] == "clean"],
        "strong": [r["components"] for r in rows if r["level"] == 3],
        "moderate": [r["components"] for r in rows if r["level"] == 2],
        "mild": [r["components"] for r in rows if r["level"] == 1],
        "noise": [p.ood["components"] if p.ood else None for p in noise],
        "other": [p.ood["components"] if p.ood else None for p in other],
        "validation": pr.ood_calibration.validation if pr.ood_calibration else None,
    }
    res["rmse_by_kind_level"] = {
        f"{k}{lv}": float(np.mean([r["rmse"] for r in rows if r["kind"] == k and r["level"] == lv]))
        for k in CORRUPTIONS
        for lv in (1, 2, 3)
    }
    return res


def target_lines(results: dict[str, Any]) -> list[str]:
    """Issue 13's targets per method with uncertainty: met / NOT met with the number."""
    base = results.get("none")
    out = ["targets (issue 13):"]
    for m, r in results.items():
        if m == "none":
            continue
        checks = [
            ("ρ subject ≥ 0.6", r.get("rho_subject"), lambda v: v >= 0.6),
            ("ρ particle ≥ 0.3", r.get("rho_particle"), lambda v: v >= 0.3),
            ("OOD clean ≤ 5 %", r["flag_clean"], lambda v: v <= 0.05),
            ("OOD strong ≥ 95 %", r["flag_strong"], lambda v: v >= 0.95),
            ("OOD pure noise ≥ 95 %", r["flag_noise"], lambda v: v >= 0.95),
            ("OOD other anatomy ≥ 95 %", r["flag_other"], lambda v: v >= 0.95),
        ]
        if base:
            checks += [
                ("RMSE ≤ 1.05 × none", r["clean_rmse"] / base["clean_rmse"], lambda v: v <= 1.05),
                ("time ≤ 3 × none", r["seconds_per_image"] / base["seconds_per_image"], lambda v: v <= 3.0),
            ]
        parts = [
            f"{name}: {'—' if v is None else f'{v:.3f}'} {'n/a' if v is None else 'met' if ok(v) else 'NOT met'}"
            for name, v, ok in checks
        ]
        out.append(f"- {m}: " + "; ".join(parts))
    return out


def fmt(v: Any, pct: bool = False) -> str:
    if v is None:
        return "—"
    return f"{100 * v:.0f} %" if pct else f"{v:.3f}"


def main(argv: list[str] | None = None) -> int:
    import warnings

    import torch

    from DeepSSMLogic.errors import IntensityRangeWarning
    from DeepSSMLogic.pipeline import TrainingOptions, train_model
    from DeepSSMLogic.synthetic import generate_cohort

    warnings.simplefilter("ignore", IntensityRangeWarning)  # the corrupted images trigger it by design
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    size = (args.image_size,) * 3
    spacing = 96.0 / args.image_size
    cohort_csv = out / "cohort" / "cohort.csv"
    if not cohort_csv.exists():
        generate_cohort(
            args.family, args.n_subjects, out / "cohort", args.seed, image_size=size, spacing=spacing,
            n_particles=args.particles,
        )  # fmt: skip
    other_csv = out / "other" / "cohort.csv"
    if not other_csv.exists():
        generate_cohort(
            args.other, max(args.n_other, 2), out / "other", args.seed + 1, image_size=size, spacing=spacing,
            n_particles=args.particles, split=(1.0, 0.0, 0.0),
        )  # fmt: skip
    images = build_images(args, cohort_csv, other_csv)
    results: dict[str, Any] = {}
    methods = [m for m in METHODS if m in args.methods]  # none first: variance and the ensemble reuse it
    for method in methods:
        # the variance network and ensemble member 0 are the "none" network (same seed, data and
        # configuration): when none was trained just before, they resume its finished checkpoint
        reuse = method in REUSES_NONE and "none" in results
        opts = TrainingOptions(
            augment=args.augment,
            epochs=args.epochs,
            device="cpu",
            seed=args.seed,
            restart=not reuse,
            resume=reuse,
            spacing=args.grid_spacing,
            encoder=args.encoder,
            uncertainty=method,
            ensemble_size=args.ensemble_size,
            mc_samples=args.mc_samples,
            variance_corruptions=args.variance_corruptions,
            variance_folds=args.variance_folds if method == "variance" else 0,
        )
        t0 = time.perf_counter()
        bundle = out / f"model-{method}"
        if args.reuse:
            from DeepSSMLogic.bundle import read_bundle_meta

            summary = read_bundle_meta(bundle)["training_summary"]
        else:
            summary = train_model(cohort_csv, bundle, opts, work_dir=out / "work").summary
        train_s = time.perf_counter() - t0 if not args.reuse else float(summary.get("seconds_total", 0.0))
        res = evaluate(bundle, images, align=args.align)
        res["train_seconds"] = train_s
        res["calibration"] = summary.get("calibration")
        results[method] = res
        print(
            f"[{method}] trained in {train_s:.0f} s; {json.dumps({k: v for k, v in res.items() if k not in ('scores', 'components')})}"
        )
        sys.stdout.flush()
    base = results.get("none")
    lines = [
        f"uncertainty study: {args.family}, {args.n_subjects} subjects, {args.encoder} encoder, "
        f"grid {args.grid_spacing} mm, augment {args.augment}, {args.epochs} epochs, seed {args.seed}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{'registration on (align=True)' if args.align else 'pre-aligned (align=False)'}",
        "",
        "| method | clean RMSE mm (÷ none) | ρ subject | ρ particle (clean) | OOD clean | OOD strong "
        "(noise/blur/fov) | OOD pure noise | OOD other anatomy | s/image (÷ none) | forward s (÷ none) | train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m, r in results.items():
        ratio = f" ({r['clean_rmse'] / base['clean_rmse']:.3f})" if base else ""
        tr = f" ({r['seconds_per_image'] / base['seconds_per_image']:.2f}×)" if base else ""
        fr = f" ({r['forward_per_image'] / base['forward_per_image']:.2f}×)" if base else ""
        sk = "/".join(fmt(v, True) for v in r["flag_strong_by_kind"].values())
        lines.append(
            f"| {m} | {r['clean_rmse']:.3f}{ratio} | {fmt(r.get('rho_subject'))} | "
            f"{fmt(r.get('rho_particle'))} ({fmt(r.get('rho_particle_clean'))}) | {fmt(r['flag_clean'], True)} | "
            f"{fmt(r['flag_strong'], True)} ({sk}) | {fmt(r['flag_noise'], True)} | {fmt(r['flag_other'], True)} | "
            f"{r['seconds_per_image']:.3f}{tr} | {r['forward_per_image']:.4f}{fr} | {r['train_seconds']:.0f} |"
        )
    lines += ["", *target_lines(results)]
    lines.append(f"\ntotal {time.perf_counter() - t_all:.0f} s")
    text = "\n".join(lines)
    print(text)
    name = "uncertainty_study" + ("_aligned" if args.align else "")
    (out / f"{name}.json").write_text(json.dumps(results, indent=1, default=float))
    (out / f"{name}.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
