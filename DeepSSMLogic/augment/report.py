"""Augmentation quality report: does the generated set look like the real one?

* per-mode variance ratio var(generated) / var(real) (both ddof=1): 1 means the mode's spread is
  kept, > 1 inflated, < 1 shrunk;
* specificity: distance of each generated shape to its nearest real shape. With a ``ShapeModel``
  it is the RMS per-point distance (mm) between the reconstructed particle sets; without one it is
  the Euclidean distance between score vectors (mm). The same distance between each real shape and
  its nearest other real shape is given as the reference scale;
* a PNG scatter of real vs generated scores in modes 1-2 and 3-4 (matplotlib, Agg, imported lazily).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from DeepSSMLogic.errors import InputError
from DeepSSMLogic.fileutil import atomic_path, atomic_write_json

__all__ = ["REPORT_JSON", "REPORT_PNG", "quality_report"]

REPORT_JSON = "augmentation_report.json"
REPORT_PNG = "augmentation_scatter.png"

_BLOCK = 2048
_MAX_PLOT_POINTS = 5000


def _as_scores(x: Any, name: str, min_rows: int) -> np.ndarray:
    z = np.asarray(x, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] < 1:
        raise InputError(f"{name}: expected a 2-D array (n shapes, K modes), found shape {z.shape}")
    if z.shape[0] < min_rows:
        raise InputError(f"{name}: expected at least {min_rows} rows, found {z.shape[0]}")
    if not np.all(np.isfinite(z)):
        raise InputError(f"{name}: contains NaN or Inf")
    return z


def _nearest(queries: np.ndarray, refs: np.ndarray, exclude_self: bool = False) -> np.ndarray:
    ref_sq = np.einsum("ij,ij->i", refs, refs)
    out = np.empty(queries.shape[0], dtype=np.int64)
    for start in range(0, queries.shape[0], _BLOCK):
        blk = queries[start : start + _BLOCK]
        d = ref_sq[None, :] - 2.0 * blk @ refs.T
        if exclude_self:
            d[np.arange(blk.shape[0]), np.arange(start, start + blk.shape[0])] = np.inf
        out[start : start + _BLOCK] = np.argmin(d, axis=1)
    return out


def _pair_distances(a: np.ndarray, b: np.ndarray, shape_model: Any) -> np.ndarray:
    """Per-pair distance between score rows ``a`` and ``b`` (n, K): RMS per point (mm) or score norm."""
    if shape_model is None:
        return np.linalg.norm(a - b, axis=1)
    out = np.empty(a.shape[0])
    for start in range(0, a.shape[0], _BLOCK):
        pa = shape_model.reconstruct(a[start : start + _BLOCK])
        pb = shape_model.reconstruct(b[start : start + _BLOCK])
        out[start : start + _BLOCK] = np.sqrt(((pa - pb) ** 2).sum(axis=-1).mean(axis=-1))
    return out


def _summary(x: np.ndarray) -> dict[str, float]:
    return {
        "mean": float(x.mean()),
        "median": float(np.median(x)),
        "p95": float(np.percentile(x, 95)),
        "max": float(x.max()),
    }


def _plot(real: np.ndarray, gen: np.ndarray, path: Path) -> None:
    # Figure + Agg canvas directly: no pyplot, so the host's (e.g. Slicer's) backend is untouched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    k = real.shape[1]
    pairs = [(0, 1), (2, 3)] if k >= 4 else ([(0, 1)] if k >= 2 else [(0, 0)])
    if k == 3:
        pairs = [(0, 1), (1, 2)]
    if gen.shape[0] > _MAX_PLOT_POINTS:
        # A fixed stride, not a random subset, so the same input gives the same picture.
        gen = gen[:: int(np.ceil(gen.shape[0] / _MAX_PLOT_POINTS))]
    fig = Figure(figsize=(5.5 * len(pairs), 5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(pairs), squeeze=False)
    for ax, (i, j) in zip(axes[0], pairs):
        yi = j if i != j else None
        gy = gen[:, yi] if yi is not None else np.zeros(gen.shape[0])
        ry = real[:, yi] if yi is not None else np.zeros(real.shape[0])
        ax.scatter(gen[:, i], gy, s=4, alpha=0.35, color="tab:orange", label=f"generated ({gen.shape[0]})")
        ax.scatter(
            real[:, i],
            ry,
            s=22,
            color="tab:blue",
            edgecolor="k",
            linewidth=0.4,
            label=f"real ({real.shape[0]})",
        )
        ax.set_xlabel(f"mode {i + 1} score (mm)")
        ax.set_ylabel(f"mode {j + 1} score (mm)" if yi is not None else "")
        ax.set_title(f"PCA modes {i + 1}-{j + 1}" if yi is not None else "PCA mode 1")
        ax.legend(loc="best", fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")


def quality_report(
    real_scores: np.ndarray,
    generated_scores: np.ndarray,
    out_dir: str | Path | None = None,
    shape_model: Any = None,
) -> dict[str, Any]:
    """Compare generated with real PCA scores (both ``(n, K)`` mm, the same K modes).

    ``shape_model`` (a ``ShapeModel`` with at least K modes) switches specificity to RMS per-point
    distance of reconstructed particles. With ``out_dir``, writes ``augmentation_report.json`` and
    ``augmentation_scatter.png`` there (atomically) and adds their paths under ``"files"``.
    Returns the JSON-able report.
    """
    real = _as_scores(real_scores, "real_scores", 2)
    gen = _as_scores(generated_scores, "generated_scores", 1)
    if gen.shape[1] != real.shape[1]:
        raise InputError(
            f"generated_scores: expected {real.shape[1]} modes (as real_scores), found {gen.shape[1]}"
        )
    k = real.shape[1]
    if shape_model is not None and not 1 <= k <= shape_model.n_modes:
        raise InputError(f"shape_model: has {shape_model.n_modes} modes, the scores have {k}")

    var_real = real.var(axis=0, ddof=1)
    var_gen = gen.var(axis=0, ddof=1) if gen.shape[0] > 1 else np.zeros(k)
    ratio = [float(g / r) if r > 0 else None for g, r in zip(var_gen, var_real)]
    finite = np.array([r for r in ratio if r is not None])

    nearest = _nearest(gen, real)
    spec = _pair_distances(gen, real[nearest], shape_model)
    real_nn = _nearest(real, real, exclude_self=True)
    real_spec = _pair_distances(real, real[real_nn], shape_model)
    unit = "rms_per_point_mm" if shape_model is not None else "score_distance_mm"

    report: dict[str, Any] = {
        "n_real": int(real.shape[0]),
        "n_generated": int(gen.shape[0]),
        "n_modes": int(k),
        "variance_real_mm2": [float(v) for v in var_real],
        "variance_generated_mm2": [float(v) for v in var_gen],
        "variance_ratio": ratio,
        "variance_ratio_summary": {
            "mode_1": ratio[0],
            "last_mode": ratio[-1],
            "median": float(np.median(finite)) if finite.size else None,
            "min": float(finite.min()) if finite.size else None,
            "max": float(finite.max()) if finite.size else None,
            "total": float(var_gen.sum() / var_real.sum()) if var_real.sum() > 0 else None,
        },
        "specificity": {
            "metric": unit,
            "generated_to_nearest_real": _summary(spec),
            "real_to_nearest_other_real": _summary(real_spec),
            "ratio_of_means": float(spec.mean() / real_spec.mean()) if real_spec.mean() > 0 else None,
        },
        "nearest_real_counts": np.bincount(nearest, minlength=real.shape[0]).astype(int).tolist(),
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        png = out / REPORT_PNG
        _plot(real, gen, png)
        report["files"] = {"json": str(out / REPORT_JSON), "png": str(png)}
        atomic_write_json(out / REPORT_JSON, report)
    return report
