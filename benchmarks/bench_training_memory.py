"""Peak memory of training against the number of augmented samples (issue 16).

In ONE run: a small synthetic cohort (cranium, 12 subjects) is resampled onto its reference grid and
an offline augmented set of max(N) samples is written ONCE in ``deepssm train --augment``'s format
(images: the real ones plus noise, not TPS warps: the trainer's memory does not depend on them); then, each in a fresh process (``ru_maxrss`` is a
process-lifetime peak), ``training.train`` runs 1 epoch (light encoder, batch 8) on the real
training images plus the first N augmented samples, for each N (default 50, 200, 800) and both data
paths: ``data_on_device="auto"`` (the default: a split whose images take < 1 GiB is kept in memory
as normalised arrays) and ``"never"`` (streamed from the set on disk every epoch). Prints each
run's peak resident set size from the data's loading on (Linux ``VmHWM``, reset after the imports
through ``/proc/self/clear_refs``: ``ru_maxrss``, which the trainer reports, also covers the imports'
transient peak), its growth per 100 samples, and what 100 samples' images take.

    .venv/bin/python benchmarks/bench_training_memory.py [--n 50 200 800] [--size 24] [--spacing 3]
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
import numpy as np
from DeepSSMLogic.augment.dataset import AugmentedSet
from DeepSSMLogic.pipeline import _ArrayDataset, _Concat, _Subset
from DeepSSMLogic.preprocess import IntensityNormalizer
from DeepSSMLogic.training import TrainConfig, peak_memory, train
work, n, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def hwm():  # the resident high-water mark, MiB (VmHWM; Linux)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
start = peak_memory()["rss_mb"]
with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM: measure from here, not the imports' peak
    f.write("5")
base = hwm()
real = np.load(f"{work}/real_images.npy"), np.load(f"{work}/real_particles.npy")
aug = AugmentedSet(f"{work}/aug")
pool = _Concat([_ArrayDataset(*real), _Subset(aug, range(n))])
idx = np.random.default_rng(0).permutation(len(pool))
n_val = max(1, round(0.15 * len(pool)))
config = TrainConfig(epochs=1, batch_size=8, device="cpu", encoder="light", conv_padding="same",
                     data_on_device=mode)
r = train(config, _Subset(pool, sorted(idx[n_val:])), _Subset(pool, sorted(idx[:n_val])), f"{work}/t-{mode}-{n}",
          image_transform=IntensityNormalizer.fit(real[0]))
print(json.dumps({"start_rss_mb": start, "base_mb": base, "peak_rss_mb": hwm(), "ru_maxrss_mb": r.peak_memory["rss_mb"], "seconds": r.seconds,
                  "n_train": len(idx) - n_val}))
"""


def prepare(tmp: Path, n_max: int, size: int, spacing: float) -> tuple[int, ...]:
    """The real training arrays and an augmented set of ``n_max`` samples in the format that
    ``augment.write_augmented_set`` writes; its images are the real ones plus noise (the memory a
    trainer uses does not depend on the warps, and TPS-warping 800 samples would dominate the run)."""
    import numpy as np

    from DeepSSMLogic.augment.dataset import FORMAT, FORMAT_VERSION, META
    from DeepSSMLogic.cohort import load_cohort, subject_particles
    from DeepSSMLogic.fileutil import atomic_write_json
    from DeepSSMLogic.pipeline import prepare_training_arrays, reference_grid
    from DeepSSMLogic.synthetic import generate_cohort

    csv = generate_cohort(
        "cranium", 12, tmp / "cohort", 3, image_size=(size,) * 3, spacing=spacing, n_particles=64
    )
    subjects = load_cohort(csv).by_split("train")
    grid = reference_grid(np.stack([subject_particles(s) for s in subjects]), spacing, 10.0)
    arrays = prepare_training_arrays(subjects, grid)
    np.save(tmp / "real_images.npy", arrays.images)
    np.save(tmp / "real_particles.npy", arrays.particles)
    rng = np.random.default_rng(0)
    source = np.arange(n_max) % len(subjects)
    aug = tmp / "aug"
    aug.mkdir()
    images = np.lib.format.open_memmap(aug / "images.npy", "w+", np.float32, (n_max, *grid.shape_zyx))
    for i in range(n_max):
        images[i] = arrays.images[source[i]] + rng.normal(0, 5, grid.shape_zyx).astype(np.float32)
    images.flush()
    del images
    np.save(
        aug / "particles.npy",
        arrays.particles[source] + rng.normal(0, 0.5, (n_max, *arrays.particles.shape[1:])),
    )
    np.save(aug / "scores.npy", np.zeros((n_max, 3)))
    np.save(aug / "source.npy", source)
    atomic_write_json(
        aug / META,
        {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "count": n_max,
            "completed": n_max,
            "chunk": 8,
            "grid": grid.to_dict(),
        },
    )
    return grid.size


def run_one(tmp: Path, n: int, mode: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp), str(n), mode],
        capture_output=True,
        text=True,
        env=env,
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
    p.add_argument("--modes", nargs="+", default=["auto", "never"], choices=("auto", "never", "always"))
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average at start {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="bench-mem-") as t:
        tmp = Path(t)
        size = prepare(tmp, max(args.n), args.size, args.spacing)
        voxels = size[0] * size[1] * size[2]
        rows = []
        for mode in args.modes:
            for n in args.n:
                r = run_one(tmp, n, mode)
                rows.append((mode, n, r))
                print(f"  {mode} {n}: {r}", flush=True)
    per100 = 100 * voxels * 4 / 2**20
    print(f"\ngrid {'×'.join(map(str, size))}: 100 samples' images take {per100:.2f} MiB (float32)\n")
    print(
        "| data path | augmented samples | training samples | RSS before (MiB) | peak RSS (MiB) "
        "| growth per 100 samples (MiB) | s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for mode in args.modes:
        sel = [(n, r) for m, n, r in rows if m == mode]
        n0, r0 = sel[0]
        for n, r in sel:
            growth = "" if n == n0 else f"{100 * (r['peak_rss_mb'] - r0['peak_rss_mb']) / (n - n0):.2f}"
            print(
                f"| {mode} | {n} | {r['n_train']} | {r['base_mb']:.1f} | {r['peak_rss_mb']:.1f} | {growth} "
                f"| {r['seconds']:.0f} |"
            )
    print(f"\nload average at end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
