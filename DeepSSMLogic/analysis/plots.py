"""matplotlib (Agg) figures for the reports: training curves, box plots, ROC, scatter. PNGs are
written atomically; every function returns the path it wrote."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..fileutil import atomic_path

PathLike = str | os.PathLike[str]


def _figure(width: float = 6.0, height: float = 4.0) -> tuple[Any, Any]:
    # an Agg canvas on a bare Figure: no pyplot global state, no GUI backend (safe inside Slicer's Qt)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _save(fig: Any, out: PathLike) -> Path:
    target = Path(out)
    fig.tight_layout()
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png")
    return target


_NOT_CURVES = {"epoch", "epochs", "lr", "seconds", "time_s", "step", "best", "phase_index", "peak_rss_mb"}


def training_curves(history: Sequence[Mapping[str, Any]], out: PathLike) -> Path:
    """Every numeric per-epoch series (``train_loss``, ``val_loss``, ``val_rmse_mm``...) against the
    cumulative epoch, with the training stages (TL: autoencoder, T-flank, joint) marked; log axis
    when every value is positive."""
    if not history:
        raise InputError("training_curves: the training history is empty")
    keys = sorted(
        {
            k
            for row in history
            for k, v in row.items()
            if k not in _NOT_CURVES and isinstance(v, int | float) and not isinstance(v, bool)
        }
    )
    x = np.arange(1, len(history) + 1)
    fig, ax = _figure()
    series = []
    for k in keys:
        ys = np.array([row.get(k, np.nan) for row in history], dtype=np.float64)
        ys[~np.isfinite(ys)] = np.nan
        if np.isfinite(ys).sum() == 0:
            continue
        ax.plot(x, ys, marker=".", label=k)
        series.append(ys)
    if not series:
        raise InputError(f"training_curves: no numeric per-epoch values in the history (keys: {keys})")
    if all(np.nanmin(y) > 0 for y in series):
        ax.set_yscale("log")
    stages = [str(row.get("stage", "")) for row in history]
    for i in range(1, len(stages)):
        if stages[i] != stages[i - 1]:
            ax.axvline(i + 0.5, color="grey", ls=":", lw=1)
    if len(set(stages)) > 1:
        ax.set_title("Training history (stages: " + " → ".join(dict.fromkeys(stages)) + ")", fontsize=10)
    else:
        ax.set_title("Training history")
    ax.set_xlabel("epoch (cumulative)")
    ax.set_ylabel("value")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out)


def box_plot(
    groups: Mapping[str, Sequence[float]], out: PathLike, ylabel: str = "mm", title: str = ""
) -> Path:
    """One box per named sample (median line; mean marked) — the paper's Fig. 6."""
    names = [k for k, v in groups.items() if len(v)]
    if not names:
        raise InputError("box_plot: no values to plot")
    fig, ax = _figure(max(4.0, 1.3 * len(names) + 2), 4.0)
    data = [np.asarray(groups[k], dtype=np.float64) for k in names]
    ax.boxplot(data, showmeans=True, meanline=True)
    ax.set_xticks(range(1, len(names) + 1), names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, out)


def roc_plot(fpr: np.ndarray, tpr: np.ndarray, auc_value: float, out: PathLike, title: str = "ROC") -> Path:
    fig, ax = _figure(4.5, 4.5)
    ax.plot(fpr, tpr, lw=2, label=f"AUC = {auc_value:.3f}")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower right")
    ax.set_title(title)
    return _save(fig, out)


def scatter_plot(
    x: np.ndarray,
    y: np.ndarray,
    out: PathLike,
    xlabel: str,
    ylabel: str,
    title: str = "",
    groups: Sequence[str] | None = None,
) -> Path:
    fig, ax = _figure(5.0, 4.5)
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if groups is None:
        ax.scatter(x, y, s=18)
    else:
        g = np.asarray(groups)
        for name in sorted(set(g.tolist())):
            sel = g == name
            ax.scatter(x[sel], y[sel], s=18, label=str(name))
        ax.legend(fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return _save(fig, out)


def bar_plot(
    values: Mapping[str, float], out: PathLike, ylabel: str, title: str = "", reference: float | None = None
) -> Path:
    fig, ax = _figure(max(4.0, 1.3 * len(values) + 2), 4.0)
    names = list(values)
    ax.bar(range(len(names)), [values[k] for k in names], color="tab:blue")
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
    if reference is not None:
        ax.axhline(reference, ls="--", color="grey", label="chance")
        ax.legend(fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return _save(fig, out)


def reliability_plot(
    bins: Sequence[Mapping[str, Any]], out: PathLike, title: str = "Uncertainty calibration"
) -> Path:
    """Mean actual error per bin of predicted uncertainty against the bin's mean predicted
    uncertainty (``calibration.reliability_bins``), with the identity line: points on it are
    calibrated, above it over-confident, below it under-confident. Marker labels: particles per bin."""
    if not bins:
        raise InputError("reliability_plot: no bins to plot")
    x = np.array([b["mean_predicted_mm"] for b in bins], dtype=np.float64)
    y = np.array([b["mean_actual_mm"] for b in bins], dtype=np.float64)
    fig, ax = _figure(5.0, 4.5)
    top = float(max(x.max(), y.max(), 1e-6)) * 1.08
    ax.plot([0.0, top], [0.0, top], ls="--", color="grey", lw=1, label="identity (calibrated)")
    ax.plot(x, y, marker="o", color="tab:red", label="mean actual error per bin")
    for xi, yi, b in zip(x, y, bins, strict=True):
        ax.annotate(str(b["count"]), (xi, yi), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set_xlim(0.0, top)
    ax.set_ylim(0.0, top)
    ax.set_xlabel("predicted uncertainty (mm, bin mean)")
    ax.set_ylabel("actual error (mm, bin mean)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return _save(fig, out)
