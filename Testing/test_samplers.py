"""Score-space samplers (KDE, Gaussian, GMM) and the augmentation quality report."""

from __future__ import annotations

import json

import numpy as np
import pytest

from DeepSSMLogic.augment.report import REPORT_JSON, REPORT_PNG, quality_report
from DeepSSMLogic.augment.samplers import (
    GaussianSampler,
    GMMSampler,
    KDESampler,
    SampleBatch,
    make_sampler,
    nearest_neighbour_distances,
)
from DeepSSMLogic.errors import InputError
from DeepSSMLogic.shape_model import ShapeModel


def _pca_scores(n: int = 30, k: int = 6, seed: int = 0) -> np.ndarray:
    """(n, k) centred, uncorrelated scores with a decaying spectrum (like a real PCA's)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, k)) * (10.0 * 0.6 ** np.arange(k))
    z -= z.mean(axis=0)
    u, s, _ = np.linalg.svd(z, full_matrices=False)
    return u * s


def test_nearest_neighbour_bandwidth_is_mean_nn_distance():
    z = np.array([[0.0], [1.0], [3.0]])  # NN distances 1, 1, 2
    np.testing.assert_allclose(nearest_neighbour_distances(z), [1.0, 1.0, 2.0])
    kde = KDESampler(kernel="isotropic").fit(z[:, :1])
    assert kde.sigma == pytest.approx(4.0 / 3.0)


def test_kde_isotropic_variance_is_real_variance_plus_sigma_squared():
    z = _pca_scores()
    kde = KDESampler(kernel="isotropic").fit(z)
    batch = kde.sample(100_000, np.random.default_rng(1))
    expected = z.var(axis=0) + kde.sigma**2  # uniform pick: population variance of the reals
    np.testing.assert_allclose(batch.scores.var(axis=0), expected, rtol=0.03)
    np.testing.assert_allclose(kde.noise_std, kde.sigma)


def test_kde_scaled_variance_grows_each_mode_by_the_same_factor():
    z = _pca_scores()
    kde = KDESampler(kernel="scaled").fit(z)
    v = z.var(axis=0, ddof=1)
    h2 = kde.sigma**2 / v.sum()
    np.testing.assert_allclose(kde.noise_std**2, h2 * v, rtol=1e-12)
    # Same expected squared displacement as the isotropic kernel, spread in proportion to variance.
    assert (kde.noise_std**2).sum() == pytest.approx(kde.sigma**2)
    batch = kde.sample(100_000, np.random.default_rng(2))
    np.testing.assert_allclose(batch.scores.var(axis=0), z.var(axis=0) + h2 * v, rtol=0.03)
    ratio = batch.scores.var(axis=0) / v
    assert ratio.max() / ratio.min() < 1.08


def test_kde_source_is_the_picked_subject():
    z = _pca_scores()
    batch = KDESampler(bandwidth_scale=1e-6).fit(z).sample(500, np.random.default_rng(3))
    assert batch.source.dtype == np.int64 and batch.source.shape == (500,)
    np.testing.assert_allclose(batch.scores, z[batch.source], atol=1e-4)
    assert set(batch.source.tolist()) == set(range(z.shape[0]))  # uniform pick reaches everyone


def test_gaussian_sampler_reproduces_mean_and_covariance():
    rng = np.random.default_rng(4)
    a = rng.normal(size=(3, 3))
    cov = a @ a.T + np.eye(3)
    z = rng.multivariate_normal([1.0, -2.0, 0.5], cov, size=400)
    g = GaussianSampler().fit(z)
    np.testing.assert_allclose(g.cov, np.cov(z, rowvar=False))
    batch = g.sample(50_000, np.random.default_rng(5))
    np.testing.assert_allclose(batch.scores.mean(axis=0), z.mean(axis=0), atol=0.03)
    np.testing.assert_allclose(np.cov(batch.scores, rowvar=False), g.cov, atol=0.05 * np.abs(cov).max())


def test_gmm_recovers_two_separated_clusters_and_bic_picks_two():
    rng = np.random.default_rng(6)
    a = rng.normal(size=(60, 2)) * [1.0, 0.5] + [-10.0, 0.0]
    b = rng.normal(size=(140, 2)) * [0.5, 1.0] + [10.0, 5.0]
    z = np.concatenate([a, b])
    gmm = GMMSampler(max_components=4, seed=0).fit(z)
    assert gmm.k == 2
    assert min(gmm.bic, key=gmm.bic.get) == 2 and gmm.bic[2] < gmm.bic[1] and gmm.bic[2] < gmm.bic[3]
    order = np.argsort(gmm.means[:, 0])
    np.testing.assert_allclose(gmm.weights[order], [0.3, 0.7], atol=0.01)
    np.testing.assert_allclose(gmm.means[order], [a.mean(axis=0), b.mean(axis=0)], atol=0.05)
    batch = gmm.sample(20_000, np.random.default_rng(7))
    # Components are drawn by weight for every sample (the reference's `[-1]` drew only one).
    assert (batch.scores[:, 0] < 0).mean() == pytest.approx(0.3, abs=0.015)
    left = batch.scores[batch.scores[:, 0] < 0]
    np.testing.assert_allclose(left.std(axis=0), a.std(axis=0), rtol=0.1)
    # Sources come from the matching cluster.
    assert np.all((batch.source < 60) == (batch.scores[:, 0] < 0))


def test_gmm_on_all_modes_falls_back_to_one_component():
    z = _pca_scores(n=20, k=19)
    gmm = GMMSampler(seed=1).fit(z)
    assert gmm.k == 1 and list(gmm.bic) == [1]
    json.dumps(gmm.describe())


def _brute_force_source(sampler, train: np.ndarray, gen: np.ndarray) -> np.ndarray:
    cov = np.cov(train, rowvar=False) + sampler._metric_eps * np.eye(train.shape[1])
    inv = np.linalg.inv(cov)
    d = gen[:, None, :] - train[None, :, :]
    return np.argmin(np.einsum("nrk,kl,nrl->nr", d, inv, d), axis=1)


@pytest.mark.parametrize("name", ["gaussian", "gmm"])
def test_nearest_source_is_mahalanobis_nearest(name):
    z = _pca_scores(n=40, k=4, seed=8)
    sampler = make_sampler(name).fit(z)
    batch = sampler.sample(300, np.random.default_rng(9))
    np.testing.assert_array_equal(batch.source, _brute_force_source(sampler, z, batch.scores))


def test_nearest_source_uses_mahalanobis_not_euclidean():
    rng = np.random.default_rng(10)
    z = rng.normal(size=(200, 2)) * [10.0, 0.1]
    z[0] = [0.0, 0.3]  # 0.3 mm away, but 3 stds in the narrow direction
    z[1] = [2.0, 0.0]  # 2 mm away, 0.2 stds in the wide direction
    z[2:, 0] = np.where(np.abs(z[2:, 0]) < 5.0, 5.0 + np.abs(z[2:, 0]), z[2:, 0])
    sampler = GaussianSampler().fit(z)
    assert sampler.nearest_source(np.zeros((1, 2)))[0] == 1
    assert np.argmin(np.linalg.norm(z, axis=1)) == 0


@pytest.mark.parametrize(
    "name, kw",
    [("kde", {}), ("kde", {"kernel": "isotropic"}), ("gaussian", {}), ("gmm", {"max_components": 3})],
)
def test_same_seed_gives_identical_samples(name, kw):
    z = _pca_scores(n=40, k=5)
    a = make_sampler(name, **kw).fit(z).sample(200, np.random.default_rng(42))
    b = make_sampler(name, **kw).fit(z).sample(200, np.random.default_rng(42))
    c = make_sampler(name, **kw).fit(z).sample(200, np.random.default_rng(43))
    assert isinstance(a, SampleBatch) and a.scores.shape == (200, 5) and len(a) == 200
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.source, b.source)
    assert not np.array_equal(a.scores, c.scores)
    json.dumps(make_sampler(name, **kw).fit(z).describe())


def test_samplers_reject_bad_input():
    z = _pca_scores()
    bad = z.copy()
    bad[3, 2] = np.nan
    for name in ("kde", "gaussian", "gmm"):
        with pytest.raises(InputError, match="NaN"):
            make_sampler(name).fit(bad)
        with pytest.raises(InputError, match="at most N-1"):
            make_sampler(name).fit(np.random.default_rng(0).normal(size=(5, 5)))
        with pytest.raises(InputError, match="2-D"):
            make_sampler(name).fit(z[:, 0])
        with pytest.raises(InputError, match="fit"):
            make_sampler(name).sample(3, np.random.default_rng(0))
    kde = KDESampler().fit(z)
    with pytest.raises(InputError, match="Generator"):
        kde.sample(3, 42)
    with pytest.raises(InputError, match="non-negative"):
        kde.sample(-1, np.random.default_rng(0))
    assert kde.sample(0, np.random.default_rng(0)).scores.shape == (0, z.shape[1])
    with pytest.raises(InputError, match="expected one of"):
        make_sampler("vae")
    with pytest.raises(InputError, match="kernel"):
        make_sampler("kde", kernel="box")
    with pytest.raises(InputError, match="invalid option"):
        make_sampler("gaussian", bandwidth=3)
    with pytest.raises(InputError, match=r"shape \(n, 6\)"):
        GaussianSampler().fit(z).nearest_source(z[:, :3])


# ---- quality report ------------------------------------------------------------------------------


@pytest.mark.slow  # matplotlib import and render: ~1-2 s
def test_quality_report_writes_png_and_json(tmp_path):
    z = _pca_scores(n=30, k=6)
    batch = KDESampler().fit(z).sample(500, np.random.default_rng(11))
    report = quality_report(z, batch.scores, out_dir=tmp_path / "qa")
    png = tmp_path / "qa" / REPORT_PNG
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    on_disk = json.loads((tmp_path / "qa" / REPORT_JSON).read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert len(report["variance_ratio"]) == 6
    np.testing.assert_allclose(
        report["variance_ratio"], batch.scores.var(axis=0, ddof=1) / z.var(axis=0, ddof=1)
    )
    assert report["specificity"]["metric"] == "score_distance_mm"
    assert sum(report["nearest_real_counts"]) == 500
    assert not list((tmp_path / "qa").glob(".*tmp"))  # nothing half-written left behind


def test_quality_report_identity_and_specificity_in_mm_with_shape_model():
    rng = np.random.default_rng(12)
    x = rng.normal(size=(10, 25, 3)) * 5.0
    model = ShapeModel.fit(x)
    z = model.project(x)
    same = quality_report(z, z, shape_model=model)
    np.testing.assert_allclose(same["variance_ratio"], 1.0)
    assert same["specificity"]["generated_to_nearest_real"]["max"] == pytest.approx(0.0, abs=1e-9)
    # Moving a training shape by 0.1 mm along every particle's x gives an RMS distance of 0.1 mm.
    shifted = x[:3].copy()
    shifted[..., 0] += 0.1
    gen = model.project(shifted)
    report = quality_report(z, gen, shape_model=model)
    assert report["specificity"]["metric"] == "rms_per_point_mm"
    expected = np.sqrt(((model.reconstruct(gen) - x[:3]) ** 2).sum(-1).mean(-1))
    np.testing.assert_allclose(report["specificity"]["generated_to_nearest_real"]["max"], expected.max())
    assert report["specificity"]["generated_to_nearest_real"]["max"] <= 0.1 + 1e-9


def test_quality_report_rejects_mismatched_and_nan_scores():
    z = _pca_scores()
    with pytest.raises(InputError, match="expected 6 modes"):
        quality_report(z, z[:, :4])
    bad = z.copy()
    bad[0, 0] = np.inf
    with pytest.raises(InputError, match="generated_scores: contains NaN"):
        quality_report(z, bad)
    with pytest.raises(InputError, match="real_scores"):
        quality_report(z[:1], z)
