"""Evaluation and downstream analysis (paper section 4).

- :mod:`.metrics`: RMSE (eq. 12), per-point RMSE, AUC, ROC, correlations.
- :mod:`.severity`: PPCA severity (eq. 13-15) and its normal-projected heatmap.
- :mod:`.groups`: group mean differences; point-wise and global Hotelling T² and the norm of the mean
  difference, with permutation tests and FDR.
- :mod:`.stats`: confidence intervals, paired tests, effect sizes and claim verdicts (model comparisons).
- :mod:`.swim`: latent swim between two group means.
- :mod:`.classifier`: descriptor trimming + classifier (Table 3 protocol).
- :mod:`.render`, :mod:`.report`: offscreen VTK renders, matplotlib plots, the HTML report.

Surface distances and meshes from particles live in :mod:`DeepSSMLogic.mesh`.
"""

from .metrics import auc, correlation, per_point_rmse, per_point_rmse_stats, rmse, rmse_per_axis, roc_curve

__all__ = [
    "auc",
    "correlation",
    "per_point_rmse",
    "per_point_rmse_stats",
    "rmse",
    "rmse_per_axis",
    "roc_curve",
]
