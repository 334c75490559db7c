"""Intensity normalisation (DeepSSMLogic.preprocess.IntensityNormalizer) against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from DeepSSMLogic.errors import InputError
from DeepSSMLogic.preprocess import IntensityNormalizer


def test_clip_then_z_score_hand_computed():
    norm = IntensityNormalizer(clip_low=0.0, clip_high=100.0, mean=40.0, std=20.0)
    out = norm(np.array([[-10.0, 0.0, 50.0], [100.0, 150.0, 40.0]]))
    np.testing.assert_allclose(out, [[-2.0, -2.0, 0.5], [3.0, 3.0, 0.0]])
    assert out.dtype == np.float32


def test_fit_makes_the_clipped_training_voxels_zero_mean_unit_std():
    rng = np.random.default_rng(0)
    images = rng.normal(300.0, 50.0, (3, 8, 9, 10)).astype(np.float32)
    images[0, 0, 0, 0] = 1e6  # an outlier that the 99.5th percentile clips away
    norm = IntensityNormalizer.fit(images)
    lo, hi = np.percentile(images, [0.5, 99.5])
    assert norm.clip_low == pytest.approx(lo) and norm.clip_high == pytest.approx(hi)
    out = norm(images)
    assert float(out.mean()) == pytest.approx(0.0, abs=1e-4)
    assert float(out.std()) == pytest.approx(1.0, abs=1e-4)
    assert float(out.max()) == pytest.approx((hi - norm.mean) / norm.std, rel=1e-5)
    assert IntensityNormalizer.from_dict(norm.to_dict()) == norm


def test_fit_refuses_constant_or_non_finite_images():
    with pytest.raises(InputError, match="constant intensity"):
        IntensityNormalizer.fit(np.full((2, 4, 4, 4), 7.0))
    bad = np.zeros((2, 4, 4, 4))
    bad[1, 2, 2, 2] = np.nan
    with pytest.raises(InputError, match="NaN or Inf"):
        IntensityNormalizer.fit(bad)
