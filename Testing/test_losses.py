"""Losses against hand-computed numbers (paper eq. 2, 3, 7–11) and the focal threshold heuristic."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from DeepSSMLogic.errors import InputError
from DeepSSMLogic.losses import (
    FOCAL_A_LATENT,
    FOCAL_A_PARTICLES,
    correspondence_l2,
    focal_loss,
    focal_threshold,
    focal_weight,
    per_sample_rmse,
    score_l2,
)

# two samples × two points; per-point distances 5 (3-4-0), 0, 1, 2
PRED = torch.tensor([[[3.0, 4.0, 0.0], [1.0, 1.0, 1.0]], [[0.0, 0.0, 1.0], [2.0, 0.0, 0.0]]])
TARGET = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]], [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])
DIST = np.array([5.0, 0.0, 1.0, 2.0])


def test_correspondence_l2_is_mean_squared_point_distance():
    assert correspondence_l2(PRED, TARGET).item() == pytest.approx((25 + 0 + 1 + 4) / 4)


def test_score_l2_is_mean_squared_score_norm():
    pred = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    target = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    assert score_l2(pred, target).item() == pytest.approx((5 + 25) / 2)


def test_focal_loss_matches_equation_7_by_hand():
    a, c = 10.0, 1.5
    expected = np.mean([d**2 / (1 + math.exp(a * (c - d))) for d in DIST])
    assert focal_loss(PRED, TARGET, a, c).item() == pytest.approx(expected, rel=1e-6)


def test_focal_is_a_weighted_l2():
    a, c = 10.0, 1.5
    w = focal_weight(torch.tensor(DIST), a, c).numpy()
    np.testing.assert_allclose(w, 1 / (1 + np.exp(a * (c - DIST))), rtol=1e-12)
    assert focal_weight(torch.tensor(c), a, c).item() == pytest.approx(0.5)
    # far below the threshold the weight vanishes, far above it the focal loss is plain L2
    assert focal_loss(PRED, TARGET, a, -100.0).item() == pytest.approx(correspondence_l2(PRED, TARGET).item())
    small = TARGET + 0.1
    assert focal_loss(small, TARGET, a, 2.0).item() < 1e-6 * correspondence_l2(small, TARGET).item()


def test_focal_on_latent_vectors_uses_the_vector_norm():
    z = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    zt = torch.zeros(2, 2)
    a, c = FOCAL_A_LATENT, 2.0
    expected = (25 / (1 + math.exp(a * (c - 5))) + 1 / (1 + math.exp(a * (c - 1)))) / 2
    assert focal_loss(z, zt, a, c).item() == pytest.approx(expected, rel=1e-6)


def test_paper_constants_not_the_swapped_reference_ones():
    assert FOCAL_A_PARTICLES == 10.0 and FOCAL_A_LATENT == 1.0


def test_focal_threshold_is_the_90th_percentile_of_point_distances_to_the_mean():
    rng = np.random.default_rng(0)
    p = rng.normal(size=(7, 30, 3))
    d = np.linalg.norm(p - p.mean(axis=0), axis=-1)  # (7, 30)
    assert focal_threshold(p) == pytest.approx(float(np.percentile(d, 90)))
    assert focal_threshold(torch.as_tensor(p)) == pytest.approx(float(np.percentile(d, 90)))
    # hand case: points sit at distance 0 or 2 from the mean; 20% are at 2 -> 90th percentile is 2
    hand = np.zeros((2, 10, 3))
    hand[0, :2, 0], hand[1, :2, 0] = 2.0, -2.0
    assert focal_threshold(hand) == pytest.approx(2.0)
    codes = rng.normal(size=(12, 4))
    assert focal_threshold(codes) == pytest.approx(
        float(np.percentile(np.linalg.norm(codes - codes.mean(0), axis=1), 90))
    )


def test_bad_inputs_are_refused():
    with pytest.raises(InputError, match="shape"):
        correspondence_l2(PRED, TARGET[:, :1])
    with pytest.raises(InputError, match="a must be > 0"):
        focal_loss(PRED, TARGET, 0.0, 1.0)
    with pytest.raises(InputError, match="2 samples"):
        focal_threshold(np.zeros((1, 5, 3)))
    with pytest.raises(InputError, match="equals the mean"):
        focal_threshold(np.ones((3, 5, 3)))


def test_per_sample_rmse_in_mm():
    r = per_sample_rmse(PRED, TARGET).numpy()
    np.testing.assert_allclose(r, [math.sqrt((25 + 0) / 2), math.sqrt((1 + 4) / 2)], rtol=1e-6)


def test_focal_gradient_flows():
    pred = PRED.clone().requires_grad_(True)
    focal_loss(pred, TARGET, 10.0, 1.5).backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0
