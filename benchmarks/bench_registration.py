"""Registration precision benchmark: how far `register_to_reference` moves the particles of held-out
synthetic subjects, already in the model frame (truth: the identity) and pose-jittered (truth: the
known pose), and how long one registration takes.

Per family (cranium, femur, atrium): a training cohort written by `synthetic.generate_cohort`
(64³ @ 1.5 mm, 256 particles), the reference grid / arrays / reference image built by the
pipeline's own functions (as `train_model` does), and held-out subjects drawn by
`synthetic.make_subject` from other seeds, once un-posed and once with `pose_jitter` (≤ 6°,
≤ 3 % of the field of view). Error = distance between the registration's model → input transform
applied to the subject's un-posed ground-truth particles and the subject's actual particles (mm).

    .venv/bin/python benchmarks/bench_registration.py [--train 20] [--heldout 6] [--variants all]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from DeepSSMLogic import synthetic  # noqa: E402
from DeepSSMLogic.cohort import load_cohort  # noqa: E402
from DeepSSMLogic.io import read_particles  # noqa: E402
from DeepSSMLogic.pipeline import (  # noqa: E402
    TrainingArrays,
    mean_reference_image,
    prepare_training_arrays,
    reference_grid,
)
from DeepSSMLogic.predict import (  # noqa: E402
    RegistrationSettings,
    apply_matrix,
    register_to_reference,
)
from DeepSSMLogic.preprocess import image_from_array  # noqa: E402

FAMILIES = ("cranium", "femur", "atrium")
SIZE = (64, 64, 64)
SPACING = 1.5
N_PARTICLES = 256


@dataclass
class Variant:
    """A reference-image builder and registration settings to compare."""

    name: str
    reference: Callable[[TrainingArrays], Any]
    settings: RegistrationSettings
    anatomy: bool = True  # pass the training mean shape (as Predictor does)


@dataclass
class Case:
    """One held-out image with its truth: ``pose`` 4x4 un-posed → image LPS mm, ``particles`` (M, 3)."""

    image: Any
    pose: np.ndarray
    particles: np.ndarray
    jittered: bool


def build_training(family: str, n: int, tmp: Path, seed: int) -> TrainingArrays:
    """Training arrays on the reference grid, exactly as `train_model` builds them (align=False)."""
    csv = synthetic.generate_cohort(
        family, n, tmp / family, seed, image_size=SIZE, spacing=SPACING, n_particles=N_PARTICLES
    )
    train = load_cohort(csv).by_split("train")
    particles = np.stack([read_particles(s.particles) for s in train])
    grid = reference_grid(particles, SPACING, 10.0)
    return prepare_training_arrays(train, grid)


def held_out(family: str, n: int, seed: int, template: bool = False) -> list[Case]:
    """``n`` un-posed and ``n`` pose-jittered subjects (same shapes), seeds disjoint from training;
    ``template``: every subject has the family's template shape (only noise, bias, distractor and
    pose differ)."""
    cases = []
    for jitter in (False, True):
        for i in range(n):
            rng = np.random.default_rng([seed, 1000 + i])
            s = synthetic.make_subject(
                family,
                synthetic.template_params(family) if template else rng,
                image_rng=rng,
                image_size=SIZE,
                spacing=SPACING,
                n_particles=N_PARTICLES,
                pose_jitter=jitter,
            )
            cases.append(Case(image_from_array(s.image, s.grid), s.pose, s.particles, jitter))
    return cases


def displacement(matrix: np.ndarray, case: Case) -> np.ndarray:
    """Per-particle error (mm) of the model → input transform ``matrix``."""
    unposed = apply_matrix(np.linalg.inv(case.pose), case.particles)
    return np.linalg.norm(apply_matrix(matrix, unposed) - case.particles, axis=1)


def mean_reference(arrays: TrainingArrays) -> Any:
    return mean_reference_image(arrays.images, arrays.grid)


def variants(selected: str) -> list[Variant]:
    new = RegistrationSettings()
    old = replace(new, highpass_mm=None, anatomy_margin_mm=None)
    out = [
        Variant("before: raw intensities, whole image", mean_reference, old, anatomy=False),
        Variant("now: high-pass 6 mm, mean-shape band 6 mm", mean_reference, new),
    ]
    if selected == "default":
        return out
    return out + [
        Variant("band 6 mm only", mean_reference, replace(new, highpass_mm=None)),
        Variant("high-pass 6 mm only", mean_reference, new, anatomy=False),
        Variant("high-pass 4 mm, band 6 mm", mean_reference, replace(new, highpass_mm=4.0)),
        Variant("high-pass 8 mm, band 6 mm", mean_reference, replace(new, highpass_mm=8.0)),
        Variant("high-pass 6 mm, band 8 mm", mean_reference, replace(new, anatomy_margin_mm=8.0)),
        Variant("now + finer reference (max_voxels 150k)", mean_reference, replace(new, max_voxels=150_000)),
    ]


def run(args: argparse.Namespace) -> list[tuple[str, str, dict[str, float]]]:
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for fi, family in enumerate(FAMILIES):
            arrays = build_training(family, args.train, Path(d), seed=11 + fi)
            cases = held_out(family, args.heldout, seed=500 + fi, template=args.template_shape)
            for v in variants(args.variants):
                ref = sitk.Cast(v.reference(arrays), sitk.sitkFloat32)
                anatomy = arrays.particles.mean(axis=0) if v.anatomy else None
                res: dict[bool, list[np.ndarray]] = {False: [], True: []}
                secs = []
                for c in cases:
                    t = time.perf_counter()
                    al = register_to_reference(c.image, ref, v.settings, anatomy)
                    secs.append(time.perf_counter() - t)
                    res[c.jittered].append(displacement(al.matrix, c))
                stats = {"s": statistics.median(secs)}
                for jit, key in ((False, "aligned"), (True, "jittered")):
                    e = np.stack(res[jit])
                    stats[f"{key}_mean"] = float(e.mean())
                    stats[f"{key}_worst_mean"] = float(e.mean(axis=1).max())
                    stats[f"{key}_max"] = float(e.max())
                rows.append((family, v.name, stats))
                print(
                    f"{family:8s} {v.name:45s} aligned {stats['aligned_mean']:.3f}/{stats['aligned_max']:.3f}  "
                    f"jittered {stats['jittered_mean']:.3f}/{stats['jittered_max']:.3f}  {stats['s']:.3f} s",
                    flush=True,
                )
    return rows


def table(rows: list[tuple[str, str, dict[str, float]]]) -> str:
    lines = [
        "| family | variant | aligned: mean / worst-subject mean / max (mm) | jittered: mean / worst-subject "
        "mean / max (mm) | s per registration (median) |",
        "|---|---|---|---|---|",
    ]
    for family, name, s in rows:
        lines.append(
            f"| {family} | {name} | {s['aligned_mean']:.3f} / {s['aligned_worst_mean']:.3f} / "
            f"{s['aligned_max']:.3f} | {s['jittered_mean']:.3f} / {s['jittered_worst_mean']:.3f} / "
            f"{s['jittered_max']:.3f} | {s['s']:.3f} |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=20, help="cohort size per family (70%% train split)")
    ap.add_argument(
        "--heldout", type=int, default=6, help="held-out subjects per family (each also jittered)"
    )
    ap.add_argument("--variants", choices=("default", "all"), default="default")
    ap.add_argument(
        "--template-shape",
        action="store_true",
        help="held-out subjects all get the family's template shape (isolates shape-driven pose ambiguity)",
    )
    args = ap.parse_args()
    sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(2)
    rows = run(args)
    load = " ".join(f"{v:.1f}" for v in os.getloadavg())
    print()
    print(
        f"Machine: {platform.processor() or platform.machine()} ({os.cpu_count()} cores), SimpleITK "
        f"{sitk.Version.VersionString()}, 2 ITK threads; load average at the end: {load}"
    )
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
