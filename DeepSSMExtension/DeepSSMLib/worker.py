"""The DeepSSM worker: runs in a child Python (PythonSlicer or any Python with DeepSSMLogic) and
speaks the JSON-lines protocol of :mod:`DeepSSMLib.runner` on stdout.

    python worker.py predict --bundle B --image IMG --out DIR [--device auto|cpu|cuda]
                             [--aligned] [--ground-truth GT.particles] [--normal-particles F ...]
    python worker.py train   --cohort COHORT.csv --out BUNDLE_DIR [training options]

Every file it writes is in LPS mm (the ITK convention); the Slicer side converts to RAS when it
loads the results. Exit status: 0 success, 2 a user-facing error (a ``{"type": "error"}`` line
says why), 130 cancelled, 1 an unexpected crash (the traceback is in the error line).

Nothing here imports Qt or Slicer: it must run outside the application, and it is tested that way.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

# Slicer's launcher sets ITK_AUTOLOAD_PATH for PythonSlicer (removing it from the parent's
# environment has no effect); SimpleITK in this process must not load Slicer's ITK factories from it
# (Slicer#8947). Done before anything can import SimpleITK.
os.environ.pop("ITK_AUTOLOAD_PATH", None)

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository / qt-scripted-modules importable
    _here = Path(__file__).resolve()
    for _root in (_here.parents[2], _here.parents[1]):
        if (_root / "DeepSSMLogic" / "__init__.py").is_file() and str(_root) not in sys.path:
            sys.path.insert(0, str(_root))

from DeepSSMLogic.analysis import metrics
from DeepSSMLogic.commands._cohort_args import add_cohort_options, cohort_from_args, cohort_header
from DeepSSMLogic.errors import CancelledError, DeepSSMError, InputError
from DeepSSMLogic.progress import ProgressCallback, ProgressEvent, json_line_reporter

RESULT_JSON = "result.json"
PARTICLES_FILE = "particles.csv"
MESH_FILE = "surface.vtk"

# names of the per-vertex / per-particle arrays written into the result files
ERROR_ARRAY = "error_mm"
SEVERITY_ARRAY = "severity_signed"
UNCERTAINTY_ARRAY = "uncertainty_mm"  # the name `deepssm predict --mesh` uses too


def emit(stream: TextIO, msg_type: str, /, **payload: Any) -> None:
    """Write one protocol message (``msg_type`` is "log", "result" or "error") and flush.
    ``msg_type`` is positional-only so a payload may carry its own "kind" field."""
    stream.write(json.dumps({**payload, "type": msg_type}, allow_nan=False, default=_jsonable) + "\n")
    stream.flush()


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# -- predict --------------------------------------------------------------------------------------
def _prediction_fields(
    prediction: Any,
) -> tuple[np.ndarray, np.ndarray, str, np.ndarray | None, dict[str, Any]]:
    """Unpack a ``predict.Prediction`` tolerantly (field names per docs/ARCHITECTURE.md)."""
    particles = np.asarray(prediction.particles, dtype=np.float64)
    descriptor = np.asarray(getattr(prediction, "descriptor", np.zeros(0)), dtype=np.float64).ravel()
    kind = str(getattr(prediction, "descriptor_kind", None) or getattr(prediction, "kind", "pca"))
    alignment = getattr(prediction, "alignment", None)
    if alignment is not None:  # predict.Alignment (matrix: model frame -> input LPS) or a 4x4
        alignment = np.asarray(getattr(alignment, "matrix", alignment), dtype=np.float64)
    timings = dict(getattr(prediction, "timings", {}) or {})
    return particles, descriptor, kind, alignment, timings


def _json_safe(obj: Any) -> Any:
    """``obj`` with numpy values as Python ones and NaN/Inf as None (the protocol is strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | np.ndarray):
        return [_json_safe(v) for v in (obj.tolist() if isinstance(obj, np.ndarray) else obj)]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def _uncertainty_result(
    prediction: Any, source: str, n_particles: int
) -> tuple[np.ndarray | None, dict[str, Any] | None, dict[str, Any] | None]:
    """The per-particle uncertainty ``(M,)`` mm of a prediction, its summary for the result
    (``{"mean_mm", "max_mm", "method"}``) and the OOD verdict, JSON-safe; Nones for a bundle
    without them. A malformed uncertainty (wrong length, NaN) is an InputError naming ``source``."""
    from DeepSSMLogic.analysis.evaluation import prediction_uncertainty

    unc, method, ood = prediction_uncertainty(prediction, source, n_particles)
    summary = None
    if unc is not None:
        summary = {"mean_mm": float(unc.mean()), "max_mm": float(unc.max()), "method": method}
    return unc, summary, (_json_safe(dict(ood)) if ood is not None else None)


def _normal_model(normal_files: Sequence[str]) -> Any | None:
    """The normal-population PPCA fitted on the ``--normal-particles`` files; None without them (a
    bundle carries no normal model: its PCA is of the whole training cohort), so no severity."""
    if not normal_files:
        return None
    from DeepSSMLogic import io
    from DeepSSMLogic.analysis.severity import fit_normal_model

    return fit_normal_model(np.stack([io.read_particles(f) for f in normal_files]))


def run_predict(args: argparse.Namespace, progress: ProgressCallback, stream: TextIO) -> dict[str, Any]:
    """Predict one image; write particles (+ surface with heatmap arrays) to ``args.out``."""
    from DeepSSMLogic import io
    from DeepSSMLogic.bundle import load_bundle
    from DeepSSMLogic.fileutil import atomic_write_json
    from DeepSSMLogic.predict import Predictor

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    total = 4
    t0 = time.perf_counter()
    progress(ProgressEvent("predict", 0, total, f"loading the model bundle {args.bundle}"))
    bundle = load_bundle(args.bundle)
    image = io.read_image(args.image)
    gt = io.read_particles(args.ground_truth) if args.ground_truth else None
    if gt is not None and gt.shape[0] != bundle.n_particles:
        raise InputError(
            f"{args.ground_truth}: {gt.shape[0]} ground-truth particles, the model predicts {bundle.n_particles}"
        )
    progress(ProgressEvent("predict", 1, total, f"running the network on {args.device}"))
    predictor = Predictor(bundle, device=args.device, align=not args.aligned)
    prediction = predictor.predict(image)
    particles, descriptor, kind, alignment, timings = _prediction_fields(prediction)
    uncertainty, uncertainty_summary, ood = _uncertainty_result(
        prediction, Path(args.image).name, len(particles)
    )
    if ood is not None and ood.get("flag"):
        reasons = "; ".join(str(r) for r in ood.get("reasons") or []) or "no reason given"
        emit(stream, "log", message=f"warning: the image looks out of distribution: {reasons}")
    io.write_particles(out / PARTICLES_FILE, particles)

    progress(ProgressEvent("predict", 2, total, "computing heatmaps"))
    point_arrays: dict[str, np.ndarray] = {}
    stats: dict[str, float] = {}
    if gt is not None:
        err = np.linalg.norm(particles - gt, axis=1)
        point_arrays[ERROR_ARRAY] = err
        # rmse_mm is paper eq. 12, the figure `deepssm evaluate` reports, so the two agree.
        stats.update(
            rmse_mm=float(metrics.rmse(particles, gt)),
            rms_distance_mm=float(np.sqrt(np.mean(err**2))),
            max_error_mm=float(err.max()),
        )
    if uncertainty is not None:
        point_arrays[UNCERTAINTY_ARRAY] = uncertainty
        stats["uncertainty_mean_mm"] = float(uncertainty.mean())
    severity_score = None
    normal = _normal_model(args.normal_particles or [])
    if normal is not None:
        from DeepSSMLogic.analysis.severity import severity

        sev = severity(normal, particles[None])
        severity_score = float(sev.scores[0])
        point_arrays[SEVERITY_ARRAY] = sev.signed[0]

    progress(ProgressEvent("predict", 3, total, "reconstructing the surface"))
    mesh_path = None
    if bundle.template_mesh_path is not None:
        from vtk.util import numpy_support as ns

        from DeepSSMLogic.mesh import MeshWarper, interpolate_to_vertices

        template = (
            bundle.template_particles if bundle.template_particles is not None else bundle.mean_particles
        )
        warper = MeshWarper.from_polydata(io.read_mesh(bundle.template_mesh_path), template)
        surface = warper.polydata(particles)
        verts = ns.vtk_to_numpy(surface.GetPoints().GetData()).astype(np.float64)
        for name, values in point_arrays.items():
            arr = ns.numpy_to_vtk(interpolate_to_vertices(particles, values, verts), deep=True)
            arr.SetName(name)
            surface.GetPointData().AddArray(arr)
        mesh_path = out / MESH_FILE
        io.write_mesh(surface, mesh_path)
    else:
        emit(stream, "log", message="the bundle has no template mesh: no surface is reconstructed")

    result = {
        "kind": "prediction",
        "coordinates": "LPS",
        "image": str(Path(args.image).resolve()),
        "bundle": str(Path(args.bundle).resolve()),
        "particles": str(out / PARTICLES_FILE),
        "mesh": str(mesh_path) if mesh_path else None,
        "point_arrays": {k: np.asarray(v, dtype=np.float64).tolist() for k, v in point_arrays.items()},
        "descriptor": descriptor.tolist(),
        "descriptor_kind": kind,
        "severity": severity_score,
        "uncertainty": uncertainty_summary,
        "ood": ood,
        "alignment": alignment.tolist() if alignment is not None else None,
        "timings": {k: float(v) for k, v in timings.items()},
        "stats": stats,
        "elapsed_s": time.perf_counter() - t0,
    }
    atomic_write_json(out / RESULT_JSON, result)
    progress(ProgressEvent("predict", total, total, "done"))
    return result


# -- train ----------------------------------------------------------------------------------------
def run_train(args: argparse.Namespace, progress: ProgressCallback, stream: TextIO) -> dict[str, Any]:
    """Train a bundle from a cohort with ``DeepSSMLogic.pipeline.train_model`` (what ``deepssm
    train`` runs), reporting progress as JSON lines; per-epoch metrics ride on the events."""
    from DeepSSMLogic.pipeline import TrainingOptions, train_model

    options = TrainingOptions(
        variant=args.variant,
        loss=args.loss,
        augment=args.augment_count,
        augment_online=args.online,
        sampler=args.sampler,
        epochs=args.epochs,
        batch_size=args.batch_size,
        device=args.device,
        seed=args.seed,
        restart=True,  # the module's Train button starts a fresh run (it offers no resume)
    )
    cohort = cohort_from_args(args)  # the same cohort options as `deepssm train`
    for line in cohort_header(cohort):
        progress(ProgressEvent("cohort", 0, 1, line))
    outcome = train_model(cohort, args.out, options, progress)
    bundle = outcome.bundle if outcome.bundle is not None else args.out
    return {
        "kind": "training",
        "bundle": str(Path(bundle).resolve()),
        "summary": dict(getattr(outcome, "summary", {}) or {}),
    }


# -- entry point ----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="DeepSSM worker", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    pr = sub.add_parser("predict", help="predict the particles of one image")
    pr.add_argument("--bundle", required=True, help="model bundle (directory or .zip)")
    pr.add_argument("--image", required=True, help="input image file (LPS, as written by Slicer)")
    pr.add_argument("--out", required=True, help="output directory")
    pr.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    pr.add_argument("--aligned", action="store_true", help="the image is already in the model frame")
    pr.add_argument("--ground-truth", default=None, help="ground-truth particles for the error heatmap")
    pr.add_argument("--normal-particles", nargs="*", default=None, help="normal-group particle files")
    pr.set_defaults(run=run_predict)
    tr = sub.add_parser("train", help="train a model bundle from a cohort")
    tr.add_argument("--cohort", required=True, help="manifest CSV or ShapeWorks project")
    tr.add_argument("--out", required=True, help="bundle directory to write")
    tr.add_argument("--variant", choices=("base", "tl"), default="base")
    tr.add_argument("--loss", choices=("l2", "focal"), default="l2")
    tr.add_argument("--epochs", type=int, default=30)
    tr.add_argument("--batch-size", type=int, default=8)
    tr.add_argument("--device", default="auto")
    tr.add_argument("--augment-count", type=int, default=0)
    tr.add_argument("--sampler", choices=("kde", "gaussian", "gmm"), default="kde")
    tr.add_argument("--online", action="store_true", help="sample fresh augmented shapes every epoch")
    tr.add_argument("--seed", type=int, default=0)
    add_cohort_options(tr)
    tr.set_defaults(run=run_train)
    return p


def main(argv: Sequence[str] | None = None, stream: TextIO | None = None) -> int:
    stream = stream or sys.stdout
    args = build_parser().parse_args(argv)
    progress = json_line_reporter(stream)
    try:
        result = args.run(args, progress, stream)
    except CancelledError as e:
        emit(stream, "error", message=str(e), error_class="CancelledError", details="")
        return 130
    except DeepSSMError as e:
        emit(stream, "error", message=str(e), error_class=type(e).__name__, details="")
        return 2
    except Exception as e:  # the GUI shows the traceback under "details"
        emit(
            stream,
            "error",
            message=f"{type(e).__name__}: {e}",
            error_class=type(e).__name__,
            details=traceback.format_exc(),
        )
        return 1
    emit(stream, "result", **result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
