"""``deepssm predict MODEL IMAGE... --out DIR``: particles (and optionally meshes) for new images.

For each image ``<stem>``: ``<stem>.particles`` (ShapeWorks text, LPS mm, in the image's own
physical space), ``<stem>.json`` (descriptor, alignment, timings, per-particle ``uncertainty`` and
the ``ood`` verdict, each null when the bundle lacks it) and with ``--mesh`` ``<stem>.vtk`` (the
bundle's template mesh warped onto the predicted particles, with the point array ``uncertainty_mm``
when the bundle has uncertainty). Images flagged out of distribution get a ``WARNING`` line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from . import add_device_option, add_overwrite_option, progress_bars


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "predict",
        help="predict correspondence particles (and meshes) for new images with a trained bundle",
        description=(
            "Load a model bundle once and predict each image: align it to the model frame (rigid "
            "registration to the bundle's reference image; --no-align for pre-aligned data), resample, "
            "normalise with the training statistics, run the network and map the particles back into the "
            "image's own physical space (LPS mm)."
        ),
        epilog="example: deepssm predict models/femur scans/*.nrrd --out predictions --mesh",
    )
    parser.add_argument("model", help="model bundle (directory or .zip)")
    parser.add_argument("images", nargs="+", help="3D images (.nrrd .nii .nii.gz .mha .mhd)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--no-align", action="store_true", help="images are already in the model frame")
    parser.add_argument(
        "--similarity", action="store_true", help="allow isotropic scaling in the alignment (default rigid)"
    )
    parser.add_argument("--mesh", action="store_true", help="also write <stem>.vtk meshes")
    parser.add_argument(
        "--uncertainty",
        action="store_true",
        help="require per-particle uncertainty: refuse a model trained without it (it is written "
        "whenever the model has it)",
    )
    add_device_option(parser)
    parser.add_argument("--batch-size", type=int, default=8, help="images per network batch")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or per-image lines")
    add_overwrite_option(parser)
    parser.set_defaults(run=run)
    return parser


def output_stem(path: str | Path) -> str:
    from ..io import suffix_of

    name = Path(path).name
    return name[: -len(suffix_of(name))] if suffix_of(name) else name


def run(args: argparse.Namespace) -> int:
    from .. import io
    from ..fileutil import atomic_write_json
    from ..predict import Predictor, RegistrationSettings, check_prediction_outputs

    stems = [output_stem(p) for p in args.images]
    dupes = sorted({s for s in stems if stems.count(s) > 1})
    if dupes:
        raise InputError(f"several input images share the output name(s) {dupes}; predict them separately")
    missing = [p for p in args.images if not Path(p).is_file()]
    if missing:
        raise InputError(f"image file(s) not found: {missing}")
    check_prediction_outputs(args.out, stems, args.mesh, args.overwrite)
    predictor = Predictor(
        args.model,
        device=args.device,
        align=not args.no_align,
        registration=RegistrationSettings(transform="similarity" if args.similarity else "rigid"),
        require_uncertainty=args.uncertainty,
    )
    warper = None
    if args.mesh:
        b = predictor.bundle
        if b.template_mesh_path is None:
            raise InputError(f"{args.model}: the bundle has no template mesh; cannot write --mesh output")
        from ..mesh import MeshWarper

        template_pts = b.template_particles if b.template_particles is not None else b.mean_particles
        warper = MeshWarper.from_polydata(io.read_mesh(b.template_mesh_path), template_pts)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with progress_bars(disable=args.quiet) as report:
        predictions = predictor.predict_many(args.images, batch_size=args.batch_size, progress=report)
    for stem, pred in zip(stems, predictions, strict=True):
        io.write_particles(out / f"{stem}.particles", pred.particles)
        doc = pred.to_dict()
        doc["model"] = str(args.model)
        doc["particles_file"] = f"{stem}.particles"
        if warper is not None:
            io.write_mesh(mesh_with_uncertainty(warper.polydata(pred.particles), pred), out / f"{stem}.vtk")
            doc["mesh_file"] = f"{stem}.vtk"
        atomic_write_json(out / f"{stem}.json", json.loads(json.dumps(doc)))
        if not args.quiet:
            unc = (
                f", mean uncertainty {float(pred.uncertainty.mean()):.2f} mm"
                if pred.uncertainty is not None
                else ""
            )
            print(
                f"{stem}: {pred.particles.shape[0]} particles, alignment {pred.alignment.kind}{unc} "
                f"({pred.timings.get('total', 0.0):.2f} s)"
            )
        if pred.ood is not None and pred.ood["flag"]:
            print(ood_warning(stem, pred.ood))
    return 0


def ood_warning(stem: str, verdict: dict[str, Any]) -> str:
    """The line printed for an image flagged out of distribution (always, even with --quiet)."""
    why = "; ".join(verdict["reasons"]) or "combined score"
    return (
        f"WARNING {stem}: out of distribution (score {verdict['score']:.2f} > threshold "
        f"{verdict['threshold']:.2f}): {why}; do not trust this prediction without checking it"
    )


def mesh_with_uncertainty(mesh: Any, pred: Any) -> Any:
    """``mesh`` with the point array ``uncertainty_mm`` (the per-particle uncertainty interpolated
    onto its vertices, ``mesh.interpolate_to_vertices``) when ``pred`` has uncertainty."""
    if pred.uncertainty is None:
        return mesh
    from vtk.util import numpy_support as ns

    from ..io import arrays_from_polydata
    from ..mesh import interpolate_to_vertices

    verts, _ = arrays_from_polydata(mesh)
    values = interpolate_to_vertices(pred.particles, pred.uncertainty, verts)
    arr = ns.numpy_to_vtk(np.ascontiguousarray(values, dtype=np.float64), deep=True)
    arr.SetName("uncertainty_mm")
    mesh.GetPointData().AddArray(arr)
    return mesh
