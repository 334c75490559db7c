"""Benchmark of the TPS image warp used for augmentation (issue #3, "Performance").

One run compares, on a 118x69x88 float image (1 mm) with 512 and 1024 landmarks taken from a pair of
synthetic femur subjects (``DeepSSMLogic.synthetic``):

* ITK ThinPlateSplineKernelTransform + ResampleImageFilter (the reference implementation's approach;
  the ``itk`` wheel from benchmarks/requirements.txt; skipped with a note if it is not installed),
* our exact torch TPS (``coarse=1``) and the fast path (coarse lattice + exact band),

reporting seconds per sample, speed-up over ITK, the max/mean deviation of the sampling positions
from the exact TPS in voxels, and the peak RSS of ``write_augmented_set`` (measured in a child process)
for a few hundred samples with an extrapolation to 5000.

    .venv/bin/python benchmarks/bench_augment.py                 # CPU
    .venv/bin/python benchmarks/bench_augment.py --device cuda   # GPU rows (volumes/s, batched)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from _common import best_time

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from DeepSSMLogic.augment.tps import (
    DEFAULT_BAND,
    DEFAULT_COARSE,
    fit_warp,
    sampling_deviation,
    sampling_positions,
    warp_images,
)
from DeepSSMLogic.synthetic import make_subject

SIZE = (118, 69, 88)  # (X, Y, Z) voxels


def subjects(n_particles: int, count: int = 2, seed: int = 1):
    return [
        make_subject(
            "femur", np.random.default_rng(seed + i), image_size=SIZE, spacing=1.0, n_particles=n_particles
        )
        for i in range(count)
    ]


def itk_warp(image: np.ndarray, grid, src: np.ndarray, tgt: np.ndarray) -> tuple[np.ndarray, float, float]:
    """The reference approach: landmarks swapped so the TPS maps output (target) to input (source)."""
    import itk

    t0 = time.perf_counter()
    tps = itk.ThinPlateSplineKernelTransform[itk.D, 3].New()
    for ps, arr in ((tps.GetModifiableSourceLandmarks(), tgt), (tps.GetModifiableTargetLandmarks(), src)):
        pts = ps.GetPoints()
        for i, p in enumerate(arr):
            pts.InsertElement(i, itk.Point[itk.D, 3]([float(v) for v in p]))
    tps.ComputeWMatrix()
    t1 = time.perf_counter()
    img = itk.image_from_array(np.ascontiguousarray(image, dtype=np.float32))
    img.SetOrigin(grid.origin)
    img.SetSpacing(grid.spacing)
    resampler = itk.ResampleImageFilter[type(img), type(img)].New(Input=img, Transform=tps)
    resampler.SetReferenceImage(img)
    resampler.UseReferenceImageOn()
    resampler.Update()
    out = itk.array_from_image(resampler.GetOutput())
    t2 = time.perf_counter()
    return out, t1 - t0, t2 - t0


def rss_child(n: int, out_dir: str, device: str, chunk: int) -> None:
    """Child process: write an n-sample set from 4 synthetic subjects and print the peak RSS."""
    from DeepSSMLogic.augment import make_sampler
    from DeepSSMLogic.augment.dataset import write_augmented_set
    from DeepSSMLogic.shape_model import ShapeModel

    subs = subjects(1024, count=4, seed=10)
    images = np.stack([s.image for s in subs]).astype(np.float32)
    parts = np.stack([s.particles for s in subs])
    segs = np.stack([s.segmentation for s in subs])
    sm = ShapeModel.fit(parts)
    sampler = make_sampler("kde").fit(sm.project(parts))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    write_augmented_set(
        out_dir,
        images,
        parts,
        subs[0].grid,
        sm,
        sampler,
        n,
        0,
        device=device,
        segmentations=segs,
        chunk=chunk,
    )
    dt = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"n": n, "seconds": dt, "rss_before_kib": before, "peak_rss_kib": peak}))


def measure_rss(n: int, device: str, chunk: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        cmd = [
            sys.executable,
            __file__,
            "--rss-child",
            str(n),
            "--device",
            device,
            "--chunk",
            str(chunk),
            d + "/aug",
        ]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        return json.loads(res.stdout.strip().splitlines()[-1])


# (coarse, band) of the fast path compared with the exact spline; band 0 = the coarse lattice alone
SETTINGS = ((4, 0.0), (4, 1.5), (DEFAULT_COARSE, DEFAULT_BAND), (3, 2.0))


def settings_sweep(a, b, device: torch.device) -> list[dict]:
    """Max / mean deviation (voxels) of the fast path from the exact 1024-landmark TPS of the femur
    pair for each of ``SETTINGS``, and of the 512-landmark (every 2nd particle) exact TPS."""
    spline = fit_warp(a.particles[None], b.particles[None], device=device)
    exact = sampling_positions(spline, a.grid, coarse=1)
    rows = [
        {"coarse": c, "band": bd, **sampling_deviation(spline, a.grid, c, bd, reference=exact)}
        for c, bd in SETTINGS
    ]
    half = fit_warp(a.particles[None], b.particles[None], landmarks=512, device=device)
    rows.append(
        {
            "coarse": 1,
            "band": None,
            "landmarks": 512,
            **sampling_deviation(half, a.grid, 1, 0.0, reference=exact),
        }
    )
    for r in rows:
        what = (
            "exact TPS on 512 of the 1024 landmarks"
            if r.get("landmarks")
            else f"coarse={r['coarse']}, band={r['band']:g}"
            + (" (coarse lattice alone)" if r["band"] == 0 else "")
        )
        print(
            f"deviation from the exact 1024-landmark TPS, {what}: max {r['max_voxels']:.4f} / mean {r['mean_voxels']:.5f} voxel",
            flush=True,
        )
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=0, help="GPU batch for volumes/s (default 64 on CUDA)")
    ap.add_argument("--no-itk", action="store_true")
    ap.add_argument("--itk-1024", action="store_true", help="also time ITK at 1024 landmarks (~1 min)")
    ap.add_argument("--rss-samples", type=int, nargs="*", default=[50, 200])
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--rss-child", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("rss_dir", nargs="?", help=argparse.SUPPRESS)
    ap.add_argument(
        "--settings-only",
        action="store_true",
        help="only the fast-path (coarse, band) deviation sweep (no timings)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.rss_child:
        rss_child(args.rss_child, args.rss_dir, args.device, args.chunk)
        return 0
    device = torch.device(args.device)

    a1024, b1024 = subjects(1024)
    grid = a1024.grid
    settings_sweep(a1024, b1024, device)
    if args.settings_only:
        return 0
    rows = []
    for n_land in (512, 1024):
        step = 1024 // n_land
        src, tgt = a1024.particles[::step], b1024.particles[::step]
        image = torch.as_tensor(a1024.image, dtype=torch.float32, device=device)[None, None]
        row: dict = {"landmarks": n_land}
        spline = fit_warp(src[None], tgt[None], device=device)
        exact_pos = sampling_positions(spline, grid, coarse=1)
        fast_pos = sampling_positions(spline, grid)
        dev = (fast_pos - exact_pos).norm(dim=-1)
        row["fast_max_vox"], row["fast_mean_vox"] = float(dev.max()), float(dev.mean())
        row["max_disp_vox"] = float(
            (
                exact_pos[0]
                - torch.stack(
                    torch.meshgrid(*(torch.arange(n, device=device) for n in grid.shape_zyx), indexing="ij")[
                        ::-1
                    ],
                    -1,
                )
            )
            .norm(dim=-1)
            .max()
        )
        exact_img = warp_images(image, grid, src[None], tgt[None], coarse=1)
        row["exact_s"] = best_time(
            partial(warp_images, image, grid, src[None], tgt[None], coarse=1),
            device,
            max(1, args.repeats - 2),
        )
        row["fast_s"] = best_time(
            partial(warp_images, image, grid, src[None], tgt[None]), device, args.repeats
        )
        if n_land == 1024:
            half = fit_warp(src[None], tgt[None], landmarks=512, device=device)
            sub = (sampling_positions(half, grid) - exact_pos).norm(dim=-1)
            row["subsample512_max_vox"] = float(sub.max())
        if device.type == "cuda":
            bsz = args.batch or 64
            imgs = image.expand(bsz, -1, -1, -1, -1).contiguous()
            s_b, t_b = np.repeat(src[None], bsz, 0), np.repeat(tgt[None], bsz, 0)
            secs = best_time(partial(warp_images, imgs, grid, s_b, t_b), device, args.repeats)
            row["gpu_volumes_per_s"] = bsz / secs
            row["gpu_batch"] = bsz
        if not args.no_itk and (n_land == 512 or args.itk_1024):
            try:
                out, solve_s, total_s = itk_warp(a1024.image, grid, src, tgt)
                row["itk_s"], row["itk_solve_s"] = total_s, solve_s
                diff = np.abs(out - exact_img[0, 0].cpu().numpy())
                row["itk_vs_exact_max_abs"] = float(diff.max())
                row["image_range"] = float(a1024.image.max() - a1024.image.min())
            except ImportError:
                row["itk_s"] = None
        rows.append(row)
        print(json.dumps(row), flush=True)

    rss = [measure_rss(n, args.device, args.chunk) for n in args.rss_samples] if args.rss_samples else []
    for r in rss:
        print(json.dumps({"rss": r}), flush=True)

    # -- table
    print()
    print(
        f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs, torch "
        f"{torch.__version__}, {args.threads} threads, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
    )
    print(f"fast path: coarse={DEFAULT_COARSE}, band={DEFAULT_BAND} coarse cells")
    hdr = f"{'landmarks':>9} | {'ITK s':>7} | {'exact s':>7} | {'fast s':>7} | {'speed-up vs ITK':>15} | {'fast max dev vox':>16} | {'mean dev vox':>12}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        itk_s = r.get("itk_s")
        speed = f"{itk_s / r['fast_s']:.1f}x" if itk_s else "n/a"
        itk_txt = f"{itk_s:.2f}" if itk_s else "n/a"
        print(
            f"{r['landmarks']:>9} | {itk_txt:>7} | {r['exact_s']:>7.3f} | {r['fast_s']:>7.3f} | {speed:>15} | "
            f"{r['fast_max_vox']:>16.4f} | {r['fast_mean_vox']:>12.6f}"
        )
    for r in rows:
        if "gpu_volumes_per_s" in r:
            print(
                f"GPU {r['landmarks']} landmarks: {r['gpu_volumes_per_s']:.0f} volumes/s (batch {r['gpu_batch']})"
            )
        if "subsample512_max_vox" in r:
            print(
                f"1024 -> 512 landmark subsampling: max deviation {r['subsample512_max_vox']:.3f} voxel from the 1024-landmark TPS"
            )
        if r.get("itk_vs_exact_max_abs") is not None:
            print(
                f"ITK vs our exact TPS ({r['landmarks']} landmarks): max |intensity difference| "
                f"{r['itk_vs_exact_max_abs']:.4g} (image range {r['image_range']:.4g})"
            )
    vol_mb = np.prod(SIZE) * 4 / 1e6
    for r in rss:
        print(
            f"write_augmented_set n={r['n']}: {r['seconds']:.1f} s ({r['seconds'] / r['n']:.3f} s/sample), "
            f"peak RSS {r['peak_rss_kib'] / 1024:.0f} MiB (before writing {r['rss_before_kib'] / 1024:.0f} MiB)"
        )
    if rss:
        print(
            f"5000 samples: images.npy {5000 * vol_mb / 1e3:.1f} GB on disk (+ segmentations.npy "
            f"{5000 * vol_mb / 4e3:.1f} GB); peak RSS at 5000 not measured: compare the rows above"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
