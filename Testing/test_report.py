"""Offscreen renders, plots, the HTML report and the evaluate/analyze commands (exit codes, files)."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from helpers_analysis import png_has_content, sphere_points, write_particle_cohort

from DeepSSMLogic import io
from DeepSSMLogic.analysis import plots
from DeepSSMLogic.analysis.render import MeshView, render_mesh, render_meshes
from DeepSSMLogic.analysis.report import Report
from DeepSSMLogic.cli import main
from DeepSSMLogic.errors import InputError


def sphere_mesh():
    import vtk

    from DeepSSMLogic.io import arrays_from_polydata

    src = vtk.vtkSphereSource()
    src.SetRadius(10)
    src.SetThetaResolution(32)
    src.SetPhiResolution(16)
    src.Update()
    return arrays_from_polydata(src.GetOutput())


def test_render_heatmap_with_colour_bar(tmp_path):
    from PIL import Image

    v, t = sphere_mesh()
    png = render_mesh(v, t, v[:, 2], tmp_path / "heat.png", cmap="viridis", title="heat")
    assert png_has_content(png, 0.05)
    arr = np.asarray(Image.open(png).convert("RGB"))
    # a heatmap: many distinct colours on the surface, and the colour bar strip on the right is drawn
    assert len(np.unique(arr.reshape(-1, 3), axis=0)) > 50
    bar = arr[:, -100:, :]
    assert np.any(np.abs(bar.astype(int) - 255).sum(-1) > 60)


def test_render_panels_points_and_validation(tmp_path):
    v, t = sphere_mesh()
    p = sphere_points(80)
    png = render_meshes(
        [MeshView(v, t, None, "plain"), MeshView(p, None, p[:, 0], "points", camera="left")],
        tmp_path / "panels.png",
        symmetric=True,
    )
    assert png_has_content(png)
    with pytest.raises(InputError, match="camera"):
        render_meshes([MeshView(v, t)], tmp_path / "x.png", camera="sideways")
    with pytest.raises(InputError, match="scalars"):
        render_meshes([MeshView(v, t, np.zeros(3))], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_plots_have_content(tmp_path):
    history = [
        {"stage": "autoencoder", "epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e} for e in range(1, 6)
    ]
    history += [
        {"stage": "joint", "epoch": e, "train_loss": 0.1 / e, "val_rmse_mm": 2 / e, "best": True}
        for e in range(1, 4)
    ]
    assert png_has_content(plots.training_curves(history, tmp_path / "curves.png"))
    assert png_has_content(plots.box_plot({"RMSE": [1, 2, 3], "surface": [0.5, 0.7]}, tmp_path / "box.png"))
    assert png_has_content(
        plots.roc_plot(np.array([0, 0.5, 1]), np.array([0, 0.9, 1]), 0.8, tmp_path / "roc.png")
    )
    assert png_has_content(
        plots.scatter_plot(np.arange(5), np.arange(5), tmp_path / "sc.png", "a", "b", groups=list("aabbb"))
    )
    with pytest.raises(InputError, match="empty"):
        plots.training_curves([], tmp_path / "none.png")


def test_report_html_references_its_figures_relatively(tmp_path):
    v, t = sphere_mesh()
    png = render_mesh(v, t, v[:, 0], tmp_path / "figures" / "a.png")
    rep = Report("Test <report>", tmp_path)
    rep.heading("Section")
    rep.paragraph("text & more")
    rep.table([{"name": "x", "value": 1.23456}])
    rep.figure(png, "caption")
    out = rep.write()
    html = out.read_text()
    assert "Test &lt;report&gt;" in html and "text &amp; more" in html and "1.235" in html
    assert 'src="figures/a.png"' in html
    with pytest.raises(InputError, match="inside the report folder"):
        rep.figure(Path(__file__), "outside")
    with pytest.raises(InputError, match="does not exist"):
        rep.figure(tmp_path / "missing.png")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # atomic: no leftovers


def _referenced_images(html_path: Path) -> list[Path]:
    html = html_path.read_text()
    return [html_path.parent / m for m in re.findall(r'<img src="([^"]+)"', html)]


@pytest.mark.slow
def test_analyze_cli_on_ground_truth_particles(tmp_path, capsys):
    cohort = write_particle_cohort(tmp_path / "cohort")
    out = tmp_path / "out"
    rc = main(
        [
            "analyze",
            str(cohort),
            "--out",
            str(out),
            "--normal-group",
            "normal",
            "--permutations",
            "1000",
            "--k",
            "3",
            "--quiet",
        ]
    )
    assert rc == 0
    assert "severity AUC" in capsys.readouterr().out
    result = json.loads((out / "analysis.json").read_text())
    assert result["groups"] == {"bump": 12, "normal": 14}
    assert result["severity"]["auc"] > 0.9 and result["severity"]["pearson"] > 0.8
    gd = result["group_differences"][0]
    assert gd["points_fdr_lt_0.05"] > 0
    # both statistics are reported. Here the bump group's heights spread 1-3 mm along the very
    # direction of the difference, which inflates the pooled covariance: the point-wise T² (3 df)
    # reaches uncorrected p < 0.05 at the bump but not FDR < 0.05 over 120 points (measured min
    # p_fdr 0.06), while the global T² on PCA scores is decisive
    assert 0 < gd["hotelling_points_p_lt_0.05"] < gd["n_points"] // 2
    assert gd["hotelling_global_p_permutation"] < 0.01 and gd["hotelling_global_p_f"] < 0.01
    assert result["latent_swim"]["lambdas"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert all(r["accuracy"] > r["chance"] for r in result["classifier"]["results"].values())
    images = _referenced_images(out / "report.html")
    names = {p.name for p in images}
    assert {
        "severity_roc.png",
        "severity_scatter.png",
        "severity_pointwise.png",
        "latent_swim.png",
        "classifier_accuracy.png",
        "group_hotelling_bump.png",
        "group_pvalues_bump.png",
    } <= names
    assert all(png_has_content(p) for p in images)
    lines = (out / "subjects.csv").read_text().splitlines()
    assert lines[0].startswith("id,split,group,severity_score") and len(lines) == 27


def test_analyze_cli_errors_exit_2(tmp_path, capsys):
    cohort = write_particle_cohort(tmp_path / "cohort", mesh=False)
    rc = main(["analyze", str(cohort), "--out", str(tmp_path / "o"), "--normal-group", "control", "--quiet"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "'control'" in err and "bump" in err
    assert main(["analyze", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert main(["analyze", str(cohort), "--out", str(tmp_path / "o"), "--permutations", "0"]) == 2
    assert not (tmp_path / "o" / "analysis.json").exists()


def test_evaluate_cli_missing_model_exit_2(tmp_path, capsys):
    cohort = write_particle_cohort(tmp_path / "cohort", mesh=False)
    rc = main(["evaluate", str(tmp_path / "no-model"), str(cohort), "--out", str(tmp_path / "o"), "--quiet"])
    assert rc == 2
    assert "no-model" in capsys.readouterr().err


@pytest.mark.slow
def test_evaluate_cli_end_to_end(tmp_path, tmp_path_factory, capsys):
    from helpers_analysis import trained_cranium_bundle

    # shares the bundle with test_analysis.py when both run in one session (same base temp)
    root = tmp_path_factory.getbasetemp() / "cranium-bundle"
    cohort, model = trained_cranium_bundle(root)
    out = tmp_path / "eval"
    rc = main(
        ["evaluate", str(model), str(cohort), "--out", str(out), "--no-align", "--device", "cpu", "--quiet"]
    )
    assert rc == 0
    assert "RMSE" in capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text())
    n_test = m["n_subjects"]
    assert n_test >= 3 and len(m["subjects"]) == n_test
    # each subject's reported RMSE is paper eq. 12 between its written prediction and its ground truth,
    # and the model beats predicting the training mean shape (measured 0.28 vs 0.75 mm; criterion 0.6×)
    from DeepSSMLogic.analysis.metrics import rmse
    from DeepSSMLogic.bundle import load_bundle
    from DeepSSMLogic.cohort import load_cohort

    truth = {s.id: io.read_particles(s.particles) for s in load_cohort(cohort).subjects}
    mean_shape = load_bundle(model).mean_particles
    written = {
        s["id"]: io.read_particles(out / "predictions" / f"{s['id']}.particles") for s in m["subjects"]
    }
    for s in m["subjects"]:
        assert s["rmse_mm"] == pytest.approx(rmse(written[s["id"]], truth[s["id"]]), rel=1e-6)
    baseline = np.mean([rmse(mean_shape, truth[sid]) for sid in written])
    assert m["rmse_mm"]["mean"] == pytest.approx(np.mean([s["rmse_mm"] for s in m["subjects"]]))
    assert m["rmse_mm"]["mean"] < 0.6 * baseline
    assert 0 < m["surface_mean_mm"]["mean"] < 10
    assert m["training_history"]["epochs"] > 0
    assert len((out / "subjects.csv").read_text().splitlines()) == n_test + 1
    assert len(list((out / "predictions").glob("*.vtk"))) == n_test
    names = {p.name for p in _referenced_images(out / "report.html")}
    assert {
        "training_curves.png",
        "error_boxplot.png",
        "per_point_rmse_mean.png",
        "per_point_rmse_std.png",
        "best_median_worst.png",
    } <= names
    assert all(png_has_content(p) for p in _referenced_images(out / "report.html"))


@pytest.mark.slow
def test_analyze_cli_with_a_tl_model_uses_its_latent_space(tmp_path):
    from helpers_analysis import untrained_tl_bundle

    from DeepSSMLogic import synthetic

    cohort = synthetic.generate_cohort(
        "cranium",
        12,
        tmp_path / "cohort",
        seed=3,
        image_size=(16, 16, 16),
        spacing=8.0,
        n_particles=128,
        split=(0.6, 0.0, 0.4),
    )
    model = untrained_tl_bundle(cohort, tmp_path / "tl-model")
    out = tmp_path / "out"
    rc = main(
        [
            "analyze",
            str(cohort),
            "--model",
            str(model),
            "--out",
            str(out),
            "--no-align",
            "--device",
            "cpu",
            "--permutations",
            "50",
            "--k",
            "3",
            "--quiet",
        ]
    )
    assert rc == 0
    result = json.loads((out / "analysis.json").read_text())
    assert result["particles"].startswith("predicted by")
    assert result["latent_swim"]["space"].startswith("TL-DeepSSM latent")
    assert result["mesh_template"] == "the model's template mesh"
    names = set(result["classifier"]["results"])
    assert any(n.startswith("TL-DeepSSM latent") for n in names) and any(
        n.startswith("ground-truth PDM") for n in names
    )
    assert all(png_has_content(p) for p in _referenced_images(out / "report.html"))
