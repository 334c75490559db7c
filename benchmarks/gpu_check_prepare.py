"""Prepare, on a CPU machine, what ``benchmarks/gpu_check.py`` carries to a bare GPU machine.

    .venv/bin/python benchmarks/gpu_check_prepare.py            # writes .gpu-check/ (git-ignored)

The GPU machine has torch/numpy/scipy but neither SimpleITK nor vtk, and no network. This writes:

* ``.gpu-check/cohort/``: a small synthetic femur cohort (12 subjects, 40³ voxels at 2.5 mm,
  128 particles; images, segmentations, particles and a ``cohort.csv`` WITHOUT the mesh column, so
  training there needs no vtk) for the end-to-end ``deepssm train / predict / augment`` step;
* ``.gpu-check/simpleitk.tar.xz``: this environment's installed SimpleITK package (the abi3 wheel's
  files, ~28 MB compressed), which ``gpu_check.py`` unpacks into a temporary folder when SimpleITK is
  not importable there.

Both together are ~30 MB; the repository's tracked files are ~17 MB, inside the device tool's 64 MiB
for what travels. Then, on the GPU machine: ``bash benchmarks/gpu_check.sh --out "$OUT"`` with
``.gpu-check`` named in ``carry``. Refuses to touch an existing ``.gpu-check/cohort`` or archive.
"""

from __future__ import annotations

import argparse
import csv
import io
import lzma
import shutil
import sys
import tarfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from DeepSSMLogic.errors import InputError
from DeepSSMLogic.fileutil import atomic_path, atomic_write_text

REPO = Path(__file__).resolve().parents[1]
PREPARED = REPO / ".gpu-check"
TRAVEL_LIMIT_MIB = 64


def prepare_cohort(out: Path, n: int = 12, seed: int = 7) -> Path:
    """Write the synthetic cohort to ``out`` (must not exist); returns its ``cohort.csv``."""
    from DeepSSMLogic.synthetic import generate_cohort

    if out.exists():
        raise InputError(f"{out}: exists; delete it to make a new cohort")
    manifest = generate_cohort(
        "femur", n, out, seed=seed, image_size=(40, 40, 40), spacing=2.5, n_particles=128
    )
    # no mesh column: the bundle then has no template mesh and nothing on the GPU machine needs vtk
    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    fields = [k for k in rows[0] if k != "mesh"]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(manifest, text.getvalue())
    shutil.rmtree(out / "meshes")  # written by generate_cohort above, unused now
    return manifest


def pack_simpleitk(target: Path) -> Path:
    """This environment's installed SimpleITK package as ``target`` (.tar.xz)."""
    import SimpleITK

    if target.exists():
        raise InputError(f"{target}: exists; delete it to pack SimpleITK again")
    package = Path(SimpleITK.__file__).parent
    if not list(package.glob("_SimpleITK*.abi3.so")):
        print(
            f"warning: {package} holds no abi3 extension: it imports only on Python "
            f"{sys.version_info.major}.{sys.version_info.minor} (the GPU machine has 3.12)"
        )
    with atomic_path(target) as tmp:
        with lzma.open(tmp, "wb", preset=6) as xz, tarfile.open(fileobj=xz, mode="w") as tar:
            tar.add(package, arcname="SimpleITK", filter=lambda t: None if "__pycache__" in t.name else t)
    return target


def _mib(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 2**20


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(PREPARED), help="folder to prepare (default .gpu-check)")
    ap.add_argument("--no-cohort", action="store_true", help="skip the synthetic cohort")
    ap.add_argument("--no-simpleitk", action="store_true", help="skip packing SimpleITK")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        if not args.no_cohort:
            print(f"cohort: {prepare_cohort(out / 'cohort')}")
        if not args.no_simpleitk:
            print(f"SimpleITK: {pack_simpleitk(out / 'simpleitk.tar.xz')}")
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    prepared = _mib(out)
    print(
        f"{out}: {prepared:.1f} MiB; carry it with the working tree (together under {TRAVEL_LIMIT_MIB} MiB)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
