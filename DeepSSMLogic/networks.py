"""Base-DeepSSM and TL-DeepSSM (Bhalodia et al., section 3.2 and Appendix A). torch only.

Both networks share one image encoder: five 5×5×5 convolutions (12, 24, 48, 96, 192 channels),
each followed by batch norm and PReLU, with 2× max-pooling after the 1st, 3rd and 5th, then
fully connected layers 384 → 96 → output. The paper uses *valid* convolutions, which need
at least 60 voxels per axis; ``conv_padding="same"`` is our documented deviation so that small
grids (CPU tests, the demo) work with the same layer stack. ``pool_size=P`` (optional, default off)
adds an adaptive average pool to ``P×P×P`` before the first FC layer, as the reference
implementation's newest version does: the FC layer then no longer grows with the grid (at
118×69×88 it holds 60 % of the parameters), which keeps shipped bundles small.

Every network carries its :attr:`architecture` dict (JSON-able). ``build_network(architecture)``
rebuilds an empty network of the same shape whose PCA / normalisation buffers are then filled by
``load_state_dict`` — the state dict is the only other thing a bundle needs.

``encoder="light"`` (issue 16) swaps the paper's conv stack for a cheaper one for CPU training — a
strided 3×3×3 stem (no full-resolution convolution), 3×3×3 residual blocks and stride-2
convolutions instead of max pooling (16, 32, 64 channels at 1/2, 1/4, 1/8 resolution) — and keeps
everything after it (FC 384 → 96 → output, the PCA layer / the TL decoder) unchanged.
``encoder="light2"`` is the same with each level's conv at stride 1 followed by 2× max pooling
(:class:`LightSpec` ``pool=3``); ``encoder="light3"`` is light2 ending in a learned 1×1×1 conv to 16
channels (``reduce=16``), which makes the first FC layer 4× smaller. Light stacks always pad
(``conv_padding="same"``).
Architectures without an ``encoder`` field are the paper's; a light network records architecture
version 2 so older software refuses it, and an encoder name unknown to a release is refused by name.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import InputError

ENCODER_CHANNELS = (12, 24, 48, 96, 192)
POOL_AFTER = (0, 2, 4)  # 0-based conv indices followed by MaxPool3d(2)
KERNEL = 5
FC_SIZES = (384, 96)
PADDINGS = ("valid", "same")
LIGHT_CHANNELS = (16, 32, 64)  # at 1/2, 1/4, 1/8 of the input resolution


@dataclass(frozen=True)
class LightSpec:
    """Shape of a light encoder: one level per entry of ``channels``, each a 3×3×3 conv that halves
    the resolution and ``blocks`` residual blocks. The first ``pool`` levels halve by a stride-1 conv
    then 2× max pooling, the others by a stride-2 conv; ``stem`` > 0 puts a full-resolution 3×3×3
    conv of that many channels first; ``reduce`` > 0 ends the stack with a learned 1×1×1 conv (+ batch
    norm, PReLU) to that many channels, so the flattened FC input shrinks by ``channels[-1] / reduce``
    at the same spatial resolution (the first FC layer dominates the weights and checkpoint); ``fc``
    is the width of the first FC layer (the paper's 384)."""

    channels: tuple[int, ...] = LIGHT_CHANNELS
    stem: int = 0
    blocks: int = 1
    pool: int = 0
    reduce: int = 0
    fc: int = FC_SIZES[0]

    def __post_init__(self) -> None:
        if isinstance(self.pool, bool) or not 0 <= self.pool <= len(self.channels):
            raise ValueError(
                f"LightSpec.pool: expected a level count 0..{len(self.channels)}, found {self.pool!r}"
            )
        if isinstance(self.fc, bool) or not isinstance(self.fc, int) or self.fc < 1:
            raise ValueError(f"LightSpec.fc: expected a layer width ≥ 1, found {self.fc!r}")
        if isinstance(self.reduce, bool) or not isinstance(self.reduce, int) or self.reduce < 0:
            raise ValueError(
                f"LightSpec.reduce: expected a channel count ≥ 0 (0: none), found {self.reduce!r}"
            )

    @property
    def out_channels(self) -> int:
        """Channels of the stack's output (the FC layer's input is this × the output voxels)."""
        return self.reduce or self.channels[-1]


# the encoders a network can be built with; a name, once shipped, keeps its layer stack for ever
# (bundles store only the name): a changed stack gets a new name
LIGHT_ENCODERS: dict[str, LightSpec] = {
    "light": LightSpec(),
    # light2 (issue 16): each level's 3×3×3 conv at stride 1, then 2× max pooling (as the paper's stack
    # pools) instead of a stride-2 conv: on the noisy synthetic atrium it generalised far better
    # (held-out 1.84 vs 3.21 mm, BENCHMARKS.md time to accuracy) for ~1.7× light's FLOPs and ~2.7× its CPU time
    "light2": LightSpec(pool=3),
    # light3 (issue 16, checkpoint ≤ 50 MB): light2 + a learned 1×1×1 reduction 64 → 16 channels before
    # the flatten, so the first FC layer (6.2 M of light2's 6.6 M weights on a 56×46×42 grid) is 4×
    # smaller at the same spatial resolution (BENCHMARKS.md, checkpoint size)
    "light3": LightSpec(pool=3, reduce=16),
}


def encoder_names() -> tuple[str, ...]:
    """Every encoder a network can be built with now: "paper" and the registered light stacks."""
    return ("paper", *LIGHT_ENCODERS)


ARCHITECTURE_VERSION = 2  # 2: the "encoder" field; paper networks still write 1 (older readers load them)


def encoder_output_shape(input_shape_zyx: Sequence[int], conv_padding: str = "valid") -> tuple[int, int, int]:
    """Spatial size ``(Z, Y, X)`` after the five convolutions and three poolings (may be ≤ 0)."""
    shrink = KERNEL - 1 if conv_padding == "valid" else 0
    out = []
    for n in input_shape_zyx:
        n = int(n)
        for i in range(len(ENCODER_CHANNELS)):
            n -= shrink
            if n < 1:
                break
            if i in POOL_AFTER:
                n //= 2
        out.append(n)
    return out[0], out[1], out[2]


def light_output_shape(
    input_shape_zyx: Sequence[int], levels: int = len(LIGHT_CHANNELS)
) -> tuple[int, int, int]:
    """Spatial size ``(Z, Y, X)`` after a light encoder's ``levels`` halvings (⌈n/8⌉ for three)."""
    out = []
    for n in input_shape_zyx:
        n = int(n)
        for _ in range(levels):
            n = (n + 1) // 2  # 3×3×3, padding 1, stride 2 (or max pooling with ceil_mode)
        out.append(n)
    return out[0], out[1], out[2]


def minimum_grid_size(conv_padding: str = "valid") -> int:
    """Smallest number of voxels per axis that leaves ≥ 1 voxel after the encoder (60 for valid)."""
    n = 1
    while encoder_output_shape((n, n, n), conv_padding)[0] < 1:
        n += 1
    return n


def _check_padding(conv_padding: str) -> None:
    if conv_padding not in PADDINGS:
        raise InputError(
            f"architecture field 'conv_padding': expected one of {PADDINGS}, found {conv_padding!r}"
        )


def is_light(encoder: str) -> bool:
    """Whether ``encoder`` names a light encoder (always "same" padding)."""
    return encoder in LIGHT_ENCODERS


def _check_encoder(encoder: str, conv_padding: str) -> None:
    names = encoder_names()
    if encoder not in names:
        raise InputError(f"architecture field 'encoder': expected one of {names}, found {encoder!r}")
    if is_light(encoder) and conv_padding != "same":
        raise InputError(
            f"the {encoder} encoder pads its convolutions: conv_padding must be 'same', found {conv_padding!r}"
        )


def _check_shape(input_shape_zyx: Sequence[int], conv_padding: str) -> tuple[int, int, int]:
    _check_padding(conv_padding)
    shape = tuple(int(n) for n in input_shape_zyx)
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(f"input shape: expected 3 positive sizes (Z, Y, X), found {tuple(input_shape_zyx)}")
    out = encoder_output_shape(shape, conv_padding)
    if min(out) < 1:
        need = minimum_grid_size(conv_padding)
        hint = " (or use conv_padding='same' for small grids)" if conv_padding == "valid" else ""
        raise InputError(
            f"reference grid {shape[2]}×{shape[1]}×{shape[0]} (x×y×z voxels) is too small for the "
            f"DeepSSM encoder with {conv_padding!r} convolutions: every axis needs at least {need} voxels; "
            f"use a finer spacing (smaller downsampling factor){hint}"
        )
    return shape  # type: ignore[return-value]


def _conv_bn_act(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
    return [
        nn.Conv3d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm3d(c_out),
        nn.PReLU(),
    ]


class ResidualBlock3d(nn.Module):
    """``x + BN(conv(PReLU(BN(conv(x)))))`` then PReLU; 3×3×3, same channels and size.

    The second batch norm starts at γ = 0 so each block is the identity at initialisation (the
    network starts as a plain strided stack and grows its residual paths as they help).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            *_conv_bn_act(channels, channels, 1),
            nn.Conv3d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm3d(channels),
        )
        self.act = nn.PReLU()

    def reset_residual(self) -> None:
        nn.init.zeros_(self.body[-1].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.body(x))


def _paper_conv_stack(conv_padding: str) -> list[nn.Module]:
    pad = 0 if conv_padding == "valid" else KERNEL // 2
    layers: list[nn.Module] = []
    c_in = 1
    for i, c_out in enumerate(ENCODER_CHANNELS):
        layers += [nn.Conv3d(c_in, c_out, KERNEL, padding=pad), nn.BatchNorm3d(c_out), nn.PReLU()]
        if i in POOL_AFTER:
            layers.append(nn.MaxPool3d(2))
        c_in = c_out
    return layers


def _light_conv_stack(spec: LightSpec) -> list[nn.Module]:
    layers: list[nn.Module] = []
    c_in = 1
    if spec.stem:
        layers += _conv_bn_act(1, spec.stem, 1)
        c_in = spec.stem
    for level, c_out in enumerate(spec.channels):
        if level < spec.pool:
            layers += [*_conv_bn_act(c_in, c_out, 1), nn.MaxPool3d(2, ceil_mode=True)]
        else:
            layers += _conv_bn_act(c_in, c_out, 2)
        layers += [ResidualBlock3d(c_out) for _ in range(spec.blocks)]
        c_in = c_out
    if spec.reduce:
        layers += [nn.Conv3d(c_in, spec.reduce, 1, bias=False), nn.BatchNorm3d(spec.reduce), nn.PReLU()]
    return layers


class ImageEncoder(nn.Module):
    """Conv encoder + FC 384 → 96 → ``n_out``: ``(B, 1, Z, Y, X) -> (B, n_out)``.

    ``encoder``: "paper" (5×5×5 convs, max pooling) or "light" (see the module docstring).
    """

    def __init__(
        self,
        input_shape_zyx: Sequence[int],
        n_out: int,
        conv_padding: str = "valid",
        pool_size: int | None = None,
        encoder: str = "paper",
    ):
        super().__init__()
        shape = _check_shape(input_shape_zyx, conv_padding)
        _check_encoder(encoder, conv_padding)
        if pool_size is not None and int(pool_size) < 1:
            raise InputError(f"architecture field 'pool_size': expected ≥ 1 or null, found {pool_size}")
        if is_light(encoder):
            spec = LIGHT_ENCODERS[encoder]
            layers, channels = _light_conv_stack(spec), spec.out_channels
            conv_shape = light_output_shape(shape, len(spec.channels))
            fc_sizes = (spec.fc, FC_SIZES[1])
        else:
            layers = _paper_conv_stack(conv_padding)
            channels, conv_shape = ENCODER_CHANNELS[-1], encoder_output_shape(shape, conv_padding)
            fc_sizes = FC_SIZES
        if pool_size is not None:
            layers.append(nn.AdaptiveAvgPool3d(int(pool_size)))
            spatial = int(pool_size) ** 3
        else:
            spatial = math.prod(conv_shape)
        self.conv = nn.Sequential(*layers)
        self.flat_features = channels * spatial
        self.fc = nn.Sequential(
            nn.Linear(self.flat_features, fc_sizes[0]),
            nn.PReLU(),
            nn.Linear(fc_sizes[0], fc_sizes[1]),
            nn.PReLU(),
            nn.Linear(fc_sizes[1], int(n_out)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.conv(x), 1))


def xavier_init(module: nn.Module) -> None:
    """Xavier-normal weights on every Conv3d and Linear (biases keep PyTorch defaults)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv3d, nn.Linear)):
            nn.init.xavier_normal_(m.weight)
    for m in module.modules():  # after Xavier: residual blocks start as the identity
        if isinstance(m, ResidualBlock3d):
            m.reset_residual()


def zero_output_layer(encoder: ImageEncoder) -> None:
    """Zero the encoder's last linear layer so an untrained network predicts the mean descriptor.

    With Xavier weights there, the first predictions sit tens of mm from any shape (training loss
    in the hundreds of mm² at epoch 1 on the synthetic cohorts) and a small CPU budget is spent
    walking back to the mean shape; starting at the mean (whitened score 0) makes every step an
    improvement over the mean-shape baseline. Gradients reach earlier layers after the first step.
    """
    nn.init.zeros_(encoder.fc[-1].weight)
    nn.init.zeros_(encoder.fc[-1].bias)


def _as_tensor(a: Any, shape: tuple[int, ...], name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(a, dtype=np.float32))
    if tuple(t.shape) != shape:
        raise InputError(f"{name}: expected shape {shape}, found {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise InputError(f"{name}: contains NaN or Inf")
    return t


def _version_fields(encoder: str) -> dict[str, Any]:
    # paper networks keep version 1 and no "encoder" field: bundles stay readable by older releases
    return {"version": 1} if encoder == "paper" else {"version": ARCHITECTURE_VERSION, "encoder": encoder}


def _fp32_off_autocast(device_type: str) -> Any:
    # The PCA / autoencoder path maps to absolute mm coordinates (~100 mm): bf16's 8-bit mantissa
    # would cost ~0.5 mm, so it always runs in fp32 even inside an autocast region.
    return torch.autocast(device_type=device_type, enabled=False)


class BaseDeepSSM(nn.Module):
    """Image → whitened PCA scores → (unwhiten) scores in mm → frozen PCA reconstruction.

    ``forward(x (B, 1, Z, Y, X)) -> (scores (B, K) mm, particles (B, M, 3) mm, LPS)``.
    ``pca_mean`` (M, 3), ``pca_components`` (K, 3M) orthonormal rows (particles flattened x,y,z
    per point), ``score_mean``/``score_std`` (K,) whitening statistics of the training scores.
    Leave the arrays ``None`` (with ``n_particles``) to get zero placeholders for ``load_state_dict``.
    """

    def __init__(
        self,
        input_shape_zyx: Sequence[int],
        n_modes: int,
        pca_mean: Any = None,
        pca_components: Any = None,
        score_mean: Any = None,
        score_std: Any = None,
        *,
        n_particles: int | None = None,
        conv_padding: str = "valid",
        pool_size: int | None = None,
        encoder: str = "paper",
    ):
        super().__init__()
        k = int(n_modes)
        if k < 1:
            raise InputError(f"architecture field 'n_modes': expected ≥ 1, found {n_modes}")
        if pca_mean is not None:
            m = int(np.asarray(pca_mean).shape[0])
        elif n_particles is not None:
            m = int(n_particles)
        else:
            raise InputError("BaseDeepSSM needs pca_mean or n_particles")
        self.input_shape_zyx = _check_shape(input_shape_zyx, conv_padding)
        self.n_modes, self.n_particles, self.conv_padding = k, m, conv_padding
        self.pool_size = None if pool_size is None else int(pool_size)
        self.encoder_kind = encoder
        self.encoder = ImageEncoder(self.input_shape_zyx, k, conv_padding, self.pool_size, encoder)
        self.decoder = nn.Linear(k, 3 * m)  # PCA reconstruction: particles = mean + scores @ basis
        xavier_init(self)
        zero_output_layer(self.encoder)
        self.register_buffer("score_mean", torch.zeros(k))
        self.register_buffer("score_std", torch.ones(k))
        with torch.no_grad():
            if pca_mean is not None:
                self.decoder.bias.copy_(_as_tensor(pca_mean, (m, 3), "pca_mean").reshape(-1))
            else:
                self.decoder.bias.zero_()
            if pca_components is not None:
                self.decoder.weight.copy_(_as_tensor(pca_components, (k, 3 * m), "pca_components").T)
            else:
                self.decoder.weight.zero_()
            if score_mean is not None:
                self.score_mean.copy_(_as_tensor(score_mean, (k,), "score_mean"))
            if score_std is not None:
                std = _as_tensor(score_std, (k,), "score_std")
                if not (std > 0).all():
                    raise InputError("score_std: every whitening std must be > 0")
                self.score_std.copy_(std)
        self.decoder.requires_grad_(False)

    @property
    def architecture(self) -> dict[str, Any]:
        return {
            **_version_fields(self.encoder_kind),
            "variant": "base",
            "input_shape_zyx": list(self.input_shape_zyx),
            "n_particles": self.n_particles,
            "n_modes": self.n_modes,
            "conv_padding": self.conv_padding,
            "pool_size": self.pool_size,
        }

    def reconstruct(self, scores: torch.Tensor) -> torch.Tensor:
        """PCA scores ``(B, K)`` mm → particles ``(B, M, 3)`` mm, always in fp32."""
        with _fp32_off_autocast(scores.device.type):
            return self.decoder(scores.float()).reshape(scores.shape[0], self.n_particles, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encoder(x)
        with _fp32_off_autocast(z.device.type):
            scores = z.float() * self.score_std + self.score_mean
        return scores, self.reconstruct(scores)


class CorrespondenceAutoencoder(nn.Module):
    """Particles ``(B, M, 3)`` mm ↔ latent ``(B, L)``; two FC layers each side, leaky ReLU.

    Particles are centred on ``particle_mean`` (M, 3) and divided by ``particle_scale`` (a scalar,
    mm) inside the network, so the decoder output is again in mm.
    """

    def __init__(self, n_particles: int, latent_dim: int, hidden: int):
        super().__init__()
        d = 3 * int(n_particles)
        self.n_particles = int(n_particles)
        self.encoder = nn.Sequential(nn.Linear(d, hidden), nn.LeakyReLU(0.01), nn.Linear(hidden, latent_dim))
        self.decoder = nn.Sequential(nn.Linear(latent_dim, hidden), nn.LeakyReLU(0.01), nn.Linear(hidden, d))
        self.register_buffer("particle_mean", torch.zeros(self.n_particles, 3))
        self.register_buffer("particle_scale", torch.ones(()))

    def encode(self, particles: torch.Tensor) -> torch.Tensor:
        with _fp32_off_autocast(particles.device.type):
            u = (particles.float() - self.particle_mean) / self.particle_scale
            return self.encoder(u.reshape(u.shape[0], -1))

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        with _fp32_off_autocast(latent.device.type):
            u = self.decoder(latent.float()).reshape(latent.shape[0], self.n_particles, 3)
            return u * self.particle_scale + self.particle_mean


class TLDeepSSM(nn.Module):
    """TL-DeepSSM: correspondence autoencoder + T-flank image encoder predicting its latent.

    ``forward(x (B, 1, Z, Y, X)) -> (latent (B, L), particles (B, M, 3) mm)`` is the inference path
    (T-flank → decoder); ``autoencode(particles) -> (latent, reconstruction (B, M, 3) mm)``.
    """

    def __init__(
        self,
        input_shape_zyx: Sequence[int],
        n_particles: int,
        latent_dim: int = 64,
        particle_mean: Any = None,
        particle_scale: float | None = None,
        *,
        hidden: int = 512,
        conv_padding: str = "valid",
        pool_size: int | None = None,
        encoder: str = "paper",
    ):
        super().__init__()
        if int(latent_dim) < 1 or int(n_particles) < 1 or int(hidden) < 1:
            raise InputError(
                f"TL-DeepSSM: latent_dim, n_particles and hidden must be ≥ 1, found "
                f"{latent_dim}, {n_particles}, {hidden}"
            )
        self.input_shape_zyx = _check_shape(input_shape_zyx, conv_padding)
        self.n_particles, self.latent_dim, self.hidden = int(n_particles), int(latent_dim), int(hidden)
        self.conv_padding = conv_padding
        self.pool_size = None if pool_size is None else int(pool_size)
        self.encoder_kind = encoder
        self.autoencoder = CorrespondenceAutoencoder(self.n_particles, self.latent_dim, self.hidden)
        self.tflank = ImageEncoder(
            self.input_shape_zyx, self.latent_dim, conv_padding, self.pool_size, encoder
        )
        xavier_init(self)
        zero_output_layer(self.tflank)
        with torch.no_grad():
            if particle_mean is not None:
                self.autoencoder.particle_mean.copy_(
                    _as_tensor(particle_mean, (self.n_particles, 3), "particle_mean")
                )
            if particle_scale is not None:
                if not float(particle_scale) > 0:
                    raise InputError(f"particle_scale: expected > 0, found {particle_scale}")
                self.autoencoder.particle_scale.fill_(float(particle_scale))

    @property
    def architecture(self) -> dict[str, Any]:
        return {
            **_version_fields(self.encoder_kind),
            "variant": "tl",
            "input_shape_zyx": list(self.input_shape_zyx),
            "n_particles": self.n_particles,
            "latent_dim": self.latent_dim,
            "hidden": self.hidden,
            "conv_padding": self.conv_padding,
            "pool_size": self.pool_size,
        }

    def autoencode(self, particles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        latent = self.autoencoder.encode(particles)
        return latent, self.autoencoder.decode(latent)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        latent = self.tflank(x)
        return latent, self.autoencoder.decode(latent)


def _field(arch: dict[str, Any], name: str, default: Any = ...) -> Any:
    if name in arch:
        return arch[name]
    if default is ...:
        raise InputError(f"architecture: missing field {name!r} (found fields {sorted(arch)})")
    return default


def build_network(architecture: dict[str, Any]) -> nn.Module:
    """An untrained network of the described shape; fill it with ``load_state_dict``.

    ``architecture`` is the network's :attr:`architecture` dict (as stored in ``model.json``).
    """
    if not isinstance(architecture, dict):
        raise InputError(f"architecture: expected a dict, found {type(architecture).__name__}")
    version = int(_field(architecture, "version", ARCHITECTURE_VERSION))
    if version > ARCHITECTURE_VERSION:
        raise InputError(
            f"architecture version {version} is newer than this software supports ({ARCHITECTURE_VERSION})"
        )
    variant = _field(architecture, "variant")
    shape = _field(architecture, "input_shape_zyx")
    padding = _field(architecture, "conv_padding", "valid")
    pool_size = _field(architecture, "pool_size", None)
    encoder = _field(architecture, "encoder", "paper")
    if variant == "base":
        return BaseDeepSSM(
            shape,
            int(_field(architecture, "n_modes")),
            n_particles=int(_field(architecture, "n_particles")),
            conv_padding=padding,
            pool_size=pool_size,
            encoder=encoder,
        )
    if variant == "tl":
        return TLDeepSSM(
            shape,
            int(_field(architecture, "n_particles")),
            int(_field(architecture, "latent_dim", 64)),
            hidden=int(_field(architecture, "hidden", 512)),
            conv_padding=padding,
            pool_size=pool_size,
            encoder=encoder,
        )
    raise InputError(f"architecture field 'variant': expected 'base' or 'tl', found {variant!r}")


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
