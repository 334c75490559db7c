"""Model-based data augmentation (paper section 3.1).

* ``samplers``: generative models of PCA-score space (KDE as in the paper, Gaussian, GMM) that
  return new scores and, for each, the real subject whose image is warped to make it.
* ``report``: augmentation quality report (per-mode variance ratio, specificity, PCA scatter PNG).
* ``tps``: thin-plate-spline image warps (torch); ``dataset``: offline and online augmented sets.

Importing this package needs only numpy/scipy; ``tps`` and ``dataset`` (torch) are imported from
their own modules.
"""

from DeepSSMLogic.augment.report import quality_report
from DeepSSMLogic.augment.samplers import (
    SAMPLERS,
    GaussianSampler,
    GMMSampler,
    KDESampler,
    SampleBatch,
    Sampler,
    make_sampler,
)

__all__ = [
    "SAMPLERS",
    "GMMSampler",
    "GaussianSampler",
    "KDESampler",
    "SampleBatch",
    "Sampler",
    "make_sampler",
    "quality_report",
]
