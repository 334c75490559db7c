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
