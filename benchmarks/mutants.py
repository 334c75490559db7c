"""Mutation check: hand-written bugs in the core modules, each of which the quick tests must catch.

Each mutant is one textual edit (``old`` → ``new``, which must occur exactly once) of one file. It is
applied to a temporary copy of the package (DeepSSMLogic, DeepSSMExtension, Testing; Resources
linked), and the tests named for it run there with ``-m "not slow"`` (a mutant may name a slow test
by node id when only a slow test can see it; such tests run too). A mutant is *killed* when the
tests fail, *survived* when they pass. The unmutated copy runs first and must pass, or nothing is
measured. Prints a Markdown table and the score; exit status 1 when a mutant survives.

    .venv/bin/python benchmarks/mutants.py               # all mutants (~2-4 min on 2 cores)
    .venv/bin/python benchmarks/mutants.py --list
    .venv/bin/python benchmarks/mutants.py --only bundle-weights-x1.5 tps-displacement-sign

The score and the notes on survivors are recorded in docs/TESTING.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COPIED = ("DeepSSMLogic", "DeepSSMExtension", "Testing")
LINKED = ("Resources",)


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the repository root
    old: str
    new: str
    tests: tuple[str, ...]  # test files or node ids, relative to the repository root
    why: str  # the bug it stands for


MUTANTS: tuple[Mutant, ...] = (
    Mutant(
        "bundle-weights-x1.5",
        "DeepSSMLogic/bundle.py",
        'state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}',
        'state = {k: (v.detach().to("cpu") * 1.5).contiguous() for k, v in state.items()}',
        ("Testing/test_bundle.py",),
        "save_bundle writes weights that are not the network's",
    ),
    Mutant(
        "augment-offline-warp-reversed",
        "DeepSSMLogic/augment/dataset.py",
        "fit_warp(pts[src], np.array(gen_particles[start:stop]),",
        "fit_warp(np.array(gen_particles[start:stop]), pts[src],",
        ("Testing/test_augmented_set.py",),
        "offline augmented images no longer match their particles (source/target swapped)",
    ),
    Mutant(
        "augment-online-warp-reversed",
        "DeepSSMLogic/augment/dataset.py",
        "fit_warp(self.particles[idx], gen[rows],",
        "fit_warp(gen[rows], self.particles[idx],",
        ("Testing/test_augmented_set.py",),
        "online augmented images no longer match their particles",
    ),
    Mutant(
        "tps-displacement-sign",
        "DeepSSMLogic/augment/tps.py",
        "return ThinPlateSpline(tgt, src - tgt, regularization=regularization, check=False)",
        "return ThinPlateSpline(tgt, tgt - src, regularization=regularization, check=False)",
        ("Testing/test_tps.py", "Testing/test_augmented_set.py"),
        "the backward warp points the wrong way",
    ),
    Mutant(
        "metric-eq12-euclidean",
        "DeepSSMLogic/analysis/metrics.py",
        "r = rmse_per_axis(pred, gt).mean(axis=-1)",
        "r = np.sqrt((rmse_per_axis(pred, gt) ** 2).sum(axis=-1))",
        ("Testing/test_metrics.py",),
        "RMSE is the Euclidean one, not the paper's eq. 12",
    ),
    Mutant(
        "evaluate-rmse-quadratic-mean",
        "DeepSSMLogic/analysis/evaluation.py",
        '"rmse_mm": float(per_axis.mean()),',
        '"rmse_mm": float(np.sqrt((per_axis**2).mean())),',
        ("Testing/test_evaluation.py",),
        "deepssm evaluate reports a different RMSE than eq. 12",
    ),
    Mutant(
        "evaluate-axes-swapped",
        "DeepSSMLogic/analysis/evaluation.py",
        '"rmse_x_mm": float(per_axis[0]),',
        '"rmse_x_mm": float(per_axis[1]),',
        ("Testing/test_evaluation.py",),
        "per-axis columns mislabelled",
    ),
    Mutant(
        "lps-ras-flip-x-only",
        "DeepSSMLogic/geometry.py",
        "out[..., :2] *= -1.0\n    return out",
        "out[..., :1] *= -1.0\n    return out",
        ("Testing/test_slicer_adapters.py", "Testing/test_io.py"),
        "particles shown in Slicer mirrored in y",
    ),
    Mutant(
        "markups-ras-not-converted",
        "DeepSSMLogic/io.py",
        'if system == "RAS":\n        pts[:, :2] *= -1.0',
        'if system == "RAS":\n        pts[:, :1] *= -1.0',
        ("Testing/test_io.py",),
        "RAS markups read as if half-converted",
    ),
    Mutant(
        "pca-reconstruct-sign",
        "DeepSSMLogic/shape_model.py",
        "flat = z @ self.components[:k] + self.mean.reshape(-1)",
        "flat = -(z @ self.components[:k]) + self.mean.reshape(-1)",
        ("Testing/test_shape_model.py",),
        "PCA scores decode to the mirrored shape",
    ),
    Mutant(
        "normaliser-scale-inverted",
        "DeepSSMLogic/preprocess.py",
        "out /= np.float32(self.std)",
        "out *= np.float32(self.std)",
        ("Testing/test_preprocess.py", "Testing/test_predict.py"),
        "inference normalises differently from training",
    ),
    Mutant(
        "l2-loss-not-squared",
        "DeepSSMLogic/losses.py",
        '"correspondence_l2")\n    return (pred.float() - target.float()).pow(2).sum(-1).mean()',
        '"correspondence_l2")\n    return (pred.float() - target.float()).abs().sum(-1).mean()',
        ("Testing/test_losses.py",),
        "the correspondence loss is L1, not eq. 2",
    ),
    Mutant(
        "focal-weight-reversed",
        "DeepSSMLogic/losses.py",
        "return torch.sigmoid(a * (distance - c))",
        "return torch.sigmoid(a * (c - distance))",
        ("Testing/test_losses.py",),
        "the focal loss down-weights the large errors it should emphasise",
    ),
    Mutant(
        "predict-alignment-not-applied",
        "DeepSSMLogic/predict.py",
        "p_in = apply_matrix(aligns[j].matrix, parts[j])",
        "p_in = apply_matrix(np.linalg.inv(aligns[j].matrix), parts[j])",
        ("Testing/test_predict.py",),
        "predicted particles mapped back to the input image the wrong way",
    ),
    Mutant(
        "align-training-particles-wrong-way",
        "DeepSSMLogic/pipeline.py",
        "particles[i] = apply_matrix(np.linalg.inv(al.matrix), arrays.particles[i])",
        "particles[i] = apply_matrix(al.matrix, arrays.particles[i])",
        ("Testing/test_train_end_to_end.py::test_align_training_arrays_moves_images_and_particles_together",),
        "aligned training images and particles in different frames (a slow test sees it)",
    ),
    Mutant(
        "severity-sign",
        "DeepSSMLogic/analysis/severity.py",
        'signed=np.einsum("nmi,mi->nm", ctilde, n),',
        'signed=-np.einsum("nmi,mi->nm", ctilde, n),',
        ("Testing/test_analysis.py", "Testing/test_worker.py"),
        "outward growth shown as inward on the severity heatmap",
    ),
    Mutant(
        "reliability-edge-to-lower-bin",
        "DeepSSMLogic/analysis/calibration.py",
        'idx = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, edges.size - 2)',
        'idx = np.clip(np.searchsorted(edges, p, side="left") - 1, 0, edges.size - 2)',
        ("Testing/test_calibration.py",),
        "reliability bins put a value on an inner edge into the bin below",
    ),
    Mutant(
        "calibration-error-per-point-rmse",
        "DeepSSMLogic/analysis/evaluation.py",
        "[np.linalg.norm(r.pred - r.gt, axis=1) for r in results],",
        "[metrics.per_point_rmse(r.pred, r.gt) for r in results],",
        ("Testing/test_evaluation.py",),
        "the reliability plot compares the uncertainty with sqrt(d²/3), not the distance in mm",
    ),
    Mutant(
        "heatmap-ignores-colour-by",
        "DeepSSMExtension/DeepSSMLib/mrml.py",
        "chosen = wanted if wanted in available else (available[0] if available else None)",
        "chosen = available[0] if available else None",
        ("Testing/test_slicer_uncertainty.py",),
        "Colour by: uncertainty still shows the error heatmap",
    ),
    Mutant(
        "variance-propagation-abs-jacobian",
        "DeepSSMLogic/variance_head.py",
        'torch.einsum("bmck,bk->bm", jacobian.float() ** 2, variance.float())',
        'torch.einsum("bmck,bk->bm", jacobian.float().abs(), variance.float())',
        ("Testing/test_variance_head.py",),
        "per-particle variance uncertainty is not the trace of the propagated covariance",
    ),
    Mutant(
        "variance-tl-jacobian-slope",
        "DeepSSMLogic/variance_head.py",
        "torch.full_like(pre, float(act.negative_slope))",
        "torch.full_like(pre, 1.0)",
        ("Testing/test_variance_head.py",),
        "TL-DeepSSM's decoder Jacobian ignores the LeakyReLU's negative side",
    ),
    Mutant(
        "variance-schema-head-unchecked",
        "DeepSSMLogic/bundle_schema.py",
        '    if method == "variance":\n        _validate_variance_head(f, unc)\n',
        "",
        ("Testing/test_variance_head.py",),
        "a model.json with a malformed variance head passes the schema",
    ),
    Mutant(
        "variance-head-not-rebuilt",
        "DeepSSMLogic/uncertainty.py",
        "        attach_variance_head(net, VarianceHead.from_config(spec.head))",
        "        pass",
        ("Testing/test_variance_head.py",),
        "a variance bundle loads without its head",
    ),
    Mutant(
        "variance-draws-shared",
        "DeepSSMLogic/variance_head.py",
        "rng = np.random.default_rng([seed, draw])",
        "rng = np.random.default_rng(seed)",
        ("Testing/test_variance_head.py",),
        "the variance head's MLPs all see the same corruption draw (the draw noise is not averaged out)",
    ),
    Mutant(
        "variance-heads-fit-first-set",
        "DeepSSMLogic/variance_head.py",
        "enumerate(zip(head.heads, sets, strict=True))",
        "enumerate(zip(head.heads, [sets[0]] * len(sets), strict=True))",
        ("Testing/test_variance_head.py",),
        "every MLP of the variance head is fitted on the first MLP's training set",
    ),
)


def _copy_tree(dst: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    for name in COPIED:
        shutil.copytree(REPO / name, dst / name, ignore=ignore)
    for name in LINKED:
        (dst / name).symlink_to(REPO / name, target_is_directory=True)
    shutil.copy2(REPO / "pyproject.toml", dst / "pyproject.toml")


def _apply(root: Path, m: Mutant) -> None:
    path = root / m.path
    text = path.read_text(encoding="utf-8")
    n = text.count(m.old)
    if n != 1:
        raise SystemExit(f"mutant {m.name}: expected the text once in {m.path}, found it {n} times")
    path.write_text(text.replace(m.old, m.new), encoding="utf-8")


def _run_tests(root: Path, tests: tuple[str, ...]) -> tuple[bool, float, str]:
    """(passed, seconds, last output line) of ``tests`` in the copy at ``root``: test files with
    ``-m "not slow"``, node ids (``file::test``) as named, slow or not."""
    env = dict(os.environ, PYTHONPATH=str(root))
    files = [t for t in tests if "::" not in t]
    nodes = [t for t in tests if "::" in t]
    runs = ([["-m", "not slow", *files]] if files else []) + ([nodes] if nodes else [])
    t = time.perf_counter()
    last = ""
    for selection in runs:
        cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *selection]
        r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
        lines = [line for line in (r.stdout + r.stderr).splitlines() if line.strip()]
        last = lines[-1] if lines else ""
        if r.returncode != 0:
            return False, time.perf_counter() - t, last
    return True, time.perf_counter() - t, last


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutants")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    args = ap.parse_args()
    mutants = [m for m in MUTANTS if not args.only or m.name in args.only]
    if args.only and len(mutants) != len(set(args.only)):
        known = {m.name for m in MUTANTS}
        raise SystemExit(f"unknown mutant(s): {sorted(set(args.only) - known)}")
    if args.list:
        for m in mutants:
            print(f"{m.name:32s} {m.path:38s} {m.why}")
        return 0

    for m in mutants:  # every edit applies, before anything slow runs
        n = (REPO / m.path).read_text(encoding="utf-8").count(m.old)
        if n != 1:
            raise SystemExit(f"mutant {m.name}: expected its text once in {m.path}, found it {n} times")
    with tempfile.TemporaryDirectory(prefix="deepssm-mutants-") as tmp:
        base = Path(tmp) / "base"
        _copy_tree(base)
        probe = subprocess.run(
            [sys.executable, "-c", "import DeepSSMLogic; print(DeepSSMLogic.__file__)"],
            cwd=base,
            env=dict(os.environ, PYTHONPATH=str(base)),
            capture_output=True,
            text=True,
        )
        if not probe.stdout.strip().startswith(str(base)):
            raise SystemExit(f"the copy is not what gets imported: {probe.stdout.strip() or probe.stderr}")
        tests = tuple(sorted({t for m in mutants for t in m.tests}))
        ok, secs, last = _run_tests(base, tests)
        if not ok:
            raise SystemExit(f"the unmutated tests fail ({last}); fix them before measuring mutants")
        print(f"baseline: {len(tests)} test files pass unmutated ({secs:.0f} s)\n")
        print("| mutant | file | bug it stands for | tests | result |\n|---|---|---|---|---|")
        survived = []
        for m in mutants:
            work = Path(tmp) / m.name
            shutil.copytree(base, work, symlinks=True)
            _apply(work, m)
            passed, secs, last = _run_tests(work, m.tests)
            if passed:
                survived.append(m.name)
            shown = ", ".join(t.removeprefix("Testing/").split("::")[-1] for t in m.tests)
            result = "**survived**" if passed else "killed"
            print(f"| {m.name} | {m.path} | {m.why} | {shown} | {result} ({secs:.0f} s) |", flush=True)
            shutil.rmtree(work, ignore_errors=True)
    killed = len(mutants) - len(survived)
    print(
        f"\nscore: {killed}/{len(mutants)} killed"
        + (f"; survived: {', '.join(survived)}" if survived else "")
    )
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
