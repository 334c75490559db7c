"""Peak memory of a training run against the number of augmented samples (issue 16).

In ONE run, each training in a fresh process (``ru_maxrss`` is a process-lifetime peak): ``deepssm
train``'s pipeline (``pipeline.train_model``) on one small synthetic cohort with N offline augmented
samples for each N (default 50, 200, 800), 1 epoch, light encoder, a tiny grid; once with the
default data handling (``data_on_device="auto"``: a split whose images take < 1 GiB is kept in
memory as normalised arrays) and once streaming from the augmented set on disk
(``--extra data_on_device="never"``). Prints the peak resident set size and its growth per 100
samples beside the bytes that 100 samples' images take.

    .venv/bin/python benchmarks/bench_training_memory.py [--n 50 200 800] [--size 24]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys
from DeepSSMLogic.pipeline import TrainingOptions, train_model
from DeepSSMLogic.training import peak_memory
csv, out, n, mode, spacing = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], float(sys.argv[5])
start = peak_memory()["rss_mb"]
opts = TrainingOptions(epochs=1, batch_size=8, device="cpu", augment=n, encoder="light", spacing=spacing,
                       bundle_weights="float32", extra={"data_on_device": mode})
s = train_model(csv, out, opts).summary
print(json.dumps({"start_rss_mb": start, "train_rss_mb": s["peak_memory"]["rss_mb"],
                  "total_rss_mb": s["peak_rss_mb_total"], "grid": s["grid"]["size"],
                  "n_train_samples": s["n_train_samples"], "seconds": s["seconds_total"]}))
"""


def run_one(csv: Path, tmp: Path, n: int, mode: str, spacing: float) -> dict:
    out = tmp / f"m-{mode}-{n}.zip"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="2")
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(csv), str(out), str(n), mode, str(spacing)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[50, 200, 800])
    p.add_argument(
        "--size", type=int, default=24, help="image size of the synthetic cohort (voxels per axis)"
    )
    p.add_argument("--spacing", type=float, default=3.0, help="image and grid spacing, mm")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from DeepSSMLogic.synthetic import generate_cohort

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average at start {os.getloadavg()[0]:.1f}"
    )
    with tempfile.TemporaryDirectory(prefix="bench-mem-") as t:
        tmp = Path(t)
        size = (args.size,) * 3
        csv = generate_cohort(
            "cranium", 12, tmp / "cohort", 3, image_size=size, spacing=args.spacing, n_particles=64
        )
        rows = []
        for mode in ("auto", "never"):
            for n in args.n:
                r = run_one(csv, tmp, n, mode, args.spacing)
                rows.append((mode, n, r))
                print(f"  {mode} {n}: {r}", flush=True)
        voxels = 1
        for v in rows[0][2]["grid"]:
            voxels *= v
        per100 = 100 * voxels * 4 / 2**20
        print(
            f"\ngrid {'×'.join(map(str, rows[0][2]['grid']))}: 100 samples' images take {per100:.1f} MiB (float32)\n"
        )
        print(
            "| data | augmented samples | train samples | peak RSS, whole run (MiB) | growth per 100 samples (MiB) | s |"
        )
        print("|---|---:|---:|---:|---:|---:|")
        for mode in ("auto", "never"):
            sel = [(n, r) for m, n, r in rows if m == mode]
            n0, r0 = sel[0]
            for n, r in sel:
                growth = "" if n == n0 else f"{100 * (r['total_rss_mb'] - r0['total_rss_mb']) / (n - n0):.1f}"
                label = "in memory (auto)" if mode == "auto" else "streamed (never)"
                print(
                    f"| {label} | {n} | {r['n_train_samples']} | {r['total_rss_mb']:.0f} | {growth} | {r['seconds']:.0f} |"
                )
        print(f"\nload average at end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
