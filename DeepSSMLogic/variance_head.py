"""Predicted-variance uncertainty (``--uncertainty variance``, issue 13). torch/numpy/scipy only.

A post-hoc head on the trained, **frozen** network: the particles come from the network's
deterministic pass unchanged (accuracy equals ``--uncertainty none`` trained the same way), and a
small head maps the network's image features to a log-variance per descriptor coordinate
(Base: the PCA scores in mm; TL: the latent code).

* **Features** (``"conv-mean"``): the image encoder's conv output averaged over space, one value per
  channel (64 for the light encoder, 192 for the paper's), standardised with the training
  features' mean and SD (buffers of the head).
* **Head**: ``heads`` MLPs ``features → hidden → K`` (PReLU) from different seeds; the predicted
  variance is the heads' mean variance, ``σ²_k = mean_h exp(h(f))_k`` (one head's result depends on
  its seed, see BENCHMARKS.md). The log-variance is clamped to ±40 so an extreme input gives a
  huge but finite uncertainty; NaN stays NaN (``NonFiniteUncertaintyError`` downstream).
* **Fit** (:func:`fit_variance_head`, after training): on the real training images on the grid,
  each clean and ``corruptions`` times corrupted (``augment.corruption.random_corruption``: noise,
  blur or a cut field of view at a random level), **each MLP on its own corruption draw** (the clean
  images shared): averaging the variances of heads that saw different random corruptions removes
  most of the draw-to-draw noise that one shared draw left in the per-image ranking (BENCHMARKS.md,
  uncertainty: ρ subject over draws ±0.05 with 3 MLPs on one draw, ±0.01 with 6 on six), with targets the descriptor residuals
  ``d_pred − d_true`` (``d_true``: Base, the least-squares PCA scores of the true particles; TL, the
  autoencoder's code of them); Gaussian negative log-likelihood with the mean fixed,
  ``½ (r² e^{−s} + s)``, full-batch Adam.
* **Per-particle uncertainty** (:func:`particle_uncertainty`): the descriptor covariance
  ``diag(σ²)`` propagated through the decoder's Jacobian ``J_m = ∂p_m/∂d`` (3 × K per particle m):
  ``Σ_m = J_m diag(σ²) J_mᵀ`` and ``u_m = sqrt(trace Σ_m) = sqrt(Σ_k σ²_k |J_m[:, k]|²)`` mm, the
  same quantity the sampling methods report (the RMS distance of the sampled particle from its mean).
  Base: ``J`` is the PCA basis (constant). TL: the decoder (Linear, LeakyReLU, Linear, × scale) is
  differentiated in closed form at the predicted code (a first-order, local propagation).
  The validation-split ``scale`` (``trust_calibration``) multiplies ``u`` like the other methods.

The head's weights travel in ``weights.pt`` as ``variance_head.*`` next to the network's (the paper
network's own keys are unchanged); its shape is ``model.json["uncertainty"]["head"]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .augment.corruption import RANDOM_LEVELS, random_corruption
from .bundle_schema import VARIANCE_FEATURES as FEATURES
from .errors import InputError

HEAD_ATTRIBUTE = "variance_head"
DEFAULT_HIDDEN = 32
DEFAULT_HEADS = 6  # one corruption draw each: the draw-to-draw spread of ρ subject ±0.05 → ±0.01
DEFAULT_CORRUPTIONS = 12
DEFAULT_STEPS = 500
DEFAULT_WEIGHT_DECAY = 1e-2
DEFAULT_LR = 1e-2
LOGVAR_LIMIT = 40.0


class VarianceHead(nn.Module):
    """``features (B, F) → log σ² (B, K)``: the mean variance of ``heads`` small MLPs on
    standardised features (see the module docstring)."""

    def __init__(
        self, n_features: int, n_outputs: int, hidden: int = DEFAULT_HIDDEN, heads: int = DEFAULT_HEADS
    ):
        super().__init__()
        self.n_features, self.n_outputs = int(n_features), int(n_outputs)
        self.hidden, self.n_heads = int(hidden), int(heads)
        if min(self.n_features, self.n_outputs, self.hidden, self.n_heads) < 1:
            raise InputError(
                f"variance head: n_features, n_outputs, hidden and heads must be ≥ 1, found "
                f"{n_features}, {n_outputs}, {hidden}, {heads}"
            )
        self.register_buffer("feature_mean", torch.zeros(self.n_features))
        self.register_buffer("feature_std", torch.ones(self.n_features))
        self.heads = nn.ModuleList(
            nn.Sequential(
                nn.Linear(self.n_features, self.hidden), nn.PReLU(), nn.Linear(self.hidden, self.n_outputs)
            )
            for _ in range(self.n_heads)
        )

    @property
    def config(self) -> dict[str, Any]:
        """``model.json["uncertainty"]["head"]``: what :meth:`from_config` needs to rebuild it."""
        return {
            "features": FEATURES[0],
            "n_features": self.n_features,
            "n_outputs": self.n_outputs,
            "hidden": self.hidden,
            "heads": self.n_heads,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> VarianceHead:
        if config.get("features") not in FEATURES:
            raise InputError(
                f"variance head: features must be one of {FEATURES}, found {config.get('features')!r}"
            )
        return cls(config["n_features"], config["n_outputs"], config["hidden"], config["heads"])

    def standardise(self, features: torch.Tensor) -> torch.Tensor:
        return (features.float() - self.feature_mean) / self.feature_std

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        xn = self.standardise(features)
        logvars = torch.stack([h(xn) for h in self.heads])  # (H, B, K)
        pooled = torch.logsumexp(logvars, 0) - math.log(self.n_heads)  # log of the heads' mean variance
        return pooled.clamp(-LOGVAR_LIMIT, LOGVAR_LIMIT)


# -- the frozen network's pieces ---------------------------------------------------------------------
def _image_head(net: nn.Module) -> nn.Module:
    from .uncertainty import image_head

    return image_head(net)


def attach_variance_head(net: nn.Module, head: VarianceHead) -> nn.Module:
    """``net`` with ``head`` as its submodule ``variance_head`` (state_dict keys ``variance_head.*``;
    ``net.forward`` does not use it). Returns ``net``."""
    net.add_module(HEAD_ATTRIBUTE, head)
    return net


def variance_head_of(net: nn.Module) -> VarianceHead:
    head = getattr(net, HEAD_ATTRIBUTE, None)
    if not isinstance(head, VarianceHead):
        raise InputError("uncertainty method 'variance' needs a network with a fitted variance head")
    return head


def features_and_prediction(
    net: nn.Module, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(features (B, F), descriptor (B, K), particles (B, M, 3) mm)``: one pass of the network on
    ``x`` (the descriptor and particles are exactly ``net(x)``'s)."""
    from .uncertainty import decode_head_output

    head = _image_head(net)
    fmap = head.conv(x)
    desc, particles = decode_head_output(net, head.fc(torch.flatten(fmap, 1)))
    return fmap.float().mean(dim=(2, 3, 4)), desc, particles


def decoder_jacobian(net: nn.Module, desc: torch.Tensor) -> torch.Tensor:
    """``∂ particles / ∂ descriptor`` at ``desc`` ``(B, K)``: ``(B, M, 3, K)`` (mm per descriptor unit).

    Base: the PCA basis (the same for every image). TL: the autoencoder's decoder
    ``(Linear, LeakyReLU, Linear) × particle_scale``, differentiated in closed form (no autograd, so
    it runs under ``torch.inference_mode``)."""
    desc = desc.float()
    if hasattr(net, "score_std"):  # Base: particles = bias + W @ scores
        w = net.decoder.weight.float()  # (3M, K)
        m = w.shape[0] // 3
        return w.reshape(m, 3, -1).unsqueeze(0).expand(desc.shape[0], -1, -1, -1)
    ae = getattr(net, "autoencoder", None)
    layers = list(getattr(ae, "decoder", []))
    if (
        len(layers) != 3
        or not isinstance(layers[0], nn.Linear)
        or not isinstance(layers[1], nn.LeakyReLU)
        or not isinstance(layers[2], nn.Linear)
    ):
        raise InputError(
            f"{type(net).__name__}: variance propagation needs a Base network or a TL decoder of "
            "(Linear, LeakyReLU, Linear) layers"
        )
    first, act, last = layers
    pre = desc @ first.weight.float().T + first.bias.float()  # (B, h)
    slope = torch.where(pre > 0, torch.ones_like(pre), torch.full_like(pre, float(act.negative_slope)))
    jac = torch.einsum("oh,bh,hk->bok", last.weight.float(), slope, first.weight.float())  # (B, 3M, K)
    jac = jac * ae.particle_scale.float()
    return jac.reshape(desc.shape[0], -1, 3, desc.shape[1])


def particle_uncertainty(jacobian: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    """Per-particle ``sqrt(trace(J_m diag(σ²) J_mᵀ))`` ``(B, M)`` mm from ``jacobian`` ``(B, M, 3, K)``
    and descriptor variances ``variance`` ``(B, K)``."""
    return torch.sqrt(torch.einsum("bmck,bk->bm", jacobian.float() ** 2, variance.float()))


def predict_variance(net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(descriptor (B, K), particles (B, M, 3) mm, uncertainty (B, M) mm, unscaled)`` for ``x``."""
    head = variance_head_of(net)
    feats, desc, particles = features_and_prediction(net, x)
    variance = torch.exp(head(feats))
    return desc, particles, particle_uncertainty(decoder_jacobian(net, desc), variance)


# -- fitting -----------------------------------------------------------------------------------------
def true_descriptors(net: nn.Module, particles: np.ndarray) -> np.ndarray:
    """The descriptor of the true particles ``(N, M, 3)`` mm: Base, the least-squares PCA scores
    (mm); TL, the correspondence autoencoder's code. ``(N, K)`` float64."""
    p = np.asarray(particles, dtype=np.float64)
    if hasattr(net, "score_std"):
        w = net.decoder.weight.detach().cpu().double().numpy()  # (3M, K)
        bias = net.decoder.bias.detach().cpu().double().numpy()
        return (p.reshape(p.shape[0], -1) - bias) @ np.linalg.pinv(w).T
    device = next(net.parameters()).device
    with torch.no_grad():
        code = net.autoencoder.encode(torch.as_tensor(p, dtype=torch.float32, device=device))
    return code.double().cpu().numpy()


def _features_of(
    net: nn.Module,
    arrays: Sequence[np.ndarray],
    normalizer: Callable[[np.ndarray], np.ndarray],
    batch_size: int,
    check_cancel: Callable[[], None],
) -> tuple[torch.Tensor, np.ndarray]:
    """``(features (N, F), predicted descriptors (N, K))`` of the raw grid ``arrays`` (normalised
    like a prediction input) through the frozen ``net``, ``batch_size`` at a time."""
    device = next(net.parameters()).device
    feats: list[torch.Tensor] = []
    descs: list[np.ndarray] = []
    for start in range(0, len(arrays), batch_size):
        check_cancel()
        batch = arrays[start : start + batch_size]
        x = torch.from_numpy(np.stack([normalizer(a) for a in batch])[:, None].astype(np.float32)).to(device)
        with torch.no_grad():
            f, d, _ = features_and_prediction(net, x)
        feats.append(f.cpu())
        descs.append(d.double().cpu().numpy())
    return torch.cat(feats), np.concatenate(descs)


def _fold_descriptors(
    net: nn.Module,
    folds: Sequence[tuple[nn.Module, np.ndarray]],
    arrays: Sequence[np.ndarray],
    index: np.ndarray,
    normalizer: Callable[[np.ndarray], np.ndarray],
    batch_size: int,
    check_cancel: Callable[[], None],
) -> np.ndarray:
    """``(N, K)``: for each of ``arrays`` (of subject ``index[i]``), the particles predicted by the
    fold network that did not see that subject, as descriptors of ``net`` (:func:`true_descriptors`:
    Base, the least-squares PCA scores in ``net``'s basis; TL, ``net``'s code)."""
    out: np.ndarray | None = None
    done = np.zeros(len(arrays), dtype=bool)
    for fold_net, held in folds:
        rows = np.flatnonzero(np.isin(index, held))
        if not len(rows):
            continue
        was_training = fold_net.training
        fold_net.eval()
        device = next(fold_net.parameters()).device
        parts = []
        try:
            for start in range(0, len(rows), batch_size):
                check_cancel()
                batch = [normalizer(arrays[i]) for i in rows[start : start + batch_size]]
                x = torch.from_numpy(np.stack(batch)[:, None].astype(np.float32)).to(device)
                with torch.no_grad():
                    parts.append(features_and_prediction(fold_net, x)[2].double().cpu().numpy())
        finally:
            fold_net.train(was_training)
        desc = true_descriptors(net, np.concatenate(parts))
        if out is None:
            out = np.full((len(arrays), desc.shape[1]), np.nan)
        out[rows] = desc
        done[rows] = True
    if out is None or not done.all():
        raise InputError(
            f"variance head folds: {int((~done).sum())} of {len(arrays)} images belong to no fold's held-out subjects"
        )
    return out


def _head_training_sets(
    net: nn.Module,
    images: np.ndarray,
    normalizer: Callable[[np.ndarray], np.ndarray],
    spacing_zyx: Sequence[float],
    corruptions: int,
    draws: int,
    seed: int,
    batch_size: int,
    check_cancel: Callable[[], None],
    folds: Sequence[tuple[nn.Module, np.ndarray]] | None = None,
) -> tuple[list[tuple[torch.Tensor, np.ndarray, np.ndarray]], dict[str, int]]:
    """One training set per head: ``[(features (N', F), predicted descriptors (N', K), subject
    index (N',))] × draws`` and the image count by kind. Each set holds every training image clean
    (the same in every set, computed once) and ``corruptions`` times corrupted, drawn by
    ``random_corruption`` from its own generator ``default_rng([seed, draw])`` (corrupted in raw
    intensities on the grid, then normalised like a prediction input). With ``folds``
    (``[(network, held-out subject indices)]``) the predicted descriptors are the fold networks'
    (out-of-fold, :func:`_fold_descriptors`); the features stay ``net``'s."""
    n = len(images)
    clean = [np.asarray(a, dtype=np.float32) for a in images]
    clean_f, clean_d = _features_of(net, clean, normalizer, batch_size, check_cancel)
    if folds:
        clean_d = _fold_descriptors(net, folds, clean, np.arange(n), normalizer, batch_size, check_cancel)
    kinds = {"clean": n} | {k: 0 for k in RANDOM_LEVELS}  # distinct images through the network
    sets = []
    for draw in range(draws):
        rng = np.random.default_rng([seed, draw])
        arrays: list[np.ndarray] = []
        for img in images:
            check_cancel()
            for _ in range(corruptions):
                arr, kind, _ = random_corruption(img, spacing_zyx, rng)
                kinds[kind] += 1
                arrays.append(arr)
        index = np.concatenate([np.arange(n), np.repeat(np.arange(n), corruptions)])
        if arrays:
            f, d = _features_of(net, arrays, normalizer, batch_size, check_cancel)
            if folds:
                d = _fold_descriptors(net, folds, arrays, index[n:], normalizer, batch_size, check_cancel)
            sets.append((torch.cat([clean_f, f]), np.concatenate([clean_d, d]), index))
        else:
            sets.append((clean_f, clean_d, index))
    return sets, kinds


def fit_heads(
    features: torch.Tensor | Sequence[torch.Tensor],
    residuals: torch.Tensor | Sequence[torch.Tensor],
    *,
    hidden: int = DEFAULT_HIDDEN,
    heads: int = DEFAULT_HEADS,
    steps: int = DEFAULT_STEPS,
    weight_decay: float = DEFAULT_WEIGHT_DECAY,
    lr: float = DEFAULT_LR,
    seed: int = 0,
) -> tuple[VarianceHead, list[float]]:
    """A :class:`VarianceHead` fitted to ``residuals`` ``(N, K)`` from ``features`` ``(N, F)`` by the
    Gaussian NLL (mean fixed at 0), each MLP ``steps`` full-batch Adam steps from seed ``seed + h``;
    returns it (eval mode, CPU) and each MLP's final NLL.

    ``features`` and ``residuals`` may also be sequences of one training set per MLP (``heads`` is
    then their length): MLP ``h`` is fitted on set ``h`` only, the standardisation on all of them
    (:func:`fit_variance_head` gives each MLP its own corruption draw)."""
    per_head = not isinstance(features, torch.Tensor)
    xs = [f.float().cpu() for f in features] if per_head else [features.float().cpu()]
    rs = [r.float().cpu() for r in residuals] if per_head else [residuals.float().cpu()]  # type: ignore[union-attr]
    if not xs or len(xs) != len(rs):
        raise InputError(
            f"variance head: expected one residual set per feature set (≥ 1), found {len(xs)} and {len(rs)}"
        )
    for x, r in zip(xs, rs, strict=True):
        if (
            x.ndim != 2
            or r.ndim != 2
            or x.shape[0] != r.shape[0]
            or x.shape[0] < 2
            or x.shape[1] != xs[0].shape[1]
        ):
            raise InputError(
                f"variance head: expected features (N, F) and residuals (N, K) with N ≥ 2, found "
                f"{tuple(x.shape)} and {tuple(r.shape)}"
            )
    sets = list(zip(xs, rs, strict=True)) if per_head else [(xs[0], rs[0])] * int(heads)
    pooled = torch.cat(xs)  # the standardisation: every distinct set once
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny full-batch steps: thread hand-offs cost more than they save (10x)
    try:
        return _fit_heads(sets, pooled, hidden, steps, weight_decay, lr, seed)
    finally:
        torch.set_num_threads(threads)


def _fit_heads(
    sets: list[tuple[torch.Tensor, torch.Tensor]],
    pooled: torch.Tensor,
    hidden: int,
    steps: int,
    weight_decay: float,
    lr: float,
    seed: int,
) -> tuple[VarianceHead, list[float]]:
    losses = []
    with torch.random.fork_rng(devices=[]):  # seeded heads, the global RNG untouched
        head = VarianceHead(pooled.shape[1], sets[0][1].shape[1], hidden, len(sets))
        with torch.no_grad():
            head.feature_mean.copy_(pooled.mean(0))
            head.feature_std.copy_(pooled.std(0) + 1e-6)
        for h, (mlp, (x, r)) in enumerate(zip(head.heads, sets, strict=True)):
            xn = head.standardise(x)
            torch.manual_seed(seed + h)
            for layer in mlp:  # re-initialise from this head's seed (construction used the global RNG)
                if hasattr(layer, "reset_parameters"):
                    layer.reset_parameters()
            opt = torch.optim.Adam(mlp.parameters(), lr, weight_decay=weight_decay)
            for _ in range(int(steps)):
                lv = mlp(xn)
                loss = 0.5 * (r**2 * torch.exp(-lv) + lv).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            losses.append(float(loss.detach()))
    return head.eval(), losses


def fit_variance_head(
    net: nn.Module,
    images: np.ndarray,
    particles: np.ndarray,
    normalizer: Callable[[np.ndarray], np.ndarray],
    spacing_zyx: Sequence[float],
    *,
    corruptions: int = DEFAULT_CORRUPTIONS,
    seed: int = 0,
    batch_size: int = 8,
    check_cancel: Callable[[], None] = lambda: None,
    fold_networks: Sequence[tuple[nn.Module, np.ndarray]] | None = None,
    **head_options: Any,
) -> tuple[VarianceHead, dict[str, Any]]:
    """Fit the variance head of the frozen ``net`` on the raw training arrays ``images``
    ``(N, Z, Y, X)`` with true ``particles`` ``(N, M, 3)`` mm (see the module docstring); returns
    the head (CPU, eval mode; attach it with :func:`attach_variance_head`) and a summary for the
    training record. ``fold_networks`` (``[(network, held-out subject indices)]``, every subject in
    one fold): the residuals are those of the network that did not see the subject (out-of-fold;
    ``net``'s own residuals on its training subjects are memorised once it fits them, see
    BENCHMARKS.md "Out-of-fold head"); the features stay ``net``'s. ``head_options``:
    :func:`fit_heads` keywords."""
    if isinstance(corruptions, bool) or not isinstance(corruptions, int) or corruptions < 0:
        raise InputError(f"variance head corruptions: expected an integer ≥ 0, found {corruptions!r}")
    if len(images) != len(particles) or len(images) < 2:
        raise InputError(
            f"variance head: expected ≥ 2 training images with particles, found {len(images)} images and "
            f"{len(particles)} particle sets"
        )
    heads = head_options.pop("heads", DEFAULT_HEADS)
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        raise InputError(f"variance head heads: expected an integer ≥ 1, found {heads!r}")
    was_training = net.training
    net.eval()
    try:
        sets, kinds = _head_training_sets(
            net,
            images,
            normalizer,
            spacing_zyx,
            corruptions,
            heads,
            seed,
            batch_size,
            check_cancel,
            fold_networks,
        )
        truth = true_descriptors(net, particles)
        feats = [f for f, _, _ in sets]
        residuals = [pred - truth[index] for _, pred, index in sets]
    finally:
        net.train(was_training)
    if not all(np.all(np.isfinite(r)) for r in residuals) or not all(
        bool(torch.isfinite(f).all()) for f in feats
    ):
        raise InputError(
            "variance head: the network gave NaN or Inf features or descriptors on the training images"
        )
    head, losses = fit_heads(feats, [torch.from_numpy(r) for r in residuals], seed=seed, **head_options)
    summary = {
        "n_images": sum(kinds.values()),  # distinct images (the clean ones are in every MLP's set)
        "n_subjects": len(images),
        "corruptions_per_subject": corruptions,
        "corruption_draws": heads,  # one per MLP (since issue 13's draw study; before: one shared draw)
        "images_by_kind": kinds,
        "random_levels": dict(RANDOM_LEVELS),
        "features": FEATURES[0],
        "final_nll": losses,
        "residual_rms": float(np.sqrt(np.mean([(r**2).mean() for r in residuals]))),
        "residuals": "out-of-fold" if fold_networks else "in-sample",
        "folds": len(fold_networks) if fold_networks else 0,
    }
    return head, summary
