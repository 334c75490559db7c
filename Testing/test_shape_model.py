"""PCA shape model and PPCA: exactness, mode selection, serialisation, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from DeepSSMLogic.errors import InputError
from DeepSSMLogic.shape_model import PPCA, ShapeModel


def _cohort(n: int = 12, m: int = 30, seed: int = 0, n_true_modes: int = 5) -> np.ndarray:
    """(n, m, 3) mm: a mean shape plus a few smooth-ish modes with decaying variance, plus noise."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(m, 3)) * 30.0
    modes = rng.normal(size=(n_true_modes, m * 3))
    stds = 8.0 * 0.5 ** np.arange(n_true_modes)
    coeff = rng.normal(size=(n, n_true_modes)) * stds
    x = base.reshape(-1) + coeff @ modes + rng.normal(size=(n, m * 3)) * 0.05
    return x.reshape(n, m, 3)


def test_reconstruct_project_is_exact_for_training_shapes_with_all_modes():
    x = _cohort()
    model = ShapeModel.fit(x)
    assert model.n_modes == x.shape[0] - 1
    scores = model.project(x)
    assert scores.shape == (x.shape[0], model.n_modes)
    np.testing.assert_allclose(model.reconstruct(scores), x, atol=1e-9)


def test_eigenvalues_equal_numpy_covariance_eigenvalues():
    x = _cohort(n=10, m=8)
    model = ShapeModel.fit(x)
    cov = np.cov(x.reshape(x.shape[0], -1), rowvar=False)  # 1/(N-1), like the model
    expected = np.sort(np.linalg.eigvalsh(cov))[::-1][: model.n_modes]
    np.testing.assert_allclose(model.eigenvalues, expected, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(model.components @ model.components.T, np.eye(model.n_modes), atol=1e-10)
    scores = model.project(x)
    np.testing.assert_allclose(np.cov(scores, rowvar=False), np.diag(model.eigenvalues), atol=1e-8)


def test_project_and_reconstruct_keep_leading_dimensions():
    x = _cohort()
    model = ShapeModel.fit(x)
    assert model.project(x[0]).shape == (model.n_modes,)
    assert model.project(np.stack([x, x]), n_modes=3).shape == (2, x.shape[0], 3)
    assert model.reconstruct(np.zeros(2)).shape == (x.shape[1], 3)
    np.testing.assert_allclose(model.reconstruct(np.zeros(2)), x.mean(axis=0), atol=1e-12)


def test_components_do_not_depend_on_subject_order():
    x = _cohort()
    a = ShapeModel.fit(x)
    b = ShapeModel.fit(x[np.random.default_rng(3).permutation(x.shape[0])])
    # Well-separated leading modes: the sign convention makes them identical, not just up to sign.
    np.testing.assert_allclose(a.components[:3], b.components[:3], atol=1e-8)


def _diag_model(eigs: list[float]) -> ShapeModel:
    k = len(eigs)
    comps = np.zeros((k, 3 * (k + 1)))
    comps[np.arange(k), np.arange(k)] = 1.0
    return ShapeModel(np.zeros((k + 1, 3)), comps, np.array(eigs))


def test_n_modes_for_variance_is_smallest_k_reaching_fraction():
    model = _diag_model([6.0, 3.0, 1.0])  # cumulative ratios 0.6, 0.9, 1.0
    assert model.n_modes_for_variance(0.5) == 1
    assert model.n_modes_for_variance(0.6) == 1
    assert model.n_modes_for_variance(0.61) == 2
    assert model.n_modes_for_variance(0.9) == 2
    assert model.n_modes_for_variance(0.95) == 3
    assert model.n_modes_for_variance(1.0) == 3
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(InputError, match="variance fraction"):
            model.n_modes_for_variance(bad)


def test_truncated_keeps_leading_modes():
    x = _cohort()
    model = ShapeModel.fit(x)
    k = model.n_modes_for_variance(0.95)
    t = model.truncated(k)
    assert t.n_modes == k
    np.testing.assert_array_equal(t.components, model.components[:k])
    np.testing.assert_array_equal(t.eigenvalues, model.eigenvalues[:k])
    np.testing.assert_allclose(t.project(x), model.project(x)[:, :k])
    with pytest.raises(InputError, match="n_modes"):
        model.truncated(model.n_modes + 1)


def test_whitening_statistics_are_the_training_scores():
    x = _cohort()
    model = ShapeModel.fit(x)
    scores = model.project(x)
    np.testing.assert_allclose(model.score_mean, scores.mean(axis=0), atol=1e-12)
    np.testing.assert_allclose(model.score_std, np.sqrt(model.eigenvalues), rtol=1e-9)
    w = model.whiten(scores)
    np.testing.assert_allclose(w.std(axis=0, ddof=1), 1.0, rtol=1e-9)
    np.testing.assert_allclose(model.unwhiten(w), scores, atol=1e-10)
    other = model.with_whitening(scores * 2.0 + 1.0)
    np.testing.assert_allclose(other.score_mean, 1.0 + 2.0 * scores.mean(axis=0), atol=1e-10)
    np.testing.assert_allclose(other.score_std, 2.0 * model.score_std, rtol=1e-9)


def test_serialisation_round_trip_through_npz_and_json(tmp_path):
    x = _cohort()
    model = ShapeModel.fit(x).with_whitening(ShapeModel.fit(x).project(x) * 1.5)
    np.savez(tmp_path / "pca.npz", **model.to_arrays())
    (tmp_path / "pca.json").write_text(json.dumps(model.meta))
    with np.load(tmp_path / "pca.npz", allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    back = ShapeModel.from_arrays(arrays, json.loads((tmp_path / "pca.json").read_text()))
    for key, value in model.to_arrays().items():
        np.testing.assert_array_equal(back.to_arrays()[key], value)
    assert back.n_subjects == x.shape[0]
    np.testing.assert_allclose(back.project(x), model.project(x))


def test_from_arrays_rejects_inconsistent_arrays():
    model = ShapeModel.fit(_cohort())
    arrays = model.to_arrays()
    with pytest.raises(InputError, match="components"):
        ShapeModel.from_arrays({**arrays, "components": arrays["components"][:, :-3]})
    with pytest.raises(InputError, match="eigenvalues"):
        ShapeModel.from_arrays({**arrays, "eigenvalues": arrays["eigenvalues"][:-1]})
    with pytest.raises(InputError, match="orthonormal"):
        ShapeModel.from_arrays({**arrays, "components": arrays["components"] * 2.0})
    with pytest.raises(InputError, match="missing"):
        ShapeModel.from_arrays({"mean": arrays["mean"]})
    with pytest.raises(InputError, match="n_particles"):
        ShapeModel.from_arrays(arrays, {**model.meta, "n_particles": 7})
    with pytest.raises(InputError, match="NaN"):
        ShapeModel.from_arrays({**arrays, "score_std": np.full_like(arrays["score_std"], np.nan)})


def test_fit_and_project_reject_bad_input():
    x = _cohort()
    bad = x.copy()
    bad[2, 5, 1] = np.nan
    with pytest.raises(InputError, match="NaN"):
        ShapeModel.fit(bad)
    with pytest.raises(InputError, match="at least 2"):
        ShapeModel.fit(x[:1])
    with pytest.raises(InputError, match=r"\(\.\.\., M, 3\)"):
        ShapeModel.fit(x[..., :2])
    with pytest.raises(InputError, match="identical"):
        ShapeModel.fit(np.repeat(x[:1], 4, axis=0))
    model = ShapeModel.fit(x)
    with pytest.raises(InputError, match=f"expected {x.shape[1]} particles"):
        model.project(x[:, :-1])
    with pytest.raises(InputError, match="scores"):
        model.reconstruct(np.zeros(model.n_modes + 1))


# ---- PPCA ----------------------------------------------------------------------------------------


def _dense_ppca(x: np.ndarray, fraction: float):
    """Brute force of paper eq. 13-14: the D x D covariance, eigh, S, S^-1/2."""
    n = x.shape[0]
    flat = x.reshape(n, -1)
    d = flat.shape[1]
    dev = flat - flat.mean(axis=0)
    lam, u = np.linalg.eigh(dev.T @ dev / n)  # eq. 13, 1/N
    lam, u = lam[::-1], u[:, ::-1]
    lam = np.maximum(lam, 0.0)
    l = int(np.argmax(np.cumsum(lam) / lam.sum() >= fraction - 1e-12)) + 1
    l = min(l, n - 2)  # the model keeps at least one non-zero mode out
    sigma2 = lam[l:].sum() / (d - l)
    s = u[:, :l] @ np.diag(lam[:l]) @ u[:, :l].T + sigma2 * np.eye(d)  # eq. 14
    ws, us = np.linalg.eigh(s)
    s_inv_half = us @ np.diag(ws**-0.5) @ us.T
    return l, sigma2, s, s_inv_half, flat.mean(axis=0)


def test_ppca_matches_dense_computation_on_tiny_example():
    x = _cohort(n=9, m=6, seed=4)
    test = _cohort(n=5, m=6, seed=5)
    ppca = PPCA.fit(x, variance_fraction=0.9)
    l, sigma2, s, s_inv_half, mean = _dense_ppca(x, 0.9)
    assert ppca.n_modes == l
    assert ppca.sigma2 == pytest.approx(sigma2, rel=1e-9)
    dev = test.reshape(5, -1) - mean
    expected = np.sqrt(np.einsum("ni,ij,nj->n", dev, np.linalg.inv(s), dev))
    np.testing.assert_allclose(ppca.mahalanobis(test), expected, rtol=1e-8)
    # eq. 15: C̃ = (C - C̄)ᵀ U_S Λ_S^{-1/2} U_Sᵀ
    np.testing.assert_allclose(ppca.pointwise_deviation(test), (dev @ s_inv_half).reshape(5, 6, 3), atol=1e-9)
    np.testing.assert_allclose(
        np.linalg.norm(ppca.pointwise_deviation(test).reshape(5, -1), axis=1),
        ppca.mahalanobis(test),
        rtol=1e-9,
    )


def test_ppca_mean_shape_has_zero_distance_and_distance_grows_with_deviation():
    x = _cohort(n=15, m=20)
    ppca = PPCA.fit(x)
    assert ppca.mahalanobis(ppca.mean[None])[0] == pytest.approx(0.0, abs=1e-9)
    assert np.all(ppca.mahalanobis(x) > 0)
    direction = ppca.components[0].reshape(-1, 3)
    steps = np.array([0.0, 1.0, 2.0, 5.0, 10.0])
    d = ppca.mahalanobis(ppca.mean[None] + steps[:, None, None] * direction[None])
    assert np.all(np.diff(d) > 0)
    # Along a kept mode the distance is linear in the step with slope 1/sqrt(Λ_1 + σ²).
    np.testing.assert_allclose(d, steps / np.sqrt(ppca.eigenvalues[0] + ppca.sigma2), rtol=1e-9)


def test_ppca_sigma2_is_mean_of_discarded_eigenvalues_over_residual_dimensions():
    x = _cohort(n=10, m=7)
    ppca = PPCA.fit(x, variance_fraction=0.95)
    flat = x.reshape(10, -1)
    lam = np.sort(np.linalg.eigvalsh(np.cov(flat, rowvar=False, bias=True)))[::-1]
    assert ppca.sigma2 == pytest.approx(lam[ppca.n_modes :].clip(0).sum() / (flat.shape[1] - ppca.n_modes))
    np.testing.assert_allclose(ppca.eigenvalues, lam[: ppca.n_modes], rtol=1e-9)


def test_ppca_small_group_always_discards_one_mode():
    # 6 isotropic random shapes: 95 % of the variance needs all 5 modes, yet σ² must stay > 0.
    x = np.random.default_rng(0).normal(size=(6, 10, 3))
    ppca = PPCA.fit(x, variance_fraction=0.95)
    assert ppca.n_modes == 4 and ppca.sigma2 > 0
    assert np.all(np.isfinite(ppca.mahalanobis(x)))


def test_ppca_handles_a_large_shape_dimension_without_dense_matrices():
    # D = 60000: a dense D x D covariance would need ~29 GB; Woodbury needs only (N, D) arrays.
    x = _cohort(n=8, m=20000, seed=1)
    ppca = PPCA.fit(x)
    d = ppca.mahalanobis(x)
    assert d.shape == (8,) and np.all(np.isfinite(d))
    assert ppca.pointwise_deviation(x[:2]).shape == (2, 20000, 3)


def test_ppca_round_trip_and_errors():
    x = _cohort()
    ppca = PPCA.fit(x)
    back = PPCA.from_arrays(ppca.to_arrays(), json.loads(json.dumps(ppca.meta)))
    np.testing.assert_allclose(back.mahalanobis(x), ppca.mahalanobis(x))
    with pytest.raises(InputError, match="n_modes"):
        PPCA.from_arrays(ppca.to_arrays(), {**ppca.meta, "n_modes": 99})
    with pytest.raises(InputError, match="expected 30 particles"):
        ppca.mahalanobis(x[:, :10])
    bad = x.copy()
    bad[0, 0, 0] = np.inf
    with pytest.raises(InputError, match="NaN or Inf"):
        ppca.pointwise_deviation(bad)
    with pytest.raises(InputError, match="at least 2"):
        PPCA.fit(x[:1])
    with pytest.raises(InputError, match="at least 3"):
        PPCA.fit(x[:2])
    with pytest.raises(InputError, match="variance_fraction"):
        PPCA.fit(x, variance_fraction=1.0)
