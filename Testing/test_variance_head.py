"""``--uncertainty variance`` (issue 13): the predicted-variance head on the frozen network — the
corruptions it is fitted on, the propagation of descriptor variances to per-particle mm, the fit,
the bundle schema and round trip, TL-DeepSSM, bad input, and (slow) train → bundle → predict."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_predict import (
    make_tiny_bundle,
    phantom_image,
    predict_mesh_uncertainty,
    save_calibrated_bundle,
    tiny_bundle_parts,
)

from DeepSSMLogic import io
from DeepSSMLogic.augment.corruption import corrupt_array, random_corruption
from DeepSSMLogic.bundle import load_bundle, read_bundle_meta
from DeepSSMLogic.bundle_schema import validate_meta
from DeepSSMLogic.cli import main
from DeepSSMLogic.errors import BundleError, InputError
from DeepSSMLogic.predict import Predictor
from DeepSSMLogic.preprocess import resample_to_grid
from DeepSSMLogic.uncertainty import NonFiniteUncertaintyError, UncertaintySpec, predict_with_uncertainty
from DeepSSMLogic.variance_head import (
    VarianceHead,
    attach_variance_head,
    decoder_jacobian,
    features_and_prediction,
    fit_heads,
    fit_variance_head,
    particle_uncertainty,
    true_descriptors,
)

M = 64


def _trained_like_net(seed: int = 0):
    """The tiny Base network with a non-zero output layer (an untrained one predicts the mean)."""
    net, sm, grid, ref, norm = tiny_bundle_parts(seed, M)
    with torch.no_grad():
        g = torch.Generator().manual_seed(100 + seed)
        net.encoder.fc[-1].weight.copy_(torch.randn(net.encoder.fc[-1].weight.shape, generator=g) * 0.05)
    return net.eval(), sm, grid, ref, norm


def _phantom_set(grid, n: int, sm, seed0: int = 10):
    """Raw phantom arrays on ``grid`` ``(n, Z, Y, X)`` and particles near the mean shape ``(n, M, 3)``."""
    images = np.stack(
        [resample_to_grid(phantom_image(seed=seed0 + i, noise=2.0 + 0.3 * i), grid) for i in range(n)]
    )
    rng = np.random.default_rng(seed0)
    particles = np.stack([sm.mean + rng.normal(0, 0.3, sm.mean.shape) for _ in range(n)])
    return images, particles


def _variance_net():
    net, sm, grid, ref, norm = _trained_like_net(0)
    images, particles = _phantom_set(grid, 4, sm)
    head, summary = fit_variance_head(
        net, images, particles, norm, grid.spacing[::-1], corruptions=2, seed=0, steps=40
    )
    attach_variance_head(net, head)
    spec = UncertaintySpec(method="variance", head=head.config)
    return net, spec, summary, sm, grid, ref, norm


@pytest.fixture(scope="module")
def variance_bundle(tmp_path_factory) -> Path:
    net, spec, _, sm, grid, ref, norm = _variance_net()
    val_images, val_particles = _phantom_set(grid, 6, sm, seed0=30)
    val_set = [(v[None], p) for v, p in zip(val_images, val_particles, strict=True)]
    path = tmp_path_factory.mktemp("var") / "variance.zip"
    return save_calibrated_bundle(path, net, spec, val_set, val_images[:4], (sm, grid, ref, norm))


# -- corruptions ------------------------------------------------------------------------------------
def test_corruptions_do_what_they_name():
    rng = np.random.default_rng(0)
    a = np.zeros((8, 9, 10), np.float32)
    a[2:6, 2:7, 2:8] = 100.0
    noisy = corrupt_array(a, "noise", 0.5, (2.0, 2.0, 2.0), rng)
    assert abs(float((noisy - a).std()) - 0.5 * float(a.std())) < 0.1 * float(a.std())
    # blur σ in mm, per axis in voxels: a point spreads to SD 2 voxels along z (1 mm) and 1 along x (2 mm)
    point = np.zeros((21, 21, 21), np.float32)
    point[10, 10, 10] = 1.0
    blurred = corrupt_array(point, "blur", 2.0, (1.0, 1.0, 2.0), rng)
    offsets = np.arange(21) - 10.0
    z_var = float((blurred.sum((1, 2)) * offsets**2).sum() / blurred.sum())
    x_var = float((blurred.sum((0, 1)) * offsets**2).sum() / blurred.sum())
    assert z_var == pytest.approx(4.0, rel=0.05) and x_var == pytest.approx(1.0, rel=0.1)
    cut = corrupt_array(a + 5.0, "fov", 0.3, (2.0, 2.0, 2.0), rng)
    assert np.all(cut[:, :, 7:] == 5.0) and np.array_equal(cut[:, :, :7], a[:, :, :7] + 5.0)  # last 3 of 10
    assert np.array_equal(a[2:6, 2:7, 2:8], np.full((4, 5, 6), 100.0))  # the input is not modified
    with pytest.raises(InputError, match="kind must be one of"):
        corrupt_array(a, "rotate", 1.0, (1, 1, 1), rng)
    # the random draw is reproducible from the generator's seed
    r1 = random_corruption(a, (2.0, 2.0, 2.0), np.random.default_rng(5))
    r2 = random_corruption(a, (2.0, 2.0, 2.0), np.random.default_rng(5))
    assert r1[1:] == r2[1:] and np.array_equal(r1[0], r2[0])


# -- propagation ------------------------------------------------------------------------------------
def test_particle_uncertainty_is_the_trace_of_the_propagated_covariance():
    # constructed: particle 0 moves (1, 0, 0) mm per unit of d0 and (0, 2, 0) per unit of d1;
    # particle 1 only along d1, by (0, 0, 3). σ² = (4, 1): Σ_0 = diag(4, 4, 0), Σ_1 = diag(0, 0, 9)
    jac = torch.zeros(1, 2, 3, 2)
    jac[0, 0, 0, 0], jac[0, 0, 1, 1], jac[0, 1, 2, 1] = 1.0, 2.0, 3.0
    u = particle_uncertainty(jac, torch.tensor([[4.0, 1.0]]))
    assert torch.allclose(u, torch.tensor([[8.0**0.5, 3.0]]), atol=1e-6)
    # random case against the explicit 3×3 covariances J_m diag(σ²) J_mᵀ
    g = torch.Generator().manual_seed(0)
    jac = torch.randn(2, 5, 3, 4, generator=g)
    var = torch.rand(2, 4, generator=g)
    want = np.array(
        [
            [np.sqrt(np.trace(j[m] @ np.diag(v) @ j[m].T)) for m in range(5)]
            for j, v in zip(jac.double().numpy(), var.double().numpy(), strict=True)
        ]
    )
    assert np.allclose(particle_uncertainty(jac, var).numpy(), want, atol=1e-5)


def test_decoder_jacobian_base_is_the_pca_basis_and_tl_matches_autograd():
    net = _trained_like_net(0)[0]
    d = torch.randn(2, 3)
    jac = decoder_jacobian(net, d)
    w = net.decoder.weight.detach()  # (3M, K)
    assert jac.shape == (2, M, 3, 3) and torch.allclose(jac[1], w.reshape(M, 3, 3))
    from DeepSSMLogic.networks import TLDeepSSM

    torch.manual_seed(0)
    tl = TLDeepSSM(
        (16, 16, 16), 20, 6, hidden=16, conv_padding="same", encoder="light", particle_scale=7.0
    ).eval()
    z = torch.randn(3, 6)
    jac = decoder_jacobian(tl, z)
    for b in range(3):
        want = torch.autograd.functional.jacobian(
            lambda v: tl.autoencoder.decode(v[None])[0], z[b]
        )  # (M, 3, L)
        assert torch.allclose(jac[b], want, atol=1e-5)


def test_true_descriptors_invert_the_decoder():
    net = _trained_like_net(0)[0]
    scores = torch.randn(4, 3, dtype=torch.float64) * 5
    particles = net.reconstruct(scores.float()).double().numpy()
    assert np.allclose(true_descriptors(net, particles), scores.numpy(), atol=1e-3)


# -- fitting ----------------------------------------------------------------------------------------
def test_the_head_learns_an_input_dependent_variance():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g)
    sd = torch.exp(0.8 * x[:, :1])  # the residual SD grows with feature 0
    r = torch.randn(200, 2, generator=g) * sd
    head, losses = fit_heads(x, r, steps=150, heads=2)
    pred_sd = torch.exp(0.5 * head(x)).mean(1)
    from scipy.stats import spearmanr

    assert spearmanr(pred_sd.detach().numpy(), sd[:, 0].numpy()).statistic > 0.8
    assert len(losses) == 2 and all(np.isfinite(losses))


def test_each_mlp_is_fitted_on_its_own_set():
    # set 0: residual SD 1, set 1: residual SD 100, same features: MLP h must predict its own set's
    # variance (log σ² ≈ 0 and ≈ log 1e4); fitting every MLP on one set would give both the same
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 4, generator=g)
    r0, r1 = torch.randn(300, 2, generator=g), 100.0 * torch.randn(300, 2, generator=g)
    head, losses = fit_heads([x, x], [r0, r1], steps=300)
    assert head.n_heads == 2 and len(losses) == 2
    with torch.no_grad():
        lv = [mlp(head.standardise(x)).mean().item() for mlp in head.heads]
    assert abs(lv[0]) < 0.5 and abs(lv[1] - np.log(1e4)) < 0.5, lv
    with pytest.raises(InputError, match="one residual set per feature set"):
        fit_heads([x, x], [r0])
    # the standardisation counts every distinct set once: one shared set gives its own mean and SD
    # (what the fit before per-MLP sets gave), separate sets their pooled statistics
    shared, _ = fit_heads(x, r0, steps=1, heads=3)
    assert torch.equal(shared.feature_mean, x.mean(0)) and torch.equal(shared.feature_std, x.std(0) + 1e-6)
    y = x + 1.0
    split, _ = fit_heads([x, y], [r0, r1], steps=1)
    assert torch.allclose(split.feature_mean, torch.cat([x, y]).mean(0))
    assert torch.allclose(split.feature_std, torch.cat([x, y]).std(0) + 1e-6)


def test_each_mlp_gets_its_own_corruption_draw_and_the_same_clean_images():
    from DeepSSMLogic.variance_head import _head_training_sets

    net, sm, grid, _, norm = _trained_like_net(0)
    images, _ = _phantom_set(grid, 3, sm)
    sets, kinds = _head_training_sets(net, images, norm, grid.spacing[::-1], 2, 3, 0, 4, lambda: None)
    assert len(sets) == 3 and kinds["clean"] == 3 and sum(kinds.values()) == 3 + 3 * 6
    for f, d, index in sets:
        assert f.shape[0] == d.shape[0] == 9 and index.tolist() == [0, 1, 2, 0, 0, 1, 1, 2, 2]
        assert torch.equal(f[:3], sets[0][0][:3])  # the clean images, shared
    for a in range(3):  # the corrupted copies differ from draw to draw
        for b in range(a + 1, 3):
            assert not torch.allclose(sets[a][0][3:], sets[b][0][3:])
    again, _ = _head_training_sets(net, images, norm, grid.spacing[::-1], 2, 3, 0, 4, lambda: None)
    assert all(torch.equal(s[0], t[0]) for s, t in zip(sets, again, strict=True))  # seeded


def _shifted_copy(net, shift: float):
    """A copy of ``net`` whose predicted descriptor is ``net``'s plus ``shift`` × score SD in every mode."""
    import copy

    other = copy.deepcopy(net)
    with torch.no_grad():
        other.encoder.fc[-1].bias.add_(shift)
    return other.eval()


def test_out_of_fold_residuals_come_from_the_network_that_did_not_see_the_subject():
    from DeepSSMLogic.variance_head import _head_training_sets

    net, sm, grid, _, norm = _trained_like_net(0)
    images, _ = _phantom_set(grid, 3, sm)
    args = (net, images, norm, grid.spacing[::-1], 2, 2, 0, 4, lambda: None)
    own, _ = _head_training_sets(*args)
    # subjects 0 and 2: a fold network identical to net; subject 1: one predicting 0.5 SD higher
    folds = [(net, np.array([0, 2])), (_shifted_copy(net, 0.5), np.array([1]))]
    oof, _ = _head_training_sets(*args, folds=folds)
    shift = 0.5 * net.score_std.double().numpy()
    for (f, d, index), (f_oof, d_oof, index_oof) in zip(own, oof, strict=True):
        assert torch.equal(f, f_oof) and np.array_equal(index, index_oof)  # net's features, always
        one = index == 1
        assert np.allclose(d_oof[~one], d[~one], atol=1e-3)
        assert np.allclose(d_oof[one] - d[one], shift, atol=1e-3)  # the other network's prediction
    with pytest.raises(InputError, match="1 of 3 images belong to no fold's held-out subjects"):
        _head_training_sets(*args, folds=folds[:1])


def test_fit_variance_head_on_out_of_fold_residuals_records_it_and_sees_their_size():
    net, sm, grid, _, norm = _trained_like_net(0)
    images, particles = _phantom_set(grid, 4, sm)
    kw = dict(corruptions=1, seed=0, steps=200, heads=2)
    _, own = fit_variance_head(net, images, particles, norm, grid.spacing[::-1], **kw)
    far = [(_shifted_copy(net, 3.0), np.array([0, 1])), (_shifted_copy(net, -3.0), np.array([2, 3]))]
    head, oof = fit_variance_head(net, images, particles, norm, grid.spacing[::-1], fold_networks=far, **kw)
    assert own["residuals"] == "in-sample" and own["folds"] == 0
    assert oof["residuals"] == "out-of-fold" and oof["folds"] == 2
    assert oof["residual_rms"] > 2 * own["residual_rms"]  # the fold networks' (3 SD off) residuals
    feats = torch.from_numpy(np.stack([norm(a) for a in images])[:, None].astype(np.float32))
    with torch.no_grad():
        f = features_and_prediction(net, feats)[0]
        assert bool((head(f).exp().sqrt() > 2.0 * net.score_std).all())  # σ ≈ 3 SD learnt


def test_bad_fold_count_is_refused_before_training():
    from DeepSSMLogic.pipeline import TrainingOptions, uncertainty_spec

    assert uncertainty_spec(TrainingOptions(uncertainty="variance", variance_folds=4)).method == "variance"
    for bad in (1, -2, 21, True, 2.5):
        with pytest.raises(
            InputError, match=r"--variance-folds: expected 0 \(off\) or an integer in 2\.\.20"
        ):
            uncertainty_spec(TrainingOptions(uncertainty="variance", variance_folds=bad))
    with pytest.raises(InputError, match="--variance-folds 3 needs --uncertainty variance, found 'none'"):
        uncertainty_spec(TrainingOptions(variance_folds=3))


def test_variance_keeps_the_networks_particles_and_gives_finite_mm():
    net, spec, summary, *_ = _variance_net()
    # 4 subjects, each clean once and 2 corrupted for each of the default 6 MLPs (one draw each)
    assert summary["corruption_draws"] == 6 and len(summary["final_nll"]) == 6
    assert summary["n_images"] == 4 + 6 * 8 and summary["images_by_kind"]["clean"] == 4
    assert sum(summary["images_by_kind"].values()) == summary["n_images"]
    x = torch.randn(2, 1, *tiny_bundle_parts(0, M)[2].shape_zyx)
    with torch.no_grad():
        d, p, u = predict_with_uncertainty(net, x, spec)
        d0, p0 = net(x)
    assert torch.equal(p, p0) and torch.equal(d, d0)  # accuracy unchanged by construction
    assert u.shape == (2, M) and bool(torch.isfinite(u).all()) and bool((u > 0).all())


def test_nan_variance_is_the_named_error():
    net, spec, *_ = _variance_net()
    with torch.no_grad():
        net.variance_head.heads[0][2].bias[0] = float("nan")
    x = torch.randn(1, 1, *tiny_bundle_parts(0, M)[2].shape_zyx)
    with pytest.raises(NonFiniteUncertaintyError, match="variance method gave a NaN or Inf"):
        predict_with_uncertainty(net, x, spec)


def test_tl_network_gets_variance_through_its_decoder():
    from DeepSSMLogic.networks import TLDeepSSM

    torch.manual_seed(1)
    grid = tiny_bundle_parts(0, M)[2]
    tl = TLDeepSSM(grid.shape_zyx, M, 6, hidden=16, conv_padding="same", encoder="light", particle_scale=5.0)
    with torch.no_grad():
        for p in tl.parameters():
            p.add_(0.05 * torch.randn_like(p))
    tl.eval()
    _, sm, _, _, norm = tiny_bundle_parts(0, M)
    images, particles = _phantom_set(grid, 3, sm)
    head, _ = fit_variance_head(tl, images, particles, norm, grid.spacing[::-1], corruptions=1, steps=20)
    assert head.n_outputs == 6  # one variance per latent coordinate
    attach_variance_head(tl, head)
    spec = UncertaintySpec(method="variance", head=head.config)
    x = torch.from_numpy(np.stack([norm(a) for a in images])[:, None].astype(np.float32))
    with torch.no_grad():
        d, p, u = predict_with_uncertainty(tl, x, spec)
    assert d.shape == (3, 6) and u.shape == (3, M) and bool(torch.isfinite(u).all()) and bool((u > 0).all())


# -- bundle -----------------------------------------------------------------------------------------
def test_bundle_round_trip_and_prediction(variance_bundle, tmp_path):
    meta = read_bundle_meta(variance_bundle)
    unc = meta["uncertainty"]
    assert unc["version"] == 2 and unc["method"] == "variance" and unc["scale"] > 0
    assert unc["head"] == {
        "features": "conv-mean",
        "n_features": 192,
        "n_outputs": 3,
        "hidden": 32,
        "heads": 6,
    }
    b = load_bundle(variance_bundle)
    assert isinstance(b.network.variance_head, VarianceHead) and b.uncertainty.method == "variance"
    assert "uncertainty_mm" in b.ood_calibration.components
    io.write_image(phantom_image(seed=1), tmp_path / "a.nrrd")
    rc = main(["predict", str(variance_bundle), str(tmp_path / "a.nrrd"), "--out", str(tmp_path / "o"), "--quiet",
               "--no-align", "--uncertainty"])  # fmt: skip
    assert rc == 0
    doc = json.loads((tmp_path / "o" / "a.json").read_text())
    values = np.asarray(doc["uncertainty"]["per_particle_mm"])
    assert doc["uncertainty"]["method"] == "variance" and values.shape == (M,) and np.all(values > 0)
    # the stored scale multiplies the propagated mm
    pr = Predictor(b, device="cpu", align=False)
    pred = pr.predict(phantom_image(seed=1))
    unscaled = Predictor(b, device="cpu", align=False)
    unscaled.uncertainty = UncertaintySpec(**{**b.uncertainty.__dict__, "scale": 1.0})
    assert np.allclose(pred.uncertainty, unscaled.predict(phantom_image(seed=1)).uncertainty * unc["scale"])
    assert "uncertainty_mm" in pred.ood["components"]


def test_old_bundle_is_refused_for_uncertainty_and_names_variance(tmp_path, capsys):
    old = make_tiny_bundle(tmp_path / "old")
    assert "uncertainty" not in read_bundle_meta(old)
    io.write_image(phantom_image(seed=1), tmp_path / "a.nrrd")
    rc = main(["predict", str(old), str(tmp_path / "a.nrrd"), "--out", str(tmp_path / "o"), "--uncertainty"])
    err = capsys.readouterr().err
    assert rc == 2 and "has no per-particle uncertainty" in err and "--uncertainty variance" in err


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda u: u.pop("head"), "uncertainty.head"),
        (lambda u: u.__setitem__("version", 1), "uncertainty.version"),
        (lambda u: u["head"].__setitem__("hidden", 0), "uncertainty.head.hidden"),
        (lambda u: u["head"].__setitem__("features", "fc"), "uncertainty.head.features"),
        (lambda u: u["head"].__setitem__("layers", 2), "uncertainty.head"),
        (lambda u: u.pop("scale"), "uncertainty.scale"),
    ],
)
def test_schema_names_the_bad_variance_field(variance_bundle, edit, field):
    meta = read_bundle_meta(variance_bundle)
    validate_meta(meta, "m")  # the written one is valid
    bad = json.loads(json.dumps(meta))
    edit(bad["uncertainty"])
    with pytest.raises(BundleError, match=rf"'{field}"):
        validate_meta(bad, "m")


def test_bad_corruption_count_is_refused_before_training():
    from DeepSSMLogic.pipeline import TrainingOptions, uncertainty_spec

    assert uncertainty_spec(TrainingOptions(uncertainty="variance")).method == "variance"
    with pytest.raises(
        InputError, match=r"--variance-corruptions: expected an integer in 0\.\.1000, found -1"
    ):
        uncertainty_spec(TrainingOptions(uncertainty="variance", variance_corruptions=-1))


def test_spec_round_trip_and_refusals():
    head = VarianceHead(8, 3).config
    spec = UncertaintySpec(method="variance", head=head, scale=1.5)
    assert UncertaintySpec.from_dict(spec.to_dict()) == spec
    assert (
        UncertaintySpec(method="ensemble").to_dict()["version"] == 1
    )  # others stay readable by older releases
    with pytest.raises(InputError, match="lacks the field 'head'"):
        UncertaintySpec.from_dict({"version": 2, "method": "variance", "scale": 1.0})
    with pytest.raises(InputError, match=r"head\.heads: expected an integer in 1\.\.32"):
        UncertaintySpec.from_dict(
            {"version": 2, "method": "variance", "scale": 1.0, "head": {**head, "heads": 0}}
        )
    with pytest.raises(InputError, match="head is not fitted"):
        UncertaintySpec(method="variance").to_dict()


# -- end to end -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_train_variance_then_predict_and_evaluate_end_to_end(tmp_path, capsys):
    from DeepSSMLogic.synthetic import generate_cohort

    csv = generate_cohort(
        "cranium", 12, tmp_path / "cohort", seed=3, image_size=(32, 32, 32), spacing=3.0, n_particles=64
    )
    common = ["--epochs", "2", "--augment", "6", "--batch-size", "4", "--spacing", "4", "--device", "cpu",
              "--seed", "1", "--quiet", "--encoder", "light", "--bundle-weights", "float32"]  # fmt: skip
    assert main(["train", str(csv), "--out", str(tmp_path / "none"), *common]) == 0
    # the same finished network (resumed from none's checkpoint) plus the head
    rc = main(["train", str(csv), "--out", str(tmp_path / "var"), "--work-dir", str(tmp_path / "none.work"),
               "--resume", *common, "--uncertainty", "variance", "--variance-corruptions", "2",
               "--variance-folds", "0"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    meta = read_bundle_meta(tmp_path / "var")
    assert meta["uncertainty"]["method"] == "variance" and meta["uncertainty"]["head"]["n_features"] == 64
    vh = meta["training_summary"]["variance_head"]
    # each training image clean once, and 2 corrupted copies for each of the 6 MLPs' draws
    assert vh["corruption_draws"] == 6
    assert vh["n_images"] == (1 + 6 * 2) * meta["training_summary"]["n_train_subjects"]
    img = sorted((csv.parent / "images").glob("*.nrrd"))[0]
    doc, _mesh = predict_mesh_uncertainty(tmp_path / "var", img, tmp_path / "p", "--uncertainty")
    assert doc["uncertainty"]["method"] == "variance" and len(doc["uncertainty"]["per_particle_mm"]) == 64
    base = Predictor(tmp_path / "none", device="cpu", align=False).predict(img)
    with_head = Predictor(tmp_path / "var", device="cpu", align=False).predict(img)
    assert np.array_equal(with_head.particles, base.particles)  # the head does not touch the network
    rc = main(
        [
            "evaluate",
            str(tmp_path / "var"),
            str(csv),
            "--out",
            str(tmp_path / "eval"),
            "--no-align",
            "--quiet",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["calibration"]["available"] and metrics["calibration"]["method"] == "variance"


@pytest.mark.slow
def test_train_with_variance_folds_trains_each_fold_network_without_its_subjects(
    tmp_path, monkeypatch, capsys
):
    from DeepSSMLogic import training
    from DeepSSMLogic.cohort import load_cohort, subject_particles
    from DeepSSMLogic.synthetic import generate_cohort

    csv = generate_cohort(
        "cranium", 12, tmp_path / "cohort", seed=3, image_size=(32, 32, 32), spacing=3.0, n_particles=64
    )
    calls = []
    real_train = training.train

    def recording_train(config, train_set, val_set, out_dir, *args, **kwargs):
        calls.append(
            (
                Path(out_dir),
                [p for _, p in (train_set[i] for i in range(len(train_set)))],
                [p for _, p in (val_set[i] for i in range(len(val_set)))],
            )
        )
        return real_train(config, train_set, val_set, out_dir, *args, **kwargs)

    monkeypatch.setattr(training, "train", recording_train)
    rc = main(["train", str(csv), "--out", str(tmp_path / "var"), "--epochs", "1", "--augment", "4",
               "--batch-size", "4", "--spacing", "4", "--device", "cpu", "--seed", "1", "--quiet",
               "--encoder", "light", "--uncertainty", "variance", "--variance-corruptions", "1",
               "--variance-folds", "2"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    vh = read_bundle_meta(tmp_path / "var")["training_summary"]["variance_head"]
    assert vh["residuals"] == "out-of-fold" and vh["folds"] == 2 and vh["fold_networks_seconds"] > 0
    assert vh["folds_source"] == "given"
    work = tmp_path / "var.work"
    assert [c[0] for c in calls[1:]] == [work / "variance-folds" / f"fold-{k}" / "training" for k in (0, 1)]
    subjects = load_cohort(csv).by_split("train")
    truth = [subject_particles(s).astype(np.float32) for s in subjects]

    def holds(parts, i):
        return any(np.allclose(p, truth[i], atol=1e-4) for p in parts)

    main_train, main_val = calls[0][1], calls[0][2]
    assert all(holds(main_train + main_val, i) for i in range(len(subjects)))  # the main network: all
    for k, (_, tr, va) in enumerate(calls[1:]):
        for i in range(len(subjects)):
            # fold k's subjects (i % 2 == k) reach its network neither in training nor in validation
            assert holds(tr + va, i) == (i % 2 != k), (k, i)


def test_variance_folds_default_to_out_of_fold_residuals_when_there_are_enough_subjects():
    """``--uncertainty variance`` without ``--variance-folds`` fits the head on 4 folds (the setting
    that met the per-image target), fewer with under 8 training subjects, none under 4; a given K wins."""
    from DeepSSMLogic.pipeline import DEFAULT_VARIANCE_FOLDS, TrainingOptions, resolve_variance_folds

    assert TrainingOptions(uncertainty="variance").variance_folds is None
    assert DEFAULT_VARIANCE_FOLDS == 4
    assert resolve_variance_folds(None, 28) == (4, "auto: 4 folds of 28 training subjects")
    assert resolve_variance_folds(None, 7)[0] == 3
    k, why = resolve_variance_folds(None, 3)
    assert k == 0 and "too few" in why
    assert resolve_variance_folds(0, 28) == (0, "given") and resolve_variance_folds(6, 28) == (6, "given")
