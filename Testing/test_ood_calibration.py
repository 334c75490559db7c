"""OOD calibration version 2 (issue 13): the intensity component scaled on the training images
left out one at a time, the threshold at least the simulated null quantile of the max robust z,
and version-1 calibrations scoring as before."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from helpers_predict import phantom_image

from DeepSSMLogic.bundle_schema import OOD_VERSION, validate_meta
from DeepSSMLogic.errors import BundleError, InputError
from DeepSSMLogic.ood import (
    IntensityReference,
    OODCalibration,
    _robust,
    calibrate,
    image_statistics,
    null_threshold,
)
from DeepSSMLogic.preprocess import resample_to_grid
from DeepSSMLogic.trust_calibration import calibrate_model
from DeepSSMLogic.uncertainty import UncertaintySpec

NAMES = ("descriptor_mahalanobis", "intensity", "registration")


def _rows(rng: np.random.Generator, n: int) -> list[dict[str, float]]:
    """In-family component values: non-negative distances, each the size of a Gaussian deviation."""
    return [{c: 1.0 + 0.5 * abs(rng.standard_normal()) for c in NAMES} for _ in range(n)]


def test_null_threshold_grows_with_components_and_shrinks_with_samples():
    t = {(n, k): null_threshold(n, k) for n in (10, 23, 200) for k in (1, 3)}
    assert t[(23, 3)] > t[(23, 1)] and t[(200, 3)] > t[(200, 1)]  # the max over more components
    assert t[(10, 3)] > t[(23, 3)] > t[(200, 3)]  # a scale from fewer samples is less sure
    assert t[(200, 1)] > 3.0  # a skewed distance's 99th percentile lies beyond 3 robust SDs
    assert null_threshold(23, 3) == null_threshold(23, 3)  # fixed seed: reproducible
    with pytest.raises(InputError, match="n >= 2"):
        null_threshold(1, 3)


def test_in_family_samples_are_flagged_at_about_the_nominal_rate():
    """Over many small validation splits (23 samples, as in the study) the share of new in-family
    samples flagged stays near 1 %; the version-1 threshold (99th percentile of 23 validation
    scores, floor 3) flags several times more."""
    rng = np.random.default_rng(5)
    ref = IntensityReference(np.zeros(9), np.ones(9))
    flags_v2, flags_v1 = [], []
    for _ in range(150):
        cal = calibrate(_rows(rng, 23), ref, n_modes=3)
        scores = [cal.assess(r)["score"] for r in _rows(rng, 40)]
        v1 = max(float(np.quantile([cal.assess(r)["score"] for r in cal_rows(cal)], 0.99)), 3.0)
        flags_v2 += [s > cal.threshold for s in scores]
        flags_v1 += [s > v1 for s in scores]
    assert np.mean(flags_v2) <= 0.02
    assert np.mean(flags_v1) > 2 * np.mean(flags_v2)


def cal_rows(cal: OODCalibration) -> list[dict[str, float]]:
    """The validation rows a calibration stored (version 2)."""
    names = list(cal.validation)
    return [{c: cal.validation[c][i] for c in names} for i in range(len(cal.validation[names[0]]))]


def test_leave_one_out_distances_are_the_distances_from_the_other_images():
    f = np.random.default_rng(1).normal(0, 1, (6, 9))
    loo = IntensityReference.leave_one_out(f)
    assert loo[2] == pytest.approx(IntensityReference.fit(np.delete(f, 2, 0)).distance(f[2]))
    inside = [IntensityReference.fit(f).distance(x) for x in f]
    assert all(a > b for a, b in zip(loo, inside, strict=True))  # an image left out lies farther
    assert IntensityReference.leave_one_out(f[:2]) == []


def test_calibration_scales_intensity_on_the_training_images_left_out():
    """The pipeline's calibration step takes the intensity component's median and scale from the
    training images' leave-one-out distances, not from the validation rows, and stores both."""
    from test_uncertainty import _net, _val_set

    net, sm, grid, ref, norm = _net(0)
    train = np.stack(
        [resample_to_grid(phantom_image(seed=40 + i, noise=1.0 + 0.4 * i), grid) for i in range(6)]
    )
    res = calibrate_model(
        net, UncertaintySpec(), _val_set(grid), normalizer=norm,
        reference=sitk.GetArrayFromImage(ref), shape_model=sm, train_images=train,
    )  # fmt: skip
    loo = IntensityReference.leave_one_out([image_statistics(t, norm) for t in train])
    stored = res.ood.to_dict()
    assert stored["version"] == OOD_VERSION == 2
    assert stored["extra"]["reference"]["intensity"]["values"] == pytest.approx(loo)
    assert stored["components"]["intensity"]["scale"] == pytest.approx(_robust(np.array(loo))["scale"])
    assert len(stored["validation"]["intensity"]) == len(_val_set(grid))
    assert stored["threshold"] >= null_threshold(min(len(loo), 8), len(stored["components"]))


def _v1_meta() -> dict:
    return {
        "version": 1,
        "method": "max robust z over components",
        "threshold": 3.27,
        "quantile": 0.99,
        "n_calibration": 23,
        "n_modes": 3,
        "components": {
            "descriptor_mahalanobis": {"median": 1.37, "scale": 0.347, "p99": 1.98},
            "intensity": {"median": 0.372, "scale": 0.1165, "p99": 0.75},
            "registration": {"median": 0.0211, "scale": 0.0081, "p99": 0.037},
        },
        "intensity": {"features": [], "mean": [0.0] * 9, "std": [1.0] * 9},
    }


def test_version_1_calibrations_load_and_score_as_before(tmp_path):
    from helpers_predict import make_tiny_bundle

    from DeepSSMLogic.bundle import read_bundle_meta

    meta = read_bundle_meta(make_tiny_bundle(tmp_path / "m"))
    meta["ood"] = _v1_meta()
    validate_meta(meta, "m")  # a version-1 calibration is still valid
    cal = OODCalibration.from_dict(meta["ood"])
    verdict = cal.assess({"descriptor_mahalanobis": 1.18, "intensity": 1.193, "registration": 0.0289})
    assert verdict["threshold"] == 3.27 and verdict["flag"] is True  # its own threshold and scales
    assert verdict["score"] == pytest.approx((1.193 - 0.372) / 0.1165)
    assert cal.to_dict()["version"] == 1 and "validation" not in cal.to_dict()


def test_schema_names_bad_stored_calibration_samples(tmp_path):
    from helpers_predict import make_tiny_bundle

    from DeepSSMLogic.bundle import read_bundle_meta

    meta = read_bundle_meta(make_tiny_bundle(tmp_path / "m"))
    cal = calibrate(_rows(np.random.default_rng(0), 10), IntensityReference(np.zeros(9), np.ones(9)), 3,
                    references={"intensity": [0.3, 0.4, 0.5]})  # fmt: skip
    meta["ood"] = json.loads(json.dumps(cal.to_dict()))
    validate_meta(meta, "m")
    bad = json.loads(json.dumps(meta))
    bad["ood"]["validation"]["registration"][2] = "x"
    with pytest.raises(BundleError, match=r"'ood\.validation\.registration\[2\]'"):
        validate_meta(bad, "m")
    bad = json.loads(json.dumps(meta))
    bad["ood"]["extra"]["reference"]["intensity"]["values"] = []
    with pytest.raises(BundleError, match=r"'ood\.extra\.reference\.intensity\.values'"):
        validate_meta(bad, "m")


def test_reasons_name_the_reference_a_component_was_judged_against():
    rng = np.random.default_rng(2)
    cal = calibrate(_rows(rng, 23), IntensityReference(np.zeros(9), np.ones(9)), 3,
                    references={"intensity": [1.0 + 0.5 * abs(x) for x in rng.standard_normal(28)]})  # fmt: skip
    far = cal.assess({"descriptor_mahalanobis": 50.0, "intensity": 50.0, "registration": 1.0})
    text = " ".join(far["reasons"])
    assert "intensity: the intensities look unlike the training images (50; training images left out" in text
    assert (
        "descriptor_mahalanobis: the predicted shape is far from the training shapes (50; validation" in text
    )
