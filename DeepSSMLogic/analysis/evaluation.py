"""``deepssm evaluate``: predict a cohort's test split with a bundle and measure it against the
ground truth (paper section 4: RMSE eq. 12, per-point RMSE heatmaps, surface-to-surface distance of
the mesh reconstructed from the predicted particles), then write metrics.json, a per-subject CSV,
the predicted particles and meshes, and an HTML report with its figures.
"""

from __future__ import annotations

import csv
import io as _io
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError, ValidationError
from ..fileutil import atomic_write_json, atomic_write_text
from ..progress import CancelToken, ProgressCallback, ProgressEvent, null_progress
from . import calibration, metrics

PathLike = str | os.PathLike[str]
CSV_COLUMNS = (
    "id",
    "group",
    "rmse_mm",
    "rmse_x_mm",
    "rmse_y_mm",
    "rmse_z_mm",
    "max_point_rmse_mm",
    "surface_mean_mm",
    "surface_gt_to_pred_mm",
    "surface_pred_to_gt_mm",
    "surface_p95_mm",
    "surface_hausdorff_mm",
    "predict_seconds",
    "mesh_seconds",
    "uncertainty_mean_mm",
    "uncertainty_max_mm",
    "uncertainty_spearman",
    "ood_score",
    "ood_flag",
    "ood_reasons",
)
UNCERTAINTY_ARRAY = "uncertainty_mm"  # the point array `deepssm predict --mesh` writes, same name


@dataclass
class SubjectResult:
    id: str
    group: str | None
    gt: np.ndarray
    pred: np.ndarray
    descriptor: np.ndarray
    row: dict[str, Any]
    gt_mesh: tuple[np.ndarray, np.ndarray] | None = None
    gt_to_pred: np.ndarray | None = None
    timings: dict[str, float] = field(default_factory=dict)
    uncertainty: np.ndarray | None = None
    ood: dict[str, Any] | None = None


def prediction_uncertainty(
    prediction: Any, subject: str, n_particles: int
) -> tuple[np.ndarray | None, str | None, dict[str, Any] | None]:
    """The per-particle uncertainty ``(M,)`` mm, its method and the OOD verdict that a
    ``predict.Prediction`` carries (all None for bundles without them). Read with defaults, so
    predictions of older code work; a malformed uncertainty raises InputError naming the subject."""
    unc = getattr(prediction, "uncertainty", None)
    method = getattr(prediction, "uncertainty_method", None)
    ood = getattr(prediction, "ood", None)
    if unc is not None:
        unc = np.asarray(unc, dtype=np.float64)
        if unc.shape != (n_particles,):
            raise InputError(
                f"subject {subject!r}: the prediction's uncertainty has shape {unc.shape}, "
                f"expected ({n_particles},) (one value in mm per particle)"
            )
        if not np.all(np.isfinite(unc)):
            raise InputError(
                f"subject {subject!r}: the predicted uncertainty contains NaN or Inf "
                f"({int((~np.isfinite(unc)).sum())} of {n_particles} particles)"
            )
    if ood is not None and not isinstance(ood, dict):
        raise InputError(f"subject {subject!r}: the OOD verdict is a {type(ood).__name__}, expected a dict")
    return unc, (str(method) if method is not None else None), ood


def _ood_row(ood: dict[str, Any] | None) -> dict[str, Any]:
    if ood is None:
        return {}
    return {
        "ood_score": _finite_or_none(ood.get("score")),
        "ood_flag": bool(ood.get("flag")),
        "ood_reasons": "; ".join(str(r) for r in (ood.get("reasons") or [])),
    }


def read_training_history(bundle: Any, train_log: PathLike | None = None) -> tuple[list[dict[str, Any]], str]:
    """The per-epoch training records and where they came from: ``train_log`` if given, else the
    bundle's ``train_log.jsonl`` or the one in its work directory (``MODEL.work/training``), else
    a ``history`` list in the bundle's training summary; ``([], "")`` when none exists."""
    candidates: list[Path] = []
    if train_log is not None:
        p = Path(train_log)
        if not p.is_file():
            raise InputError(f"training log not found: {p}")
        candidates.append(p)
    else:
        src = Path(bundle.path)
        candidates += [
            src / "train_log.jsonl",
            src.with_name(src.name.removesuffix(".zip") + ".work") / "training" / "train_log.jsonl",
        ]
    for p in candidates:
        if p.is_file():
            rows = []
            for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"{p}:{n}: not a JSON object per line ({e.msg})") from None
                if isinstance(row, dict):
                    rows.append(row)
            return rows, str(p)
    hist = (bundle.meta.get("training_summary") or {}).get("history")
    if isinstance(hist, list) and hist:
        return [r for r in hist if isinstance(r, dict)], "model.json training_summary"
    return [], ""


def _csv_text(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    buf = _io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _csv_cell(v) for k, v in r.items()})
    return buf.getvalue()


def _csv_cell(v: Any) -> Any:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else v


_finite_or_none = calibration.finite_or_none


def _write_uncertainty(out: Path, subject: str, uncertainty: np.ndarray) -> None:
    """``predictions/<id>.uncertainty.csv``: the predicted uncertainty per particle (mm), in the
    order of ``<id>.particles``."""
    atomic_write_text(
        out / "predictions" / f"{subject}.uncertainty.csv",
        "uncertainty_mm\n" + "".join(f"{v:.6g}\n" for v in uncertainty),
    )


def _add_point_array(mesh: Any, particles: np.ndarray, values: np.ndarray, name: str) -> None:
    """Per-particle ``values`` interpolated onto the mesh vertices as point array ``name``."""
    from vtk.util import numpy_support as ns

    from ..mesh import interpolate_to_vertices

    verts = ns.vtk_to_numpy(mesh.GetPoints().GetData()).astype(np.float64)
    arr = ns.numpy_to_vtk(interpolate_to_vertices(particles, values, verts), deep=True)
    arr.SetName(name)
    mesh.GetPointData().AddArray(arr)


def evaluate_model(
    model: PathLike,
    cohort: PathLike,
    out_dir: PathLike,
    splits: Sequence[str] = ("test",),
    device: str = "auto",
    align: bool = True,
    train_log: PathLike | None = None,
    batch_size: int = 4,
    render: bool = True,
    progress: ProgressCallback = null_progress,
    cancel: CancelToken | None = None,
) -> dict[str, Any]:
    """Evaluate the bundle ``model`` on the ``splits`` subjects of ``cohort``; writes into
    ``out_dir`` and returns the metrics.json content (all distances in mm)."""
    from .. import io
    from ..bundle import load_bundle
    from ..cohort import Cohort, load_cohort, particles_in_image_space
    from ..mesh import MeshWarper, surface_distance
    from ..predict import Predictor

    t_start = time.perf_counter()
    out = Path(out_dir)
    bundle = load_bundle(model)
    coh = cohort if isinstance(cohort, Cohort) else load_cohort(cohort)
    subjects = coh.by_split(*splits)
    if not subjects:
        raise InputError(
            f"{coh.source}: no subjects in split(s) {', '.join(splits)} (counts: {coh.split_counts()}); "
            "evaluation needs held-out subjects with images and ground-truth particles"
        )
    problems = [f"subject {s.id!r}: no image" for s in subjects if s.image is None]
    # image-only rows (ShapeWorks' inference rows) are predicted and written, but have no metrics
    image_only = [s for s in subjects if s.particles is None]
    subjects = [s for s in subjects if s.particles is not None]
    if not subjects:
        problems.append("no subject has ground-truth particles (for predictions only, use `deepssm predict`)")
    if problems:
        raise ValidationError(f"{coh.source}: cannot evaluate the {'/'.join(splits)} subjects", problems)

    predictor = Predictor(bundle, device=device, align=align)
    template_particles = (
        bundle.template_particles if bundle.template_particles is not None else bundle.mean_particles
    )
    warper = None
    if bundle.template_mesh_path is not None:
        t0 = time.perf_counter()
        warper = MeshWarper.from_polydata(io.read_mesh(bundle.template_mesh_path), template_particles)
        t_warper = time.perf_counter() - t0
    else:
        t_warper = 0.0

    ood_image_only: dict[str, dict[str, Any] | None] = {}
    for subj in image_only:
        pred = predictor.predict(subj.image, name=subj.id)
        unc, _method, ood_image_only[subj.id] = prediction_uncertainty(pred, subj.id, pred.particles.shape[0])
        io.write_particles(out / "predictions" / f"{subj.id}.particles", pred.particles)
        if unc is not None:
            _write_uncertainty(out, subj.id, unc)
        if warper is not None:
            mesh = warper.polydata(pred.particles)
            if unc is not None:
                _add_point_array(mesh, pred.particles, unc, UNCERTAINTY_ARRAY)
            io.write_mesh(mesh, out / "predictions" / f"{subj.id}.vtk")
    methods: set[str | None] = set()
    n = len(subjects)
    results: list[SubjectResult] = []
    t_pred_total = 0.0
    for i, subj in enumerate(subjects):
        if cancel is not None:
            cancel.check()
        progress(ProgressEvent("evaluate", i, n, f"predicting {subj.id}"))
        t0 = time.perf_counter()
        pred = predictor.predict(subj.image, name=subj.id)
        t_pred = time.perf_counter() - t0
        t_pred_total += t_pred
        gt = particles_in_image_space(subj)  # where the prediction from this image lands
        if gt.shape != pred.particles.shape:
            raise InputError(
                f"{subj.particles}: {gt.shape[0]} ground-truth particles, but the model predicts {pred.particles.shape[0]}"
            )
        per_axis = metrics.rmse_per_axis(pred.particles, gt)
        row: dict[str, Any] = {
            "id": subj.id,
            "group": subj.group,
            "rmse_mm": float(per_axis.mean()),
            "rmse_x_mm": float(per_axis[0]),
            "rmse_y_mm": float(per_axis[1]),
            "rmse_z_mm": float(per_axis[2]),
            "max_point_rmse_mm": float(metrics.per_point_rmse(pred.particles, gt).max()),
            "predict_seconds": t_pred,
        }
        unc, method, ood = prediction_uncertainty(pred, subj.id, gt.shape[0])
        if unc is not None:
            methods.add(method)
            row.update(uncertainty_mean_mm=float(unc.mean()), uncertainty_max_mm=float(unc.max()))
        row.update(_ood_row(ood))
        res = SubjectResult(
            subj.id,
            subj.group,
            gt,
            pred.particles,
            np.asarray(pred.descriptor),
            row,
            timings=dict(pred.timings),
            uncertainty=unc,
            ood=ood,
        )
        io.write_particles(out / "predictions" / f"{subj.id}.particles", pred.particles)
        if unc is not None:
            _write_uncertainty(out, subj.id, unc)
        if warper is not None:
            t0 = time.perf_counter()
            recon = warper.polydata(pred.particles)
            row["mesh_seconds"] = time.perf_counter() - t0
            if unc is not None:
                _add_point_array(recon, pred.particles, unc, UNCERTAINTY_ARRAY)
            io.write_mesh(recon, out / "predictions" / f"{subj.id}.vtk")
            if subj.mesh is not None:
                gt_mesh = io.arrays_from_polydata(io.read_mesh(subj.mesh))
                sd = surface_distance(gt_mesh, recon)
                row.update(
                    surface_mean_mm=sd.mean,
                    surface_gt_to_pred_mm=sd.mean_a_to_b,
                    surface_pred_to_gt_mm=sd.mean_b_to_a,
                    surface_p95_mm=sd.p95,
                    surface_hausdorff_mm=sd.hausdorff,
                )
                res.gt_mesh = gt_mesh
                res.gt_to_pred = sd.a_to_b
        results.append(res)
    progress(ProgressEvent("evaluate", n, n, "metrics"))

    gt_all = np.stack([r.gt for r in results])
    pred_all = np.stack([r.pred for r in results])
    pp_mean, pp_std = metrics.per_point_rmse_stats(pred_all, gt_all)
    rows = [r.row for r in results]
    summary: dict[str, Any] = {
        "model": str(Path(model)),
        "descriptor_kind": bundle.descriptor_kind,
        "cohort": str(coh.source),
        "splits": list(splits),
        "n_subjects": n,
        "frame": {"name": coh.frame, "reason": coh.frame_reason},
        "predicted_without_ground_truth": [s.id for s in image_only],
        "rmse_mm": metrics.summarize([r["rmse_mm"] for r in rows]),
        "rmse_pooled_mm": float(metrics.rmse(pred_all.reshape(-1, 3), gt_all.reshape(-1, 3))),
        "per_point_rmse_mm": {
            "mean_over_points_of_mean": float(pp_mean.mean()),
            "max_over_points_of_mean": float(pp_mean.max()),
            "mean_over_points_of_std": float(pp_std.mean()),
        },
        "surface_mesh": "template warp (thin-plate spline) of the bundle's template mesh"
        if warper
        else "none: the bundle has no template mesh",
    }
    for key in ("surface_mean_mm", "surface_p95_mm", "surface_hausdorff_mm"):
        vals = [r[key] for r in rows if key in r]
        if vals:
            summary[key] = metrics.summarize(vals)
    groups = sorted({r.group for r in results if r.group is not None})
    if len(groups) > 1:
        summary["rmse_by_group_mm"] = {
            g: metrics.summarize([r.row["rmse_mm"] for r in results if r.group == g]) for g in groups
        }
    stage_keys = sorted({k for r in results for k in r.timings})
    summary["timings_s"] = {
        "template_warper_setup": t_warper,
        "predict_per_subject_mean": t_pred_total / n,
        **{f"predict_{k}_mean": float(np.mean([r.timings.get(k, 0.0) for r in results])) for k in stage_keys},
        "mesh_per_subject_mean": _finite_or_none(
            np.mean([r.row.get("mesh_seconds", np.nan) for r in results])
        )
        if warper
        else None,
        "total": 0.0,
    }
    summary["calibration"] = _calibration_section(results, methods)
    summary["ood"] = calibration.ood_summary({r.id: r.ood for r in results})
    if summary["ood"]["available"] and ood_image_only:
        summary["ood"]["predicted_without_ground_truth"] = calibration.ood_summary(ood_image_only)
    history, history_source = read_training_history(bundle, train_log)
    summary["training_history"] = {"source": history_source, "epochs": len(history)}

    atomic_write_text(
        out / "per_point_rmse.csv",
        "x,y,z,mean_mm,std_mm\n"
        + "".join(
            f"{p[0]:.6g},{p[1]:.6g},{p[2]:.6g},{m:.6g},{sd:.6g}\n"
            for p, m, sd in zip(template_particles, pp_mean, pp_std)
        ),
    )
    atomic_write_text(out / "subjects.csv", _csv_text(rows, CSV_COLUMNS))
    if render:
        progress(ProgressEvent("evaluate", n, n, "figures"))
        _write_report(
            out,
            bundle,
            warper,
            template_particles,
            results,
            pp_mean,
            pp_std,
            history,
            history_source,
            summary,
        )
    summary["timings_s"]["total"] = time.perf_counter() - t_start
    summary["subjects"] = [{k: _json_value(v) for k, v in r.items()} for r in rows]
    atomic_write_json(out / "metrics.json", summary)
    return summary


def _calibration_section(results: list[SubjectResult], methods: set[str | None]) -> dict[str, Any]:
    """metrics.json "calibration": predicted vs actual per-particle error over the subjects that
    carry an uncertainty; also fills each row's ``uncertainty_spearman``."""
    with_unc = [r for r in results if r.uncertainty is not None]
    if not with_unc:
        return calibration.no_uncertainty(
            "the model bundle predicts none (train with an uncertainty method to get it)"
        )
    if len(with_unc) != len(results):
        missing = [r.id for r in results if r.uncertainty is None]
        raise InputError(f"predictions of subjects {missing} carry no uncertainty, the others do")
    section = calibration.calibration_summary(
        [r.id for r in results],
        [r.uncertainty for r in results],
        [np.linalg.norm(r.pred - r.gt, axis=1) for r in results],
        [r.row["rmse_mm"] for r in results],
        method=", ".join(sorted(m or "unnamed" for m in methods)),
    )
    for r in results:
        r.row["uncertainty_spearman"] = section["particle_spearman_per_subject"]["values"][r.id]
    return section


def _json_value(v: Any) -> Any:
    if isinstance(v, float | np.floating):
        return float(v) if np.isfinite(v) else None
    return v


def _write_report(
    out: Path,
    bundle: Any,
    warper: Any,
    template_particles: np.ndarray,
    results: list[SubjectResult],
    pp_mean: np.ndarray,
    pp_std: np.ndarray,
    history: list[dict[str, Any]],
    history_source: str,
    summary: dict[str, Any],
) -> Path:
    from ..mesh import interpolate_to_vertices
    from . import plots
    from .render import MeshView, render_meshes
    from .report import Report

    fig_dir = out / "figures"
    rep = Report(f"DeepSSM evaluation — {Path(summary['model']).name}", out)
    rep.paragraph(
        f"Model {summary['model']} ({summary['descriptor_kind']} descriptor) on {summary['n_subjects']} "
        f"subject(s) of split {', '.join(summary['splits'])} from {summary['cohort']}. Distances in mm. "
        "RMSE is paper eq. 12 (mean of the per-axis RMSEs); the per-point RMSE is sqrt(|ΔC_i|²/3)."
    )
    rep.heading("Summary")
    kv: dict[str, Any] = {
        "RMSE mean ± std (mm)": f"{summary['rmse_mm']['mean']:.3f} ± {summary['rmse_mm']['std']:.3f}",
        "RMSE median (mm)": summary["rmse_mm"]["median"],
    }
    for key, label in (
        ("surface_mean_mm", "surface distance, symmetric mean"),
        ("surface_p95_mm", "surface distance, 95th percentile"),
        ("surface_hausdorff_mm", "Hausdorff distance"),
    ):
        if key in summary:
            kv[f"{label} (mm, mean ± std over subjects)"] = (
                f"{summary[key]['mean']:.3f} ± {summary[key]['std']:.3f}"
            )
    kv["prediction time per subject (s)"] = summary["timings_s"]["predict_per_subject_mean"]
    if summary["timings_s"].get("mesh_per_subject_mean") is not None:
        kv["mesh reconstruction per subject (s)"] = summary["timings_s"]["mesh_per_subject_mean"]
    rep.key_values(kv)

    rep.heading("Training curves")
    if history:
        rep.figure(
            plots.training_curves(history, fig_dir / "training_curves.png"),
            f"Per-epoch training records from {history_source}.",
        )
    else:
        rep.paragraph(
            "No training history found (no train_log.jsonl next to the bundle or in MODEL.work/training; pass --train-log).",
            note=True,
        )

    rep.heading("Error distribution (paper Fig. 6)")
    box = {"RMSE": [r.row["rmse_mm"] for r in results]}
    for key, label in (
        ("surface_mean_mm", "surface mean"),
        ("surface_p95_mm", "surface p95"),
        ("surface_hausdorff_mm", "Hausdorff"),
    ):
        vals = [r.row[key] for r in results if key in r.row]
        if vals:
            box[label] = vals
    rep.figure(
        plots.box_plot(box, fig_dir / "error_boxplot.png", "mm", "Per-subject errors (test set)"),
        "Boxes: quartiles and median (orange); dashed green: mean.",
    )

    rep.heading("Per-point RMSE on the mean shape (paper Fig. 4)")
    if warper is not None:
        verts, tris = warper.warp(template_particles), warper.triangles
        mean_v = interpolate_to_vertices(template_particles, pp_mean, verts)
        std_v = interpolate_to_vertices(template_particles, pp_std, verts)
    else:
        verts, tris, mean_v, std_v = template_particles, None, pp_mean, pp_std
    for name, values, label in (
        ("mean", mean_v, "mean over the test set"),
        ("std", std_v, "standard deviation"),
    ):
        panels = [
            MeshView(verts, tris, values, f"{view}", camera=view)
            for view in ("anterior", "left", "posterior", "superior")
        ]
        png = render_meshes(
            panels,
            fig_dir / f"per_point_rmse_{name}.png",
            cmap="viridis",
            scalar_title="mm",
            value_range=(0.0, float(max(np.max(values), 1e-6))),
            title=f"Per-point RMSE: {label}",
        )
        rep.figure(png, f"Per-point RMSE ({label}) on the model's mean shape, four views.")

    rep.heading("Best, median and worst subjects (paper Fig. 5/8/11)")
    key = "surface_mean_mm" if all("surface_mean_mm" in r.row for r in results) else "rmse_mm"
    order = np.argsort([r.row[key] for r in results])
    picks = [("best", order[0]), ("median", order[len(order) // 2]), ("worst", order[-1])]
    value_range: tuple[float, float] | None
    if all(r.gt_mesh is not None for r in results):
        shown = [(results[i].gt_mesh[0], results[i].gt_mesh[1], results[i].gt_to_pred) for _, i in picks]
        value_range = (0.0, max(max(float(values.max()) for _, _, values in shown), 1e-6))
        title = f"Surface distance, ground truth → reconstruction (ranked by {key})"
        caption = "Each ground-truth mesh coloured by its distance to the mesh reconstructed from the predicted particles."
    else:
        shown = [
            (results[i].gt, None, metrics.per_point_rmse(results[i].pred, results[i].gt)) for _, i in picks
        ]
        value_range = None
        title = "Per-point RMSE (no ground-truth meshes)"
        caption = "Ground-truth particles coloured by per-point RMSE."
    panels = [
        MeshView(verts, tris, values, f"{name}: {results[i].id}")
        for (name, i), (verts, tris, values) in zip(picks, shown, strict=True)
    ]
    rep.figure(
        render_meshes(
            panels,
            fig_dir / "best_median_worst.png",
            cmap="inferno",
            value_range=value_range,
            scalar_title="mm",
            title=title,
        ),
        caption,
    )
    rep.table(
        [
            {
                "rank": name,
                **{
                    k: results[i].row.get(k)
                    for k in ("id", "rmse_mm", "surface_mean_mm", "surface_hausdorff_mm")
                },
            }
            for name, i in picks
        ]
    )

    _report_calibration(rep, fig_dir, results, summary["calibration"])
    _report_ood(rep, summary["ood"])

    rep.heading("Timings")
    rep.key_values({k: v for k, v in summary["timings_s"].items() if v is not None and k != "total"})
    rep.heading("Subjects")
    rep.paragraph(
        "Per-subject values are also in subjects.csv; predicted particles and meshes in predictions/.",
        note=True,
    )
    rep.table(
        [
            {
                k: r.row.get(k)
                for k in (
                    "id",
                    "group",
                    "rmse_mm",
                    "surface_mean_mm",
                    "surface_p95_mm",
                    "surface_hausdorff_mm",
                    *(
                        ("uncertainty_mean_mm", "uncertainty_spearman")
                        if summary["calibration"]["available"]
                        else ()
                    ),
                    *(("ood_score", "ood_flag") if summary["ood"]["available"] else ()),
                    "predict_seconds",
                )
            }
            for r in results
        ]
    )
    return rep.write()


def _rho_text(result: dict[str, Any]) -> str:
    if result["rho"] is None:
        return f"– ({result['reason']})"
    return f"{result['rho']:.3f} (n = {result['n']})"


def _report_calibration(rep: Any, fig_dir: Path, results: list[SubjectResult], cal: dict[str, Any]) -> None:
    """ "Uncertainty calibration": Spearman ρ pooled / per subject / per-subject mean vs RMSE, the
    reliability plot and the per-subject scatter."""
    from . import plots

    rep.heading("Uncertainty calibration")
    if not cal["available"]:
        rep.paragraph(f"{cal['reason'].capitalize()}.", note=True)
        return
    per = cal["particle_spearman_per_subject"]
    rep.paragraph(
        f"Predicted per-particle uncertainty (method: {cal['method']}) against the actual error, the "
        f"{cal['error_definition']}. Spearman ρ near 1: the uncertainty ranks particles and subjects "
        "by their actual error; near 0: it does not."
    )
    rep.key_values(
        {
            "ρ per particle, pooled over subjects": _rho_text(cal["particle_spearman_pooled"]),
            "ρ per particle within a subject, median": "–"
            if per["median"] is None
            else f"{per['median']:.3f} ({per['n_defined']} of {cal['n_subjects']} subjects defined)",
            "ρ per subject: mean uncertainty vs RMSE": _rho_text(
                cal["subject_spearman_mean_uncertainty_vs_rmse"]
            ),
            "mean predicted uncertainty (mm)": cal["mean_uncertainty_mm"],
            "mean actual error (mm)": cal["mean_error_mm"],
        }
    )
    rep.figure(
        plots.reliability_plot(cal["reliability"]["bins"], fig_dir / "uncertainty_reliability.png"),
        f"Reliability: {cal['reliability']['binning']}; mean actual error per bin against the bin's mean "
        "predicted uncertainty (numbers: particles per bin). Above the dashed identity line the model is "
        "over-confident, below it under-confident.",
    )
    rep.figure(
        plots.scatter_plot(
            np.array([cal["per_subject_mean_uncertainty_mm"][r.id] for r in results]),
            np.array([r.row["rmse_mm"] for r in results]),
            fig_dir / "uncertainty_vs_rmse.png",
            "mean predicted uncertainty (mm)",
            "RMSE (mm)",
            "Per subject: uncertainty vs error",
        ),
        "One point per subject.",
    )
    if per["reasons"]:
        rep.paragraph(
            "Undefined per-subject ρ: " + "; ".join(f"{k}: {v}" for k, v in per["reasons"].items()),
            note=True,
        )


def _report_ood(rep: Any, ood: dict[str, Any]) -> None:
    """ "Out-of-distribution check": flag rate and the flagged images with their reasons."""
    rep.heading("Out-of-distribution check")
    if not ood["available"]:
        rep.paragraph(f"{ood['reason'].capitalize()}.", note=True)
        return
    rep.key_values(
        {
            "images checked": ood["n_checked"],
            "flagged out of distribution": f"{ood['n_flagged']} ({100 * ood['flag_rate']:.1f} %)",
            "threshold (score)": ood["threshold"],
        }
    )
    if ood["flagged"]:
        rep.table(
            [
                {
                    "id": f["id"],
                    "score": f["score"],
                    "threshold": f["threshold"],
                    "reasons": "; ".join(f["reasons"]),
                }
                for f in ood["flagged"]
            ]
        )
    else:
        rep.paragraph("No evaluated image was flagged.", note=True)
    extra = ood.get("predicted_without_ground_truth")
    if extra and extra.get("available"):
        rep.paragraph(
            f"Images without ground truth: {extra['n_flagged']} of {extra['n_checked']} flagged"
            + (": " + ", ".join(f["id"] for f in extra["flagged"]) if extra["flagged"] else "."),
        )
