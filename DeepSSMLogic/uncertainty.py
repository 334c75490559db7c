"""Per-particle predictive uncertainty (issue 13): MC dropout in the FC head, a deep ensemble, or a
predicted-variance head on the frozen network (``variance``; see ``variance_head.py``).

torch/numpy only. The paper networks (``networks.BaseDeepSSM`` / ``TLDeepSSM``) are not changed:

* ``mc-dropout``: dropout (rate ``dropout``) on the inputs of the image encoder's 2nd and 3rd FC
  layers, added as forward pre-hooks so the state_dict keys stay the paper network's. It is active
  while training; at prediction the conv features are computed once and the FC head runs ``samples``
  times in one batch with dropout on (the particles themselves come from the deterministic pass).
* ``ensemble``: ``members`` networks trained from different seeds on the same data, held by
  :class:`EnsembleDeepSSM` (state_dict keys ``members.<k>.…``); the particles are the members' mean.

* ``variance``: the paper network unchanged plus a small head (``variance_head.*`` state_dict keys)
  predicting a variance per descriptor coordinate, fitted after training on corrupted copies of the
  training images; no sampling.

The per-particle uncertainty is the RMS distance (mm) of the sampled particle positions from their
mean, ``u_m = sqrt(mean_s |p_s,m − p̄_m|²)`` (= ``sqrt`` of the trace of the particle's 3×3
covariance; ``variance``: the trace of the covariance its descriptor variances give through the
decoder's Jacobian), multiplied by ``scale``: a single factor fitted on the
validation split at training time so that ``mean(u²) = mean(err²)`` there (the values then read as
an expected per-particle error in mm; rank correlations do not depend on it).

The bundle stores :meth:`UncertaintySpec.to_dict` as ``model.json["uncertainty"]`` (versioned).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .bundle_schema import UNCERTAINTY_METHODS as METHODS
from .bundle_schema import UNCERTAINTY_VERSION, UNCERTAINTY_VERSION_V1, variance_head_problems
from .errors import DeepSSMError, InputError

DEFAULT_DROPOUT = 0.2
DEFAULT_MC_SAMPLES = 30
DEFAULT_MEMBERS = 3
_DROPOUT_FC_INDICES = (2, 4)  # ImageEncoder.fc: Linear, PReLU, [drop] Linear, PReLU, [drop] Linear


class NonFiniteUncertaintyError(DeepSSMError):
    """The per-particle uncertainty is NaN or Inf (sampled spread or predicted variance: a damaged
    model or input)."""


@dataclass
class UncertaintySpec:
    """How a bundle's network yields uncertainty (see the module docstring)."""

    method: str = "none"
    dropout: float = DEFAULT_DROPOUT
    samples: int = DEFAULT_MC_SAMPLES
    members: int = DEFAULT_MEMBERS
    scale: float = 1.0
    seed: int = 0  # the MC dropout masks at prediction (reproducible predictions)
    head: dict[str, Any] | None = None  # variance: VarianceHead.config (rebuilds the head)

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    def validate(self, where: str = "uncertainty") -> None:
        problems = []
        if self.method not in METHODS:
            problems.append(f"method: expected one of {METHODS}, found {self.method!r}")
        if not (isinstance(self.dropout, int | float) and 0.0 < float(self.dropout) < 1.0):
            problems.append(f"dropout: expected a rate in (0, 1), found {self.dropout!r}")
        if (
            isinstance(self.samples, bool)
            or not isinstance(self.samples, int)
            or not 2 <= self.samples <= 1000
        ):
            problems.append(f"samples: expected an integer in 2..1000, found {self.samples!r}")
        if isinstance(self.members, bool) or not isinstance(self.members, int) or not 2 <= self.members <= 32:
            problems.append(f"members: expected an integer in 2..32, found {self.members!r}")
        if not (isinstance(self.scale, int | float) and math.isfinite(self.scale) and self.scale > 0):
            problems.append(f"scale: expected a finite number > 0, found {self.scale!r}")
        if self.method == "variance" and self.head is not None:
            problems += [f"{k}: expected {e}, found {v!r}" for k, e, v in variance_head_problems(self.head)]
        if problems:
            raise InputError(f"{where}: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        # version 2 only where it is needed (variance), so other bundles stay readable by older releases
        version = UNCERTAINTY_VERSION if self.method == "variance" else UNCERTAINTY_VERSION_V1
        d: dict[str, Any] = {"version": version, "method": self.method}
        if self.method == "variance":
            if self.head is None:
                raise InputError("uncertainty method 'variance': the head is not fitted (no head config)")
            d["head"] = dict(self.head)
        elif self.method == "mc-dropout":
            d |= {"dropout": float(self.dropout), "samples": int(self.samples), "seed": int(self.seed)}
        elif self.method == "ensemble":
            d |= {"members": int(self.members)}
        if self.enabled:
            d["scale"] = float(self.scale)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, where: str = "uncertainty") -> UncertaintySpec:
        """The spec of a ``model.json["uncertainty"]`` object; None (older bundles) → method "none"."""
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise InputError(f"{where}: expected an object, found {type(d).__name__}")
        version = d.get("version")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise InputError(f"{where}.version: expected an integer ≥ 1, found {version!r}")
        if version > UNCERTAINTY_VERSION:
            raise InputError(
                f"{where}.version {version} is newer than this software supports ({UNCERTAINTY_VERSION}); "
                "update DeepSSM to use this bundle's uncertainty"
            )
        known = {"version", "method", "dropout", "samples", "members", "scale", "seed", "head"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InputError(f"{where}: unknown field(s) {unknown}")
        spec = cls(**{k: v for k, v in d.items() if k != "version"})
        spec.validate(where)
        if spec.method == "variance" and spec.head is None:
            raise InputError(f"{where}: method 'variance' lacks the field 'head' (the variance head's shape)")
        return spec


# -- MC dropout -------------------------------------------------------------------------------------
def image_head(net: nn.Module) -> nn.Module:
    """The image encoder of a Base (``encoder``) or TL (``tflank``) network."""
    head = getattr(net, "encoder", None) if hasattr(net, "score_std") else getattr(net, "tflank", None)
    if head is None or not hasattr(head, "fc"):
        raise InputError(f"{type(net).__name__}: not a DeepSSM network with an image encoder")
    return head


def _dropout_pre_hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    active = module.training or module._deepssm_mc  # type: ignore[attr-defined]
    return (F.dropout(args[0], module._deepssm_dropout, training=active), *args[1:])  # type: ignore[attr-defined]


def add_head_dropout(net: nn.Module, rate: float) -> nn.Module:
    """Dropout of ``rate`` on the inputs of the encoder's 2nd and 3rd FC layers (forward pre-hooks:
    the parameters and state_dict are unchanged). Active in ``train()``; in ``eval()`` only inside
    :func:`mc_dropout_active`. Returns ``net``."""
    if not 0.0 < float(rate) < 1.0:
        raise InputError(f"dropout rate: expected a value in (0, 1), found {rate}")
    fc = image_head(net).fc
    for i in _DROPOUT_FC_INDICES:
        layer = fc[i]
        if getattr(layer, "_deepssm_dropout", None) is None:
            layer.register_forward_pre_hook(_dropout_pre_hook)
        layer._deepssm_dropout = float(rate)
        layer._deepssm_mc = False
    return net


def has_head_dropout(net: nn.Module) -> bool:
    try:
        fc = image_head(net).fc
    except InputError:
        return False
    return getattr(fc[_DROPOUT_FC_INDICES[0]], "_deepssm_dropout", None) is not None


@contextlib.contextmanager
def mc_dropout_active(net: nn.Module) -> Iterator[None]:
    """Dropout on in the FC head while the rest (batch norm) stays in eval mode."""
    fc = image_head(net).fc
    layers = [fc[i] for i in _DROPOUT_FC_INDICES]
    for layer in layers:
        layer._deepssm_mc = True
    try:
        yield
    finally:
        for layer in layers:
            layer._deepssm_mc = False


def decode_head_output(net: nn.Module, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder output ``(B, K)`` → ``(descriptor, particles (B, M, 3) mm)`` as ``net.forward`` does."""
    if hasattr(net, "score_std"):  # Base: whitened scores → mm scores → PCA reconstruction
        with torch.autocast(device_type=z.device.type, enabled=False):
            scores = z.float() * net.score_std + net.score_mean
        return scores, net.reconstruct(scores)
    return z, net.autoencoder.decode(z)


# -- ensemble ---------------------------------------------------------------------------------------
class EnsembleDeepSSM(nn.Module):
    """``K`` DeepSSM networks of one architecture; ``forward`` returns the members' mean
    ``(descriptor, particles)`` so it drops in wherever a single network is used."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        if len(members) < 2:
            raise InputError(f"an ensemble needs at least 2 members, found {len(members)}")
        archs = [m.architecture for m in members]
        if any(a != archs[0] for a in archs[1:]):
            raise InputError("ensemble members must share one architecture")
        self.members = nn.ModuleList(members)

    @property
    def architecture(self) -> dict[str, Any]:
        return self.members[0].architecture

    @property
    def n_particles(self) -> int:
        return int(self.members[0].n_particles)

    def sample(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(descriptors (K, B, D), particles (K, B, M, 3))`` of every member."""
        outs = [m(x) for m in self.members]
        return torch.stack([o[0].float() for o in outs]), torch.stack([o[1].float() for o in outs])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d, p = self.sample(x)
        return d.mean(0), p.mean(0)


def build_uncertain_network(architecture: dict[str, Any], spec: UncertaintySpec) -> nn.Module:
    """An untrained network for ``architecture`` shaped for ``spec`` (an ensemble of members, or
    the single network with head dropout); fill it with ``load_state_dict``."""
    from .networks import build_network

    if spec.method == "ensemble":
        return EnsembleDeepSSM([build_network(dict(architecture)) for _ in range(spec.members)])
    net = build_network(dict(architecture))
    if spec.method == "mc-dropout":
        add_head_dropout(net, spec.dropout)
    if spec.method == "variance":
        from .variance_head import VarianceHead, attach_variance_head

        if spec.head is None:
            raise InputError(
                "uncertainty method 'variance' needs the head config (model.json uncertainty.head)"
            )
        attach_variance_head(net, VarianceHead.from_config(spec.head))
    return net


# -- sampling ---------------------------------------------------------------------------------------
def particle_spread(samples: torch.Tensor) -> torch.Tensor:
    """``(S, B, M, 3)`` sampled particles → ``(B, M)`` RMS distance (mm) from their mean."""
    centred = samples.float() - samples.float().mean(0, keepdim=True)
    return torch.sqrt((centred**2).sum(-1).mean(0))


def predict_with_uncertainty(
    net: nn.Module, x: torch.Tensor, spec: UncertaintySpec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(descriptor (B, D), particles (B, M, 3) mm, uncertainty (B, M) mm)`` for a batch ``x``.

    ``net`` is in eval mode. Raises :class:`NonFiniteUncertaintyError` when the spread is not finite.
    """
    if spec.method == "ensemble":
        if not isinstance(net, EnsembleDeepSSM):
            raise InputError("uncertainty method 'ensemble' needs an EnsembleDeepSSM network")
        descs, parts = net.sample(x)
        desc, particles = descs.mean(0), parts.mean(0)
        spread = particle_spread(parts)
    elif spec.method == "mc-dropout":
        if not has_head_dropout(net):
            raise InputError("uncertainty method 'mc-dropout' needs a network with head dropout")
        head = image_head(net)
        feat = torch.flatten(head.conv(x), 1)
        desc, particles = decode_head_output(net, head.fc(feat))
        reps = feat.repeat(spec.samples, 1)  # (S*B, F): sample s of item b at row s*B + b
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), mc_dropout_active(net):
            torch.manual_seed(spec.seed)
            _, sampled = decode_head_output(net, head.fc(reps))
        parts = sampled.float().reshape(spec.samples, x.shape[0], *sampled.shape[1:])
        spread = particle_spread(parts)
    elif spec.method == "variance":
        from .variance_head import predict_variance

        desc, particles, spread = predict_variance(net, x)
    else:
        raise InputError("the model has no uncertainty (trained with --uncertainty none)")
    spread = spread * float(spec.scale)
    if not bool(torch.isfinite(spread).all()):
        raise NonFiniteUncertaintyError(
            f"the {spec.method} method gave a NaN or Inf per-particle uncertainty; the model bundle or the "
            "input image is damaged (check the image values, retrain or restore the bundle)"
        )
    return desc, particles, spread


def check_uncertainty_values(values: Any, where: str) -> None:
    """Raise :class:`NonFiniteUncertaintyError` when ``values`` hold NaN/Inf or negatives."""
    t = torch.as_tensor(values)
    if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
        raise NonFiniteUncertaintyError(
            f"{where}: the per-particle uncertainty holds NaN, Inf or negative values "
            "(expected finite standard deviations in mm)"
        )
