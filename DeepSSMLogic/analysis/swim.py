"""Latent swim (paper Fig. 10/12): walk the line between two group means in a descriptor space
(PCA scores or the TL-DeepSSM latent) and decode each point to correspondences,
``C_λ = f((1 - λ) μ_A + λ μ_B)`` for λ in [0, 1]."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InputError

Decoder = Callable[[np.ndarray], np.ndarray]


@dataclass
class Swim:
    """``lambdas`` ``(L,)``; ``latents`` ``(L, K)``; ``particles`` ``(L, M, 3)`` mm; ``differences``
    ``(L, M, 3)`` = C_λ - C_0 (mm, the displacement from the group-A end)."""

    lambdas: np.ndarray
    latents: np.ndarray
    particles: np.ndarray
    differences: np.ndarray
    mean_a: np.ndarray
    mean_b: np.ndarray


def latent_swim(
    descriptors_a: np.ndarray,
    descriptors_b: np.ndarray,
    decoder: Decoder,
    lambdas: Sequence[float] | np.ndarray | int = 5,
) -> Swim:
    """Interpolate between the means of ``descriptors_a`` ``(Na, K)`` and ``descriptors_b``
    ``(Nb, K)`` and decode with ``decoder`` ``(L, K) -> (L, M, 3)`` (e.g. ``ShapeModel.reconstruct``
    or a TL decoder). ``lambdas``: values in [0, 1], or a count of evenly spaced ones."""
    da = np.asarray(descriptors_a, dtype=np.float64)
    db = np.asarray(descriptors_b, dtype=np.float64)
    if da.ndim != 2 or db.ndim != 2 or da.shape[1] != db.shape[1] or len(da) == 0 or len(db) == 0:
        raise InputError(
            f"latent swim: expected descriptors (Na, K) and (Nb, K), found {da.shape} and {db.shape}"
        )
    if isinstance(lambdas, int | np.integer):
        if lambdas < 2:
            raise InputError(f"latent swim: need at least 2 steps, found {lambdas}")
        lam = np.linspace(0.0, 1.0, int(lambdas))
    else:
        lam = np.asarray(lambdas, dtype=np.float64).ravel()
    if lam.size == 0 or lam.min() < 0 or lam.max() > 1:
        raise InputError(f"latent swim: lambdas must lie in [0, 1], found {lam.tolist()}")
    mu_a, mu_b = da.mean(axis=0), db.mean(axis=0)
    z = (1.0 - lam)[:, None] * mu_a[None] + lam[:, None] * mu_b[None]
    pts = _decode(decoder, z)
    if pts.shape[0] != len(lam):
        raise InputError(f"latent swim: the decoder returned {pts.shape[0]} shapes for {len(lam)} latents")
    ref = pts[0] if lam[0] == 0 else _decode(decoder, mu_a[None])[0]
    return Swim(lam, z, pts, pts - ref[None], mu_a, mu_b)


def swim_meshes(result: Swim, warper: Any) -> np.ndarray:
    """Vertices ``(L, V, 3)`` mm of ``warper``'s template (a :class:`DeepSSMLogic.mesh.MeshWarper`
    in the decoder's frame) warped onto each decoded shape of the swim."""
    return warper.warp_many(result.particles)


def _decode(decoder: Decoder, z: np.ndarray) -> np.ndarray:
    out: Any = decoder(z)
    if hasattr(out, "detach"):
        out = out.detach().cpu().numpy()
    pts = np.asarray(out, dtype=np.float64)
    if pts.ndim == 2 and pts.shape[1] % 3 == 0:
        pts = pts.reshape(len(pts), -1, 3)
    if pts.ndim != 3 or pts.shape[2] != 3:
        raise InputError(f"latent swim: the decoder returned shape {pts.shape}, expected (L, M, 3)")
    return pts


def torch_decoder(module: Any, device: str = "cpu") -> Decoder:
    """Wrap a torch decoder ``(L, K) -> (L, M, 3)`` (or ``(L, 3M)``) as a numpy callable."""
    import torch

    def decode(z: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = module(torch.as_tensor(np.asarray(z), dtype=torch.float32, device=device))
        if isinstance(out, tuple | list):
            out = out[-1]
        return out.detach().cpu().double().numpy()

    return decode
