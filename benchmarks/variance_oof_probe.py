"""Can a variance head fitted on OUT-OF-FOLD residuals rank unseen subjects (issue 13, ρ subject)?

Reads an ``uncertainty_study.py --out STUDY`` run (its frozen ``none`` network = the "final"
network, its cohort and its 80 held-out images) and the K fold networks of
``variance_oof_folds.py --out FOLDS`` (each trained like ``none`` without one fold of the training
subjects). For every training subject, its image clean and ``--corruptions`` times corrupted per
draw (``augment.corruption.random_corruption`` at the image's own spacing, random kind and level;
``--draws`` draws per seed, one MLP per draw as in the product) goes through

* the fold network that did **not** see the subject: its out-of-fold (OOF) residual, projected onto
  the final network's PCA basis (``d_pred − d_true``, the product's target, but of an unseen subject),
  its per-image RMSE, its predicted scores and its test-time-augmentation (TTA) spread;
* the final network (which saw the subject): its conv-mean features (the product's head input) and
  its residual (the product's target, memorised).

Head inputs that mean the same across networks: ``desc`` (predicted PCA scores in the final basis
over the final ``score_std``, and their squared norm = the Mahalanobis distance under the training
PPCA), ``img`` (7 image-quality statistics of the final network's normalised input), ``tta`` (log of
the RMS particle displacement, mm, when the input is shifted by ±1 voxel along each axis: 6 extra
forwards), and ``conv`` (the final network's conv-mean features; at fit time of a subject the final
network has seen, so this is a feature/target mismatch, tested anyway).

Variants: ``product`` = conv features, final-network (memorised) residuals (the current head);
``oof-<inputs>`` = those inputs, OOF residuals; ``product+tta`` = conv + TTA, final-network residuals. Two numbers each, per seed (0..``--seeds``-1):

* **cv** (selects): leave-one-fold-out over the OOF images: fit on the other folds' subjects, ρ
  between per-image mean predicted uncertainty and the fold network's per-image RMSE on the left-out
  fold's images (unseen subjects, clean + corrupted), averaged over folds. Subject-grouped.
* **held** (reports only): ρ subject on the study's 80 held-out images with the final network (the
  head fitted on all OOF images), the study's metric.

Also printed (diagnostics): the unlearned TTA spread alone as the uncertainty, the spread of the K
fold networks' predictions on the held-out images, and whether the fold networks agree with the
final network on which held-out subjects are hard.

    python benchmarks/variance_oof_probe.py --study /tmp/i13w/full --folds-dir /tmp/oof --seeds 3
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
from variance_head_probe import image_statistics  # noqa: E402

VARIANTS = {
    "product": (["conv"], "final"),
    "oof-conv": (["conv"], "oof"),
    "oof-desc": (["desc"], "oof"),
    "oof-tta": (["tta"], "oof"),
    "oof-desc+tta": (["desc", "tta"], "oof"),
    "oof-desc+img": (["desc", "img"], "oof"),
    "oof-desc+img+tta": (["desc", "img", "tta"], "oof"),
    "oof-conv+tta": (["conv", "tta"], "oof"),
    "product+tta": (["conv", "tta"], "final"),
}
SHIFTS = [(d, s) for d in (2, 3, 4) for s in (-1, 1)]


class Runner:
    """One bundle's network on raw SimpleITK images: captured inputs, particles and features."""

    def __init__(self, bundle: Path, final_net: Any):
        from DeepSSMLogic.predict import Predictor

        self.pr = Predictor(bundle, device="cpu", align=False)
        self.net = self.pr._network
        self.final_net = final_net

    def __call__(self, images: list[Any]) -> dict[str, np.ndarray]:
        import torch

        from DeepSSMLogic.variance_head import features_and_prediction, true_descriptors

        inputs: list[Any] = []
        enc = self.net.encoder
        hook = enc.conv.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach()))
        try:
            preds = self.pr.predict_many(images, batch_size=16)
        finally:
            hook.remove()
        x = torch.cat(inputs).float()
        parts = np.stack([q.particles for q in preds])
        with torch.no_grad():
            conv, _, p0 = features_and_prediction(self.net, x)
            disp = 0.0
            for dim, s in SHIFTS:
                _, _, ps = features_and_prediction(self.net, torch.roll(x, s, dims=dim))
                disp = disp + ((ps - p0) ** 2).sum(-1).mean(1)
        tta = np.log(np.sqrt(disp.double().numpy() / len(SHIFTS)) + 1e-6)
        desc = true_descriptors(self.final_net, parts)  # in the final network's basis
        z = desc / self.final_net.score_std.double().numpy()
        return {
            "particles": parts,
            "desc_mm": desc,
            "desc": np.concatenate([z, (z**2).sum(1, keepdims=True)], 1),
            "conv": conv.double().numpy(),
            "img": image_statistics(x).double().numpy(),
            "tta": tta[:, None],
        }


def main(argv: list[str] | None = None) -> int:
    import SimpleITK as sitk
    import torch

    from DeepSSMLogic import io
    from DeepSSMLogic.augment.corruption import random_corruption
    from DeepSSMLogic.cohort import load_cohort, subject_particles
    from DeepSSMLogic.errors import IntensityRangeWarning
    from DeepSSMLogic.variance_head import fit_heads, true_descriptors

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--study", required=True)
    ap.add_argument("--folds-dir", required=True)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--draws", type=int, default=3, help="corruption draws per seed, one MLP each")
    ap.add_argument("--corruptions", type=int, default=12, help="corrupted copies per subject per draw")
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    warnings.simplefilter("ignore", IntensityRangeWarning)
    torch.set_num_threads(a.threads)
    study, fdir = Path(a.study), Path(a.folds_dir)
    t0 = time.perf_counter()

    final = Runner(study / "model-none", None)
    final.final_net = final.net
    fnet = final.net
    w = fnet.decoder.weight.detach().double()  # (3M, K)
    basis_sq = (w.reshape(-1, 3, w.shape[1]) ** 2).sum(1)  # (M, K): Σ_c J²

    def mean_u(var: np.ndarray) -> np.ndarray:
        return torch.sqrt(torch.as_tensor(var, dtype=torch.float64) @ basis_sq.T).mean(1).numpy()

    folds = sorted(fdir.glob("fold-*/fold.json"))
    fold_info = [json.loads(f.read_text()) for f in folds]
    runners = [Runner(f.parent / "model", fnet) for f in folds]
    subjects = {s.id: s for s in load_cohort(study / "cohort" / "cohort.csv").by_split("train")}
    fold_of = {sid: k for k, info in enumerate(fold_info) for sid in info["held_out"]}
    print(f"{len(runners)} folds, {len(fold_of)} OOF subjects [{time.perf_counter() - t0:.0f} s]", flush=True)

    # -- held-out images (the study's 80): final network, plus the fold networks' spread (diagnostic)
    held = us.build_images(
        us.parse_args(["--out", str(study)]), study / "cohort" / "cohort.csv", study / "other" / "cohort.csv"
    )["held"]
    h_imgs = [h["image"] for h in held]
    hf = final(h_imgs)
    truth_h = np.stack([h["truth"] for h in held])
    rmse_h = np.sqrt(((hf["particles"] - truth_h) ** 2).sum(-1).mean(1))
    fold_parts = np.stack([r(h_imgs)["particles"] for r in runners])  # (K, N, M, 3)
    spread = np.sqrt(((fold_parts - fold_parts.mean(0)) ** 2).sum(-1).mean((0, 2)))
    fold_rmse = np.sqrt(((fold_parts - truth_h) ** 2).sum(-1).mean(2))  # (K, N)
    clean = np.array([h["kind"] == "clean" for h in held])
    diag = {
        "tta_alone_held": us.spearman(hf["tta"][:, 0], rmse_h),
        "fold_spread_held": us.spearman(spread, rmse_h),
        "fold_mean_rmse_vs_final_rmse_held": us.spearman(fold_rmse.mean(0), rmse_h),
        "fold_vs_final_clean_subject_rmse": us.spearman(fold_rmse.mean(0)[clean], rmse_h[clean]),
    }
    print(f"held-out diagnostics: {json.dumps(diag)} [{time.perf_counter() - t0:.0f} s]", flush=True)

    # -- OOF images: clean once, corrupted per (seed, draw)
    order = sorted(fold_of)
    raw = {sid: sitk.Cast(io.read_image(subjects[sid].image), sitk.sitkFloat32) for sid in order}
    truth = {sid: subject_particles(subjects[sid]) for sid in order}

    def collect(images_by_sid: dict[str, list[Any]]) -> dict[str, np.ndarray]:
        """Features/targets of images of training subjects: fold-network (OOF) and final-network."""
        rows: dict[str, list[np.ndarray]] = {}
        for k, r in enumerate(runners):
            sids = [s for s in order if fold_of[s] == k]
            imgs = [im for s in sids for im in images_by_sid[s]]
            sid_of = [s for s in sids for _ in images_by_sid[s]]
            tr = np.stack([truth[s] for s in sid_of])
            dtrue = true_descriptors(fnet, tr)
            o, f = r(imgs), final(imgs)
            out = {
                "oof_resid": o["desc_mm"] - dtrue,
                "final_resid": f["desc_mm"] - dtrue,
                "oof_rmse": np.sqrt(((o["particles"] - tr) ** 2).sum(-1).mean(1)),
                "final_rmse": np.sqrt(((f["particles"] - tr) ** 2).sum(-1).mean(1)),
                "true_z": dtrue / fnet.score_std.double().numpy(),
                "fold": np.full(len(imgs), k),
                "subject": np.array([order.index(s) for s in sid_of]),
                # inputs: OOF variants see the fold network's desc/tta (at apply: the final network's,
                # on an unseen subject); product and conv see the final network's conv features
                "desc": o["desc"],
                "tta": o["tta"],
                "img": f["img"],
                "conv": f["conv"],
            }
            for key, v in out.items():
                rows.setdefault(key, []).append(v)
        return {key: np.concatenate(v) for key, v in rows.items()}

    def as_image(arr: np.ndarray, like: Any) -> Any:
        im = sitk.GetImageFromArray(arr)
        im.CopyInformation(like)
        return im

    clean_set = collect({s: [raw[s]] for s in order})
    print(
        f"OOF clean RMSE {clean_set['oof_rmse'].mean():.3f} mm (final, seen: {clean_set['final_rmse'].mean():.3f}); "
        f"ρ(OOF clean RMSE, Mahalanobis of prediction) {us.spearman(clean_set['oof_rmse'], clean_set['desc'][:, -1]):.3f}, "
        f"ρ(OOF clean RMSE, TTA) {us.spearman(clean_set['oof_rmse'], clean_set['tta'][:, 0]):.3f}, "
        f"ρ(OOF clean RMSE, final-net residual RMS) "
        f"{us.spearman(clean_set['oof_rmse'], np.sqrt((clean_set['final_resid'] ** 2).sum(1))):.3f} "
        f"[{time.perf_counter() - t0:.0f} s]",
        flush=True,
    )
    sd = fnet.score_std.double().numpy()
    z_h = true_descriptors(fnet, truth_h) / sd
    resid_h = hf["desc_mm"] - true_descriptors(fnet, truth_h)
    modes = {
        "score_sd_mm": sd.round(2).tolist(),
        "oof_clean_mean_abs_residual_mm": np.abs(clean_set["oof_resid"]).mean(0).round(2).tolist(),
        "held_clean_mean_abs_residual_mm": np.abs(resid_h[clean]).mean(0).round(2).tolist(),
        "rho_oof_clean_rmse_true_z2": us.spearman(clean_set["oof_rmse"], (clean_set["true_z"] ** 2).sum(1)),
        "rho_oof_clean_rmse_pred_z2": us.spearman(clean_set["oof_rmse"], clean_set["desc"][:, -1]),
        "rho_held_clean_rmse_true_z2": us.spearman(rmse_h[clean], (z_h[clean] ** 2).sum(1)),
        "rho_held_clean_rmse_pred_z2": us.spearman(rmse_h[clean], hf["desc"][clean, -1]),
        "rho_oof_clean_rmse_seen_rmse": us.spearman(clean_set["oof_rmse"], clean_set["final_rmse"]),
    }
    print(
        f"where the error sits: {json.dumps({k: v if isinstance(v, list) else round(v, 3) for k, v in modes.items()})}"
    )
    held_inputs = {"desc": hf["desc"], "tta": hf["tta"], "img": hf["img"], "conv": hf["conv"]}

    def cat(d: dict[str, np.ndarray], keys: list[str], sel: Any = slice(None)) -> Any:
        return torch.from_numpy(np.concatenate([d[k][sel] for k in keys], 1)).float()

    res: dict[str, dict[str, list[float]]] = {v: {"cv": [], "held": []} for v in a.variants}
    for seed in range(a.seeds):
        draws = []
        for d in range(a.draws):
            rng = np.random.default_rng([seed, d, 13])
            imgs = {}
            for s in order:
                sp = tuple(raw[s].GetSpacing())[::-1]
                arr = sitk.GetArrayFromImage(raw[s])
                imgs[s] = [as_image(random_corruption(arr, sp, rng)[0], raw[s]) for _ in range(a.corruptions)]
            c = collect(imgs)
            draws.append({k: np.concatenate([clean_set[k], c[k]]) for k in c})
        print(f"seed {seed}: {a.draws} draws collected [{time.perf_counter() - t0:.0f} s]", flush=True)
        ref = draws[0]
        for name in a.variants:
            keys, target = VARIANTS[name]
            seeds = [seed * 100 + j for j in range(a.draws)]
            cvs = []
            for k in range(len(runners)):
                tr = [dr["fold"] != k for dr in draws]
                head, _ = fit_heads(
                    [cat(dr, keys, m) for dr, m in zip(draws, tr, strict=True)],
                    [torch.from_numpy(dr[f"{target}_resid"][m]) for dr, m in zip(draws, tr, strict=True)],
                    seed=seeds[0],
                )
                te = ref["fold"] == k
                with torch.no_grad():
                    var = torch.exp(head(cat(ref, keys, te))).double().numpy()
                cvs.append(us.spearman(mean_u(var), ref["oof_rmse"][te]))
            head, _ = fit_heads(
                [cat(dr, keys) for dr in draws],
                [torch.from_numpy(dr[f"{target}_resid"]) for dr in draws],
                seed=seeds[0],
            )
            with torch.no_grad():
                var = torch.exp(head(cat(held_inputs, keys))).double().numpy()
            he = us.spearman(mean_u(var), rmse_h)
            res[name]["cv"].append(float(np.mean(cvs)))
            res[name]["held"].append(he)
            print(
                f"seed {seed} {name}: cv {np.mean(cvs):.3f} (folds {', '.join(f'{v:.2f}' for v in cvs)}) "
                f"held {he:.3f} [{time.perf_counter() - t0:.0f} s]",
                flush=True,
            )
    print(
        f"\n{len(runners)} folds, {a.seeds} seeds × {a.draws} draws × {a.corruptions} corruptions per subject"
    )
    print(
        "| variant (inputs, target) | cv ρ (selects), mean ± SD | held-out ρ subject (reports), mean ± SD | held per seed |"
    )
    print("|---|---|---|---|")
    for name, r in res.items():
        print(
            f"| {name} | {np.mean(r['cv']):.3f} ± {np.std(r['cv']):.3f} | {np.mean(r['held']):.3f} ± "
            f"{np.std(r['held']):.3f} | {', '.join(f'{v:.3f}' for v in r['held'])} |"
        )
    print(f"diagnostics: {json.dumps({k: round(v, 3) for k, v in diag.items()})}")
    print(
        f"where the error sits: {json.dumps({k: v if isinstance(v, list) else round(v, 3) for k, v in modes.items()})}"
    )
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
