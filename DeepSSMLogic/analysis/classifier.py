"""Descriptor classifier (the paper's Table 3 protocol).

Descriptors ``(N, K)`` (PCA scores in mm, or a TL latent) are trimmed to the ``k`` dimensions with
the largest absolute difference of the two group means (computed on the training subjects only, so
the test set never leaks into the choice), standardised with training statistics, and fed to a
small seeded classifier: L2-regularised logistic regression (Newton/IRLS, numpy) or a one-hidden-
layer MLP (numpy; the paper used an MLP). Accuracy is measured on held-out subjects.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import InputError


def stratified_split(labels: Any, test_fraction: float = 0.4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified train/test index split ``(train_idx, test_idx)``; each class keeps at least
    one subject on each side."""
    y = np.asarray(labels).astype(bool).ravel()
    if not 0 < test_fraction < 1:
        raise InputError(f"stratified_split: test_fraction must be in (0, 1), found {test_fraction}")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for cls in (False, True):
        idx = rng.permutation(np.flatnonzero(y == cls))
        if len(idx) < 2:
            raise InputError(f"stratified_split: class {int(cls)} has {len(idx)} subject(s); need at least 2")
        n_test = int(np.clip(round(test_fraction * len(idx)), 1, len(idx) - 1))
        test.extend(idx[:n_test])
        train.extend(idx[n_test:])
    return np.sort(np.asarray(train)), np.sort(np.asarray(test))


def trim_dimensions(descriptors: Any, labels: Any, k: int) -> np.ndarray:
    """Indices ``(k,)`` of the descriptor dimensions with the largest |mean(pos) - mean(neg)|,
    largest first (the paper's feature-trimming heuristic)."""
    x, y = _xy(descriptors, labels)
    k = int(min(max(k, 1), x.shape[1]))
    diff = np.abs(x[y].mean(axis=0) - x[~y].mean(axis=0))
    return np.argsort(-diff, kind="stable")[:k]


def _features(descriptors: Any) -> np.ndarray:
    """Descriptors as float64 ``(N, K)``; a 1-D input is one dimension ``(N, 1)``."""
    x = np.asarray(descriptors, dtype=np.float64)
    return x[:, None] if x.ndim == 1 else x


def _xy(descriptors: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    x = _features(descriptors)
    y = np.asarray(labels).ravel()
    if x.ndim != 2 or len(x) != len(y):
        raise InputError(f"classifier: descriptors (N, K) and labels (N,) disagree: {x.shape} vs {y.shape}")
    if not np.all(np.isfinite(x)):
        raise InputError("classifier: descriptors contain NaN or Inf")
    y = y.astype(bool)
    if y.all() or not y.any():
        raise InputError(f"classifier: labels need both classes, found {int(y.sum())} positive of {y.size}")
    return x, y


def _sigmoid(t: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-t))


class _Standardised:
    """Inputs standardised with the training mean/std (a constant dimension keeps std 1)."""

    mu: np.ndarray
    sd: np.ndarray

    def _fit_standardise(self, x: np.ndarray) -> np.ndarray:
        """Learn the mean/std of training ``x`` ``(N, K)`` and return ``x`` standardised."""
        self.mu = x.mean(axis=0)
        self.sd = x.std(axis=0)
        self.sd[self.sd == 0] = 1.0
        return (x - self.mu) / self.sd

    def _standardise(self, x: Any) -> np.ndarray:
        return (_features(x) - self.mu) / self.sd


class LogisticRegression(_Standardised):
    """Binary logistic regression with an L2 penalty ``l2 · |w|²/2`` (intercept unpenalised), fitted
    by Newton's method; inputs are standardised with the training mean/std."""

    def __init__(self, l2: float = 1.0, max_iter: int = 100) -> None:
        self.l2 = float(l2)
        self.max_iter = int(max_iter)

    def fit(self, x: np.ndarray, y: np.ndarray) -> LogisticRegression:
        x, yb = _xy(x, y)
        z = np.hstack([np.ones((len(x), 1)), self._fit_standardise(x)])
        t = yb.astype(np.float64)
        w = np.zeros(z.shape[1])
        pen = np.full(z.shape[1], self.l2)
        pen[0] = 1e-8
        for _ in range(self.max_iter):
            p = _sigmoid(z @ w)
            grad = z.T @ (p - t) + pen * w
            hess = (z * (p * (1 - p))[:, None]).T @ z + np.diag(pen)
            step = np.linalg.solve(hess, grad)
            w -= step
            if np.abs(step).max() < 1e-10:
                break
        self.w = w
        return self

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return _sigmoid(self.w[0] + self._standardise(x) @ self.w[1:])


class MLPClassifier(_Standardised):
    """One-hidden-layer (ReLU) MLP, full-batch Adam with decoupled weight decay, seeded (numpy;
    deterministic and free of thread-pool overheads for these tiny problems)."""

    def __init__(
        self, hidden: int = 16, epochs: int = 300, lr: float = 1e-2, weight_decay: float = 1e-2, seed: int = 0
    ) -> None:
        self.hidden, self.epochs, self.lr, self.weight_decay, self.seed = (
            hidden,
            epochs,
            lr,
            weight_decay,
            seed,
        )

    def fit(self, x: np.ndarray, y: np.ndarray) -> MLPClassifier:
        x, yb = _xy(x, y)
        xs = self._fit_standardise(x)
        rng = np.random.default_rng(self.seed)
        d, h = x.shape[1], self.hidden
        params = [
            rng.normal(size=(d, h)) * np.sqrt(2.0 / d),
            np.zeros(h),
            rng.normal(size=(h, 1)) * np.sqrt(1.0 / h),
            np.zeros(1),
        ]
        m = [np.zeros_like(p) for p in params]
        v = [np.zeros_like(p) for p in params]
        t = yb.astype(np.float64)[:, None]
        b1, b2, eps = 0.9, 0.999, 1e-8
        n = len(xs)
        for step in range(1, self.epochs + 1):
            w1, c1, w2, c2 = params
            pre = xs @ w1 + c1
            hid = np.maximum(pre, 0.0)
            prob = _sigmoid(hid @ w2 + c2)
            g_out = (prob - t) / n  # d(mean BCE)/d(logit)
            g_hid = (g_out @ w2.T) * (pre > 0)
            grads = [xs.T @ g_hid, g_hid.sum(0), hid.T @ g_out, g_out.sum(0)]
            for i, g in enumerate(grads):
                m[i] = b1 * m[i] + (1 - b1) * g
                v[i] = b2 * v[i] + (1 - b2) * g * g
                mhat = m[i] / (1 - b1**step)
                vhat = v[i] / (1 - b2**step)
                if i in (0, 2):
                    params[i] *= 1.0 - self.lr * self.weight_decay
                params[i] -= self.lr * mhat / (np.sqrt(vhat) + eps)
        self.params = params
        return self

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        w1, c1, w2, c2 = self.params
        hid = np.maximum(self._standardise(x) @ w1 + c1, 0.0)
        return _sigmoid(hid @ w2 + c2)[:, 0]


@dataclass
class ClassifierResult:
    """Held-out ``accuracy`` (fraction), ``train_accuracy``, ``auc`` of the test probabilities (None
    when the test set has one class), the trimmed ``dimensions``, ``chance`` = majority-class rate."""

    accuracy: float
    train_accuracy: float
    auc: float | None
    chance: float
    dimensions: list[int]
    probabilities: np.ndarray = field(repr=False)
    n_train: int = 0
    n_test: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "accuracy": self.accuracy,
            "train_accuracy": self.train_accuracy,
            "auc": self.auc,
            "chance": self.chance,
            "dimensions": self.dimensions,
            "n_train": self.n_train,
            "n_test": self.n_test,
        }


def classify_descriptors(
    descriptors: Any,
    labels: Any,
    train_idx: Any,
    test_idx: Any,
    k: int = 10,
    model: str = "logistic",
    seed: int = 0,
    l2: float = 1.0,
) -> ClassifierResult:
    """Trim to ``k`` dimensions on the training subjects, fit ``model`` ("logistic" or "mlp") on them
    and report held-out accuracy on ``test_idx``."""
    from .metrics import auc as _auc

    x, y = _xy(descriptors, labels)
    tr = np.asarray(train_idx, dtype=np.int64)
    te = np.asarray(test_idx, dtype=np.int64)
    if len(tr) == 0 or len(te) == 0:
        raise InputError(f"classifier: need training and test subjects, found {len(tr)} and {len(te)}")
    dims = trim_dimensions(x[tr], y[tr], k)
    if model == "logistic":
        clf: Any = LogisticRegression(l2=l2).fit(x[tr][:, dims], y[tr])
    elif model == "mlp":
        clf = MLPClassifier(seed=seed).fit(x[tr][:, dims], y[tr])
    else:
        raise InputError(f"classifier: model must be 'logistic' or 'mlp', found {model!r}")
    p_te = clf.predict_proba(x[te][:, dims])
    p_tr = clf.predict_proba(x[tr][:, dims])
    acc = float(np.mean((p_te >= 0.5) == y[te]))
    tr_acc = float(np.mean((p_tr >= 0.5) == y[tr]))
    both = y[te].any() and not y[te].all()
    return ClassifierResult(
        accuracy=acc,
        train_accuracy=tr_acc,
        auc=_auc(p_te, y[te]) if both else None,
        chance=float(max(y[te].mean(), 1 - y[te].mean())),
        dimensions=[int(d) for d in dims],
        probabilities=p_te,
        n_train=len(tr),
        n_test=len(te),
    )


def compare_descriptors(
    descriptor_sets: Mapping[str, Any],
    labels: Any,
    train_idx: Any,
    test_idx: Any,
    k: int = 10,
    model: str = "logistic",
    seed: int = 0,
) -> dict[str, ClassifierResult]:
    """The Table 3 comparison: the same split, trimming and classifier for each named descriptor set
    (e.g. ``{"PDM (ground-truth PCA)": ..., "Base-DeepSSM": ..., "TL-DeepSSM": ...}``)."""
    return {
        name: classify_descriptors(x, labels, train_idx, test_idx, k=k, model=model, seed=seed)
        for name, x in descriptor_sets.items()
    }
