"""``deepssm analyze``: the paper's downstream tasks on a labelled cohort — severity (PPCA of the
normal group, eq. 13-15), group differences (point-wise and global Hotelling T², and the norm of the
mean difference, with permutation tests), a latent swim between group
means and the descriptor classifier (Table 3 protocol) — on ground-truth particles, or on the
particles and descriptors predicted by a model bundle. Writes analysis.json, subjects.csv and an
HTML report with its figures.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..fileutil import atomic_write_json, atomic_write_text
from ..progress import CancelToken, ProgressCallback, ProgressEvent, null_progress
from . import classifier, groups, metrics, severity, swim

PathLike = str | os.PathLike[str]


@dataclass
class _Data:
    subjects: list[Any]
    labels: list[str | None]
    particles: np.ndarray  # (N, M, 3) analysed particles (ground truth or predicted)
    gt_particles: np.ndarray | None  # (N, M, 3) when every subject has ground truth
    descriptors: np.ndarray | None  # (N, K) predicted descriptors (with a model)
    descriptor_kind: str | None
    source: str  # "ground truth" | "predicted by MODEL"


def _label(subject: Any, column: str) -> str | None:
    value = subject.group if column == "group" else subject.metadata.get(column)
    value = None if value is None else str(value).strip()
    return value or None


def _float_or_nan(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def _template(data: _Data, bundle: Any) -> tuple[Any, str]:
    """A MeshWarper for the analysed frame: the bundle's template, else the mesh of the subject
    closest to the mean (ShapeWorks' choice), else None (particles are drawn as points)."""
    from .. import io
    from ..mesh import MeshWarper

    if bundle is not None and bundle.template_mesh_path is not None:
        tp = bundle.template_particles if bundle.template_particles is not None else bundle.mean_particles
        return MeshWarper.from_polydata(
            io.read_mesh(bundle.template_mesh_path), tp
        ), "the model's template mesh"
    mean = data.particles.mean(axis=0)
    dist = np.sqrt(((data.particles - mean) ** 2).sum(-1).mean(-1))
    for i in np.argsort(dist):
        s = data.subjects[int(i)]
        if s.mesh is not None:
            own = data.gt_particles[int(i)] if data.gt_particles is not None else data.particles[int(i)]
            return MeshWarper.from_polydata(
                io.read_mesh(s.mesh), own
            ), f"the mesh of {s.id} (closest to the mean)"
    return None, "none (no meshes): particles drawn as points"


def _surface(warper: Any, particles: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    if warper is None:
        return particles, None
    return warper.warp(particles), warper.triangles


def _normals(warper: Any, particles: np.ndarray) -> np.ndarray:
    from ..mesh import estimate_point_normals, normals_at_points

    if warper is None:
        return estimate_point_normals(particles)
    verts, tris = _surface(warper, particles)
    return normals_at_points(particles, verts, tris)


def _on_surface(
    warper: Any, particles: np.ndarray, values: np.ndarray
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    from ..mesh import interpolate_to_vertices

    verts, tris = _surface(warper, particles)
    return verts, tris, (interpolate_to_vertices(particles, values, verts) if tris is not None else values)


def _load(
    cohort: PathLike,
    model: PathLike | None,
    label_column: str,
    device: str,
    align: bool,
    progress: ProgressCallback,
    cancel: CancelToken | None,
) -> tuple[_Data, Any]:
    from ..cohort import Cohort, load_cohort

    coh = cohort if isinstance(cohort, Cohort) else load_cohort(cohort, check_images=model is not None)
    subjects = list(coh.subjects)
    bundle = None
    if model is None:
        missing = [s.id for s in subjects if s.particles is None]
        if missing:
            raise InputError(
                f"{coh.source}: analysis of ground-truth shapes needs particles for every subject; "
                f"missing for {', '.join(missing[:10])}{' …' if len(missing) > 10 else ''} (or pass --model)"
            )
        parts = coh.particles(subjects)
        data = _Data(
            subjects, [_label(s, label_column) for s in subjects], parts, parts, None, None, "ground truth"
        )
        return data, bundle
    from ..bundle import load_bundle
    from ..predict import Predictor

    bundle = load_bundle(model)
    subjects = [s for s in subjects if s.image is not None]
    if len(subjects) < 4:
        raise InputError(
            f"{coh.source}: only {len(subjects)} subject(s) have images; the analysis needs at least 4"
        )
    predictor = Predictor(bundle, device=device, align=align)
    preds = []
    for i, s in enumerate(subjects):
        if cancel is not None:
            cancel.check()
        progress(ProgressEvent("analyze", i, len(subjects), f"predicting {s.id}"))
        preds.append(predictor.predict(s.image, name=s.id))
    gt = coh.particles(subjects) if all(s.particles is not None for s in subjects) else None
    # compare like with like: a ShapeWorks project in its world frame has world ground truth, and the
    # model frame is that world frame (predictions in each scan's own space would carry its pose)
    in_world = getattr(coh, "frame", "local") == "world"
    data = _Data(
        subjects,
        [_label(s, label_column) for s in subjects],
        np.stack(
            [p.particles_model if in_world and p.particles_model is not None else p.particles for p in preds]
        ),
        gt,
        np.stack([np.asarray(p.descriptor, dtype=np.float64).ravel() for p in preds]),
        bundle.descriptor_kind,
        f"predicted by {model}",
    )
    return data, bundle


def _severity_sets(
    data: _Data, is_normal: np.ndarray, labelled: np.ndarray, seed: int
) -> tuple[np.ndarray, np.ndarray, str]:
    """(fit indices, evaluation indices, how): normals of the training split fit the PPCA and the
    test split is scored (the paper: 72 controls fit, 48 held-out scans scored); without a usable
    split, a seeded 60 % of the normals fit and everything else is scored."""
    split = np.array([s.split_name for s in data.subjects])
    fit = np.flatnonzero(is_normal & labelled & np.isin(split, ["train", "val"]))
    ev = np.flatnonzero(labelled & (split == "test"))
    if len(fit) >= 3 and is_normal[ev].any() and (~is_normal[ev]).any():
        return fit, ev, "PPCA fitted on the normal subjects of the train/val splits, scored on the test split"
    rng = np.random.default_rng(seed)
    normals = rng.permutation(np.flatnonzero(is_normal & labelled))
    n_fit = round(0.6 * len(normals))
    if n_fit < 3 or len(normals) - n_fit < 1:
        raise InputError(f"severity needs at least 5 subjects of the normal group, found {len(normals)}")
    fit = np.sort(normals[:n_fit])
    ev = np.setdiff1d(np.flatnonzero(labelled), fit)
    return fit, ev, f"PPCA fitted on a seeded 60 % of the normal subjects ({n_fit}), scored on all others"


def analyze_cohort(
    cohort: PathLike | Any,
    out_dir: PathLike,
    model: PathLike | None = None,
    normal_group: str = "normal",
    label_column: str = "group",
    severity_column: str | None = "severity",
    variance_fraction: float = 0.95,
    n_permutations: int = 1000,
    k: int = 10,
    classifier_model: str = "logistic",
    swim_steps: int = 5,
    seed: int = 0,
    device: str = "auto",
    align: bool = True,
    render: bool = True,
    progress: ProgressCallback = null_progress,
    cancel: CancelToken | None = None,
) -> dict[str, Any]:
    """Run severity, group differences, latent swim and classification; returns analysis.json."""
    from ..shape_model import ShapeModel

    t0 = time.perf_counter()
    out = Path(out_dir)
    data, bundle = _load(cohort, model, label_column, device, align, progress, cancel)
    cohort = getattr(cohort, "source", cohort)  # a loaded Cohort: name it by its file
    labels = np.array([lab if lab is not None else "" for lab in data.labels])
    labelled = labels != ""
    values = sorted(set(labels[labelled].tolist()))
    if normal_group not in values:
        raise InputError(
            f"{cohort}: column {label_column!r} has no subject labelled {normal_group!r} "
            f"(found {values or 'no labels'}); choose the normal group with --normal-group"
        )
    others = [v for v in values if v != normal_group]
    if not others:
        raise InputError(
            f"{cohort}: every labelled subject is {normal_group!r}; group analyses need a second group"
        )
    is_normal = labels == normal_group
    is_abnormal = labelled & ~is_normal
    cont = None
    if severity_column:
        raw = np.array([_float_or_nan(s.metadata.get(severity_column)) for s in data.subjects])
        cont = raw if np.isfinite(raw).sum() >= 3 else None
    warper, template_note = _template(data, bundle)
    fig_dir = out / "figures"
    figures: list[tuple[str, Path, str]] = []
    result: dict[str, Any] = {
        "cohort": str(cohort),
        "particles": data.source,
        "label_column": label_column,
        "normal_group": normal_group,
        "groups": {v: int((labels == v).sum()) for v in values},
        "unlabelled": int((~labelled).sum()),
        "mesh_template": template_note,
    }

    # -- severity (eq. 13-15)
    progress(ProgressEvent("analyze", 0, 4, "severity"))
    fit, ev, how = _severity_sets(data, is_normal, labelled, seed)
    ppca = severity.fit_normal_model(data.particles[fit], variance_fraction)
    sev = severity.severity(ppca, data.particles, _normals(warper, ppca.mean))
    sev_eval: dict[str, Any] = {
        "protocol": how,
        "n_fit": len(fit),
        "n_scored": len(ev),
        "ppca_modes": ppca.n_modes,
        "sigma2_mm2": ppca.sigma2,
    }
    sev_eval["auc"] = metrics.auc(sev.scores[ev], is_abnormal[ev])
    if cont is not None:
        ok = ev[np.isfinite(cont[ev])]
        if len(ok) >= 3 and np.ptp(cont[ok]) > 0:
            sev_eval.update(
                {k2: v for k2, v in metrics.correlation(sev.scores[ok], cont[ok]).to_dict().items()}
            )
            sev_eval["severity_column"] = severity_column
    result["severity"] = sev_eval
    if render:
        fpr, tpr, _ = metrics.roc_curve(sev.scores[ev], is_abnormal[ev])
        figures.append(
            (
                "Severity",
                plots_roc(fpr, tpr, sev_eval["auc"], fig_dir / "severity_roc.png"),
                f"ROC of the Mahalanobis severity ({how}).",
            )
        )
        if "pearson" in sev_eval:
            ok = ev[np.isfinite(cont[ev])]
            figures.append(
                (
                    "Severity",
                    plots_scatter(
                        cont[ok],
                        sev.scores[ok],
                        fig_dir / "severity_scatter.png",
                        severity_column,
                        "Mahalanobis severity",
                        f"Pearson {sev_eval['pearson']:.3f}, Spearman {sev_eval['spearman']:.3f}",
                        labels[ok],
                    ),
                    "Severity score against the cohort's severity column (scored subjects).",
                )
            )
        abn = ev[is_abnormal[ev]]
        mean_signed = sev.signed[abn].mean(axis=0)
        verts, tris, vals = _on_surface(warper, ppca.mean, mean_signed)
        figures.append(
            (
                "Severity",
                render_views(
                    verts,
                    tris,
                    vals,
                    fig_dir / "severity_pointwise.png",
                    "Point-wise whitened deviation C̃·n (mean over scored abnormal subjects)",
                    cmap="RdBu_r",
                    symmetric=True,
                    unit="σ",
                ),
                "Signed point-wise Mahalanobis deviation (eq. 15) projected on the outward normals of the normal mean shape (paper Fig. 7): red = outward of normal.",
            )
        )

    # -- group differences
    progress(ProgressEvent("analyze", 1, 4, "group differences"))
    result["group_differences"] = []
    for other in others[:4]:
        if cancel is not None:
            cancel.check()
        a, b = data.particles[is_normal], data.particles[labels == other]
        mean_b = b.mean(axis=0)
        diff = groups.group_difference(a, b, _normals(warper, mean_b))
        perm = groups.permutation_test(a, b, n_permutations=n_permutations, seed=seed, cancel=cancel)
        entry = {
            "from": normal_group,
            "to": other,
            "n_from": len(a),
            "n_to": len(b),
            "max_difference_mm": float(diff.magnitude.max()),
            "mean_difference_mm": float(diff.magnitude.mean()),
            "n_permutations": n_permutations,
            "points_p_lt_0.05": int((perm.p_values < 0.05).sum()),
            "points_fdr_lt_0.05": int((perm.p_fdr < 0.05).sum()),
            "points_fwer_lt_0.05": int((perm.p_max < 0.05).sum()),
            "n_points": len(perm.p_values),
            "statistic": "norm of the mean difference (points_*); Hotelling T² (hotelling_*)",
        }
        hot = None
        if len(a) >= 2 and len(b) >= 2 and len(a) + len(b) >= 5:
            hot = groups.hotelling_pointwise(a, b, n_permutations=n_permutations, seed=seed, cancel=cancel)
            glob = groups.hotelling_global(
                a, b, variance_fraction, n_permutations=n_permutations, seed=seed, cancel=cancel
            )
            entry.update(
                {
                    "hotelling_points_p_lt_0.05": int((hot.p_values < 0.05).sum()),
                    "hotelling_points_fdr_lt_0.05": int((hot.p_fdr < 0.05).sum()),
                    "hotelling_points_fwer_lt_0.05": int((hot.p_max < 0.05).sum()),
                    "hotelling_global_t2": glob.t2,
                    "hotelling_global_modes": glob.n_modes,
                    "hotelling_global_p_f": glob.p_f,
                    "hotelling_global_p_permutation": glob.p_permutation,
                }
            )
        else:
            entry["hotelling"] = "skipped: needs at least 2 subjects per group and 5 in all"
        result["group_differences"].append(entry)
        if render:
            # the two figures differ only in values, names and colour scale
            signed_style: dict[str, Any] = {"cmap": "RdBu_r", "symmetric": True, "unit": "mm"}
            p_style: dict[str, Any] = {
                "cmap": "magma",
                "value_range": (0.0, float(np.log10(n_permutations + 1))),
                "unit": "-log10 p",
            }
            for values, stem, title, style, caption in (
                (
                    diff.signed,
                    "group_difference",
                    f"{other} − {normal_group}: mean difference along the normal",
                    signed_style,
                    f"Difference of group means ({other} minus {normal_group}) projected on the outward normals, on the {other} mean shape (paper Fig. 9).",
                ),
                (
                    -np.log10(perm.p_fdr),
                    "group_pvalues",
                    f"{other} vs {normal_group}: −log10 p (FDR), {n_permutations} permutations",
                    p_style,
                    f"Per-point permutation test of the norm of the mean difference; −log10 p > 1.3 means FDR-adjusted p < 0.05 ({entry['points_fdr_lt_0.05']} of {entry['n_points']} points).",
                ),
            ) + (
                (
                    (
                        -np.log10(hot.p_fdr),
                        "group_hotelling",
                        f"{other} vs {normal_group}: Hotelling T² −log10 p (FDR), {n_permutations} permutations",
                        p_style,
                        f"Point-wise Hotelling T² (3D displacement, pooled covariance), permutation p-values, Benjamini–Hochberg FDR; −log10 p > 1.3 means p < 0.05 ({entry['hotelling_points_fdr_lt_0.05']} of {entry['n_points']} points). Global T² on {entry['hotelling_global_modes']} PCA modes: permutation p {entry['hotelling_global_p_permutation']:.4f}.",
                    ),
                )
                if hot is not None
                else ()
            ):
                verts, tris, vals = _on_surface(warper, mean_b, values)
                png = render_views(verts, tris, vals, fig_dir / f"{stem}_{_safe(other)}.png", title, **style)
                figures.append(("Group differences", png, caption))

    # -- latent swim
    progress(ProgressEvent("analyze", 2, 4, "latent swim"))
    target = others[0]
    if (
        data.descriptors is not None
        and data.descriptor_kind == "latent"
        and hasattr(bundle.network, "autoencoder")
    ):
        desc = data.descriptors
        decoder = swim.torch_decoder(bundle.network.autoencoder.decode)
        space = "TL-DeepSSM latent (predicted), decoded by the TL decoder (model frame)"
        frame_warper = warper if bundle.template_mesh_path is not None else None
    else:
        pca = ShapeModel.fit(data.particles[labelled])
        desc = pca.project(data.particles)
        decoder = pca.reconstruct
        space = (
            f"PCA scores of the {'predicted' if model else 'ground-truth'} particles ({pca.n_modes} modes)"
        )
        frame_warper = warper
    sw = swim.latent_swim(desc[is_normal], desc[labels == target], decoder, lambdas=swim_steps)
    result["latent_swim"] = {
        "space": space,
        "from": normal_group,
        "to": target,
        "lambdas": sw.lambdas.tolist(),
        "max_displacement_mm": [float(np.linalg.norm(d, axis=1).max()) for d in sw.differences],
    }
    if render:
        panels = []
        for lam, shape, d in zip(sw.lambdas, sw.particles, sw.differences):
            signed = np.einsum("mi,mi->m", d, _normals(frame_warper, shape))
            verts, tris, vals = _on_surface(frame_warper, shape, signed)
            panels.append((verts, tris, vals, f"λ = {lam:.2f}"))
        from .render import MeshView, render_meshes

        png = render_meshes(
            [MeshView(v, t, s, title) for v, t, s, title in panels],
            fig_dir / "latent_swim.png",
            cmap="RdBu_r",
            symmetric=True,
            scalar_title="mm",
            title=f"Latent swim {normal_group} → {target}: (C_λ − C_0)·n on C_λ",
            camera="oblique",
            panel_size=(260, 260),
        )
        figures.append(
            (
                "Latent swim",
                png,
                f"Shapes decoded along the line between the group means in {space}; colour: displacement from the {normal_group} mean along the normal (paper Fig. 10/12).",
            )
        )

    # -- descriptor classifier (Table 3)
    progress(ProgressEvent("analyze", 3, 4, "classifier"))
    y = is_abnormal[labelled]
    idx = np.flatnonzero(labelled)
    split = np.array([data.subjects[i].split_name for i in idx])
    tr, te = np.flatnonzero(split != "test"), np.flatnonzero(split == "test")
    protocol = "cohort split: train+val subjects train, test subjects test"
    if len(tr) < 4 or len(te) < 2 or y[tr].all() or not y[tr].any() or y[te].all() or not y[te].any():
        tr, te = classifier.stratified_split(y, 0.4, seed)
        protocol = "seeded stratified 60/40 split (the cohort split lacks a class on one side)"
    sets: dict[str, np.ndarray] = {}
    if data.gt_particles is not None:
        gt_l = data.gt_particles[labelled]
        pdm = ShapeModel.fit(gt_l[tr])
        modes = pdm.n_modes_for_variance(0.95)
        sets[f"ground-truth PDM (PCA, {modes} modes = 95 %)"] = pdm.project(gt_l, n_modes=modes)
    if data.descriptors is not None:
        name = "TL-DeepSSM latent" if data.descriptor_kind == "latent" else "Base-DeepSSM PCA scores"
        sets[f"{name} (predicted)"] = data.descriptors[labelled]
    if not sets:
        part = data.particles[labelled]
        pdm = ShapeModel.fit(part[tr])
        modes = pdm.n_modes_for_variance(0.95)
        sets[f"PCA of the analysed particles ({modes} modes)"] = pdm.project(part, n_modes=modes)
    table = classifier.compare_descriptors(sets, y, tr, te, k=k, model=classifier_model, seed=seed)
    result["classifier"] = {
        "protocol": protocol,
        "model": classifier_model,
        "k": k,
        "positive": f"not {normal_group}",
        "results": {n: r.to_dict() for n, r in table.items()},
    }
    if render:
        from .plots import bar_plot

        acc = {n: r.accuracy for n, r in table.items()}
        chance = next(iter(table.values())).chance
        figures.append(
            (
                "Descriptor classifier",
                bar_plot(
                    acc,
                    fig_dir / "classifier_accuracy.png",
                    "held-out accuracy",
                    f"Top-{k} trimmed descriptors, {classifier_model}",
                    reference=chance,
                ),
                f"Held-out accuracy ({protocol}); dashed: majority-class rate.",
            )
        )

    # -- per-subject table
    rows = []
    ev_set, fit_set = set(ev.tolist()), set(fit.tolist())
    for i, s in enumerate(data.subjects):
        rows.append(
            {
                "id": s.id,
                "split": s.split_name,
                label_column: data.labels[i] or "",
                "severity_score": float(sev.scores[i]),
                "severity_role": "fit" if i in fit_set else ("scored" if i in ev_set else ""),
                **({severity_column: s.metadata.get(severity_column, "")} if severity_column else {}),
            }
        )
    from .evaluation import _csv_text

    atomic_write_text(out / "subjects.csv", _csv_text(rows, list(rows[0].keys())))
    result["seconds"] = time.perf_counter() - t0
    if render:
        _report(out, result, figures)
    atomic_write_json(out / "analysis.json", _clean(result))
    progress(ProgressEvent("analyze", 4, 4, "done"))
    return result


def _clean(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if isinstance(obj, float | np.floating):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def plots_roc(fpr: np.ndarray, tpr: np.ndarray, auc_value: float, out: Path) -> Path:
    from .plots import roc_plot

    return roc_plot(fpr, tpr, auc_value, out, "Severity ROC")


def plots_scatter(
    x: np.ndarray, y: np.ndarray, out: Path, xlabel: str, ylabel: str, title: str, labels: Sequence[str]
) -> Path:
    from .plots import scatter_plot

    return scatter_plot(x, y, out, xlabel, ylabel, title, groups=list(labels))


def render_views(
    verts: np.ndarray,
    tris: np.ndarray | None,
    values: np.ndarray,
    out: Path,
    title: str,
    cmap: str = "viridis",
    symmetric: bool = False,
    value_range: tuple[float, float] | None = None,
    unit: str = "mm",
) -> Path:
    from .render import MeshView, render_meshes

    panels = [MeshView(verts, tris, values, view, camera=view) for view in ("anterior", "left", "superior")]
    return render_meshes(
        panels,
        out,
        cmap=cmap,
        symmetric=symmetric,
        value_range=value_range,
        scalar_title=unit,
        title=title,
        panel_size=(300, 300),
    )


def _report(out: Path, result: dict[str, Any], figures: list[tuple[str, Path, str]]) -> Path:
    from .report import Report

    rep = Report("DeepSSM downstream analysis", out)
    rep.paragraph(
        f"Cohort {result['cohort']}; particles: {result['particles']}; labels from column "
        f"{result['label_column']!r} with normal group {result['normal_group']!r}; groups {result['groups']}. "
        f"Meshes: {result['mesh_template']}."
    )
    sev = result["severity"]
    rep.heading("Severity (paper eq. 13–15)")
    rep.key_values({k: v for k, v in sev.items()})
    for section in ("Severity",):
        for sec, path, cap in figures:
            if sec == section:
                rep.figure(path, cap)
    rep.heading("Group differences")
    rep.table(result["group_differences"])
    for sec, path, cap in figures:
        if sec == "Group differences":
            rep.figure(path, cap)
    rep.heading("Latent swim")
    rep.key_values(
        {
            "space": result["latent_swim"]["space"],
            "λ": ", ".join(f"{v:.2f}" for v in result["latent_swim"]["lambdas"]),
            "max displacement per λ (mm)": ", ".join(
                f"{v:.2f}" for v in result["latent_swim"]["max_displacement_mm"]
            ),
        }
    )
    for sec, path, cap in figures:
        if sec == "Latent swim":
            rep.figure(path, cap)
    rep.heading("Descriptor classifier (paper Table 3 protocol)")
    clf = result["classifier"]
    rep.paragraph(
        f"{clf['protocol']}; descriptors trimmed to the {clf['k']} dimensions with the largest group-mean difference (training subjects); {clf['model']} classifier; positive class: {clf['positive']}."
    )
    rep.table(
        [{"descriptor": n, **r} for n, r in clf["results"].items()],
        ["descriptor", "accuracy", "train_accuracy", "auc", "chance", "n_train", "n_test"],
    )
    for sec, path, cap in figures:
        if sec == "Descriptor classifier":
            rep.figure(path, cap)
    rep.paragraph(
        f"Per-subject severity scores: subjects.csv. Analysis time {result['seconds']:.1f} s.", note=True
    )
    return rep.write()
