"""``deepssm predict MODEL IMAGE... --out DIR``: particles (and optionally meshes) for new images.

For each image ``<stem>``: ``<stem>.particles`` (ShapeWorks text, LPS mm, in the image's own
physical space), ``<stem>.json`` (descriptor, alignment, timings) and with ``--mesh``
``<stem>.vtk`` (the bundle's template mesh warped onto the predicted particles).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

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
            io.write_mesh(warper.polydata(pred.particles), out / f"{stem}.vtk")
            doc["mesh_file"] = f"{stem}.vtk"
        atomic_write_json(out / f"{stem}.json", json.loads(json.dumps(doc)))
        if not args.quiet:
            print(
                f"{stem}: {pred.particles.shape[0]} particles, alignment {pred.alignment.kind} "
                f"({pred.timings.get('total', 0.0):.2f} s)"
            )
    return 0
