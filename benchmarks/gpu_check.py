"""The CUDA path, proven and measured in ONE prepared run on a GPU machine (issue 17).

    bash benchmarks/gpu_check.sh --out "$OUT"                      # on the GPU machine
    .venv/bin/python benchmarks/gpu_check.py --device cpu --dry-run --out /tmp/gc    # here: seconds

Steps, printed as they run; the summary table is also written as ``gpu_check.json`` and
``gpu_check.md`` (plus ``pytest_cuda.log`` and ``e2e.log``) under ``--out``:

1. environment: python, torch / CUDA / cuDNN versions, the GPU, its driver (``nvidia-smi``), the
   torch build's architectures; then REAL kernels (fp32 matmul and 3D convolution, bf16 matmul, a
   reduction) on the device compared with float64 on the CPU. A build without kernels for the card,
   or one that returns wrong numbers, is refused: exit status 3 and a message saying what to install.
2. ``pytest -m cuda Testing/test_cuda.py`` (training, predictor and TPS warp CUDA vs CPU; real
   out-of-memory under a memory cap).
3. timings in the same run, eager fp32 (how the reference implementation runs: contiguous NCDHW,
   no autotuning, PyTorch's default TF32) against our paths, Base-DeepSSM at the paper's 118×69×88
   grid with 1024 particles: forward batch-1 latency, volumes/s batched, training samples/s; TPS
   warps/s (1024 landmarks) with the fast path's max deviation from the exact spline (voxels).
4. optional: ``deepssm train / predict / augment --device cuda`` end to end on a small synthetic
   cohort made beforehand on a CPU machine by ``benchmarks/gpu_check_prepare.py`` (it needs
   SimpleITK, which that script also packs); skipped, with the reason, when absent.

Exit status: 0 everything ran and passed; 1 a CUDA test or the end-to-end run failed; 3 refused (no
CUDA device for ``--device cuda``, or a torch build that cannot run correct kernels on it). Missed
speed targets are reported, not failures. Needs torch, numpy, scipy (+ pytest for step 2).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from _common import best_time, sync

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from DeepSSMLogic.augment.tps import (
    DEFAULT_BAND,
    DEFAULT_COARSE,
    fit_warp,
    resample,
    sampling_deviation,
    sampling_positions,
)
from DeepSSMLogic.fileutil import atomic_write_json, atomic_write_text
from DeepSSMLogic.losses import correspondence_l2
from DeepSSMLogic.networks import BaseDeepSSM
from DeepSSMLogic.predict import exact_fp32_convolutions
from DeepSSMLogic.synthetic import make_grid, make_shape, sample_params

REPO = Path(__file__).resolve().parents[1]
PREPARED = REPO / ".gpu-check"  # git-ignored; carried to the GPU machine (see gpu_check_prepare.py)
DEFAULT_COHORT = PREPARED / "cohort" / "cohort.csv"
SIMPLEITK_ARCHIVE = PREPARED / "simpleitk.tar.xz"
EXIT_FAILED, EXIT_REFUSED = 1, 3
# The targets (issue 17), measured against eager fp32 in the same run.
TARGETS = {
    "forward_b1_ms": ("≤ 0.5 ms", lambda v: v <= 0.5),
    "volumes_per_s": ("≥ 5,000 /s", lambda v: v >= 5000),
    "train_samples_per_s": ("≥ 750 /s", lambda v: v >= 750),
    "tps_warps_per_s": ("≥ 500 /s at ≤ 0.05 voxel", lambda v: v >= 500),
}


class Refused(Exception):
    """The machine cannot run the check (no CUDA device, or a torch build without working kernels)."""


@dataclass(frozen=True)
class Sizes:
    """Problem sizes: the paper's (``FULL``) or tiny ones for a seconds-long dry run (``DRY``)."""

    image_xyz: tuple[int, int, int]  # grid size (X, Y, Z) voxels
    spacing: float  # mm
    particles: int
    modes: int
    conv_padding: str
    pool_size: int | None
    batch_volumes: int  # batched forward
    batch_train_ref: int  # the reference implementation's training batch
    batch_train: tuple[int, ...]  # ours
    batch_tps_ref: int
    batch_tps: int
    repeats: int

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        return self.image_xyz[2], self.image_xyz[1], self.image_xyz[0]


FULL = Sizes((118, 69, 88), 1.0, 1024, 20, "valid", None, 64, 8, (8, 32), 8, 64, 5)
DRY = Sizes((16, 16, 16), 6.0, 64, 4, "same", 2, 2, 2, (2,), 1, 2, 1)


def say(text: str = "") -> None:
    print(text, flush=True)


# -- step 1: environment and real kernels --------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        build = torch.version.cuda
        why = (
            "this torch is a CPU-only build (torch.version.cuda is None): install a CUDA wheel"
            if build is None
            else f"this torch is built for CUDA {build} but sees no GPU (driver missing or too old, "
            "CUDA_VISIBLE_DEVICES empty?)"
        )
        raise Refused(f"--device {name} requested but {why}")
    return device


def _nvidia_smi() -> str | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    query = "--query-gpu=name,driver_version,memory.total,compute_cap"
    try:
        res = subprocess.run(
            [exe, query, "--format=csv,noheader"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"nvidia-smi failed: {e}"
    return res.stdout.strip() or res.stderr.strip()


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": str(device),
        "cpu_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "nvidia_smi": _nvidia_smi(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env |= {
            "gpu": props.name,
            "capability": f"sm_{props.major}{props.minor}",
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "multiprocessors": props.multi_processor_count,
            "arch_list": torch.cuda.get_arch_list(),
            "tf32_conv_default": torch.backends.cudnn.allow_tf32,
        }
    else:
        env["gpu"] = platform.processor() or platform.machine()
    return env


def _arch_problem(env: dict[str, Any]) -> str | None:
    """A build without SASS for this card's major architecture and no PTX to JIT from: the kernels
    cannot run (the real kernels below decide; this only names the likely cause)."""
    cap, archs = env.get("capability"), env.get("arch_list") or []
    if cap is None or cap in archs:
        return None
    major_minor = int(cap[3:])
    ptx = [int(a[8:]) for a in archs if a.startswith("compute_") and a[8:].isdigit()]
    if any(p <= major_minor for p in ptx):
        return None
    return f"torch {env['torch']} carries kernels for {archs} but this GPU is {cap} ({env.get('gpu')})"


def kernel_check(device: torch.device) -> list[str]:
    """Run real kernels on ``device`` and compare with float64 on the CPU; returns the problems."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(256, 256, generator=g), torch.randn(256, 256, generator=g)
    x, w = torch.randn(2, 1, 20, 20, 20, generator=g), torch.randn(12, 1, 5, 5, 5, generator=g)
    # (name, what runs on the device, its float64 reference, inputs, relative tolerance)
    checks: list[tuple[str, Callable[..., torch.Tensor], Callable[..., torch.Tensor], tuple, float]] = [
        ("fp32 matmul", torch.matmul, torch.matmul, (a, b), 1e-4),
        ("fp32 conv3d 5x5x5", F.conv3d, F.conv3d, (x, w), 1e-4),
        ("bf16 matmul", lambda p, q: p.bfloat16() @ q.bfloat16(), torch.matmul, (a, b), 3e-2),
        ("reduction", lambda p, q: (p.sin() * q).sum(1), lambda p, q: (p.sin() * q).sum(1), (a, b), 1e-4),
    ]
    problems = []
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for name, on_device, reference, inputs, tol in checks:
            ref = reference(*(t.double() for t in inputs))
            try:
                with exact_fp32_convolutions(device):
                    got = on_device(*(t.to(device) for t in inputs))
                sync(device)
                got = got.double().cpu()
            except RuntimeError as e:  # "no kernel image is available for execution on the device"
                problems.append(f"{name}: {str(e).strip().splitlines()[0]}")
                continue
            err = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
            if not bool(torch.isfinite(got).all()) or not err <= tol:
                problems.append(
                    f"{name}: relative error {err:.2e} against float64 on the CPU (limit {tol:g})"
                )
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    return problems


def ensure_simpleitk() -> str:
    """SimpleITK importable (unpacking the carried archive when needed): its version, or why not."""
    try:
        import SimpleITK as sitk

        return sitk.Version_VersionString()
    except ImportError:
        pass
    if not SIMPLEITK_ARCHIVE.is_file():
        return f"absent (no {SIMPLEITK_ARCHIVE.relative_to(REPO)}; see benchmarks/gpu_check_prepare.py)"
    site = Path(tempfile.gettempdir()) / "deepssm-gpu-check-site"
    if not (site / "SimpleITK").is_dir():
        with tarfile.open(SIMPLEITK_ARCHIVE, "r:xz") as tar:
            tar.extractall(site, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    sys.path.insert(0, str(site))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    try:
        import SimpleITK as sitk

        return sitk.Version_VersionString() + " (unpacked from the carried archive)"
    except ImportError as e:
        return f"absent (the carried archive did not import: {e})"


# -- step 2: the CUDA tests -------------------------------------------------------------------------------
def run_cuda_tests(out: Path, timeout_s: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-m", "cuda", "-p", "no:cacheprovider"]
    cmd.append("Testing/test_cuda.py")
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    )
    t0 = time.perf_counter()
    try:
        res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
        text, rc = res.stdout + res.stderr, res.returncode
    except subprocess.TimeoutExpired as e:
        text, rc = f"{e.stdout or ''}{e.stderr or ''}\nTIMEOUT after {timeout_s:.0f} s", -1
    atomic_write_text(out / "pytest_cuda.log", text if isinstance(text, str) else text.decode())
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors)", str(text))}
    tail = "\n".join(str(text).strip().splitlines()[-15:])
    say(tail)
    ok = rc == 0 or (rc == 5 and not counts.get("failed"))  # 5: nothing collected/selected
    return {"returncode": rc, "ok": ok, "seconds": round(time.perf_counter() - t0, 1), **counts}


# -- step 3: timings --------------------------------------------------------------------------------------
def _network(sizes: Sizes, device: torch.device) -> BaseDeepSSM:
    """The paper's Base-DeepSSM (random weights, every layer non-zero so the output depends on the input)."""
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(3 * sizes.particles, sizes.modes, dtype=torch.float64))
    net = BaseDeepSSM(
        sizes.shape_zyx,
        sizes.modes,
        torch.randn(sizes.particles, 3) * 30,
        q.T,
        torch.zeros(sizes.modes),
        torch.ones(sizes.modes) * 5,
        conv_padding=sizes.conv_padding,
        pool_size=sizes.pool_size,
    )
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    return net.to(device)


@contextlib.contextmanager
def cudnn_benchmark(on: bool) -> Iterator[None]:
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = on
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


@dataclass(frozen=True)
class RunPath:
    """One way of running the network: memory format, autocast, autotuning, TF32, grad mode."""

    label: str
    channels_last: bool
    bf16: bool
    benchmark: bool
    exact_fp32: bool  # TF32 off (the predictor's choice)

    @contextlib.contextmanager
    def context(self, device: torch.device, grad: bool = False) -> Iterator[None]:
        mode = contextlib.nullcontext() if grad else torch.inference_mode()
        fp32 = exact_fp32_convolutions(device) if self.exact_fp32 else contextlib.nullcontext()
        with cudnn_benchmark(self.benchmark), fp32, mode:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16):
                yield

    def prepare(self, net: torch.nn.Module, x: torch.Tensor) -> tuple[torch.nn.Module, torch.Tensor]:
        fmt = torch.channels_last_3d if self.channels_last else torch.contiguous_format
        return net.to(memory_format=fmt), x.contiguous(memory_format=fmt)


EAGER = RunPath("eager fp32 (reference way)", False, False, False, False)
PREDICTOR = RunPath("predictor: channels_last_3d, full fp32", True, False, False, True)
FLAGS = RunPath("channels_last_3d + bf16 + cudnn.benchmark", True, True, True, False)
# on a CPU the trainer runs fp32 (precision "auto"), and bf16 without hardware support is very slow
CPU_FLAGS = RunPath("channels_last_3d fp32", True, False, False, False)


def throughput_path(device: torch.device) -> RunPath:
    """The trainer's own settings on ``device`` (``TrainConfig`` precision / channels_last "auto")."""
    return FLAGS if device.type == "cuda" else CPU_FLAGS


def _peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _forward_fn(
    net: torch.nn.Module, path: RunPath, device: torch.device
) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(x: torch.Tensor) -> torch.Tensor:
        with path.context(device):
            return net(x)[1]

    return run


def time_forward(sizes: Sizes, device: torch.device) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    reference = None
    for path in (EAGER, PREDICTOR, throughput_path(device)):
        _reset_peak(device)
        net = _network(sizes, device).eval()
        x1 = torch.randn(1, 1, *sizes.shape_zyx, generator=torch.Generator().manual_seed(1)).to(device)
        xb = torch.randn(sizes.batch_volumes, 1, *sizes.shape_zyx, device=device)
        net, x1 = path.prepare(net, x1)
        _, xb = path.prepare(net, xb)
        run = _forward_fn(net, path, device)
        t1 = best_time(lambda run=run, x1=x1: run(x1), device, sizes.repeats)
        tb = best_time(lambda run=run, xb=xb: run(xb), device, sizes.repeats)
        out = run(x1).float().cpu()
        reference = out if reference is None else reference
        rows.append(
            {
                "path": path.label,
                "forward_b1_ms": t1 * 1e3,
                "batch": sizes.batch_volumes,
                "volumes_per_s": sizes.batch_volumes / tb,
                "max_dev_vs_eager_mm": float((out - reference).abs().max()),
                "peak_gib": _peak_gib(device),
            }
        )
        say(
            f"  forward  {path.label:45s} b1 {t1 * 1e3:8.2f} ms   "
            f"b{sizes.batch_volumes} {sizes.batch_volumes / tb:9.1f} vol/s"
        )
        del net, x1, xb, run
    return rows


def _train_step_fn(
    net: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, path: RunPath, device: torch.device
) -> tuple[Callable[[], None], list[torch.Tensor]]:
    """One Adam step on the correspondence loss (what the trainer does per batch) and its loss log."""
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-4, weight_decay=5e-5)
    losses: list[torch.Tensor] = []

    def step() -> None:
        with path.context(device, grad=True):
            loss = correspondence_l2(net(x)[1], target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach().float())

    return step, losses


def time_training(sizes: Sizes, device: torch.device) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    runs = [(EAGER, sizes.batch_train_ref)] + [(throughput_path(device), b) for b in sizes.batch_train]
    for path, batch in runs:
        _reset_peak(device)
        net = _network(sizes, device).train()
        x = torch.randn(batch, 1, *sizes.shape_zyx, device=device)
        target = torch.randn(batch, sizes.particles, 3, device=device) * 30
        net, x = path.prepare(net, x)
        step, losses = _train_step_fn(net, x, target, path, device)
        t = best_time(step, device, sizes.repeats)
        label = path.label if path is EAGER else "trainer: " + path.label
        rows.append(
            {
                "path": label,
                "batch": batch,
                "step_ms": t * 1e3,
                "train_samples_per_s": batch / t,
                "losses_finite": bool(torch.isfinite(torch.stack(losses)).all()),
                "peak_gib": _peak_gib(device),
            }
        )
        say(f"  train    {label:45s} b{batch:<3d} {t * 1e3:8.1f} ms/step {batch / t:9.1f} samples/s")
        del net, x, target, step, losses
    return rows


def _landmark_pairs(sizes: Sizes) -> tuple[Any, np.ndarray, np.ndarray]:
    """The grid and 4 ``(source, target)`` femur correspondence sets ``(4, M, 3)`` mm: different
    shapes, the target also moved by a small rigid pose (displacements of several voxels)."""
    grid = make_grid(sizes.image_xyz, sizes.spacing)
    src, tgt = [], []
    for i in range(4):
        rng = np.random.default_rng(100 + i)
        v, _, idx = make_shape("femur", sample_params("femur", rng), grid=grid, n_particles=sizes.particles)
        angle = np.deg2rad(3.0 + i)
        pose = np.eye(4)
        pose[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
        pose[:3, 3] = (2.0, -1.5, 1.0)
        v2, _, _ = make_shape(
            "femur", sample_params("femur", rng), grid=grid, n_particles=sizes.particles, pose=pose
        )
        src.append(v[idx])
        tgt.append(v2[idx])
    return grid, np.stack(src), np.stack(tgt)


def _warp(grid: Any, src: np.ndarray, tgt: np.ndarray, images: torch.Tensor, coarse: int) -> torch.Tensor:
    """One batched augmentation warp as write_augmented_set does it: fit, sampling positions, resample."""
    spline = fit_warp(src, tgt, device=images.device)
    return resample(images, grid, sampling_positions(spline, grid, coarse=coarse, band=DEFAULT_BAND))


def time_tps(sizes: Sizes, device: torch.device) -> list[dict[str, Any]]:
    grid, src4, tgt4 = _landmark_pairs(sizes)
    image = torch.randn(1, 1, *grid.shape_zyx, device=device)
    rows = []
    fast_dev = None
    for label, coarse, batch in (
        ("exact spline (coarse=1)", 1, sizes.batch_tps_ref),
        (
            f"ours: fast path (coarse={DEFAULT_COARSE}, band={DEFAULT_BAND:g})",
            DEFAULT_COARSE,
            sizes.batch_tps,
        ),
    ):
        _reset_peak(device)
        pick = np.arange(batch) % 4
        images = image.expand(batch, -1, -1, -1, -1).contiguous()

        t = best_time(partial(_warp, grid, src4[pick], tgt4[pick], images, coarse), device, sizes.repeats)
        if coarse > 1:
            spline = fit_warp(src4, tgt4, device=device)
            fast_dev = sampling_deviation(spline, grid, coarse=coarse, band=DEFAULT_BAND)
        rows.append(
            {
                "path": label,
                "batch": batch,
                "seconds_per_batch": t,
                "tps_warps_per_s": batch / t,
                "landmarks": sizes.particles,
                "max_dev_voxels": 0.0 if coarse == 1 else fast_dev["max_voxels"],
                "mean_dev_voxels": 0.0 if coarse == 1 else fast_dev["mean_voxels"],
                "peak_gib": _peak_gib(device),
            }
        )
        say(f"  tps      {label:45s} b{batch:<3d} {batch / t:9.1f} warps/s")
    return rows


# -- step 4: end to end ------------------------------------------------------------------------------
def end_to_end(
    cohort_csv: Path, device: torch.device, out: Path, timeout_s: float, simpleitk: str
) -> dict[str, Any]:
    if not cohort_csv.is_file():
        return {
            "status": "skipped",
            "reason": f"no prepared cohort at {cohort_csv} (benchmarks/gpu_check_prepare.py)",
        }
    if simpleitk.startswith("absent"):
        return {"status": "skipped", "reason": f"SimpleITK {simpleitk}"}
    with open(cohort_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    tests = [cohort_csv.parent / r["image"] for r in rows if r.get("split") == "test"][:3]
    work = Path(tempfile.mkdtemp(prefix="deepssm-gpu-e2e-"))
    cli = [sys.executable, "-m", "DeepSSMLogic.cli"]
    dev = ["--device", device.type]
    steps = {
        "train": cli + ["train", str(cohort_csv), "--out", str(work / "model.zip"), "--epochs", "3",
                        "--augment", "16", "--batch-size", "4", "--seed", "0", "--quiet", *dev],
        "predict": cli + ["predict", str(work / "model.zip"), *map(str, tests), "--out", str(work / "pred"),
                          "--quiet", *dev],
        "augment": cli + ["augment", str(cohort_csv), "--n", "16", "--out", str(work / "aug"), "--quiet", *dev],
    }  # fmt: skip
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    )
    log, result = [], {"status": "passed", "device": device.type, "work_dir": str(work)}
    deadline = time.perf_counter() + timeout_s
    for name, cmd in steps.items():
        t0 = time.perf_counter()
        try:
            res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                                 timeout=max(1.0, deadline - t0))  # fmt: skip
            rc, text = res.returncode, res.stdout + res.stderr
        except subprocess.TimeoutExpired:
            rc, text = -1, f"TIMEOUT (the end-to-end step has {timeout_s:.0f} s in all)"
        result[name] = {"returncode": rc, "seconds": round(time.perf_counter() - t0, 1)}
        log.append(f"$ {' '.join(cmd)}\n{text}\n[rc {rc}]\n")
        say(f"  e2e {name}: rc {rc}, {result[name]['seconds']} s")
        if rc != 0:
            result["status"] = "failed"
            break
    if result["status"] == "passed":
        result["checks"] = _check_e2e_outputs(work, tests)
        if not all(result["checks"].values()):
            result["status"] = "failed"
    atomic_write_text(out / "e2e.log", "\n".join(log))
    if result["status"] == "passed":
        shutil.rmtree(work)  # made above; kept only when something failed
        del result["work_dir"]
    return result


def _check_e2e_outputs(work: Path, tests: list[Path]) -> dict[str, bool]:
    from DeepSSMLogic.bundle import load_bundle
    from DeepSSMLogic.io import read_particles

    bundle = load_bundle(work / "model.zip")
    summary = bundle.meta.get("training_summary", {})
    preds = [work / "pred" / (t.name.split(".")[0] + ".particles") for t in tests]
    aug = json.loads((work / "aug" / "augmentation.json").read_text()) if (work / "aug").is_dir() else {}
    return {
        "bundle_loads_and_val_rmse_finite": bool(np.isfinite(summary.get("best_val_rmse_mm", np.nan))),
        "predictions_finite": all(p.is_file() and np.isfinite(read_particles(p)).all() for p in preds),
        "augmented_set_complete": aug.get("completed") == 16,
    }


# -- report ---------------------------------------------------------------------------------------
def summary_rows(timings: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One line per target: the reference value, the best of ours (named), the ratio, met or not."""
    fwd, train, tps = timings["forward"], timings["training"], timings["tps"]
    lines = []

    def line(metric: str, ref: dict, ours: list[dict], key: str, lower_better: bool) -> None:
        best = min(ours, key=lambda r: r[key]) if lower_better else max(ours, key=lambda r: r[key])
        ratio = ref[key] / best[key] if lower_better else best[key] / ref[key]
        text, ok = TARGETS[key]
        met = ok(best[key]) and (key != "tps_warps_per_s" or best["max_dev_voxels"] <= 0.05)
        lines.append(
            {"metric": metric, "reference": ref[key], "ours": best[key], "ours_path": best["path"],
             "speedup": ratio, "target": text, "met": met}
        )  # fmt: skip

    line("forward, batch 1 (ms)", fwd[0], fwd[1:], "forward_b1_ms", True)
    line(f"forward, batch {fwd[0]['batch']} (volumes/s)", fwd[0], fwd[1:], "volumes_per_s", False)
    line("training (samples/s)", train[0], train[1:], "train_samples_per_s", False)
    line(f"TPS warp, {tps[0]['landmarks']} landmarks (warps/s)", tps[0], tps[1:], "tps_warps_per_s", False)
    return lines


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    out = [
        f"GPU check, {report['date']}: {env.get('gpu')} ({env.get('capability', env['device'])}), "
        f"torch {env['torch']}, CUDA {env['torch_cuda']}, cuDNN {env['cudnn']}, "
        f"driver: {env.get('nvidia_smi') or 'n/a'}; sizes: {report['sizes']}",
        "",
        "| measurement | eager fp32 (reference way) | ours (best path) | ours ÷ reference | target | met |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["summary"]:
        out.append(
            f"| {r['metric']} | {r['reference']:.4g} | {r['ours']:.4g} ({r['ours_path']}) | "
            f"{r['speedup']:.2f}× | {r['target']} | {'yes' if r['met'] else 'no'} |"
        )
    tps = report["timings"]["tps"][-1]
    out += [
        "",
        f"TPS fast path: max {tps['max_dev_voxels']:.4f} voxel (mean {tps['mean_dev_voxels']:.5f}) from the exact spline.",
        f"CUDA tests: {report['cuda_tests']}",
        f"End to end: {report['end_to_end']}",
        "",
        "All rows:",
        "",
        "| step | path | batch | value | peak GiB |",
        "|---|---|---|---|---|",
    ]
    for step, key in (
        ("forward", "volumes_per_s"),
        ("training", "train_samples_per_s"),
        ("tps", "tps_warps_per_s"),
    ):
        for r in report["timings"][step]:
            extra = f"b1 {r['forward_b1_ms']:.3f} ms, " if step == "forward" else ""
            out.append(f"| {step} | {r['path']} | {r['batch']} | {extra}{r[key]:.1f} /s | {r['peak_gib']} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--device", default="cuda", help="cuda (default; refuses without one), cuda:N, cpu or auto"
    )
    ap.add_argument(
        "--dry-run", action="store_true", help="tiny sizes, one repeat: checks the script in seconds"
    )
    ap.add_argument("--out", default=str(REPO / "out" / "gpu-check"), help="where the report files go")
    ap.add_argument(
        "--cohort", default=str(DEFAULT_COHORT), help="prepared cohort.csv for the end-to-end step"
    )
    ap.add_argument("--skip-tests", action="store_true", help="do not run pytest -m cuda")
    ap.add_argument("--skip-e2e", action="store_true", help="do not run the end-to-end CLI step")
    ap.add_argument("--tests-timeout", type=float, default=300.0, help="seconds for the CUDA tests")
    ap.add_argument("--e2e-timeout", type=float, default=200.0, help="seconds for the end-to-end step")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = DRY if args.dry_run else FULL
    if args.dry_run:
        torch.set_num_threads(1)  # tiny tensors: threads only contend (10x slower on a shared machine)
    t_start = time.perf_counter()

    say("== 1. environment and real kernels")
    try:
        device = resolve_device(args.device)
        env = environment(device)
        for k, v in env.items():
            say(f"  {k}: {v}")
        problems = kernel_check(device)
        arch = _arch_problem(env) if device.type == "cuda" else None
        if problems:
            hint = f" (likely cause: {arch})" if arch else ""
            raise Refused(
                "this torch build does not run correct kernels on this device"
                + hint
                + ":\n    "
                + "\n    ".join(problems)
                + "\n  Install a torch wheel built for this GPU's architecture and CUDA driver "
                "(https://pytorch.org/get-started/locally/); training here would produce garbage or fail."
            )
        if arch:
            say(f"  note: {arch}; its kernels ran correctly anyway (PTX JIT or forward-compatible SASS)")
        say("  kernels: fp32 matmul, fp32 conv3d, bf16 matmul and a reduction match float64 on the CPU")
    except Refused as e:
        say(f"\nREFUSED: {e}")
        atomic_write_json(out / "gpu_check.json", {"refused": str(e)})
        return EXIT_REFUSED
    env["simpleitk"] = ensure_simpleitk()
    say(f"  simpleitk: {env['simpleitk']}")

    say("\n== 2. CUDA tests (pytest -m cuda)")
    tests = (
        {"status": "skipped (--skip-tests)"} if args.skip_tests else run_cuda_tests(out, args.tests_timeout)
    )

    say(f"\n== 3. timings ({'dry run: tiny sizes' if args.dry_run else 'the paper grid'}, device {device})")
    timings = {
        "forward": time_forward(sizes, device),
        "training": time_training(sizes, device),
        "tps": time_tps(sizes, device),
    }

    say("\n== 4. end to end (deepssm train / predict / augment)")
    if args.skip_e2e:
        e2e = {"status": "skipped", "reason": "--skip-e2e"}
    else:
        e2e = end_to_end(Path(args.cohort), device, out, args.e2e_timeout, env["simpleitk"])
    if e2e["status"] == "skipped":
        say(f"  skipped: {e2e['reason']}")

    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "dry_run": args.dry_run,
        "sizes": f"{sizes.image_xyz[0]}×{sizes.image_xyz[1]}×{sizes.image_xyz[2]}, {sizes.particles} particles",
        "environment": env,
        "cuda_tests": tests,
        "timings": timings,
        "summary": summary_rows(timings),
        "end_to_end": e2e,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    atomic_write_json(out / "gpu_check.json", report)
    md = markdown(report)
    atomic_write_text(out / "gpu_check.md", md)
    say("\n== summary\n" + md)
    failed = (tests.get("ok") is False) or e2e["status"] == "failed"
    say(f"{'FAILED' if failed else 'OK'} in {report['seconds']} s; report: {out / 'gpu_check.md'}")
    return EXIT_FAILED if failed else 0


if __name__ == "__main__":
    sys.exit(main())
