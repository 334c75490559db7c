"""Time to accuracy (issue 16): held-out RMSE against wall-clock training time, per configuration.

For each dataset (a synthetic family generated here, or ``--cohort CSV``) the script prepares the
training arrays once — reference grid, resampled images, intensity normaliser, PCA shape model,
offline KDE augmentation — and then trains every configuration on exactly those arrays with the
same seed: by default ``paper`` (the paper's network), ``light`` (``encoder="light"``) and ``light2``
(``encoder="light2"``, ``deepssm train``'s default since issue 16); ``--configs`` picks others: ``light-x3``
(light with 3× the epochs), optimiser variants and experimental light stacks (``CANDIDATES``; each
``LightSpec`` is registered under its own encoder name for the run). After every epoch the trainer evaluates the
held-out subjects (the cohort's ``test`` split, else ``val``), so the curve is held-out RMSE (mm, per
sample per-point Euclidean RMSE, mean over subjects) against cumulative epoch seconds (training +
that evaluation; data preparation excluded, identical for all configurations); the same curve is
also kept against process CPU seconds (all threads), which a shared machine's other jobs disturb
far less than the wall-clock. ``--patience P`` stops every configuration after P epochs without a
better held-out RMSE.

**Reference** = the best held-out RMSE the ``paper`` configuration reaches in this run
(``--paper-epochs``, default ``--epochs``; give it more epochs and ``--patience`` so that it is the
converged network of issue 16's definition); **target** = 1.05 × reference; **time to target** = cumulative
seconds at the first epoch whose held-out RMSE ≤ target (``—``: never reached). "final" is the last
epoch's held-out RMSE (the trainer also restores the best epoch at the end, selected on these
held-out subjects; the benchmark reports the curve, not that selection). FLOPs: 2 × multiply-adds of
every Conv3d and Linear for one volume (batch norm, activations and pooling not counted).

Writes ``time_to_accuracy.json``, ``time_to_accuracy.png`` and prints a Markdown table.

    python benchmarks/time_to_accuracy.py --out /tmp/tta --families femur atrium cranium
    python benchmarks/time_to_accuracy.py --quick --out /tmp/tta-quick   # < 1 min, smoke test
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

FAMILIES = ("femur", "atrium", "cranium")
TARGET_FACTOR = 1.05


@dataclass(frozen=True)
class Candidate:
    """One configuration: encoder, a multiple of the run's epochs and optimiser overrides."""

    name: str
    encoder: str
    epoch_factor: int = 1
    lr: float | None = None  # None: TrainConfig's default
    weight_decay: float | None = None
    spec: Any = None  # a networks.LightSpec registered under ``encoder`` for this run (experiments)
    pool_size: int | None = None  # adaptive average pool before the FC layer (None: flatten)
    precision: str | None = None  # TrainConfig.precision ("bf16": CPU autocast); None: its default


def _spec(**kw: Any) -> Any:
    from DeepSSMLogic.networks import LightSpec

    return LightSpec(**kw)


CANDIDATES = {
    "paper": Candidate("paper", "paper"),
    "light": Candidate("light", "light"),
    "light-x3": Candidate("light-x3", "light", 3),
    "light2": Candidate("light2", "light2"),  # = light-pool below, shipped under its own name
    "light2-bf16": Candidate("light2-bf16", "light2", precision="bf16"),  # bf16 autocast on the CPU
    "light3": Candidate("light3", "light3"),  # light2 + a 1×1×1 reduction to 16 channels (checkpoint size)
    # optimiser variants of light
    "light-lr3e-4": Candidate("light-lr3e-4", "light", lr=3e-4),
    "light-wd1e-3": Candidate("light-wd1e-3", "light", weight_decay=1e-3),
    # experimental light stacks (issue 16, atrium gap); registered under their own encoder names
    "light-stem8": Candidate("light-stem8", "x-stem8", spec=_spec(stem=8)),
    "light-pool": Candidate("light-pool", "x-pool", spec=_spec(pool=3)),
    "light-stem8-pool": Candidate("light-stem8-pool", "x-stem8-pool", spec=_spec(stem=8, pool=3)),
    "light-wide": Candidate("light-wide", "x-wide", spec=_spec(channels=(24, 48, 96))),
    "light-2blk": Candidate("light-2blk", "x-2blk", spec=_spec(blocks=2)),
    "light-stem16": Candidate("light-stem16", "x-stem16", spec=_spec(stem=16)),
    "light-stem8-wd1e-3": Candidate("light-stem8-wd1e-3", "x-stem8", weight_decay=1e-3, spec=_spec(stem=8)),
    "light-pool-wd1e-3": Candidate("light-pool-wd1e-3", "x-pool", weight_decay=1e-3, spec=_spec(pool=3)),
    "light-pool-lr3e-4": Candidate("light-pool-lr3e-4", "x-pool", lr=3e-4, spec=_spec(pool=3)),
    "light-pool-2blk": Candidate("light-pool-2blk", "x-pool-2blk", spec=_spec(pool=3, blocks=2)),
    "light-pool-wide": Candidate("light-pool-wide", "x-pool-wide", spec=_spec(pool=3, channels=(24, 48, 96))),
    "light-pool-4lvl": Candidate(
        "light-pool-4lvl", "x-pool-4lvl", spec=_spec(pool=4, channels=(16, 32, 64, 128))
    ),
    "light-pool-p2": Candidate("light-pool-p2", "x-pool", pool_size=2, spec=_spec(pool=3)),
    "light-pool-p1": Candidate("light-pool-p1", "x-pool", pool_size=1, spec=_spec(pool=3)),
    "light-pool-wd1e-2": Candidate("light-pool-wd1e-2", "x-pool", weight_decay=1e-2, spec=_spec(pool=3)),
    "light-pool1": Candidate("light-pool1", "x-pool1", spec=_spec(pool=1)),
    "light-pool2": Candidate("light-pool2", "x-pool2", spec=_spec(pool=2)),
    "light-pool-c8": Candidate("light-pool-c8", "x-pool-c8", spec=_spec(pool=3, channels=(8, 32, 64))),
    "light-pool1-c8": Candidate("light-pool1-c8", "x-pool1-c8", spec=_spec(pool=1, channels=(8, 32, 64))),
    # checkpoint size (issue 16): light2 with fewer FC inputs (a 1×1×1 reduction) or a narrower first FC layer
    "light3-r24": Candidate("light3-r24", "x-r24", spec=_spec(pool=3, reduce=24)),
    "light3-r32": Candidate("light3-r32", "x-r32", spec=_spec(pool=3, reduce=32)),
    "light2-fc128": Candidate("light2-fc128", "x-fc128", spec=_spec(pool=3, fc=128)),
    "light2-fc192": Candidate("light2-fc192", "x-fc192", spec=_spec(pool=3, fc=192)),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (created; must not hold a previous run)")
    p.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    p.add_argument("--cohort", help="also (or with --families none given: only) run on this cohort CSV")
    p.add_argument("--configs", nargs="+", choices=sorted(CANDIDATES), default=["paper", "light", "light2"])
    p.add_argument("--n-subjects", type=int, default=40, help="synthetic subjects per family")
    p.add_argument("--image-size", type=int, default=64, help="synthetic image voxels per axis")
    p.add_argument("--image-spacing", type=float, default=1.5, help="synthetic image spacing, mm")
    p.add_argument("--particles", type=int, default=256)
    p.add_argument("--grid-spacing", type=float, default=3.0, help="reference grid spacing, mm (demo: 3)")
    p.add_argument("--augment", type=int, default=200, help="offline augmented samples")
    p.add_argument("--epochs", type=int, default=20, help="epochs of the candidate configurations")
    p.add_argument(
        "--paper-epochs",
        type=int,
        help="epochs of the paper configuration, the reference (default: --epochs); longer, with "
        "--patience, for a converged reference",
    )
    p.add_argument(
        "--patience",
        type=int,
        help="early stopping: stop a configuration after this many epochs without a better held-out RMSE",
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--quick", action="store_true", help="tiny smoke run (one family, a few seconds)")
    args = p.parse_args(argv)
    if args.quick:
        args.families = args.families[:1] if argv and "--families" in argv else ["femur"]
        args.n_subjects, args.image_size, args.image_spacing = 12, 24, 3.0
        args.particles, args.grid_spacing, args.augment, args.epochs = 32, 4.5, 6, 2
    if args.paper_epochs is None:
        args.paper_epochs = args.epochs
    if args.cohort:
        args.families = args.families if argv and "--families" in argv else []
    return args


# -- measurements -------------------------------------------------------------------------------


def forward_flops(model: torch.nn.Module, shape_zyx: tuple[int, ...]) -> int:
    """2 × multiply-adds of every Conv3d and Linear for one ``(1, 1, Z, Y, X)`` volume."""
    total = 0

    def conv_hook(m: torch.nn.Conv3d, _inp: Any, out: torch.Tensor) -> None:
        nonlocal total
        total += 2 * out.numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)

    def linear_hook(m: torch.nn.Linear, _inp: Any, out: torch.Tensor) -> None:
        nonlocal total
        total += 2 * (out.numel() // m.out_features) * m.in_features * m.out_features

    handles = []
    for m in model.modules():
        if isinstance(m, torch.nn.Conv3d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, torch.nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros((1, 1, *shape_zyx)))
    model.train(was_training)
    for h in handles:
        h.remove()
    return total


def time_to_target(curve: list[tuple[float, float]], target: float) -> float | None:
    """Cumulative seconds of the first ``(seconds, rmse)`` point with ``rmse ≤ target``, else None."""
    for t, r in curve:
        if r <= target:
            return t
    return None


# -- data ---------------------------------------------------------------------------------------


@dataclass
class Prepared:
    name: str
    grid: Any
    train_images: np.ndarray  # (N, Z, Y, X) raw
    train_particles: np.ndarray  # (N, M, 3) mm
    test_images: np.ndarray
    test_particles: np.ndarray
    normalizer: Any
    shape_model: Any
    reference: Any  # SimpleITK mean image
    augmented: Any  # AugmentedSet
    mean_shape_rmse: float
    seconds: float


def prepare(name: str, cohort_csv: Path, work: Path, args: argparse.Namespace) -> Prepared:
    from DeepSSMLogic import io
    from DeepSSMLogic.augment import dataset as aug_dataset
    from DeepSSMLogic.augment import make_sampler
    from DeepSSMLogic.cohort import load_cohort
    from DeepSSMLogic.pipeline import mean_reference_image, prepare_training_arrays, reference_grid
    from DeepSSMLogic.preprocess import IntensityNormalizer
    from DeepSSMLogic.shape_model import ShapeModel

    t0 = time.perf_counter()
    cohort = load_cohort(cohort_csv)
    train_subjects = cohort.by_split("train")
    held_out = [s for s in cohort.by_split("test") if s.particles is not None] or [
        s for s in cohort.by_split("val") if s.particles is not None
    ]
    if not held_out:
        raise SystemExit(f"{cohort_csv}: no test or val subjects with particles to hold out")
    particles = np.stack([io.read_particles(s.particles) for s in train_subjects])
    grid = reference_grid(particles, args.grid_spacing)
    train = prepare_training_arrays(train_subjects, grid)
    test = prepare_training_arrays(held_out, grid)
    normalizer = IntensityNormalizer.fit(train.images)
    shape_model = ShapeModel.fit(train.particles)
    sampler = make_sampler("kde")
    sampler.fit(shape_model.project(train.particles))
    aug_dir = aug_dataset.write_augmented_set(
        work / "augmentation", train.images, train.particles, grid, shape_model, sampler, args.augment,
        seed=args.seed, device="cpu",
    )  # fmt: skip
    mean = train.particles.mean(axis=0)
    rmse = np.sqrt(((test.particles - mean[None]) ** 2).sum(-1).mean(-1))
    return Prepared(
        name, grid, train.images, train.particles, test.images, test.particles, normalizer, shape_model,
        mean_reference_image(train.images, grid), aug_dataset.AugmentedSet(aug_dir), float(rmse.mean()),
        time.perf_counter() - t0,
    )  # fmt: skip


def synthetic_cohort(family: str, out: Path, args: argparse.Namespace) -> Path:
    from DeepSSMLogic import synthetic

    return synthetic.generate_cohort(
        family, args.n_subjects, out, args.seed,
        image_size=(args.image_size,) * 3, spacing=args.image_spacing, n_particles=args.particles,
    )  # fmt: skip


# -- one configuration --------------------------------------------------------------------------


def run_candidate(cand: Candidate, data: Prepared, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    from DeepSSMLogic import networks
    from DeepSSMLogic.bundle import save_bundle
    from DeepSSMLogic.networks import count_parameters
    from DeepSSMLogic.pipeline import _ArrayDataset, _Concat, choose_conv_padding
    from DeepSSMLogic.training import CHECKPOINT_NAME, TrainConfig, train

    if cand.spec is not None:
        known = networks.LIGHT_ENCODERS.setdefault(cand.encoder, cand.spec)
        if known != cand.spec:
            raise SystemExit(f"encoder {cand.encoder!r} already names another stack: {known}")
    padding = choose_conv_padding(data.grid, "auto", cand.encoder)
    epochs = args.paper_epochs if cand.name == "paper" else args.epochs * cand.epoch_factor
    pairs = (
        ("lr", cand.lr),
        ("weight_decay", cand.weight_decay),
        ("pool_size", cand.pool_size),
        ("precision", cand.precision),
    )
    overrides = {k: v for k, v in pairs if v is not None}
    config = TrainConfig(
        variant="base", epochs=epochs, batch_size=args.batch_size, seed=args.seed,
        device="cpu", conv_padding=padding, encoder=cand.encoder, patience=args.patience, **overrides,
    )  # fmt: skip
    train_set = _Concat([_ArrayDataset(data.train_images, data.train_particles), data.augmented])
    test_set = _ArrayDataset(data.test_images, data.test_particles)
    out_dir = work / cand.name
    cpu_marks = [time.process_time()]  # process CPU seconds (all threads) at the end of each epoch

    def on_epoch(event: Any) -> None:
        if event.stage == "train":
            cpu_marks.append(time.process_time())

    result = train(
        config, train_set, test_set, out_dir, on_epoch, shape_model=data.shape_model,
        image_transform=data.normalizer,
    )  # fmt: skip
    elapsed, curve, losses = 0.0, [], []
    for h in result.history:
        elapsed += float(h["seconds"])
        curve.append((elapsed, float(h["val_rmse_mm"])))
        losses.append((float(h["train_loss"]), float(h["val_loss"])))
    cpu = [m - cpu_marks[0] for m in cpu_marks[1:]]
    net = result.model
    k = int(result.architecture["n_modes"])
    sm = data.shape_model.truncated(k)
    sm.score_mean = net.score_mean.detach().double().numpy()
    sm.score_std = net.score_std.detach().double().numpy()
    bundle = save_bundle(
        out_dir / "model.zip", net, result.architecture, data.grid, data.normalizer, sm, data.reference,
        training_summary=result.summary(),
    )  # fmt: skip
    return {
        "encoder": cand.encoder,
        "conv_padding": padding,
        "epochs": config.epochs,
        "stopped_early": len(curve) < config.epochs,
        "curve": [
            {"seconds": t, "cpu_seconds": c, "heldout_rmse_mm": r, "train_loss": tl, "heldout_loss": vl}
            for (t, r), c, (tl, vl) in zip(curve, cpu, losses, strict=True)
        ],
        "final_rmse_mm": curve[-1][1],
        "best_rmse_mm": min(r for _, r in curve),
        "train_seconds": elapsed,
        "seconds_per_epoch": elapsed / len(curve),
        "cpu_seconds": cpu[-1],
        "parameters": count_parameters(net, trainable_only=True),
        "gflop_per_forward": forward_flops(net, data.grid.shape_zyx) / 1e9,
        "checkpoint_mb": (out_dir / CHECKPOINT_NAME).stat().st_size / 1e6,
        "bundle_mb": bundle.stat().st_size / 1e6,
    }


def summarise(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Adds the reference, target, time to target and ratios to the paper row (in place)."""
    reference = rows["paper"]["best_rmse_mm"] if "paper" in rows else None
    if reference is None:
        return {"reference_rmse_mm": None, "target_rmse_mm": None}
    target = TARGET_FACTOR * reference
    for row in rows.values():
        row["time_to_target_s"] = time_to_target(
            [(p["seconds"], p["heldout_rmse_mm"]) for p in row["curve"]], target
        )
        row["cpu_to_target_s"] = time_to_target(
            [(p["cpu_seconds"], p["heldout_rmse_mm"]) for p in row["curve"]], target
        )
    paper_t, paper_cpu = rows["paper"]["time_to_target_s"], rows["paper"]["cpu_to_target_s"]
    for row in rows.values():
        t, c = row["time_to_target_s"], row["cpu_to_target_s"]
        row["speedup_to_target_vs_paper"] = paper_t / t if t else None
        row["cpu_speedup_to_target_vs_paper"] = paper_cpu / c if c else None
        row["epoch_speedup_vs_paper"] = rows["paper"]["seconds_per_epoch"] / row["seconds_per_epoch"]
    return {"reference_rmse_mm": reference, "target_rmse_mm": target}


# -- output -------------------------------------------------------------------------------------


def _f(v: Any, fmt: str) -> str:
    return "—" if v is None else format(v, fmt)


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "| data | config | epochs run | s/epoch | time to 1.05×ref (s) | speed-up to target | "
        "CPU s to 1.05×ref | CPU speed-up | final RMSE (mm) | best RMSE (mm) | mean-shape RMSE (mm) | "
        "parameters | GFLOP/forward | checkpoint (MB) | bundle (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, ds in results["datasets"].items():
        for cname, r in ds["configs"].items():
            lines.append(
                f"| {name} (ref {_f(ds['reference_rmse_mm'], '.3f')}) | {cname} | {len(r['curve'])}/{r['epochs']} | "
                f"{r['seconds_per_epoch']:.1f} | {_f(r.get('time_to_target_s'), '.0f')} | "
                f"{_f(r.get('speedup_to_target_vs_paper'), '.1f')}{'×' if r.get('speedup_to_target_vs_paper') else ''} | "
                f"{_f(r.get('cpu_to_target_s'), '.0f')} | "
                f"{_f(r.get('cpu_speedup_to_target_vs_paper'), '.1f')}{'×' if r.get('cpu_speedup_to_target_vs_paper') else ''} | "
                f"{r['final_rmse_mm']:.3f} | {r['best_rmse_mm']:.3f} | {ds['mean_shape_rmse_mm']:.3f} | "
                f"{r['parameters']:,} | {r['gflop_per_forward']:.3f} | {r['checkpoint_mb']:.1f} | {r['bundle_mb']:.2f} |"
            )  # fmt: skip
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["datasets"])
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        ds = results["datasets"][name]
        for cname, r in ds["configs"].items():
            ax.plot([p["seconds"] for p in r["curve"]], [p["heldout_rmse_mm"] for p in r["curve"]], "o-",
                    ms=3, label=cname)  # fmt: skip
        if ds["target_rmse_mm"] is not None:
            ax.axhline(ds["target_rmse_mm"], color="k", ls="--", lw=0.8, label="1.05 × paper best")
        ax.axhline(ds["mean_shape_rmse_mm"], color="grey", ls=":", lw=0.8, label="mean shape")
        ax.set(title=name, xlabel="training wall-clock (s)", ylabel="held-out RMSE (mm)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if (out / "time_to_accuracy.json").exists():
        raise SystemExit(f"{out}: holds a previous run (time_to_accuracy.json); choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    datasets: list[tuple[str, Path | None]] = [(f, None) for f in args.families]
    if args.cohort:
        datasets.append((Path(args.cohort).stem, Path(args.cohort)))
    t_run = time.perf_counter()
    results: dict[str, Any] = {
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": {"threads": torch.get_num_threads(), "torch": torch.__version__},
        "definitions": {
            "reference": "best held-out RMSE of the 'paper' configuration in this run",
            "target": f"{TARGET_FACTOR} x reference",
            "time": "cumulative epoch seconds (training + held-out evaluation), data preparation excluded",
            "cpu_time": "process CPU seconds (all threads) over the same epochs (+ checkpoint writes): "
            "less sensitive to other jobs on a shared machine than the wall-clock",
            "flops": "2 x multiply-adds of Conv3d and Linear layers, one volume",
        },
        "datasets": {},
    }
    for name, csv in datasets:
        work = out / name
        csv = csv or synthetic_cohort(name, work / "cohort", args)
        data = prepare(name, csv, work, args)
        print(f"[{name}] grid {data.grid.size} at {data.grid.spacing} mm, {len(data.train_images)} train + "
              f"{len(data.augmented)} augmented, {len(data.test_images)} held out ({data.seconds:.0f} s)",
              flush=True)  # fmt: skip
        rows: dict[str, dict[str, Any]] = {}
        for cname in args.configs:
            rows[cname] = run_candidate(CANDIDATES[cname], data, work, args)
            print(f"[{name}] {cname}: {rows[cname]['train_seconds']:.0f} s, final "
                  f"{rows[cname]['final_rmse_mm']:.3f} mm", flush=True)  # fmt: skip
        results["datasets"][name] = {
            "grid_size_xyz": list(data.grid.size),
            "grid_spacing_mm": list(data.grid.spacing),
            "n_train": len(data.train_images),
            "n_augmented": len(data.augmented),
            "n_heldout": len(data.test_images),
            "mean_shape_rmse_mm": data.mean_shape_rmse,
            "prepare_seconds": data.seconds,
            **summarise(rows),
            "configs": rows,
        }
        results["complete"] = name == datasets[-1][0]
        results["seconds_total"] = time.perf_counter() - t_run
        write_outputs(results, out)  # after every dataset: a cut-off run keeps what it measured
    print(markdown(results))
    return 0


def write_outputs(results: dict[str, Any], out: Path) -> None:
    """``time_to_accuracy.json`` and ``.png``, each written to a temporary name and renamed."""
    from DeepSSMLogic.fileutil import atomic_write_text

    atomic_write_text(out / "time_to_accuracy.json", json.dumps(results, indent=1))
    tmp = out / "time_to_accuracy.tmp.png"
    plot(results, tmp)
    tmp.replace(out / "time_to_accuracy.png")


if __name__ == "__main__":
    raise SystemExit(main())
