"""Training-time calibration of a trained network's uncertainty and OOD score (issue 13).

Runs the trained network (single, MC dropout or ensemble) once over the validation split, fits the
uncertainty scale (``uncertainty.UncertaintySpec.scale``) and the OOD calibration
(``ood.OODCalibration``) from it. torch/numpy only; called by ``pipeline.train_model``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import ood
from .rank_correlation import spearman
from .uncertainty import UncertaintySpec, predict_with_uncertainty


@dataclass
class CalibrationResult:
    spec: UncertaintySpec  # with the fitted scale
    ood: ood.OODCalibration | None  # None when the validation split has fewer than 2 samples
    summary: dict[str, Any]


@torch.no_grad()
def run_network(
    network: torch.nn.Module, spec: UncertaintySpec, xs: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(descriptors, particles (B, M, 3), uncertainty (B, M) | None)`` for normalised ``xs``
    ``(B, 1, Z, Y, X)`` on the CPU (uncertainty unscaled by ``spec.scale`` when it is 1)."""
    x = torch.from_numpy(np.ascontiguousarray(xs, dtype=np.float32))
    network.eval()
    if spec.enabled:
        d, p, u = predict_with_uncertainty(network, x, spec)
        return d.double().numpy(), p.double().numpy(), u.double().numpy()
    d, p = network(x)
    return d.double().numpy(), p.double().numpy(), None


def calibrate_model(
    network: torch.nn.Module,
    spec: UncertaintySpec,
    val_set: Any,
    *,
    normalizer: Any,
    reference: np.ndarray,
    shape_model: Any,
    train_images: np.ndarray,
    batch_size: int = 8,
) -> CalibrationResult:
    """Fit the uncertainty scale and the OOD calibration on ``val_set`` (items ``(raw image
    (1, Z, Y, X), particles (M, 3))``). ``reference``: the raw reference image ``(Z, Y, X)``;
    ``shape_model``: the bundle's PCA; ``train_images``: the raw real training images ``(N, Z, Y, X)``."""
    network = network.to("cpu").eval()
    unscaled = UncertaintySpec(**{**spec.__dict__, "scale": 1.0})
    train_features = [ood.image_statistics(img, normalizer) for img in train_images]
    intensity = ood.IntensityReference.fit(train_features)
    n_modes = ood.mahalanobis_modes(shape_model)
    ref_x = normalizer(np.asarray(reference, dtype=np.float32))
    image_rows, truths, preds, uncs = [], [], [], []
    n = len(val_set)
    for start in range(0, n, batch_size):
        items = [val_set[i] for i in range(start, min(n, start + batch_size))]
        raw = np.stack([np.asarray(it[0], dtype=np.float32).reshape(ref_x.shape) for it in items])
        xs = np.stack([normalizer(r) for r in raw])[:, None]
        _, parts, unc = run_network(network, unscaled, xs)
        image_rows += [ood.image_components(r, x[0], ref_x, normalizer, intensity) for r, x in zip(raw, xs)]
        truths += [np.asarray(it[1], dtype=np.float64) for it in items]
        preds += list(parts)
        uncs += list(unc) if unc is not None else [None] * len(items)
    triples = list(zip(truths, preds, uncs, strict=True))
    scale = ood.fit_uncertainty_scale(triples) if spec.enabled else 1.0
    fitted = UncertaintySpec(**{**spec.__dict__, "scale": float(scale)})
    rows = [
        row | ood.prediction_components(p, None if u is None else u * scale, shape_model, n_modes)
        for row, p, u in zip(image_rows, preds, uncs, strict=True)
    ]
    # fewer than 2 validation predictions (a tiny cohort without augmentation): no OOD calibration
    references = {"intensity": ood.IntensityReference.leave_one_out(train_features)}
    cal = ood.calibrate(rows, intensity, n_modes, references=references) if len(rows) >= 2 else None
    rmse = [float(np.sqrt(((p - t) ** 2).sum(-1).mean())) for t, p, _ in triples]
    summary: dict[str, Any] = {"n_validation": n, "val_rmse_mm": float(np.mean(rmse))}
    if spec.enabled:
        mean_u = [float(np.mean(u)) * scale for u in uncs]
        summary |= {
            "uncertainty_scale": float(scale),
            "val_mean_uncertainty_mm": float(np.mean(mean_u)),
            "val_spearman_subject": spearman(mean_u, rmse)["rho"],
        }
    return CalibrationResult(fitted, cal, summary)
