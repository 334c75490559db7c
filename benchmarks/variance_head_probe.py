"""Which variance-head inputs and fits raise ρ subject (issue 13): a probe that selects by CV.

On the frozen ``none`` network of an ``uncertainty_study.py --out DIR`` run, for head-training seeds
0–2, fits the product's head (``variance_head.fit_heads``: 32 hidden, weight decay 1e-2, 500 steps)
with other inputs or training draws and prints two numbers per setting:

* **cv** — the selection criterion: subject-grouped 4-fold CV on the 28 training subjects' images
  (clean + corrupted): ρ between the per-image mean predicted uncertainty and the per-image
  in-PCA error of the held-out fold's images (the network's error, through the PCA basis);
* **held** — for information only, never for choosing: ρ subject on the study's 80 held-out images.

Feature sets (``--sets``): ``mean`` (the product: the last conv stage averaged per channel), ``std``
(its per-channel SD), ``ms`` (mean and SD of the earlier conv stages), ``img`` (statistics of the
normalised input: log gradient energy, log Laplacian variance, log high-frequency residual energy,
fraction of voxels at the minimum, the largest such fraction on a face, SD, HF/gradient ratio),
``desc`` (the predicted scores over their training SD and their squared norm). Training draws
(``--mode``): ``random`` (the product's ``random_corruption``, ``--n`` per subject, one draw for all
``--heads`` MLPs), ``graded`` (``--n``/3 evenly spaced levels per kind, jittered), or ``bag``
(``--draws`` draws of ``--n``, one MLP each: what the product now does).

    python benchmarks/variance_head_probe.py --out /tmp/i13v/full --mode random --n 12 --heads 3
    python benchmarks/variance_head_probe.py --out /tmp/i13v/full --mode graded --n 12 --heads 9 --sets mean mean+img
    python benchmarks/variance_head_probe.py --out /tmp/i13v/full --mode bag --draws 6 --n 12 --sets mean
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

SETS = {
    "mean": ["mean"],
    "mean+std": ["mean", "std"],
    "mean+img": ["mean", "img"],
    "mean+std+img": ["mean", "std", "img"],
    "ms+mean+std": ["ms", "mean", "std"],
    "all": ["ms", "mean", "std", "img"],
    "mean+desc": ["mean", "desc"],
}


def image_statistics(x: Any) -> Any:
    """Per-image quality statistics of the normalised input ``x`` ``(B, 1, Z, Y, X)`` → ``(B, 7)``."""
    import torch
    from scipy import ndimage

    rows = []
    for v in x[:, 0].double().numpy():
        at_min = v <= v.min() + 1e-6
        faces = [at_min[0], at_min[-1], at_min[:, 0], at_min[:, -1], at_min[:, :, 0], at_min[:, :, -1]]
        grad = sum((g**2).mean() for g in np.gradient(v))
        lap = ndimage.laplace(v).var()
        hf = ((v - ndimage.gaussian_filter(v, 1.0)) ** 2).mean()
        rows.append(
            [np.log(grad + 1e-6), np.log(lap + 1e-6), np.log(hf + 1e-6), at_min.mean(),
             max(f.mean() for f in faces), v.std(), np.log(hf + 1e-6) - np.log(grad + 1e-6)]
        )  # fmt: skip
    return torch.tensor(rows, dtype=torch.float32)


def main(argv: list[str] | None = None) -> int:
    import SimpleITK as sitk
    import torch

    from DeepSSMLogic import io
    from DeepSSMLogic.augment.corruption import RANDOM_LEVELS, RANDOM_LOW, corrupt_array, random_corruption
    from DeepSSMLogic.cohort import load_cohort, subject_particles
    from DeepSSMLogic.errors import IntensityRangeWarning
    from DeepSSMLogic.predict import Predictor
    from DeepSSMLogic.preprocess import resample_to_grid
    from DeepSSMLogic.uncertainty import decode_head_output
    from DeepSSMLogic.variance_head import decoder_jacobian, fit_heads, particle_uncertainty, true_descriptors

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="an uncertainty_study.py --out folder (read only)")
    p.add_argument("--mode", choices=("random", "graded", "bag"), default="random")
    p.add_argument("--n", type=int, default=12, help="corrupted copies per subject (per draw)")
    p.add_argument("--heads", type=int, default=3, help="MLPs (per draw with --mode bag)")
    p.add_argument("--draws", type=int, default=6, help="--mode bag: draws, one MLP group each")
    p.add_argument("--sets", nargs="+", choices=list(SETS), default=list(SETS))
    a = p.parse_args(argv)
    warnings.simplefilter("ignore", IntensityRangeWarning)
    torch.set_num_threads(1)
    out = Path(a.out)
    held = us.build_images(
        us.parse_args(["--out", str(out)]), out / "cohort" / "cohort.csv", out / "other" / "cohort.csv"
    )["held"]
    pr = Predictor(out / "model-none", device="cpu", align=False)
    net, grid, norm = pr._network, pr.bundle.grid, pr.bundle.normalizer
    enc = net.encoder

    def all_features(x: Any) -> tuple[dict[str, Any], Any]:
        h, stages = x, []
        for m in enc.conv:
            h = m(h)
            if type(m).__name__ == "ResidualBlock3d":
                stages.append(h)
        desc, _ = decode_head_output(net, enc.fc(torch.flatten(h, 1)))
        z = desc.float() / net.score_std.float()
        return {
            "mean": stages[-1].mean((2, 3, 4)),
            "std": stages[-1].std((2, 3, 4)),
            "ms": torch.cat([torch.cat([s.mean((2, 3, 4)), s.std((2, 3, 4))], 1) for s in stages[:-1]], 1),
            "img": image_statistics(x),
            "desc": torch.cat([z, (z**2).sum(1, keepdim=True)], 1),
        }, desc

    def features_of(arrays: list[Any]) -> tuple[dict[str, Any], np.ndarray]:
        fs, ds = [], []
        for i in range(0, len(arrays), 16):
            x = torch.from_numpy(np.stack([norm(v) for v in arrays[i : i + 16]])[:, None].astype(np.float32))
            with torch.no_grad():
                f, d = all_features(x)
            fs.append(f)
            ds.append(d.double().numpy())
        return {k: torch.cat([f[k] for f in fs]) for k in fs[0]}, np.concatenate(ds)

    inputs: list[Any] = []
    hook = enc.conv.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach()))
    preds = pr.predict_many([h["image"] for h in held], batch_size=8)
    hook.remove()
    with torch.no_grad():
        held_f, held_desc = all_features(torch.cat(inputs))
    held_desc = held_desc.float()
    rmse = np.array(
        [
            float(np.sqrt(((q.particles - h["truth"]) ** 2).sum(-1).mean()))
            for h, q in zip(held, preds, strict=True)
        ]
    )
    subjects = load_cohort(out / "cohort" / "cohort.csv").by_split("train")
    grids = [resample_to_grid(sitk.Cast(io.read_image(s.image), sitk.sitkFloat32), grid) for s in subjects]
    truth = true_descriptors(net, np.array([subject_particles(s) for s in subjects]))
    spacing = grid.spacing[::-1]
    basis = decoder_jacobian(net, torch.zeros(1, truth.shape[1]))[0].double()  # (M, 3, K), Base
    folds = np.arange(len(grids)) % 4

    def training_set(seed: int, mode: str) -> tuple[dict[str, Any], Any, np.ndarray]:
        rng = np.random.default_rng(seed)
        arrays, index = [], []
        for i, g in enumerate(grids):
            arrays.append(g)
            index.append(i)
            if mode == "graded":
                per = a.n // 3
                for kind, top in RANDOM_LEVELS.items():
                    for j in range(per):
                        u = RANDOM_LOW + (1 - RANDOM_LOW) * (j + rng.uniform()) / per
                        arrays.append(corrupt_array(g, kind, u * top, spacing, rng))
                        index.append(i)
            else:
                for _ in range(a.n):
                    arrays.append(random_corruption(g, spacing, rng)[0])
                    index.append(i)
        f, d = features_of(arrays)
        idx = np.array(index)
        return f, torch.from_numpy(d - truth[idx]), idx

    def cat(f: dict[str, Any], keys: list[str]) -> Any:
        return torch.cat([f[k] for k in keys], 1)

    def mean_u(var: Any, desc: Any) -> np.ndarray:
        return particle_uncertainty(decoder_jacobian(net, desc), var).numpy().mean(1)

    def scores(
        draws: list[tuple[dict[str, Any], Any, np.ndarray]], keys: list[str], seed: int
    ) -> tuple[float, float]:
        """(cv, held) for heads fitted on ``draws`` (one head group per draw, variances averaged)."""
        seeds = [seed * 1000 + j for j in range(len(draws))] if a.mode == "bag" else [seed]
        f0, r0, i0 = draws[0]
        err0 = torch.einsum("mck,nk->nmc", basis, r0).pow(2).sum(-1).mean(1).sqrt().numpy()
        cvs = []
        for k in range(4):
            te = folds[i0] == k
            var = 0
            for j, (f, r, idx) in enumerate(draws):
                tr = folds[idx] != k
                head, _ = fit_heads(cat(f, keys)[tr], r[tr], seed=seeds[j], heads=a.heads)
                with torch.no_grad():
                    var = var + torch.exp(head(cat(f0, keys)[te])) / len(draws)
            cvs.append(us.spearman(mean_u(var, torch.zeros(int(te.sum()), r0.shape[1])), err0[te]))
        var = 0
        for j, (f, r, _) in enumerate(draws):
            head, _ = fit_heads(cat(f, keys), r, seed=seeds[j], heads=a.heads)
            with torch.no_grad():
                var = var + torch.exp(head(cat(held_f, keys))) / len(draws)
        return float(np.mean(cvs)), us.spearman(mean_u(var, held_desc), rmse)

    t0 = time.perf_counter()
    res: dict[str, dict[str, list[float]]] = {s: {"cv": [], "held": []} for s in a.sets}
    for seed in (0, 1, 2):
        if a.mode == "bag":
            draws = [training_set(seed * 1000 + j, "random") for j in range(a.draws)]
        else:
            draws = [training_set(seed, a.mode)]
        for name in a.sets:
            cv, he = scores(draws, SETS[name], seed)
            res[name]["cv"].append(cv)
            res[name]["held"].append(he)
            print(
                f"seed {seed} {name}: cv {cv:.3f} held {he:.3f} [{time.perf_counter() - t0:.0f} s]",
                flush=True,
            )
    bag = f", {a.draws} draws × {a.heads} MLPs" if a.mode == "bag" else f", {a.heads} MLPs"
    print(f"\nmode {a.mode}, {a.n} corruptions per subject{bag}")
    print("| features | cv (select) mean ± SD | held (report) mean ± SD | held per seed |")
    print("|---|---|---|---|")
    for name, r in res.items():
        print(
            f"| {name} | {np.mean(r['cv']):.3f} ± {np.std(r['cv']):.3f} | {np.mean(r['held']):.3f} ± "
            f"{np.std(r['held']):.3f} | {', '.join(f'{v:.3f}' for v in r['held'])} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
