"""Per-particle uncertainty and the OOD flag (issue 13): methods, bundle round trip, predictor and
CLI contract, old bundles, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from helpers_predict import (
    make_tiny_bundle,
    phantom_image,
    predict_mesh_uncertainty,
    save_calibrated_bundle,
    tiny_bundle_parts,
)

from DeepSSMLogic import io
from DeepSSMLogic.bundle import load_bundle, read_bundle_meta
from DeepSSMLogic.cli import main
from DeepSSMLogic.errors import BundleError, InputError
from DeepSSMLogic.ood import IntensityReference, OODCalibration, calibrate
from DeepSSMLogic.predict import Predictor
from DeepSSMLogic.preprocess import resample_to_grid
from DeepSSMLogic.trust_calibration import calibrate_model
from DeepSSMLogic.uncertainty import (
    EnsembleDeepSSM,
    NonFiniteUncertaintyError,
    UncertaintySpec,
    add_head_dropout,
    predict_with_uncertainty,
)

M = 64


def _net(seed: int, dropout: float | None = None):
    net, sm, grid, ref, norm = tiny_bundle_parts(seed, M)
    with torch.no_grad():  # an untrained network predicts the mean exactly: give it an output layer
        g = torch.Generator().manual_seed(100 + seed)
        net.encoder.fc[-1].weight.copy_(torch.randn(net.encoder.fc[-1].weight.shape, generator=g) * 0.05)
    if dropout:
        add_head_dropout(net, dropout)
    return net.eval(), sm, grid, ref, norm


def _val_set(grid, n: int = 8):
    """Raw phantom images on the grid with their (mean-shape) particles: a stand-in validation split."""
    _, sm, *_ = tiny_bundle_parts(0, M)
    out = []
    for i in range(n):
        arr = resample_to_grid(phantom_image(seed=10 + i, noise=2.0 + 0.3 * i), grid)
        out.append((arr[None], sm.mean + np.random.default_rng(i).normal(0, 0.3, sm.mean.shape)))
    return out


def _bundle_with_uncertainty(path: Path, method: str) -> Path:
    if method == "ensemble":
        members = [_net(s)[0] for s in (0, 1)]
        net = EnsembleDeepSSM(members).eval()
        spec = UncertaintySpec(method="ensemble", members=2)
    else:
        net = _net(0, dropout=0.2)[0]
        spec = UncertaintySpec(method="mc-dropout", dropout=0.2, samples=30)
    _, sm, grid, ref, norm = tiny_bundle_parts(0, M)
    train_images = np.stack([v[0][0] for v in _val_set(grid, 4)])
    return save_calibrated_bundle(path, net, spec, _val_set(grid), train_images, (sm, grid, ref, norm))


@pytest.fixture(scope="module", params=["mc-dropout", "ensemble"])
def uq_bundle(request, tmp_path_factory) -> Path:
    return _bundle_with_uncertainty(tmp_path_factory.mktemp("uq") / f"{request.param}.zip", request.param)


@pytest.fixture(scope="module")
def old_bundle(tmp_path_factory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp("old") / "model")


# -- methods ----------------------------------------------------------------------------------------
def test_head_dropout_keeps_the_paper_network_and_its_eval_output():
    plain = _net(0)[0]
    hooked = _net(0, dropout=0.5)[0]
    assert list(plain.state_dict()) == list(hooked.state_dict())
    x = torch.randn(2, 1, *tiny_bundle_parts(0, M)[2].shape_zyx)
    with torch.no_grad():
        assert torch.equal(plain(x)[1], hooked(x)[1])  # eval: dropout off
        hooked.train()
        assert not torch.allclose(plain(x)[1], hooked(x)[1])  # training: dropout on
        hooked.eval()


def test_mc_dropout_samples_are_reproducible_and_shaped():
    net = _net(0, dropout=0.2)[0]
    spec = UncertaintySpec(method="mc-dropout", dropout=0.2, samples=6)
    x = torch.randn(3, 1, *tiny_bundle_parts(0, M)[2].shape_zyx)
    with torch.no_grad():
        d, p, u = predict_with_uncertainty(net, x, spec)
        _, p_det = net(x)
        _, _, u2 = predict_with_uncertainty(net, x, spec)
    assert p.shape == (3, M, 3) and u.shape == (3, M) and d.shape == (3, 3)
    assert torch.allclose(p, p_det, rtol=0, atol=1e-6)  # the particles are the deterministic pass
    assert torch.equal(u, u2) and bool((u > 0).all())


def test_ensemble_forward_is_the_member_mean():
    a, b = _net(0)[0], _net(1)[0]
    ens = EnsembleDeepSSM([a, b]).eval()
    x = torch.randn(2, 1, *tiny_bundle_parts(0, M)[2].shape_zyx)
    with torch.no_grad():
        want = (a(x)[1] + b(x)[1]) / 2
        _, p, u = predict_with_uncertainty(ens, x, UncertaintySpec(method="ensemble", members=2))
    assert torch.allclose(p, want, atol=1e-5)
    # two members: the RMS distance from their mean is half their distance
    assert torch.allclose(u, (a(x)[1] - b(x)[1]).norm(dim=-1) / 2, atol=1e-4)


def test_nan_variance_is_a_named_error():
    net = _net(0, dropout=0.2)[0]
    with torch.no_grad():
        net.encoder.fc[2].weight[0, 0] = float("nan")
    x = torch.randn(1, 1, *tiny_bundle_parts(0, M)[2].shape_zyx)
    with pytest.raises(NonFiniteUncertaintyError, match="NaN or Inf per-particle uncertainty"):
        predict_with_uncertainty(net, x, UncertaintySpec(method="mc-dropout", samples=4))


def test_spec_validation_and_versions():
    assert UncertaintySpec.from_dict(None).method == "none"
    spec = UncertaintySpec(method="mc-dropout", dropout=0.3, samples=12, scale=2.5)
    assert UncertaintySpec.from_dict(spec.to_dict()) == UncertaintySpec(
        method="mc-dropout", dropout=0.3, samples=12, scale=2.5
    )
    with pytest.raises(InputError, match="newer than this software"):
        UncertaintySpec.from_dict({"version": 99, "method": "ensemble"})
    with pytest.raises(InputError, match="method: expected one of"):
        UncertaintySpec.from_dict({"version": 1, "method": "bayes"})


# -- OOD score logic --------------------------------------------------------------------------------
def _calibration() -> OODCalibration:
    rng = np.random.default_rng(0)
    rows = [
        {"descriptor_mahalanobis": 2 + rng.normal(0, 0.3), "intensity": 0.5 + rng.normal(0, 0.1),
         "registration": 0.1 + rng.normal(0, 0.01)}
        for _ in range(40)
    ]  # fmt: skip
    ref = IntensityReference(np.zeros(9), np.ones(9))
    return calibrate(rows, ref, n_modes=3)


def test_ood_threshold_is_the_validation_quantile_with_a_floor():
    cal = _calibration()
    assert cal.threshold >= 3.0
    inside = cal.assess({"descriptor_mahalanobis": 2.1, "intensity": 0.5, "registration": 0.1})
    assert inside["flag"] is False and inside["reasons"] == []
    far = cal.assess({"descriptor_mahalanobis": 2.0, "intensity": 0.5, "registration": 0.6})
    assert far["flag"] is True and far["score"] > far["threshold"]
    assert len(far["reasons"]) == 1 and far["reasons"][0].startswith("registration")
    assert OODCalibration.from_dict(cal.to_dict()).to_dict() == cal.to_dict()


# -- bundles and the predictor ----------------------------------------------------------------------
def test_bundle_round_trip_with_uncertainty_and_ood(uq_bundle):
    b = load_bundle(uq_bundle)
    meta = read_bundle_meta(uq_bundle)
    assert meta["uncertainty"]["version"] == 1 and meta["ood"]["version"] == 2
    assert b.uncertainty.enabled and b.uncertainty.scale > 0
    assert b.ood_calibration.threshold == meta["ood"]["threshold"]
    assert set(b.ood_calibration.components) == {
        "descriptor_mahalanobis",
        "uncertainty_mm",
        "intensity",
        "registration",
    }


def test_prediction_json_contract(uq_bundle, tmp_path):
    io.write_image(phantom_image(seed=1), tmp_path / "a.nrrd")
    rc = main(["predict", str(uq_bundle), str(tmp_path / "a.nrrd"), "--out", str(tmp_path / "o"), "--quiet", "--no-align",
               "--uncertainty"])  # fmt: skip
    assert rc == 0
    doc = json.loads((tmp_path / "o" / "a.json").read_text())
    unc = doc["uncertainty"]
    assert unc["method"] == load_bundle(uq_bundle).uncertainty.method
    values = np.asarray(unc["per_particle_mm"])
    assert values.shape == (M,) and np.all(np.isfinite(values)) and np.all(values >= 0)
    assert unc["mean_mm"] == pytest.approx(values.mean())
    ood = doc["ood"]
    assert set(ood) == {"score", "threshold", "flag", "reasons", "components"}
    assert isinstance(ood["flag"], bool) and np.isfinite(ood["score"]) and ood["threshold"] >= 3.0
    assert set(ood["components"]) == {"descriptor_mahalanobis", "uncertainty_mm", "intensity", "registration"}


def test_pure_noise_is_flagged_and_warned(uq_bundle, tmp_path, capsys):
    clean = phantom_image(seed=3)
    rng = np.random.default_rng(0)
    arr = rng.normal(60.0, 40.0, sitk.GetArrayFromImage(clean).shape).astype(np.float32)
    noise = sitk.GetImageFromArray(arr)
    noise.CopyInformation(clean)
    io.write_image(clean, tmp_path / "clean.nrrd")
    io.write_image(noise, tmp_path / "noise.nrrd")
    rc = main(["predict", str(uq_bundle), str(tmp_path / "clean.nrrd"), str(tmp_path / "noise.nrrd"),
               "--out", str(tmp_path / "o"), "--quiet", "--no-align"])  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert "WARNING noise: out of distribution" in out and "WARNING clean" not in out
    assert json.loads((tmp_path / "o" / "noise.json").read_text())["ood"]["flag"] is True
    assert json.loads((tmp_path / "o" / "clean.json").read_text())["ood"]["flag"] is False


def test_old_bundle_reports_no_uncertainty(old_bundle, tmp_path, capsys):
    b = load_bundle(old_bundle)
    assert "uncertainty" not in b.meta and not b.uncertainty.enabled and b.ood_calibration is None
    pred = Predictor(b, device="cpu", align=False).predict(phantom_image(seed=1))
    assert pred.uncertainty is None and pred.uncertainty_method is None and pred.ood is None
    d = pred.to_dict()
    assert d["uncertainty"] is None and d["ood"] is None
    with pytest.raises(InputError, match="has no per-particle uncertainty"):
        Predictor(b, device="cpu", require_uncertainty=True)
    io.write_image(phantom_image(seed=1), tmp_path / "a.nrrd")
    rc = main(
        ["predict", str(old_bundle), str(tmp_path / "a.nrrd"), "--out", str(tmp_path / "o"), "--uncertainty"]
    )
    assert rc == 2 and "retrain it with --uncertainty" in capsys.readouterr().err


def test_schema_names_bad_uncertainty_and_ood_fields(uq_bundle, tmp_path):
    from DeepSSMLogic.bundle_schema import validate_meta

    meta = read_bundle_meta(uq_bundle)
    bad = json.loads(json.dumps(meta))
    bad["uncertainty"]["method"] = "bayes"
    with pytest.raises(BundleError, match=r"'uncertainty\.method'"):
        validate_meta(bad, "m")
    bad = json.loads(json.dumps(meta))
    bad["ood"]["components"]["registration"]["scale"] = 0
    with pytest.raises(BundleError, match=r"'ood\.components\.registration\.scale'"):
        validate_meta(bad, "m")
    bad = json.loads(json.dumps(meta))
    bad["ood"]["version"] = 7
    with pytest.raises(BundleError, match="newer than this software"):
        validate_meta(bad, "m")


def test_mesh_output_carries_uncertainty(tmp_path):
    from DeepSSMLogic.commands.predict import mesh_with_uncertainty

    verts = np.random.default_rng(0).normal(size=(20, 3))
    mesh = io.polydata_from_arrays(verts, np.array([[0, 1, 2], [2, 3, 4]]))
    pred = type("P", (), {})()
    pred.particles, pred.uncertainty = verts[:10], np.arange(10, dtype=float)
    out = mesh_with_uncertainty(mesh, pred)
    arr = out.GetPointData().GetArray("uncertainty_mm")
    assert arr is not None and arr.GetNumberOfTuples() == 20
    assert arr.GetValue(3) == pytest.approx(3.0)  # a vertex on a particle takes its value


@pytest.mark.parametrize("method", ["mc-dropout", "ensemble"])
def test_tl_and_light_networks_give_uncertainty(method):
    from DeepSSMLogic.networks import TLDeepSSM
    from DeepSSMLogic.uncertainty import build_uncertain_network

    arch = TLDeepSSM((16, 16, 16), 20, 8, hidden=16, conv_padding="same", encoder="light").architecture
    spec = UncertaintySpec(method=method, members=2, samples=5)
    net = build_uncertain_network(arch, spec).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
        d, p, u = predict_with_uncertainty(net, torch.randn(2, 1, 16, 16, 16), spec)
    assert d.shape == (2, 8) and p.shape == (2, 20, 3) and u.shape == (2, 20)
    assert bool(torch.isfinite(u).all()) and bool((u > 0).all())


@pytest.mark.slow
def test_train_mc_dropout_then_predict_mesh_end_to_end(tmp_path, capsys):
    from DeepSSMLogic.synthetic import generate_cohort

    csv = generate_cohort(
        "cranium", 12, tmp_path / "cohort", seed=3, image_size=(32, 32, 32), spacing=3.0, n_particles=64
    )
    model = tmp_path / "model"
    rc = main(["train", str(csv), "--out", str(model), "--epochs", "2", "--augment", "6", "--batch-size", "4",
               "--spacing", "4", "--device", "cpu", "--seed", "1", "--quiet", "--encoder", "light",
               "--uncertainty", "mc-dropout", "--mc-samples", "10"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    meta = read_bundle_meta(model)
    assert meta["uncertainty"]["method"] == "mc-dropout" and meta["uncertainty"]["samples"] == 10
    assert meta["hyperparameters"]["train_config"]["head_dropout"] == 0.2
    assert meta["ood"]["threshold"] >= 3.0 and meta["training_summary"]["calibration"]["n_validation"] >= 2
    img = sorted((csv.parent / "images").glob("*.nrrd"))[0]
    doc, _mesh = predict_mesh_uncertainty(model, img, tmp_path / "p")
    assert len(doc["uncertainty"]["per_particle_mm"]) == 64 and doc["uncertainty"]["method"] == "mc-dropout"

    # the real bundle's uncertainty and OOD verdicts reach deepssm evaluate (not only fabricated ones)
    rc = main(["evaluate", str(model), str(csv), "--out", str(tmp_path / "eval"), "--no-align", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    cal, ood_rate = metrics["calibration"], metrics["ood"]
    assert cal["available"] and ood_rate["available"]
    assert ood_rate["n_checked"] == metrics["n_subjects"] and ood_rate["n_unchecked"] == 0
    per_subject = cal["particle_spearman_per_subject"]["values"]
    assert set(per_subject) == {s["id"] for s in metrics["subjects"]}
    assert -1.0 <= cal["particle_spearman_pooled"]["rho"] <= 1.0


def test_one_validation_sample_gives_no_ood_calibration():
    net, sm, grid, ref, norm = _net(0)
    val = _val_set(grid, 1)
    cal = calibrate_model(
        net, UncertaintySpec(), val, normalizer=norm, reference=sitk.GetArrayFromImage(ref), shape_model=sm,
        train_images=np.stack([v[0][0] for v in val]),
    )  # fmt: skip
    assert cal.ood is None and cal.spec.method == "none" and cal.summary["n_validation"] == 1


def test_image_statistics_leave_out_the_voxels_outside_the_input():
    from DeepSSMLogic.ood import image_statistics
    from DeepSSMLogic.preprocess import IntensityNormalizer

    a = np.random.default_rng(0).normal(50.0, 10.0, (12, 10, 8))
    norm = IntensityNormalizer(20.0, 80.0, 50.0, 10.0)
    padded = a.copy()
    padded[:, :, 6:] = np.nan  # the grid beyond the shifted input
    assert np.allclose(image_statistics(padded, norm), image_statistics(a[:, :, :6], norm))
    padded[:, :, 6:] = a.min() - 100.0  # a constant pad instead moves the low quantile
    assert not np.allclose(image_statistics(padded, norm), image_statistics(a[:, :, :6], norm))
