"""The Analysis panel's computations, in-process (numpy/scipy only: fast enough for the GUI).

Shapes are read from folders of particle files (``.particles``, ``.csv``, ``.mrk.json``), all LPS
mm with the same particle count. Results are shown with :mod:`.mrml` as point clouds coloured by
per-particle values.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from DeepSSMLogic.errors import InputError

PARTICLE_GLOBS = ("*.particles", "*.csv", "*.mrk.json", "*.pts", "*.txt")


def particle_files(folder: str | Path) -> list[Path]:
    """The particle files in ``folder``, sorted by name."""
    d = Path(folder)
    if not d.is_dir():
        raise InputError(f"not a folder of particle files: {d}")
    files = sorted({p for g in PARTICLE_GLOBS for p in d.glob(g)})
    if not files:
        raise InputError(f"{d}: no particle files ({', '.join(PARTICLE_GLOBS)})")
    return files


def load_group(folder: str | Path) -> tuple[list[str], np.ndarray]:
    """Subject names and particles ``(N, M, 3)`` LPS mm of every file in ``folder``."""
    from DeepSSMLogic import io

    files = particle_files(folder)
    arrays = [io.read_particles(f) for f in files]
    counts = {a.shape[0] for a in arrays}
    if len(counts) != 1:
        raise InputError(f"{folder}: particle files differ in point count {sorted(counts)}")
    return [f.name for f in files], np.stack(arrays)


@dataclass
class SwimPath:
    """Shapes along the line between two group means (``lambdas`` ``(L,)``, ``particles`` ``(L, M, 3)``)."""

    lambdas: np.ndarray
    particles: np.ndarray

    def at(self, lam: float) -> np.ndarray:
        """Particles ``(M, 3)`` at ``lam`` in [0, 1], linear between the precomputed steps."""
        lam = float(np.clip(lam, 0.0, 1.0))
        i = int(np.searchsorted(self.lambdas, lam, side="right") - 1)
        i = min(max(i, 0), len(self.lambdas) - 2)
        lo, hi = self.lambdas[i], self.lambdas[i + 1]
        w = 0.0 if hi == lo else (lam - lo) / (hi - lo)
        return (1.0 - w) * self.particles[i] + w * self.particles[i + 1]


def swim_between_groups(a: np.ndarray, b: np.ndarray, steps: int = 11) -> SwimPath:
    """PCA swim from group A's mean to group B's: a shape model of both groups, walked in score
    space (``analysis.swim.latent_swim`` with the PCA decoder)."""
    from DeepSSMLogic.analysis.swim import latent_swim
    from DeepSSMLogic.shape_model import ShapeModel

    both = np.concatenate([a, b])
    if len(both) < 3:
        raise InputError("swim: need at least 3 shapes in the two groups together")
    model = ShapeModel.fit(both)
    swim = latent_swim(model.project(a), model.project(b), model.reconstruct, steps)
    return SwimPath(swim.lambdas, swim.particles)


def severity_scores(normal: np.ndarray, subjects: np.ndarray) -> np.ndarray:
    """Mahalanobis severity ``(N,)`` of ``subjects`` against a PPCA of the ``normal`` group."""
    from DeepSSMLogic.analysis.severity import fit_normal_model, severity

    return severity(fit_normal_model(normal), subjects).scores
