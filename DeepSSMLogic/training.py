"""The DeepSSM trainer (paper Appendix A.2): Base and TL, L2 or focal loss. torch/numpy only.

* Adam, weight decay 5e-5. Base: lr 1e-3 with cosine annealing over the run (monotone,
  ``T_max`` = the stage's epochs). TL: autoencoder at a fixed 1e-4, then the T-flank with the
  autoencoder frozen, then joint training (λ1 = λ2 = 1), the last two with cosine annealing.
* Validation on the caller's split under ``torch.no_grad`` and ``eval()``; the best epoch of each
  stage (lowest epoch mean of per-sample per-point Euclidean RMSE, mm) is restored at its end;
  ``patience`` epochs without improvement stop the stage early. TL's joint stage validates on the
  same image → particles path as the T-flank and competes with it: when no joint epoch beats the
  T-flank's best, the T-flank's weights are kept (``best_stage`` says which stage won).
* Every epoch: a :class:`~DeepSSMLogic.progress.ProgressEvent` with metrics, ``train_log.jsonl``
  (one JSON object per epoch, rewritten atomically) and ``checkpoint.pt`` (atomic; tensors and
  plain containers only, so it loads with ``weights_only=True``; mid-stage it holds the weights, the
  best weights and Adam's moments, ≈ 4× the weights; at a stage's end only the restored best weights,
  which is all a resumption past that stage reads). ``resume=True`` continues a
  killed run to the same weights as an uninterrupted one (CPU, same seed, same data).
* Device-agnostic; on CUDA: bf16 autocast, channels_last_3d, data kept on the device when it
  fits, cudnn.benchmark, optional ``torch.compile``. Under ``torchrun`` (``WORLD_SIZE`` > 1) it
  runs DDP (nccl on CUDA, gloo on CPU) with a ``DistributedSampler``; rank 0 writes the files.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import resource
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler
from torch.utils.data.distributed import DistributedSampler

from .errors import DeepSSMError, InputError
from .fileutil import atomic_write_text, save_torch
from .losses import (
    FOCAL_A_LATENT,
    FOCAL_A_PARTICLES,
    correspondence_l2,
    focal_loss,
    focal_threshold,
    per_sample_rmse,
    score_l2,
)
from .networks import BaseDeepSSM, TLDeepSSM, encoder_names
from .progress import CancelToken, ProgressCallback, ProgressEvent, null_progress

CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "train_log.jsonl"
CHECKPOINT_FORMAT = 1
# Fields that may differ between a killed run and its resumption without changing the result.
_RESUME_FREE_FIELDS = {"device", "num_workers", "data_on_device", "val_batch_size"}


@dataclass
class TrainConfig:
    """Everything that determines a training run (stored in the bundle as JSON)."""

    variant: str = "base"  # "base" | "tl"
    loss: str = "l2"  # "l2" (eq. 2 / 5-6) | "focal" (eq. 8 / 9-11)
    epochs: int = 100  # Base-DeepSSM
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 5e-5
    n_modes: int | None = None  # Base: PCA modes; None = enough for ``variance_fraction``
    variance_fraction: float = 0.99
    conv_padding: str = "valid"  # "same" is our deviation for grids under 60 voxels per axis
    pool_size: int | None = None  # adaptive pool before the FC layer (None: the paper's flatten)
    encoder: str = "paper"  # "paper" | "light" | "light2" (networks docstring; "same" padding for light)
    latent_dim: int = 64  # TL bottleneck
    ae_hidden: int = 512
    ae_epochs: int = 100
    ae_lr: float = 1e-4
    tf_epochs: int = 100
    joint_epochs: int = 25
    lambda_ae: float = 1.0
    lambda_tf: float = 1.0
    focal_a: float = FOCAL_A_PARTICLES
    focal_c: float | None = None  # None: 90th percentile heuristic (mm)
    focal_a_latent: float = FOCAL_A_LATENT
    focal_c_latent: float | None = None  # None: heuristic on the trained autoencoder's codes
    patience: int | None = None  # None: run every epoch, still restore the best
    seed: int = 0
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    precision: str = "auto"  # "auto" (bf16 on CUDA, fp32 on CPU) | "fp32" | "bf16"
    channels_last: str = "auto"  # "auto" (on for CUDA) | "on" | "off"
    compile: bool = False
    num_workers: int = 0
    data_on_device: str = "auto"  # "auto" | "always" | "never"
    val_batch_size: int = 16
    head_dropout: float = 0.0  # MC dropout in the FC head (uncertainty "mc-dropout"); 0: the paper network

    def validate(self) -> None:
        problems = []
        choices = {
            "variant": ("base", "tl"),
            "loss": ("l2", "focal"),
            "conv_padding": ("valid", "same"),
            "encoder": encoder_names(),
            "precision": ("auto", "fp32", "bf16"),
            "channels_last": ("auto", "on", "off"),
            "data_on_device": ("auto", "always", "never"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                problems.append(f"{name}: expected one of {allowed}, found {getattr(self, name)!r}")
        for name in ("epochs", "ae_epochs", "tf_epochs", "joint_epochs", "num_workers"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                problems.append(f"{name}: expected an integer ≥ 0, found {getattr(self, name)!r}")
        for name in ("batch_size", "latent_dim", "ae_hidden", "val_batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                problems.append(f"{name}: expected an integer ≥ 1, found {getattr(self, name)!r}")
        for name in ("lr", "ae_lr", "focal_a", "focal_a_latent"):
            if not getattr(self, name) > 0:
                problems.append(f"{name}: expected > 0, found {getattr(self, name)!r}")
        if not 0.0 <= self.head_dropout < 1.0:
            problems.append(f"head_dropout: expected a rate in [0, 1), found {self.head_dropout!r}")
        if self.weight_decay < 0:
            problems.append(f"weight_decay: expected ≥ 0, found {self.weight_decay}")
        if self.patience is not None and self.patience < 1:
            problems.append(f"patience: expected ≥ 1 or None, found {self.patience}")
        if self.pool_size is not None and (not isinstance(self.pool_size, int) or self.pool_size < 1):
            problems.append(f"pool_size: expected an integer ≥ 1 or None, found {self.pool_size!r}")
        if self.n_modes is not None and self.n_modes < 1:
            problems.append(f"n_modes: expected ≥ 1 or None, found {self.n_modes}")
        if not 0 < self.variance_fraction <= 1:
            problems.append(f"variance_fraction: expected a value in (0, 1], found {self.variance_fraction}")
        total = self.epochs if self.variant == "base" else self.ae_epochs + self.tf_epochs + self.joint_epochs
        if total < 1:
            problems.append("the run has no epochs")
        if problems:
            raise InputError("training configuration: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InputError(f"training configuration: unknown field(s) {unknown}; known: {sorted(known)}")
        cfg = cls(**d)
        cfg.validate()
        return cfg

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"training configuration: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise InputError("training configuration: expected a JSON object")
        return cls.from_dict(d)

    @property
    def total_epochs(self) -> int:
        return self.epochs if self.variant == "base" else self.ae_epochs + self.tf_epochs + self.joint_epochs


@dataclass
class TrainResult:
    """The trained network (best weights, CPU, eval mode) and what the bundle records about the run."""

    model: nn.Module
    architecture: dict[str, Any]
    config: TrainConfig
    history: list[dict[str, Any]]
    best_epoch: int  # 1-based epoch, within ``best_stage``, of the weights kept
    best_val_rmse_mm: float
    focal: dict[str, float | None]
    stopped_early: dict[str, bool] = field(default_factory=dict)
    seconds: float = 0.0
    peak_memory: dict[str, float | None] = field(default_factory=dict)  # see :func:`peak_memory`
    precision: dict[str, Any] = field(default_factory=dict)  # autocast used, CPU bf16 features found
    best_stage: str = ""  # the stage those weights come from (TL: "joint", or "tflank" when it won)

    def summary(self) -> dict[str, Any]:
        """JSON-able summary for ``model.json``."""
        return {
            "peak_memory": self.peak_memory,
            "precision": self.precision,
            "config": self.config.to_dict(),
            "best_epoch": self.best_epoch,
            "best_stage": self.best_stage,
            "best_val_rmse_mm": self.best_val_rmse_mm,
            "focal": self.focal,
            "stopped_early": self.stopped_early,
            "epochs_run": len(self.history),
            "seconds": self.seconds,
        }


CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_bf16_features(cpuinfo: str | None = None) -> list[str]:
    """The bf16 instruction sets this CPU lists in ``/proc/cpuinfo`` (AVX512-BF16, AMX-BF16; empty
    elsewhere). Recorded in the training summary; bf16 autocast stays off on a CPU unless asked for
    (``precision="bf16"``): on this project's AVX512-BF16 machine it was ≈ 1.5× faster end to end with
    held-out accuracy within ≈ 5 % (BENCHMARKS.md, default training of a 30-subject 64³ cohort), too
    little evidence yet for a default that changes every CPU training there."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read(1 << 20)
        except OSError:
            return []
    flags = set(cpuinfo.split())
    return [f for f in CPU_BF16_FLAGS if f in flags]


def peak_memory(device: torch.device | str | None = None) -> dict[str, float | None]:
    """``{"rss_mb": …, "cuda_max_allocated_mb": …}``: this process's peak resident set size so far
    (``ru_maxrss``, MiB; the process's whole life, not only training) and, on a CUDA ``device``,
    ``torch.cuda.max_memory_allocated`` (MiB; None elsewhere)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_mb = rss / 2**20 if sys.platform == "darwin" else rss / 1024.0  # bytes on macOS, KiB on Linux
    cuda = None
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda" and torch.cuda.is_available():
        cuda = torch.cuda.max_memory_allocated(dev) / 2**20
    return {"rss_mb": round(rss_mb, 1), "cuda_max_allocated_mb": None if cuda is None else round(cuda, 1)}


# ---------------------------------------------------------------------------------------------
# Distributed context


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def all_sum(self, values: list[float]) -> list[float]:
        if not self.active:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {name!r} requested but CUDA is not available")
    return dev


def _setup_distributed(config: TrainConfig) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist(device=_pick_device(config.device))
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and config.device != "cpu"
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        owns = True
    return _Dist(rank=rank, world=world, device=device, owns_group=owns)


# ---------------------------------------------------------------------------------------------
# Data


class _Transformed(Dataset):
    """``(image (1, Z, Y, X), particles (M, 3))`` as float32 tensors, image through ``transform``."""

    def __init__(self, base: Any, transform: Callable[[np.ndarray], np.ndarray] | None):
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._convert(self.base[i])

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        # let a base fetch the whole batch at once: online augmentation warps it in one TPS solve
        fetch = getattr(self.base, "__getitems__", None)
        items = fetch(indices) if fetch is not None else [self.base[i] for i in indices]
        return [self._convert(item) for item in items]

    def _convert(self, item: Any) -> tuple[torch.Tensor, torch.Tensor]:
        image, particles = item[0], item[1]
        if isinstance(image, torch.Tensor):
            image = image.detach().cpu().numpy()
        if self.transform is not None:
            image = self.transform(np.asarray(image))
        image = torch.from_numpy(np.array(image, dtype=np.float32))
        if isinstance(particles, torch.Tensor):  # online samples may live on the GPU
            particles = particles.detach().cpu()
        particles = torch.as_tensor(np.asarray(particles, dtype=np.float32))
        return image, particles


def _is_online(ds: Any) -> bool:
    return bool(getattr(ds, "online", False)) or type(ds).__name__ == "OnlineAugmentedDataset"


@dataclass
class _Data:
    """One split: a dataset plus, when it fits, its tensors already on the training device."""

    dataset: _Transformed
    particles: torch.Tensor  # (N, M, 3) float32 on the device (always kept: small)
    images: torch.Tensor | None  # (N, 1, Z, Y, X) float32 on the device, or None (stream)
    image_shape: tuple[int, ...]

    def __len__(self) -> int:
        return int(self.particles.shape[0])


def _load_split(
    name: str, ds: Any, transform: Any, config: TrainConfig, device: torch.device, cancel: CancelToken | None
) -> _Data:
    if ds is None or len(ds) == 0:
        raise InputError(f"{name} set is empty")
    wrapped = _Transformed(ds, transform)
    image0, p0 = wrapped[0]
    if image0.ndim != 4 or image0.shape[0] != 1:
        raise InputError(f"{name} set: images must have shape (1, Z, Y, X), found {tuple(image0.shape)}")
    if p0.ndim != 2 or p0.shape[1] != 3:
        raise InputError(f"{name} set: particles must have shape (M, 3), found {tuple(p0.shape)}")
    n = len(wrapped)
    nbytes = n * image0.numel() * 4
    if config.data_on_device == "always":
        preload = True
    elif config.data_on_device == "never" or _is_online(ds):
        preload = False  # online augmentation draws fresh shapes every epoch
    elif device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        preload = nbytes < 0.4 * free
    else:
        preload = nbytes < 1 << 30
    particles = torch.empty((n, *p0.shape), dtype=torch.float32)
    images = torch.empty((n, *image0.shape), dtype=torch.float32) if preload else None
    loader = DataLoader(wrapped, batch_size=16, shuffle=False, num_workers=config.num_workers)
    i = 0
    for img, pts in loader:
        if cancel is not None:
            cancel.check()
        b = pts.shape[0]
        if tuple(pts.shape[1:]) != tuple(p0.shape) or tuple(img.shape[1:]) != tuple(image0.shape):
            raise InputError(
                f"{name} set: samples {i}..{i + b - 1} have image {tuple(img.shape[1:])} / particles "
                f"{tuple(pts.shape[1:])}, expected {tuple(image0.shape)} / {tuple(p0.shape)} like sample 0"
            )
        particles[i : i + b] = pts
        if images is not None:
            images[i : i + b] = img
        i += b
    if not torch.isfinite(particles).all():
        raise InputError(f"{name} set: particles contain NaN or Inf")
    if images is not None and not torch.isfinite(images).all():
        raise InputError(f"{name} set: images contain NaN or Inf voxels")
    return _Data(
        wrapped,
        particles.to(device),
        images.to(device) if images is not None else None,
        tuple(image0.shape),
    )


def _epoch_seed(seed: int, stage: int, epoch: int) -> int:
    return (int(seed) * 1_000_003 + stage * 10_007 + epoch) % (2**63 - 1)


def _train_indices(n: int, config: TrainConfig, stage: int, epoch: int, dist: _Dist) -> list[int]:
    """This rank's shuffled sample order for one epoch; a pure function of (seed, stage, epoch)."""
    if dist.active:
        sampler = DistributedSampler(
            range(n),
            num_replicas=dist.world,
            rank=dist.rank,
            shuffle=True,
            seed=_epoch_seed(config.seed, stage, 0),
        )
        sampler.set_epoch(epoch)
    else:
        g = torch.Generator().manual_seed(_epoch_seed(config.seed, stage, epoch))
        sampler = RandomSampler(range(n), generator=g)
    return list(sampler)


def _batches(
    data: _Data,
    indices: list[int],
    batch_size: int,
    config: TrainConfig,
    device: torch.device,
    with_images: bool,
    seed: int,
) -> Iterator[tuple[torch.Tensor | None, torch.Tensor]]:
    chunks = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    if not with_images or data.images is not None:
        for c in chunks:
            idx = torch.as_tensor(c, device=device)
            yield (data.images[idx] if with_images else None), data.particles[idx]
        return
    loader = DataLoader(
        data.dataset,
        batch_sampler=chunks,
        num_workers=config.num_workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(seed),
    )
    for img, pts in loader:
        yield img.to(device, non_blocking=True), pts.to(device, non_blocking=True)


# ---------------------------------------------------------------------------------------------
# Stages


@dataclass
class _Stage:
    name: str
    epochs: int
    lr: float
    cosine: bool
    trainable: Callable[[nn.Module], list[nn.Parameter]]
    needs_images: bool
    # fine-tunes the previous stage on the same validation metric: its start must be beaten
    continues_previous: bool = False


class _Step(nn.Module):
    """What one stage runs per batch, as a module so DDP / compile can wrap it."""

    def __init__(self, model: nn.Module, stage: str):
        super().__init__()
        self.model, self.stage = model, stage

    def forward(self, images: torch.Tensor | None, particles: torch.Tensor) -> tuple[torch.Tensor, ...]:
        m = self.model
        if self.stage == "base":
            return (m(images)[1],)
        if self.stage == "ae":
            return (m.autoencode(particles)[1],)
        if self.stage == "tflank":
            with torch.no_grad():
                z = m.autoencoder.encode(particles)
            return z, m.tflank(images)
        z, recon = m.autoencode(particles)
        return z, m.tflank(images), recon


class _Losses:
    def __init__(self, config: TrainConfig, c: float, c_latent: float | None):
        self.config, self.c, self.c_latent = config, c, c_latent

    def particles(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.config.loss == "focal":
            return focal_loss(pred, target, self.config.focal_a, self.c)
        return correspondence_l2(pred, target)

    def latent(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.config.loss == "focal":
            assert self.c_latent is not None
            return focal_loss(pred, target, self.config.focal_a_latent, self.c_latent)
        return score_l2(pred, target)  # eq. 6: squared norm of the latent error

    def __call__(self, stage: str, out: tuple[torch.Tensor, ...], particles: torch.Tensor) -> torch.Tensor:
        if stage in ("base", "ae"):
            return self.particles(out[0], particles)
        if stage == "tflank":
            return self.latent(out[1], out[0])
        z, zt, recon = out
        return self.config.lambda_ae * self.particles(recon, particles) + self.config.lambda_tf * self.latent(
            zt, z
        )


def _stages(config: TrainConfig) -> list[_Stage]:
    def all_trainable(m: nn.Module) -> list[nn.Parameter]:
        if isinstance(m, BaseDeepSSM):
            return list(m.encoder.parameters())  # the PCA decoder stays frozen
        return list(m.parameters())

    if config.variant == "base":
        return [_Stage("base", config.epochs, config.lr, True, all_trainable, True)]
    return [
        _Stage(
            "ae", config.ae_epochs, config.ae_lr, False, lambda m: list(m.autoencoder.parameters()), False
        ),
        _Stage("tflank", config.tf_epochs, config.lr, True, lambda m: list(m.tflank.parameters()), True),
        _Stage("joint", config.joint_epochs, config.lr, True, all_trainable, True, continues_previous=True),
    ]


def _set_trainable(model: nn.Module, params: list[nn.Parameter]) -> None:
    ids = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)


# ---------------------------------------------------------------------------------------------
# Model construction


def _build_model(config: TrainConfig, train: _Data, shape_model: Any) -> tuple[nn.Module, Any]:
    image_shape = train.image_shape[1:]
    pts = train.particles.detach().cpu().double().numpy()
    if config.variant == "base":
        if shape_model is None:
            from .shape_model import ShapeModel

            shape_model = ShapeModel.fit(pts)
        if shape_model.n_particles != pts.shape[1]:
            raise InputError(
                f"shape model has {shape_model.n_particles} particles, the training set {pts.shape[1]}"
            )
        k = config.n_modes or shape_model.n_modes_for_variance(config.variance_fraction)
        if k > shape_model.n_modes:
            raise InputError(
                f"n_modes: expected ≤ {shape_model.n_modes} (the shape model's modes), found {k}"
            )
        sm = shape_model.truncated(k)
        sm = sm.with_whitening(sm.project(pts))  # whiten over the (augmented) training targets
        model = BaseDeepSSM(
            image_shape,
            k,
            sm.mean,
            sm.components,
            sm.score_mean,
            sm.score_std,
            conv_padding=config.conv_padding,
            pool_size=config.pool_size,
            encoder=config.encoder,
        )
        return model, sm
    mean = pts.mean(axis=0)
    scale = float(np.sqrt(((pts - mean) ** 2).mean()))
    model = TLDeepSSM(
        image_shape,
        pts.shape[1],
        config.latent_dim,
        mean,
        scale if scale > 0 else 1.0,
        hidden=config.ae_hidden,
        conv_padding=config.conv_padding,
        pool_size=config.pool_size,
        encoder=config.encoder,
    )
    return model, None


def _state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# Checkpoints


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()  # noqa: NPY002 - a dataset may use the legacy global RNG
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))  # noqa: NPY002
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read ``checkpoint.pt`` safely (``weights_only=True``, CPU)."""
    from .bundle import torch_load_reason

    path = Path(path)
    advice = "pass --restart to discard it and train from the start (or restore a good copy)"
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt files
        raise InputError(
            f"{path}: the training checkpoint is unreadable ({torch_load_reason(e)}); {advice}"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{path}: not a DeepSSM training checkpoint of format {CHECKPOINT_FORMAT}; {advice}")
    return ckpt


def _write_log(out_dir: Path, history: list[dict[str, Any]]) -> None:
    atomic_write_text(out_dir / LOG_NAME, "".join(json.dumps(h, allow_nan=False) + "\n" for h in history))


# ---------------------------------------------------------------------------------------------
# The loop


def _autocast(device: torch.device, bf16: bool) -> Any:
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)


@torch.no_grad()
def _validate(
    model: nn.Module,
    stage: str,
    losses: _Losses,
    val: _Data,
    config: TrainConfig,
    dist: _Dist,
    bf16: bool,
    channels_last: bool,
) -> tuple[float, float]:
    """(mean loss, mean per-sample RMSE mm) over the whole validation set, identical on all ranks."""
    model.eval()
    if dist.active:  # BN statistics drift per rank between DDP syncs; evaluate rank 0's model everywhere
        for b in model.buffers():
            torch.distributed.broadcast(b, 0)
    step = _Step(model, stage)
    indices = list(range(dist.rank, len(val), dist.world))
    loss_sum = rmse_sum = 0.0
    count = 0
    for images, particles in _batches(
        val, indices, config.val_batch_size, config, dist.device, stage != "ae", 0
    ):
        if images is not None and channels_last:
            images = images.contiguous(memory_format=torch.channels_last_3d)
        with _autocast(dist.device, bf16):
            out = step(images, particles)
            loss = losses(stage, out, particles)
            if stage in ("base", "ae"):
                pred = out[0]
            else:
                pred = model.autoencoder.decode(out[1])  # the inference path: image → latent → particles
        b = particles.shape[0]
        loss_sum += float(loss) * b
        rmse_sum += float(per_sample_rmse(pred, particles).sum())
        count += b
    loss_sum, rmse_sum, count = dist.all_sum([loss_sum, rmse_sum, float(count)])
    return loss_sum / count, rmse_sum / count


def train(
    config: TrainConfig,
    train_set: Any,
    val_set: Any,
    out_dir: str | os.PathLike[str],
    progress: ProgressCallback = null_progress,
    cancel: CancelToken | None = None,
    resume: bool = False,
    *,
    shape_model: Any = None,
    image_transform: Callable[[np.ndarray], np.ndarray] | None = None,
) -> TrainResult:
    """Train Base- or TL-DeepSSM; returns the best model of the run.

    ``train_set`` / ``val_set``: datasets of ``(image (1, Z, Y, X) float32, particles (M, 3) float32
    mm)``; ``image_transform`` (e.g. an ``IntensityNormalizer``) maps a raw ``(1, Z, Y, X)`` array to
    the normalised one. ``shape_model`` (Base): a ``ShapeModel`` of the real training shapes; fitted
    on ``train_set``'s particles when None. Writes ``checkpoint.pt`` and ``train_log.jsonl`` in
    ``out_dir``; with ``resume=True`` an existing checkpoint of the same configuration is continued.
    """
    config.validate()
    t_start = time.perf_counter()
    dist = _setup_distributed(config)
    try:
        result = _train(
            config,
            train_set,
            val_set,
            Path(out_dir),
            progress,
            cancel,
            resume,
            shape_model,
            image_transform,
            dist,
        )
    finally:
        if dist.owns_group:
            torch.distributed.destroy_process_group()
    result.seconds = time.perf_counter() - t_start
    return result


@dataclass
class _RunState:
    """What a run carries across stages and checkpoints: the log, the focal parameters and the
    best weights so far (``best_state`` None: the model's own tensors are the best)."""

    focal: dict[str, float | None]
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped_early: dict[str, bool] = field(default_factory=dict)
    best_rmse: float = math.inf
    best_epoch: int = 0
    best_stage: str = ""
    bad_epochs: int = 0


def _load_data(
    config: TrainConfig, train_set: Any, val_set: Any, image_transform: Any, device: torch.device, cancel: Any
) -> tuple[_Data, _Data]:
    """Stage setup: both splits as normalised tensors, checked to match each other."""
    train_data = _load_split("training", train_set, image_transform, config, device, cancel)
    val_data = _load_split("validation", val_set, image_transform, config, device, cancel)
    if (
        val_data.image_shape != train_data.image_shape
        or val_data.particles.shape[1:] != train_data.particles.shape[1:]
    ):
        raise InputError(
            f"validation samples (image {val_data.image_shape}, particles {tuple(val_data.particles.shape[1:])}) "
            f"differ from training samples (image {train_data.image_shape}, "
            f"particles {tuple(train_data.particles.shape[1:])})"
        )
    return train_data, val_data


def _new_model(
    config: TrainConfig, train_data: _Data, shape_model: Any, device: torch.device, channels_last: bool
) -> tuple[nn.Module, dict[str, float | None]]:
    """Stage setup: the seeded network on ``device`` and the focal parameters (``c`` from the
    paper's heuristic unless given; TL's latent ``c`` is found after the autoencoder stage)."""
    torch.manual_seed(config.seed)
    model, _ = _build_model(config, train_data, shape_model)
    if config.head_dropout > 0:
        from .uncertainty import add_head_dropout

        add_head_dropout(model, config.head_dropout)
    c = config.focal_c if config.focal_c is not None else focal_threshold(train_data.particles)
    focal: dict[str, float | None] = {"a": config.focal_a, "c": c, "a_latent": None, "c_latent": None}
    if config.variant == "tl":
        focal["a_latent"] = config.focal_a_latent
        focal["c_latent"] = config.focal_c_latent
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last_3d)
    return model, focal


def _resume(
    ckpt_path: Path, config: TrainConfig, model: nn.Module, run: _RunState
) -> tuple[int, int, dict[str, Any] | None]:
    """Checkpoint/resume: load ``checkpoint.pt`` into ``model`` and ``run``; returns the stage and
    epoch to continue from and the checkpoint when it is mid-stage (None after a finished stage)."""
    ckpt = load_checkpoint(ckpt_path)
    # checkpoints from before these fields
    saved = {"encoder": "paper", "head_dropout": 0.0} | json.loads(ckpt["config"])
    mine = config.to_dict()
    diff = sorted(
        k for k in set(saved) | set(mine) if k not in _RESUME_FREE_FIELDS and saved.get(k) != mine.get(k)
    )
    if diff:
        raise InputError(
            f"{ckpt_path}: cannot resume, the configuration differs in {diff} "
            f"(checkpoint: {[saved.get(k) for k in diff]}, now: {[mine.get(k) for k in diff]})"
        )
    model.load_state_dict(ckpt["model"])
    run.history = list(ckpt["history"])
    run.focal = dict(ckpt["focal"])
    run.stopped_early = dict(ckpt["stopped_early"])
    run.best_rmse, run.best_epoch = float(ckpt["best_rmse"]), int(ckpt["best_epoch"])
    run.best_stage = str(ckpt.get("best_stage", ckpt["stage_name"]))  # absent before the joint carry-over
    run.bad_epochs = int(ckpt["bad_epochs"])
    _set_rng_state(ckpt["rng"])
    stage, epoch = int(ckpt["stage_index"]), int(ckpt["stage_epoch"])
    if ckpt["stage_done"]:
        return stage + 1, 0, None
    return stage, epoch, ckpt


def _save_checkpoint(
    out_dir: Path,
    config: TrainConfig,
    si: int,
    stage: _Stage,
    epoch: int,
    last: bool,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    best_state: dict[str, torch.Tensor] | None,
    run: _RunState,
) -> None:
    """Checkpoint/resume: ``checkpoint.pt`` (atomic) and the log after an epoch. A finished stage is
    resumed from its (best) weights alone: its optimizer and scheduler are never read again; at a
    stage's end or a best epoch the best weights are the model's (``best_state`` None), so the
    checkpoint refers to the model's tensors and torch.save writes them once."""
    state = model.state_dict()
    ckpt_obj = {
        "format": CHECKPOINT_FORMAT,
        "config": config.to_json(),
        "stage_index": si,
        "stage_name": stage.name,
        "stage_epoch": epoch + 1,
        "stage_done": last,
        "model": state,
        "optimizer": None if last else optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None and not last else None,
        "best_state": state if best_state is None else best_state,
        "best_rmse": run.best_rmse,
        "best_epoch": run.best_epoch,
        "best_stage": run.best_stage,
        "bad_epochs": run.bad_epochs,
        "history": run.history,
        "focal": run.focal,
        "stopped_early": run.stopped_early,
        "rng": _rng_state(),
    }
    save_torch(ckpt_obj, out_dir / CHECKPOINT_NAME)
    _write_log(out_dir, run.history)


def _train_one_epoch(
    step: nn.Module,
    stage: _Stage,
    si: int,
    epoch: int,
    optimizer: torch.optim.Optimizer,
    losses: _Losses,
    train_data: _Data,
    config: TrainConfig,
    dist: _Dist,
    bf16: bool,
    channels_last: bool,
    cancel: CancelToken | None,
) -> float:
    """Epoch loop body: one pass over this rank's shuffled training samples; the mean loss over
    every rank. Raises the named error when the loss is not finite."""
    indices = _train_indices(len(train_data), config, si, epoch, dist)
    loss_sum, count = 0.0, 0
    for images, particles in _batches(
        train_data,
        indices,
        config.batch_size,
        config,
        dist.device,
        stage.needs_images,
        _epoch_seed(config.seed, si, epoch),
    ):
        if cancel is not None:
            cancel.check()
        if images is not None and channels_last:
            images = images.contiguous(memory_format=torch.channels_last_3d)
        with _autocast(dist.device, bf16):
            out = step(images, particles)
            loss = losses(stage.name, out, particles)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += float(loss.detach()) * particles.shape[0]
        count += particles.shape[0]
    loss_sum, count_f = dist.all_sum([loss_sum, float(count)])
    train_loss = loss_sum / count_f
    if not math.isfinite(train_loss):
        raise DeepSSMError(
            f"training diverged in stage {stage.name!r} epoch {epoch + 1}: the loss is {train_loss}; "
            "lower the learning rate"
        )
    return train_loss


def _train(
    config: TrainConfig,
    train_set: Any,
    val_set: Any,
    out_dir: Path,
    progress: ProgressCallback,
    cancel: CancelToken | None,
    resume: bool,
    shape_model: Any,
    image_transform: Any,
    dist: _Dist,
) -> TrainResult:
    # -- stage setup: device, data, network
    device = dist.device
    bf16 = config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")
    channels_last = config.channels_last == "on" or (config.channels_last == "auto" and device.type == "cuda")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if dist.main:
        out_dir.mkdir(parents=True, exist_ok=True)
    train_data, val_data = _load_data(config, train_set, val_set, image_transform, device, cancel)
    model, focal = _new_model(config, train_data, shape_model, device, channels_last)
    stages = _stages(config)
    run = _RunState(focal)

    # -- checkpoint/resume
    start_stage, start_epoch = 0, 0
    ckpt: dict[str, Any] | None = None  # the checkpoint to continue mid-stage from
    ckpt_path = out_dir / CHECKPOINT_NAME
    dist.barrier()
    if resume and ckpt_path.exists():
        start_stage, start_epoch, ckpt = _resume(ckpt_path, config, model, run)
    losses = _Losses(config, float(run.focal["c"]), run.focal["c_latent"])
    total_epochs = config.total_epochs

    for si in range(start_stage, len(stages)):
        # -- stage setup: trainable parameters, optimizer, the best-so-far this stage must beat
        stage = stages[si]
        if stage.name == "tflank" and run.focal["c_latent"] is None:
            with torch.no_grad():
                codes = model.autoencoder.encode(train_data.particles)
            run.focal["c_latent"] = focal_threshold(codes)
            losses.c_latent = float(run.focal["c_latent"])
        params = stage.trainable(model)
        _set_trainable(model, params)
        optimizer = torch.optim.Adam(params, lr=stage.lr, weight_decay=config.weight_decay)
        scheduler = (
            torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(stage.epochs, 1))
            if stage.cosine
            else None
        )
        if ckpt is not None and si == start_stage:  # mid-stage resume: run holds this stage's bests
            optimizer.load_state_dict(ckpt["optimizer"])
            if scheduler is not None:
                scheduler.load_state_dict(ckpt["scheduler"])
            best_state = ckpt["best_state"]
            epoch0 = start_epoch
        else:
            best_state = _state_copy(model)  # the previous stage's best weights, restored at its end
            if not stage.continues_previous:
                run.best_rmse, run.best_epoch, run.best_stage = math.inf, 0, stage.name
            run.bad_epochs = 0
            epoch0 = 0
        step: nn.Module = _Step(model, stage.name)
        if dist.active:
            step = nn.parallel.DistributedDataParallel(
                step, device_ids=[device.index] if device.type == "cuda" else None
            )
        if config.compile:
            step = torch.compile(step)

        # -- epoch loop
        stopped = False
        for epoch in range(epoch0, stage.epochs):
            if cancel is not None:
                cancel.check()
            t0 = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            if hasattr(train_set, "set_epoch"):
                # run-wide epoch index: online augmentation draws fresh shapes in every epoch of every stage
                train_set.set_epoch(sum(s.epochs for s in stages[:si]) + epoch)
            model.train()
            train_loss = _train_one_epoch(
                step,
                stage,
                si,
                epoch,
                optimizer,
                losses,
                train_data,
                config,
                dist,
                bf16,
                channels_last,
                cancel,
            )
            if scheduler is not None:
                scheduler.step()
            val_loss, val_rmse = _validate(
                model, stage.name, losses, val_data, config, dist, bf16, channels_last
            )
            improved = val_rmse < run.best_rmse
            if improved:
                run.best_rmse, run.best_epoch, run.best_stage, run.bad_epochs = (
                    val_rmse,
                    epoch + 1,
                    stage.name,
                    0,
                )
                best_state = _state_copy(model)
            else:
                run.bad_epochs += 1
            stopped = config.patience is not None and run.bad_epochs >= config.patience
            record = {
                "stage": stage.name,
                "epoch": epoch + 1,
                "epochs": stage.epochs,
                "train_loss": train_loss,
                "val_loss": val_loss,
                "val_rmse_mm": val_rmse,
                "lr": lr,
                "seconds": time.perf_counter() - t0,
                "best": improved,
                "peak_rss_mb": peak_memory(device)["rss_mb"],
            }
            run.history.append(record)
            last = stopped or epoch + 1 == stage.epochs
            if last:
                model.load_state_dict(best_state)
                run.stopped_early[stage.name] = stopped
            if dist.main:
                model_is_best = last or improved
                _save_checkpoint(
                    out_dir,
                    config,
                    si,
                    stage,
                    epoch,
                    last,
                    model,
                    optimizer,
                    scheduler,
                    None if model_is_best else best_state,
                    run,
                )
            dist.barrier()
            done = sum(s.epochs for s in stages[:si]) + epoch + 1
            progress(
                ProgressEvent(
                    "train",
                    done,
                    total_epochs,
                    f"{stage.name} epoch {epoch + 1}/{stage.epochs}",
                    {k: v for k, v in record.items() if k not in ("stage", "epochs")} | {"stage": stage.name},
                )
            )
            if stopped:
                break
        ckpt = None

    if dist.active:  # identical weights and BN statistics on every rank
        for t in model.state_dict().values():
            torch.distributed.broadcast(t, 0)
    model = model.to("cpu", memory_format=torch.contiguous_format).eval()
    return TrainResult(
        model=model,
        architecture=model.architecture,
        config=config,
        history=run.history,
        best_epoch=run.best_epoch,
        best_stage=run.best_stage,
        best_val_rmse_mm=run.best_rmse,
        focal=run.focal,
        stopped_early=run.stopped_early,
        peak_memory=peak_memory(device),
        precision={
            "autocast": "bf16" if bf16 else "fp32",
            "device": device.type,
            "cpu_bf16": cpu_bf16_features(),
        },
    )
