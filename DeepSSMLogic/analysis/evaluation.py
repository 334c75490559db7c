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
from . import metrics

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
)


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
        w.writerow(
            {k: (f"{v:.6g}" if isinstance(v, float) else ("" if v is None else v)) for k, v in r.items()}
        )
    return buf.getvalue()


def _finite_or_none(v: float) -> float | None:
    return float(v) if v is not None and np.isfinite(v) else None


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

    for subj in image_only:
        pred = predictor.predict(subj.image, name=subj.id)
        io.write_particles(out / "predictions" / f"{subj.id}.particles", pred.particles)
        if warper is not None:
            io.write_mesh(warper.polydata(pred.particles), out / "predictions" / f"{subj.id}.vtk")
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
        res = SubjectResult(
            subj.id,
            subj.group,
            gt,
            pred.particles,
            np.asarray(pred.descriptor),
            row,
            timings=dict(pred.timings),
        )
        io.write_particles(out / "predictions" / f"{subj.id}.particles", pred.particles)
        if warper is not None:
            t0 = time.perf_counter()
            recon = warper.polydata(pred.particles)
            row["mesh_seconds"] = time.perf_counter() - t0
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
                    "predict_seconds",
                )
            }
            for r in results
        ]
    )
    return rep.write()
