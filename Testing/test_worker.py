"""The Slicer worker (DeepSSMExtension/DeepSSMLib/worker.py) run in-process: the predict path's files
and heatmaps against an independent computation (error and severity), and the train path end to end."""

from __future__ import annotations

import io as _io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers_predict import phantom_image, tiny_bundle_parts

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "DeepSSMExtension"))

from DeepSSMLib import worker  # noqa: E402

from DeepSSMLogic import io  # noqa: E402
from DeepSSMLogic.analysis.severity import fit_normal_model, severity  # noqa: E402
from DeepSSMLogic.bundle import load_bundle, save_bundle  # noqa: E402

SHIFT = np.array([0.6, -0.8, 0.0])  # ground truth = prediction + SHIFT: every error is 1.0 mm


def _run(argv: list[str]) -> tuple[int, list[dict]]:
    stream = _io.StringIO()
    code = worker.main(argv, stream=stream)
    return code, [json.loads(line) for line in stream.getvalue().splitlines()]


@pytest.fixture(scope="module")
def bundle_with_template(tmp_path_factory) -> Path:
    """The tiny untrained bundle plus a template mesh whose vertices are the mean particles."""
    from scipy.spatial import ConvexHull

    root = tmp_path_factory.mktemp("worker")
    net, sm, grid, ref, normalizer = tiny_bundle_parts(seed=2)
    tri = ConvexHull(sm.mean).simplices
    assert len(np.unique(tri)) == len(sm.mean)  # every particle is a vertex
    return save_bundle(
        root / "model",
        net,
        net.architecture,
        grid,
        normalizer,
        sm,
        ref,
        io.polydata_from_arrays(sm.mean, tri),
    )


def _predict_args(bundle: Path, tmp_path: Path, *extra: str) -> list[str]:
    io.write_image(phantom_image(seed=3), tmp_path / "img.nrrd")
    return [
        "predict",
        "--bundle",
        str(bundle),
        "--image",
        str(tmp_path / "img.nrrd"),
        "--out",
        str(tmp_path / "out"),
        "--device",
        "cpu",
        "--aligned",
        *extra,
    ]


def _mesh_array(path: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    from vtk.util import numpy_support as ns

    mesh = io.read_mesh(path)
    arr = mesh.GetPointData().GetArray(name)
    assert arr is not None, f"{path} has no point array {name!r}"
    return ns.vtk_to_numpy(mesh.GetPoints().GetData()).astype(np.float64), ns.vtk_to_numpy(arr)


def test_predict_heatmaps_equal_an_independent_computation(bundle_with_template, tmp_path):
    b = load_bundle(bundle_with_template)
    rng = np.random.default_rng(0)
    normals = b.mean_particles[None] + rng.normal(0.0, 0.4, (8, *b.mean_particles.shape))
    files = []
    for i, shape in enumerate(normals):
        files.append(str(tmp_path / f"normal{i}.particles"))
        io.write_particles(files[-1], shape)
    # the ground truth is the prediction shifted by SHIFT: predict once without it to know it
    code, _ = _run(_predict_args(bundle_with_template, tmp_path / "first"))
    assert code == 0
    pred = io.read_particles(tmp_path / "first" / "out" / worker.PARTICLES_FILE)
    io.write_particles(tmp_path / "gt.particles", pred + SHIFT)
    args = _predict_args(bundle_with_template, tmp_path, "--ground-truth", str(tmp_path / "gt.particles"))
    code, msgs = _run([*args, "--normal-particles", *files])
    assert code == 0, msgs[-1]
    result = msgs[-1]
    assert result["type"] == "result" and result["kind"] == "prediction" and result["coordinates"] == "LPS"
    assert result == {**json.loads((tmp_path / "out" / worker.RESULT_JSON).read_text()), "type": "result"}
    particles = io.read_particles(result["particles"])
    np.testing.assert_array_equal(particles, pred)  # same image, same bundle, same particles
    # error heatmap: |prediction - ground truth| = |SHIFT| at every particle and every vertex
    err = np.asarray(result["point_arrays"][worker.ERROR_ARRAY])
    np.testing.assert_allclose(err, np.linalg.norm(SHIFT), rtol=1e-9)
    assert result["stats"]["max_error_mm"] == pytest.approx(np.linalg.norm(SHIFT))
    assert result["stats"]["rms_distance_mm"] == pytest.approx(np.linalg.norm(SHIFT))
    assert result["stats"]["rmse_mm"] == pytest.approx(np.abs(SHIFT).mean())  # eq. 12, as `evaluate`
    verts, err_v = _mesh_array(Path(result["mesh"]), worker.ERROR_ARRAY)
    np.testing.assert_allclose(err_v, np.linalg.norm(SHIFT), rtol=1e-6)
    # severity: the worker's score and signed map are those of a PPCA of the normal files
    expected = severity(fit_normal_model(normals), particles[None])
    assert result["severity"] == pytest.approx(float(expected.scores[0]), rel=1e-9)
    signed = np.asarray(result["point_arrays"][worker.SEVERITY_ARRAY])
    np.testing.assert_allclose(signed, expected.signed[0], rtol=1e-9, atol=1e-12)
    # the surface's vertices are the predicted particles (template vertices = mean particles)
    np.testing.assert_allclose(verts, particles, atol=1e-4)
    _, sev_v = _mesh_array(Path(result["mesh"]), worker.SEVERITY_ARRAY)
    np.testing.assert_allclose(sev_v, expected.signed[0], rtol=1e-5, atol=1e-6)


def test_predict_without_normal_particles_has_no_severity(bundle_with_template, tmp_path):
    code, msgs = _run(_predict_args(bundle_with_template, tmp_path))
    assert code == 0, msgs[-1]
    result = msgs[-1]
    assert result["severity"] is None and result["point_arrays"] == {} and result["stats"] == {}
    assert Path(result["mesh"]).is_file()


def _predict_with(monkeypatch, uncertainty=None, ood=None, method="ensemble"):
    """Predictions carry what an uncertainty bundle's do (issue 13 contract): ``uncertainty``
    ``(M,)`` mm (a function of the particle index), ``uncertainty_method``, ``ood``."""
    from DeepSSMLogic.predict import Predictor

    original = Predictor.predict

    def predict(self, *args, **kwargs):
        pred = original(self, *args, **kwargs)
        pred.uncertainty = None if uncertainty is None else uncertainty(len(pred.particles))
        pred.uncertainty_method = method if uncertainty is not None else None
        pred.ood = ood
        return pred

    monkeypatch.setattr(Predictor, "predict", predict)


def test_predict_passes_uncertainty_and_ood_into_the_result(bundle_with_template, tmp_path, monkeypatch):
    ood = {
        "score": 7.25,
        "threshold": 3.0,
        "flag": True,
        "reasons": ["descriptor far from the training shapes"],
        "components": {"mahalanobis": np.float64(7.25), "registration": float("nan")},
    }
    _predict_with(monkeypatch, lambda m: 0.1 + np.arange(m) / m, ood)
    code, msgs = _run(_predict_args(bundle_with_template, tmp_path))
    assert code == 0, msgs[-1]
    result = msgs[-1]
    m = len(io.read_particles(result["particles"]))
    expected = 0.1 + np.arange(m) / m
    np.testing.assert_allclose(result["point_arrays"][worker.UNCERTAINTY_ARRAY], expected)
    assert result["uncertainty"] == {
        "mean_mm": pytest.approx(expected.mean()),
        "max_mm": pytest.approx(expected.max()),
        "method": "ensemble",
    }
    assert result["stats"]["uncertainty_mean_mm"] == pytest.approx(expected.mean())
    # the OOD verdict arrives whole, NaN components as null (the protocol is strict JSON)
    assert result["ood"]["flag"] is True and result["ood"]["score"] == 7.25
    assert result["ood"]["components"] == {"mahalanobis": 7.25, "registration": None}
    assert any("out of distribution" in m.get("message", "") for m in msgs if m["type"] == "log")
    # the surface carries the uncertainty too; its vertices are the particles
    _, unc_v = _mesh_array(Path(result["mesh"]), worker.UNCERTAINTY_ARRAY)
    np.testing.assert_allclose(unc_v, expected, rtol=1e-5)


def test_predict_without_uncertainty_reports_none(bundle_with_template, tmp_path, monkeypatch):
    _predict_with(monkeypatch)  # an older bundle: no uncertainty, no OOD calibration
    code, msgs = _run(_predict_args(bundle_with_template, tmp_path))
    assert code == 0, msgs[-1]
    result = msgs[-1]
    assert result["uncertainty"] is None and result["ood"] is None
    assert worker.UNCERTAINTY_ARRAY not in result["point_arrays"]


def test_nan_uncertainty_is_a_named_error(bundle_with_template, tmp_path, monkeypatch):
    _predict_with(monkeypatch, lambda m: np.where(np.arange(m) == 2, np.nan, 1.0))
    code, msgs = _run(_predict_args(bundle_with_template, tmp_path))
    assert code == 2
    assert msgs[-1]["type"] == "error" and "img.nrrd" in msgs[-1]["message"]
    assert "uncertainty contains NaN" in msgs[-1]["message"]


@pytest.mark.slow
def test_train_path_writes_a_bundle_with_the_trained_weights(tmp_path):
    import torch

    from DeepSSMLogic.synthetic import generate_cohort
    from DeepSSMLogic.training import load_checkpoint

    csv = generate_cohort(
        "femur", 8, tmp_path / "cohort", seed=1, image_size=(24, 24, 24), spacing=3.0, n_particles=32
    )
    out = tmp_path / "model"
    code, msgs = _run(
        [
            "train",
            "--cohort",
            str(csv),
            "--out",
            str(out),
            "--epochs",
            "2",
            "--batch-size",
            "4",
            "--device",
            "cpu",
        ]
    )
    assert code == 0, msgs[-1]
    result = msgs[-1]
    assert result["type"] == "result" and result["kind"] == "training"
    assert Path(result["bundle"]) == out.resolve()
    assert result["summary"]["epochs_run"] == 2 and result["summary"]["n_train_subjects"] >= 3
    epochs = [
        m for m in msgs if m["type"] == "progress" and m.get("metrics", {}).get("val_rmse_mm") is not None
    ]
    assert len(epochs) == 2  # one event per epoch carries its metrics
    b = load_bundle(out)
    best = load_checkpoint(tmp_path / "model.work" / "training" / "checkpoint.pt")["best_state"]
    stored = torch.load(b._files_dir / "weights.pt", weights_only=True)  # float16 where the bundle chose it
    for k, v in b.network.state_dict().items():
        assert torch.equal(v, best[k].to(stored[k].dtype).to(v.dtype)), k


def test_the_workers_training_defaults_are_the_clis_for_the_default_encoder():
    """issue 16: the Slicer module trains light2 with the schedule it was measured with (30 epochs, batch 8)."""
    from DeepSSMLogic.pipeline import TrainingOptions, resolve_epochs

    args = worker.build_parser().parse_args(["train", "--cohort", "c.csv", "--out", "m"])
    assert args.epochs == resolve_epochs("auto", TrainingOptions().encoder)[0] == 30
    assert args.batch_size == TrainingOptions().batch_size == 8
