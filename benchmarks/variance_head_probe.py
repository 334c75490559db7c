"""Probe (issue 13): can a predicted-variance (aleatoric) head reach per-subject ρ ≥ 0.6?

A prototype, not a product feature: it reads the ``none`` bundle an earlier
``benchmarks/uncertainty_study.py --out DIR`` run left in ``DIR/model-none`` (frozen: its particles,
hence RMSE and time, are unchanged) and fits a small head on the network's features that outputs a
log-variance per PCA score. Head training set: the cohort's train + val subjects, each clean and
``--corruptions`` times randomly corrupted (noise 0.06–1.2 × SD, blur 0.35–7 mm, cut field of view
3–55 %: the study's three kinds at random levels); targets: the score residuals
``s_pred − s_true`` (``s_true`` = least-squares projection of the true particles on the PCA basis);
loss: Gaussian NLL with the mean fixed (β-NLL with β irrelevant). Per-particle uncertainty
``u_m = sqrt(Σ_k σ²_k |b_k(m)|²)`` (``b_k(m)`` the mode-k displacement of particle m, mm).

The head's configuration (features: the 96-wide input of the last FC layer, or the conv features
averaged per channel; hidden width; weight decay; epochs) is selected by a subject-grouped 4-fold
cross-validation of ρ subject on the head-training images only, then evaluated once on the study's
held-out images (clean + 9 corruptions of the 8 test subjects, align=False), with the study's ρ
definitions. Caveat: the head is trained on the same corruption kinds the held-out set uses.

    python benchmarks/variance_head_probe.py --out /tmp/i13/full   # ~4-5 min on 2 busy CPU cores
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
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
if str(REPO.parent) not in sys.path:
    sys.path.insert(0, str(REPO.parent))

import uncertainty_study as us  # noqa: E402

LEVELS = {"noise": 1.2, "blur": 7.0, "fov": 0.55}  # upper ends; levels drawn in [5 %, 100 %] of these
CONFIGS = [
    (feat, hidden, wd, epochs)
    for feat in ("penult", "convgap")
    for (hidden, wd, epochs) in ((32, 1e-2, 500), (16, 1e-2, 1500), (32, 1e-3, 500))
]


def fit_head(x: Any, r: Any, hidden: int, epochs: int, wd: float, seed: int) -> Any:
    """A standardised-input MLP ``x → log σ²`` (one per score) fitted by Gaussian NLL on residuals ``r``."""
    import torch

    torch.manual_seed(seed)
    mu, sd = x.mean(0), x.std(0) + 1e-6
    head = torch.nn.Sequential(
        torch.nn.Linear(x.shape[1], hidden), torch.nn.PReLU(), torch.nn.Linear(hidden, r.shape[1])
    )
    opt = torch.optim.Adam(head.parameters(), 1e-2, weight_decay=wd)
    xn = (x - mu) / sd
    for _ in range(epochs):
        lv = head(xn)
        loss = 0.5 * (r**2 * torch.exp(-lv) + lv).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return lambda z: head((z - mu) / sd).detach()


def main(argv: list[str] | None = None) -> int:
    import SimpleITK as sitk
    import torch

    from DeepSSMLogic import io
    from DeepSSMLogic.cohort import load_cohort, subject_particles
    from DeepSSMLogic.errors import IntensityRangeWarning
    from DeepSSMLogic.predict import Predictor

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="an uncertainty_study.py --out folder (model-none, cohort)")
    p.add_argument("--corruptions", type=int, default=12, help="random corruptions per training subject")
    p.add_argument("--seeds", type=int, default=3, help="head seeds evaluated for the selected config")
    a = p.parse_args(argv)
    warnings.simplefilter("ignore", IntensityRangeWarning)
    out = Path(a.out)
    t0 = time.perf_counter()
    args = us.parse_args(["--out", str(out)])
    images = us.build_images(args, out / "cohort" / "cohort.csv", out / "other" / "cohort.csv")
    pr = Predictor(out / "model-none", device="cpu", align=False)
    enc = pr._network.encoder
    cap: dict[str, Any] = {}
    enc.fc[4].register_forward_pre_hook(lambda m, x: cap.__setitem__("penult", x[0].detach().float().clone()))
    enc.conv.register_forward_hook(
        lambda m, x, o: cap.__setitem__("convgap", o.detach().float().mean((2, 3, 4)).clone())
    )

    def run(imgs: list[Any]) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
        feats: dict[str, list[Any]] = {"penult": [], "convgap": []}
        desc, parts = [], []
        for i in range(0, len(imgs), 8):
            preds = pr.predict_many(imgs[i : i + 8], batch_size=8)
            for k in feats:
                feats[k].append(cap[k])
            desc += [q.descriptor for q in preds]
            parts += [q.particles for q in preds]
        return {k: torch.cat(v) for k, v in feats.items()}, np.array(desc), np.array(parts)

    w = pr._network.decoder.weight.detach().double().numpy()  # (3M, K): particles = bias + w @ scores
    bias = pr._network.decoder.bias.detach().double().numpy()
    m, k = w.shape[0] // 3, w.shape[1]
    b2 = torch.tensor((w.reshape(m, 3, k) ** 2).sum(1), dtype=torch.float32)  # (M, K) |b_k(m)|²
    rng = np.random.default_rng(7)
    cohort = load_cohort(out / "cohort" / "cohort.csv")
    subjects = cohort.by_split("train") + cohort.by_split("val")
    timgs, truths = [], []
    for s in subjects:
        img = sitk.Cast(io.read_image(s.image), sitk.sitkFloat32)
        truth = subject_particles(s)
        timgs.append(img)
        truths.append(truth)
        for _ in range(a.corruptions):
            kind = list(LEVELS)[int(rng.integers(3))]
            timgs.append(us.corrupt(img, kind, float(rng.uniform(0.05, 1.0) * LEVELS[kind]), rng))
            truths.append(truth)
    ftr, dtr, ptr = run(timgs)
    proj = [np.linalg.lstsq(w, t.reshape(-1) - bias, rcond=None)[0] for t in truths]
    resid = torch.tensor(dtr - np.array(proj), dtype=torch.float32)  # (N, K) score residuals, mm
    trmse = np.array([np.sqrt(((q - t) ** 2).sum(-1).mean()) for q, t in zip(ptr, truths, strict=True)])
    held = images["held"]
    fh, _, ph = run([h["image"] for h in held])

    def unc(logvar: Any) -> np.ndarray:
        return torch.sqrt(torch.exp(logvar) @ b2.T).numpy()  # (N, M) mm

    group = np.repeat(np.arange(len(subjects)), a.corruptions + 1)
    best = None
    for cfg in CONFIGS:
        feat, hidden, wd, epochs = cfg
        u = np.zeros(len(group))
        for fold in range(4):
            te = group % 4 == fold
            head = fit_head(ftr[feat][~te], resid[~te], hidden, epochs, wd, 0)
            u[te] = unc(head(ftr[feat][te])).mean(1)
        r = us.spearman(u, trmse)
        print(f"CV {cfg}: rho subject {r:.3f}")
        if best is None or r > best[0]:
            best = (r, cfg)
    feat, hidden, wd, epochs = best[1]
    err = [np.sqrt(((q - h["truth"]) ** 2).sum(-1)) for q, h in zip(ph, held, strict=True)]
    rmse = [float(np.sqrt((e**2).mean())) for e in err]
    clean = [i for i, h in enumerate(held) if h["kind"] == "clean"]
    print(f"selected {best[1]} (CV rho subject {best[0]:.3f}); held-out, {len(held)} images:")
    print("| head seed | ρ subject | ρ particle (clean) | mean u clean / strong noise / blur / fov mm |")
    print("|---|---|---|---|")
    logvars = [fit_head(ftr[feat], resid, hidden, epochs, wd, seed)(fh[feat]) for seed in range(a.seeds)]
    pooled = torch.log(torch.stack([torch.exp(lv) for lv in logvars]).mean(0))  # the heads' mean variance
    for seed, lv in [*enumerate(logvars), ("mean of heads", pooled)]:
        u = unc(lv)
        strong = [
            float(np.mean([u[i].mean() for i, h in enumerate(held) if h["kind"] == kind and h["level"] == 3]))
            for kind in LEVELS
        ]
        print(
            f"| {seed} | {us.spearman(u.mean(1), rmse):.3f} | "
            f"{us.spearman(u.reshape(-1), np.concatenate(err)):.3f} "
            f"({us.spearman(u[clean].reshape(-1), np.concatenate([err[i] for i in clean])):.3f}) | "
            f"{u[clean].mean():.3f} / " + " / ".join(f"{v:.3f}" for v in strong) + " |"
        )
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
