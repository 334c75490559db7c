"""Which KDE kernel should be the default? Measures samplers on realistic shape spectra.

For each cohort, fits a ShapeModel on N training shapes (all N-1 modes, as in the paper), fits each
sampler on the training scores, draws n shapes and reports:

* variance ratio var(generated)/var(real) per mode: mode 1, mode 2, the median over modes and the
  mean over the 5 smallest modes ("minor");
* specificity: mean RMS per-point distance (mm) of each generated shape to its nearest training
  shape, and the same divided by the training set's own nearest-neighbour distance ("spec/NN");
* coverage: mean RMS per-point distance (mm) of held-out real shapes to their nearest generated
  shape (lower = the generated set reaches unseen real shapes), next to their distance to the
  nearest training shape.

Cohorts: ``powerlaw`` (random orthonormal modes with eigenvalues 400 k^-2 mm², the decay of real
SSMs: 95 % of the variance in ~12 modes) and ``cranium`` (DeepSSMLogic.synthetic shapes plus
0.25 mm correspondence noise).

    .venv/bin/python benchmarks/kde_kernels.py [--n-train 50] [--n-test 20] [--n-gen 5000] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from DeepSSMLogic.augment.samplers import (
    KDESampler,
    make_sampler,
    nearest_neighbour_distances,
)
from DeepSSMLogic.shape_model import ShapeModel


def powerlaw_cohort(n: int, m: int, rng: np.random.Generator) -> np.ndarray:
    d = 3 * m
    n_modes = 60
    q, _ = np.linalg.qr(rng.standard_normal((d, n_modes)))
    lam = 400.0 * np.arange(1, n_modes + 1, dtype=float) ** -2.0
    mean = rng.normal(size=d) * 40.0
    return (mean + (rng.standard_normal((n, n_modes)) * np.sqrt(lam)) @ q.T).reshape(n, m, 3)


def cranium_cohort(n: int, m: int, rng: np.random.Generator) -> np.ndarray:
    from DeepSSMLogic import synthetic

    shapes = []
    for _ in range(n):
        verts, _, idx = synthetic.make_shape(
            "cranium", synthetic.sample_params("cranium", rng), n_particles=m
        )
        shapes.append(verts[idx])
    return np.asarray(shapes) + rng.normal(scale=0.25, size=(n, m, 3))


def rms_nearest(queries: np.ndarray, refs: np.ndarray, model: ShapeModel) -> np.ndarray:
    """Mean-over-points RMS distance (mm) from each query score row to the nearest ref row."""
    ref_sq = np.einsum("ij,ij->i", refs, refs)
    out = np.empty(len(queries))
    for s in range(0, len(queries), 2048):
        q = queries[s : s + 2048]
        j = np.argmin(ref_sq[None] - 2 * q @ refs.T, axis=1)
        diff = model.reconstruct(q) - model.reconstruct(refs[j])
        out[s : s + 2048] = np.sqrt((diff**2).sum(-1).mean(-1))
    return out


def variants(z: np.ndarray) -> list[tuple[str, object]]:
    """(label, unfitted sampler). The whitened-NN rows show why that rule cannot set the bandwidth."""
    k = z.shape[1]
    sigma = nearest_neighbour_distances(z).mean()
    v = z.var(axis=0, ddof=1)
    white_nn = nearest_neighbour_distances(z / np.sqrt(v)).mean()  # = sqrt(2(N-1)) with all modes
    # KDESampler(scaled) gives per-mode std sigma * scale * sqrt(v / sum v); these scales turn it
    # into std h * sqrt(v) for a chosen whitened bandwidth h.
    to_scale = float(np.sqrt(v.sum()) / sigma)
    return [
        ("kde isotropic (paper eq. 1)", KDESampler("isotropic")),
        ("kde scaled (default)", KDESampler("scaled")),
        ("kde scaled, h = whitened NN", KDESampler("scaled", bandwidth_scale=white_nn * to_scale)),
        (
            "kde scaled, h = whitened NN/sqrt(K)",
            KDESampler("scaled", bandwidth_scale=white_nn / np.sqrt(k) * to_scale),
        ),
        ("reference (std 2 mm, isotropic)", KDESampler("isotropic", bandwidth_scale=2.0 / sigma)),
        ("gaussian", make_sampler("gaussian")),
        ("gmm (BIC)", make_sampler("gmm")),
    ]


def run(cohort: str, args: argparse.Namespace) -> list[dict]:
    rng = np.random.default_rng(args.seed)
    make = powerlaw_cohort if cohort == "powerlaw" else cranium_cohort
    shapes = make(args.n_train + args.n_test, args.particles, rng)
    train, test = shapes[: args.n_train], shapes[args.n_train :]
    model = ShapeModel.fit(train)
    z = model.project(train)
    zt = model.project(test)
    var_real = z.var(axis=0, ddof=1)
    # Training set's own nearest-neighbour distance (excluding self), the specificity scale.
    sq = np.einsum("ij,ij->i", z, z)
    d2 = sq[:, None] + sq[None] - 2 * z @ z.T
    np.fill_diagonal(d2, np.inf)
    j = np.argmin(d2, axis=1)
    real_nn = np.sqrt(((model.reconstruct(z) - model.reconstruct(z[j])) ** 2).sum(-1).mean(-1))
    test_to_train = rms_nearest(zt, z, model).mean()
    print(
        f"\n## {cohort}: N={args.n_train} train ({model.n_modes} modes, 95% in "
        f"{model.n_modes_for_variance(0.95)}), {args.n_test} held out, {args.particles} particles, "
        f"{args.n_gen} generated, seed {args.seed}\n"
        f"training NN distance {real_nn.mean():.2f} mm RMS/point; held-out to nearest training shape "
        f"{test_to_train:.2f} mm\n"
    )
    print(
        "| sampler | var ratio mode 1 | mode 2 | median | 5 minor | specificity mm | spec/NN | coverage mm |"
    )
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for label, sampler in variants(z):
        t0 = time.perf_counter()
        sampler.fit(z)
        batch = sampler.sample(args.n_gen, np.random.default_rng(args.seed + 1))
        elapsed = time.perf_counter() - t0
        ratio = batch.scores.var(axis=0, ddof=1) / var_real
        spec = rms_nearest(batch.scores, z, model).mean()
        cover = rms_nearest(zt, batch.scores, model).mean()
        row = {
            "cohort": cohort,
            "sampler": label,
            "ratio_mode1": float(ratio[0]),
            "ratio_mode2": float(ratio[1]),
            "ratio_median": float(np.median(ratio)),
            "ratio_minor5": float(ratio[-5:].mean()),
            "specificity_mm": float(spec),
            "specificity_over_nn": float(spec / real_nn.mean()),
            "coverage_mm": float(cover),
            "seconds": elapsed,
        }
        rows.append(row)
        print(
            f"| {label} | {ratio[0]:.2f} | {ratio[1]:.2f} | {np.median(ratio):.3g} | {ratio[-5:].mean():.3g} "
            f"| {spec:.2f} | {spec / real_nn.mean():.2f} | {cover:.2f} |"
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-train", type=int, default=50)
    p.add_argument("--n-test", type=int, default=20)
    p.add_argument("--n-gen", type=int, default=5000)
    p.add_argument("--particles", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cohorts", nargs="+", default=["powerlaw", "cranium"], choices=["powerlaw", "cranium"])
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = p.parse_args()
    rows = [r for c in args.cohorts for r in run(c, args)]
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
