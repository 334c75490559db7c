"""``evaluate_model`` against an independent computation on a case with known error, and where it
reads the training history from (DeepSSMLogic.analysis.evaluation)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from helpers_predict import make_tiny_bundle, phantom_image

from DeepSSMLogic import io
from DeepSSMLogic.analysis.evaluation import evaluate_model, read_training_history
from DeepSSMLogic.bundle import load_bundle
from DeepSSMLogic.errors import InputError
from DeepSSMLogic.predict import Predictor

# ground truth = the model's own prediction shifted by d (mm, LPS), so every error is known exactly
SHIFTS = np.array([[0.5, -1.0, 2.0], [1.5, 0.0, 0.0], [0.0, 0.0, -0.25]])


@pytest.fixture(scope="module")
def shifted_case(tmp_path_factory) -> tuple[Path, Path, np.ndarray]:
    root = tmp_path_factory.mktemp("eval")
    model = make_tiny_bundle(root / "model")
    predictor = Predictor(load_bundle(model), device="cpu", align=False)
    rows = ["id,image,particles,group,split"]
    preds = []
    for i, d in enumerate(SHIFTS):
        io.write_image(phantom_image(seed=i), root / f"s{i}.nrrd")
        pred = predictor.predict(root / f"s{i}.nrrd").particles
        preds.append(pred)
        io.write_particles(root / f"s{i}.particles", pred + d)
        rows.append(f"s{i},s{i}.nrrd,s{i}.particles,{'a' if i < 2 else 'b'},test")
    for i in range(3):  # training rows are not evaluated
        rows.append(f"t{i},s0.nrrd,s0.particles,a,train")
    (root / "cohort.csv").write_text("\n".join(rows) + "\n")
    return model, root / "cohort.csv", np.stack(preds)


def test_a_prediction_shifted_by_d_measures_exactly_d(shifted_case, tmp_path):
    model, cohort, preds = shifted_case
    m = evaluate_model(model, cohort, tmp_path / "out", device="cpu", align=False, render=False)
    assert m["n_subjects"] == 3 and [r["id"] for r in m["subjects"]] == ["s0", "s1", "s2"]
    absd = np.abs(SHIFTS)
    for row, d, ad in zip(m["subjects"], SHIFTS, absd, strict=True):
        assert [row["rmse_x_mm"], row["rmse_y_mm"], row["rmse_z_mm"]] == pytest.approx(ad, abs=1e-6)
        assert row["rmse_mm"] == pytest.approx(ad.mean(), abs=1e-6)  # eq. 12: mean of the per-axis RMSEs
        assert row["max_point_rmse_mm"] == pytest.approx(np.sqrt((d**2).mean()), abs=1e-6)
    per_subject = absd.mean(axis=1)
    assert m["rmse_mm"]["mean"] == pytest.approx(per_subject.mean(), abs=1e-6)
    assert m["rmse_mm"]["median"] == pytest.approx(np.median(per_subject), abs=1e-6)
    assert m["rmse_pooled_mm"] == pytest.approx(np.sqrt((SHIFTS**2).mean(axis=0)).mean(), abs=1e-6)
    point = np.sqrt((SHIFTS**2).mean(axis=1))  # every point of subject i is off by |d_i| / sqrt(3)
    pp = m["per_point_rmse_mm"]
    assert pp["mean_over_points_of_mean"] == pytest.approx(point.mean(), abs=1e-6)
    assert pp["mean_over_points_of_std"] == pytest.approx(point.std(), abs=1e-6)
    assert m["rmse_by_group_mm"]["a"]["mean"] == pytest.approx(per_subject[:2].mean(), abs=1e-6)
    # a bundle without uncertainty: the sections say so, the columns stay empty
    assert m["calibration"]["available"] is False and "no uncertainty" in m["calibration"]["reason"]
    assert m["ood"]["available"] is False
    from DeepSSMLogic.commands.evaluate import uncertainty_lines

    assert uncertainty_lines(m) == [m["calibration"]["reason"]]
    assert all(r.get("uncertainty_mean_mm") is None and r.get("ood_flag") is None for r in m["subjects"])
    # the files say the same
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["rmse_pooled_mm"] == pytest.approx(m["rmse_pooled_mm"])
    with open(tmp_path / "out" / "subjects.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [float(r["rmse_mm"]) for r in table] == pytest.approx(per_subject, abs=1e-5)
    heat = np.loadtxt(tmp_path / "out" / "per_point_rmse.csv", delimiter=",", skiprows=1)
    np.testing.assert_allclose(heat[:, 3], point.mean(), atol=1e-5)
    np.testing.assert_allclose(heat[:, :3], load_bundle(model).mean_particles, rtol=1e-5, atol=1e-4)
    for i in range(3):
        np.testing.assert_allclose(
            io.read_particles(tmp_path / "out" / "predictions" / f"s{i}.particles"), preds[i], atol=1e-9
        )


def _log(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    return path


def test_training_history_sources_in_order(tmp_path):
    model = make_tiny_bundle(tmp_path / "model")
    b = load_bundle(model)
    assert read_training_history(b) == ([], "")
    b.meta["training_summary"]["history"] = [{"epoch": 1, "val_rmse_mm": 2.0}, "junk"]
    assert read_training_history(b) == ([{"epoch": 1, "val_rmse_mm": 2.0}], "model.json training_summary")
    work_log = _log(tmp_path / "model.work" / "training" / "train_log.jsonl", [{"epoch": 1}, {"epoch": 2}])
    assert read_training_history(b) == ([{"epoch": 1}, {"epoch": 2}], str(work_log))
    inside = _log(tmp_path / "model" / "train_log.jsonl", [{"epoch": 7}])
    assert read_training_history(b) == ([{"epoch": 7}], str(inside))
    explicit = _log(tmp_path / "elsewhere.jsonl", [{"epoch": 3}, {"epoch": 4}, {"epoch": 5}])
    rows, src = read_training_history(b, explicit)
    assert [r["epoch"] for r in rows] == [3, 4, 5] and src == str(explicit)


def test_training_history_errors_name_the_file_and_line(tmp_path):
    b = load_bundle(make_tiny_bundle(tmp_path / "model"))
    with pytest.raises(InputError, match=r"training log not found: .*nope\.jsonl"):
        read_training_history(b, tmp_path / "nope.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"epoch": 1}\n{"epoch": \n')
    with pytest.raises(InputError, match=r"bad\.jsonl:2: not a JSON object per line"):
        read_training_history(b, bad)


# -- issue 13: calibration of the predicted uncertainty, OOD flag rate ------------------------------
# ground truth = prediction + d_i * w_j: particle j of subject i is off by |d_i| * w_j; the
# fabricated uncertainty is half of that, so the model is perfectly ranked (Spearman 1) and every
# reliability bin has mean error = 2 x mean uncertainty
OOD = {
    "s0": {"score": 1.2, "threshold": 4.0, "flag": False, "reasons": [], "components": {"mahalanobis": 1.2}},
    "s1": {
        "score": 9.5,
        "threshold": 4.0,
        "flag": True,
        "reasons": ["image intensities outside the training range"],
        "components": {"intensity": 9.5},
    },
    "s2": {"score": 0.4, "threshold": 4.0, "flag": False, "reasons": [], "components": {}},
}


@pytest.fixture(scope="module")
def uncertain_case(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_unc")
    model = make_tiny_bundle(root / "model")
    predictor = Predictor(load_bundle(model), device="cpu", align=False)
    rows = ["id,image,particles,split"]
    uncertainty = {}
    for i, d in enumerate(SHIFTS):
        io.write_image(phantom_image(seed=i), root / f"s{i}.nrrd")
        pred = predictor.predict(root / f"s{i}.nrrd").particles
        w = 1.0 + np.arange(len(pred)) / len(pred)
        io.write_particles(root / f"s{i}.particles", pred + d * w[:, None])
        uncertainty[f"s{i}"] = 0.5 * np.linalg.norm(d) * w
        rows.append(f"s{i},s{i}.nrrd,s{i}.particles,test")
    (root / "cohort.csv").write_text("\n".join(rows) + "\n")
    return model, root / "cohort.csv", uncertainty


def _with_uncertainty(monkeypatch, uncertainty, ood=OOD, method="ensemble"):
    """Predictor.predict returns what an uncertainty bundle's Prediction carries (contract of
    issue 13: ``uncertainty`` (M,) mm, ``uncertainty_method``, ``ood``)."""
    original = Predictor.predict

    def predict(self, image, *args, name=None, **kwargs):
        pred = original(self, image, *args, name=name, **kwargs)
        pred.uncertainty = uncertainty[name]
        pred.uncertainty_method = method
        pred.ood = ood[name]
        return pred

    monkeypatch.setattr(Predictor, "predict", predict)


def test_calibration_and_ood_rate_of_a_perfectly_ranked_model(uncertain_case, tmp_path, monkeypatch):
    model, cohort, uncertainty = uncertain_case
    _with_uncertainty(monkeypatch, uncertainty)
    m = evaluate_model(model, cohort, tmp_path / "out", device="cpu", align=False, render=True)
    c = m["calibration"]
    assert c["available"] and c["method"] == "ensemble"
    assert c["particle_spearman_pooled"]["rho"] == pytest.approx(1.0)
    assert c["particle_spearman_per_subject"]["values"] == pytest.approx({"s0": 1.0, "s1": 1.0, "s2": 1.0})
    assert c["particle_spearman_per_subject"]["median"] == pytest.approx(1.0)
    assert c["subject_spearman_mean_uncertainty_vs_rmse"]["rho"] == pytest.approx(1.0)
    bins = c["reliability"]["bins"]
    assert sum(b["count"] for b in bins) == 3 * len(uncertainty["s0"]) and len(bins) == 10
    for b in bins:  # actual error = 2 x predicted uncertainty, particle by particle
        assert b["mean_actual_mm"] == pytest.approx(2.0 * b["mean_predicted_mm"], rel=1e-6)
    o = m["ood"]
    assert o["available"] and (o["n_checked"], o["n_flagged"]) == (3, 1)
    assert o["flag_rate"] == pytest.approx(1 / 3)
    assert o["flagged"] == [
        {
            "id": "s1",
            "score": 9.5,
            "threshold": 4.0,
            "reasons": ["image intensities outside the training range"],
        }
    ]
    # per-subject CSV and metrics.json rows
    with open(tmp_path / "out" / "subjects.csv", newline="") as f:
        table = {r["id"]: r for r in csv.DictReader(f)}
    for sid, u in uncertainty.items():
        assert float(table[sid]["uncertainty_mean_mm"]) == pytest.approx(u.mean(), rel=1e-5)
        assert float(table[sid]["uncertainty_spearman"]) == pytest.approx(1.0)
        assert float(table[sid]["ood_score"]) == pytest.approx(OOD[sid]["score"])
        assert table[sid]["ood_flag"] == ("true" if sid == "s1" else "false")
        np.testing.assert_allclose(
            np.loadtxt(tmp_path / "out" / "predictions" / f"{sid}.uncertainty.csv", skiprows=1), u, rtol=1e-5
        )
    assert table["s1"]["ood_reasons"] == "image intensities outside the training range"
    text = (tmp_path / "out" / "metrics.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in metrics.json"))
    # what `deepssm evaluate` prints
    from DeepSSMLogic.commands.evaluate import uncertainty_lines

    lines = uncertainty_lines(m)
    assert lines[0].startswith(
        "uncertainty (ensemble): Spearman ρ predicted vs actual per-particle error 1.000"
    )
    assert lines[1] == "out of distribution: 1 of 3 image(s) flagged (s1)"
    # the report shows both sections and the reliability plot
    html = (tmp_path / "out" / "report.html").read_text()
    assert "Uncertainty calibration" in html and "Out-of-distribution check" in html
    assert "figures/uncertainty_reliability.png" in html and "1 (33.3 %)" in html
    assert (tmp_path / "out" / "figures" / "uncertainty_reliability.png").stat().st_size > 1000


def test_anti_ranked_uncertainty_is_reported_as_such(uncertain_case, tmp_path, monkeypatch):
    model, cohort, uncertainty = uncertain_case
    flipped = {k: 10.0 - v for k, v in uncertainty.items()}  # high where the error is low
    _with_uncertainty(monkeypatch, flipped, ood={k: None for k in uncertainty})
    m = evaluate_model(model, cohort, tmp_path / "out", device="cpu", align=False, render=False)
    assert m["calibration"]["particle_spearman_per_subject"]["median"] == pytest.approx(-1.0)
    assert m["calibration"]["subject_spearman_mean_uncertainty_vs_rmse"]["rho"] == pytest.approx(-1.0)
    assert m["ood"]["available"] is False


def test_nan_uncertainty_is_a_named_error(uncertain_case, tmp_path, monkeypatch):
    model, cohort, uncertainty = uncertain_case
    bad = dict(uncertainty, s1=np.where(np.arange(len(uncertainty["s1"])) == 3, np.nan, uncertainty["s1"]))
    _with_uncertainty(monkeypatch, bad)
    with pytest.raises(InputError, match="subject 's1': the predicted uncertainty contains NaN"):
        evaluate_model(model, cohort, tmp_path / "out", device="cpu", align=False, render=False)
