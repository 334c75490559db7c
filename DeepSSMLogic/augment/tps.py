"""3D thin-plate spline image warps (torch only; batched; CPU and CUDA).

The spline uses the 3D biharmonic kernel U(r) = r plus an affine part. For augmentation it is fitted
*backwards*, from the generated (target) correspondences to the source correspondences, so that each
output voxel at physical position x samples the source image at T(x) (trilinear, or nearest for label
maps). The linear system is solved in float64 on centred, scaled coordinates.

Evaluating the spline exactly costs one distance per (voxel, landmark) pair: about 7 GFLOP for a
118x69x88 volume with 1024 landmarks. The fast path (``coarse = s > 1``) evaluates the spline exactly
on a lattice s times coarser (1/s³ of the work), interpolates it with a separable Catmull-Rom cubic
(the field is smooth away from the landmarks), and evaluates it exactly again at every fine voxel
within ``band`` coarse cells of a landmark, where U(r) = r has its kink -- i.e. on the anatomy's
surface, where accuracy matters. :func:`sampling_deviation` measures the deviation from the exact
spline in voxels; the benchmark and the tests report it.

Units: points are ``(B, L, 3)`` mm in LPS physical space; images ``(B, C, Z, Y, X)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError
from ..geometry import Grid

# Relative tolerances for degenerate landmark sets (relative to the set's extent).
_DUPLICATE_TOL = 1e-6
_COPLANAR_TOL = 1e-6
# Number of (voxel, landmark) pairs evaluated at once: bounds the temporary memory to ~64 MB (float64).
_PAIR_CHUNK = 1 << 23
_CPU_PAIR_CHUNK = 1 << 18
DEFAULT_COARSE = 4
DEFAULT_BAND = 2.0


def _as_points(points: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    t = torch.as_tensor(points)
    if t.ndim == 2:
        t = t[None]
    if t.ndim != 3 or t.shape[-1] != 3:
        raise InputError(f"{name}: expected points of shape (B, L, 3) or (L, 3), found {tuple(t.shape)}")
    if not torch.is_floating_point(t):
        t = t.to(torch.float64)
    return t


def check_landmarks(points: torch.Tensor, name: str) -> None:
    """Raise :class:`InputError` if any batch element of ``points`` ``(B, L, 3)`` is unusable.

    Unusable: non-finite values, fewer than 5 points, duplicated points or all points (nearly) on one
    plane (the affine part is then undetermined and the TPS system singular).
    """
    if points.ndim != 3 or points.shape[-1] != 3:
        raise InputError(f"{name}: expected points of shape (B, L, 3), found {tuple(points.shape)}")
    b, n = points.shape[0], points.shape[1]
    if n < 5:
        raise InputError(f"{name}: a 3D thin-plate spline needs at least 5 landmarks, found {n}")
    p = points.detach().to("cpu", torch.float64)
    bad = ~torch.isfinite(p).all(dim=-1)
    if bad.any():
        bi, li = (int(v) for v in torch.nonzero(bad)[0])
        raise InputError(
            f"{name}: {int(bad.sum())} landmark(s) contain NaN or Inf (first: sample {bi}, landmark {li})"
        )
    for i in range(b):
        q = p[i] - p[i].mean(dim=0)
        extent = float(q.norm(dim=1).max())
        if extent == 0.0:
            raise InputError(f"{name}: sample {i}: all {n} landmarks are the same point")
        sv = torch.linalg.svdvals(q)
        if float(sv[-1]) <= _COPLANAR_TOL * float(sv[0]):
            raise InputError(
                f"{name}: sample {i}: the landmarks are coplanar (or collinear); a 3D thin-plate spline "
                f"needs points spanning 3D (singular values {[round(float(s), 6) for s in sv]})"
            )
        d = torch.cdist(q[None], q[None])[0]
        d.fill_diagonal_(math.inf)
        if float(d.min()) <= _DUPLICATE_TOL * extent:
            j, k = (int(v) for v in torch.nonzero(d <= _DUPLICATE_TOL * extent)[0])
            raise InputError(
                f"{name}: sample {i}: landmarks {j} and {k} are duplicates ({q[j].tolist()} mm from the "
                "centroid); remove duplicated correspondences"
            )


def _pairwise_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distances ``(B, P, Q)`` between ``a`` (B, P, 3) and ``b`` (B, Q, 3) (matmul form)."""
    d2 = torch.baddbmm(
        (a * a).sum(-1, keepdim=True) + (b * b).sum(-1)[:, None, :], a, b.transpose(1, 2), alpha=-2.0
    )
    return d2.clamp_min_(0.0).sqrt_()


class ThinPlateSpline:
    """A batch of 3D thin-plate splines f: R³ -> R^C, f(x) = Σ_i w_i |x - c_i| + a_0 + A x.

    Fitted on control points ``(B, L, 3)`` (mm) and values ``(B, L, C)``. Coordinates are centred on
    the control points' centroid and divided by their RMS radius before solving (float64), which keeps
    the system well conditioned whatever the units and position of the anatomy.
    """

    def __init__(
        self,
        control_points: torch.Tensor,
        values: torch.Tensor,
        regularization: float = 0.0,
        check: bool = True,
    ) -> None:
        ctrl = _as_points(control_points, "control points")
        vals = torch.as_tensor(values)
        if vals.ndim == 2:
            vals = vals[None]
        if vals.shape[:2] != ctrl.shape[:2]:
            raise InputError(
                f"thin-plate spline: {ctrl.shape[1]} control points per sample (batch {ctrl.shape[0]}) but "
                f"values of shape {tuple(vals.shape)}; expected ({ctrl.shape[0]}, {ctrl.shape[1]}, C)"
            )
        if not torch.isfinite(vals).all():
            raise InputError("thin-plate spline: the values to interpolate contain NaN or Inf")
        if regularization < 0 or not math.isfinite(regularization):
            raise InputError(f"thin-plate spline: regularization must be >= 0, found {regularization}")
        if check:
            check_landmarks(ctrl, "control points")
        device = ctrl.device
        c64 = ctrl.to(torch.float64)
        self.centre = c64.mean(dim=1, keepdim=True)  # (B, 1, 3) mm
        q = c64 - self.centre
        self.scale = q.pow(2).sum(-1).mean(-1).sqrt().clamp_min(1e-12)[:, None, None]  # (B, 1, 1) mm
        self.ctrl_n = q / self.scale  # (B, L, 3) unitless
        b, n, _ = ctrl.shape
        k = _pairwise_dist(self.ctrl_n, self.ctrl_n)
        if regularization:
            # The kernel is in normalised units; the regularisation is given in mm.
            k = k + (regularization / self.scale) * torch.eye(n, dtype=torch.float64, device=device)
        p = torch.cat([torch.ones(b, n, 1, dtype=torch.float64, device=device), self.ctrl_n], dim=-1)
        system = torch.zeros(b, n + 4, n + 4, dtype=torch.float64, device=device)
        system[:, :n, :n] = k
        system[:, :n, n:] = p
        system[:, n:, :n] = p.transpose(1, 2)
        rhs = torch.zeros(b, n + 4, vals.shape[-1], dtype=torch.float64, device=device)
        rhs[:, :n] = vals.to(device, torch.float64)
        try:
            if device.type == "cpu" and b > 1:
                # torch 2.13's batched CPU solve fails with >1 thread for n >~ 600 (MKL DLASWP
                # "Parameter 6 was incorrect"); one unbatched solve per sample is as fast and correct.
                sol = torch.stack([torch.linalg.solve(system[i], rhs[i]) for i in range(b)])
            else:
                sol = torch.linalg.solve(system, rhs)
        except RuntimeError as e:  # singular despite the checks (e.g. check=False)
            raise InputError(f"thin-plate spline: the landmark system is singular ({e})") from None
        if not torch.isfinite(sol).all():
            raise InputError("thin-plate spline: the landmark system is singular (non-finite solution)")
        self.weights = sol[:, :n]  # (B, L, C) in units of the values per normalised length
        self.affine = sol[:, n:]  # (B, 4, C)

    @property
    def batch(self) -> int:
        return self.ctrl_n.shape[0]

    def normalise(self, points: torch.Tensor) -> torch.Tensor:
        """Points ``(B, P, 3)`` mm -> the spline's normalised coordinates (float64)."""
        return (points.to(self.ctrl_n.device, torch.float64) - self.centre) / self.scale

    def _eval_normalised(self, u: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """f at normalised points ``u`` (B, P, 3) -> (B, P, C), computed in ``dtype``.

        Chunked so that at most ``_PAIR_CHUNK`` point-landmark distances exist at once. In float32 the
        centred, scaled coordinates (|u| ~ 1) keep the r² = |u|² + |c|² - 2u·c cancellation small.
        """
        b, p, _ = u.shape
        n = self.ctrl_n.shape[1]
        ctrl = self.ctrl_n.to(dtype)
        w = self.weights.to(dtype)
        aff0 = self.affine[:, :1].to(dtype)
        aff = self.affine[:, 1:].to(dtype)
        c2 = (ctrl * ctrl).sum(-1)[:, None, :]
        out = torch.empty(b, p, w.shape[-1], dtype=dtype, device=u.device)
        # Small chunks stay in the CPU cache (4x faster than large ones); the GPU wants large ones.
        pairs = _PAIR_CHUNK if u.device.type == "cuda" else _CPU_PAIR_CHUNK
        step = max(1, pairs // max(1, n * b))
        for s in range(0, p, step):
            uu = u[:, s : s + step].to(dtype)
            d2 = torch.baddbmm((uu * uu).sum(-1, keepdim=True) + c2, uu, ctrl.transpose(1, 2), alpha=-2.0)
            res = torch.baddbmm(aff0, d2.clamp_min_(0.0).sqrt_(), w)
            out[:, s : s + step] = res.baddbmm_(uu, aff)
        return out

    def __call__(self, points: torch.Tensor) -> torch.Tensor:
        """Exact f at ``points`` ``(B, P, 3)`` mm -> ``(B, P, C)`` float64."""
        pts = _as_points(points, "evaluation points")
        if pts.shape[0] != self.batch:
            raise InputError(
                f"thin-plate spline: batch of {self.batch} splines but {pts.shape[0]} point sets"
            )
        return self._eval_normalised(self.normalise(pts))


# ----------------------------------------------------------------------------------------------
# Grid evaluation
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _GridGeom:
    a: torch.Tensor  # (3, 3) index (i, j, k) -> mm
    a_inv: torch.Tensor
    origin: torch.Tensor  # (3,)
    size_xyz: tuple[int, int, int]


def _grid_geom(grid: Grid, device: torch.device) -> _GridGeom:
    a = grid.direction_matrix @ np.diag(grid.spacing)
    return _GridGeom(
        torch.as_tensor(a, dtype=torch.float64, device=device),
        torch.as_tensor(np.linalg.inv(a), dtype=torch.float64, device=device),
        torch.as_tensor(grid.origin, dtype=torch.float64, device=device),
        tuple(int(s) for s in grid.size),
    )


def _index_points(nx: int, ny: int, nz: int, step: int, device: torch.device) -> torch.Tensor:
    """(Z*Y*X, 3) float64 voxel indices (i, j, k) of a lattice with ``step``, z slowest."""
    k, j, i = torch.meshgrid(
        *(torch.arange(n, dtype=torch.float64, device=device) * step for n in (nz, ny, nx)), indexing="ij"
    )
    return torch.stack([i, j, k], dim=-1).reshape(-1, 3)


def _cubic_upsample_matrix(n_fine: int, step: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """(n_fine, K) Catmull-Rom interpolation from coarse nodes at fine indices (k - 1)·step, k = 0..K-1.

    One extra node on each side keeps the 4-node stencil inside the lattice at the grid's edges.
    """
    cells = max(1, math.ceil((n_fine - 1) / step))
    k_nodes = cells + 3
    x = torch.arange(n_fine, dtype=torch.float64, device=device) / step
    j = x.floor().clamp(max=cells - 1)
    t = x - j
    t2, t3 = t * t, t * t * t
    w = torch.stack(
        [(-t3 + 2 * t2 - t) / 2, (3 * t3 - 5 * t2 + 2) / 2, (-3 * t3 + 4 * t2 + t) / 2, (t3 - t2) / 2], dim=1
    )
    m = torch.zeros(n_fine, k_nodes, dtype=torch.float64, device=device)
    cols = j.long()[:, None] + torch.arange(4, device=device)[None]
    m.scatter_(1, cols, w)
    return m, k_nodes


def _band_mask(ctrl_mm: torch.Tensor, g: _GridGeom, radius_mm: float, device: torch.device) -> torch.Tensor:
    """(Z*Y*X,) bool: fine voxels within ``radius_mm`` of any of the landmarks ``ctrl_mm`` (L, 3)."""
    nx, ny, nz = g.size_xyz
    reach = radius_mm * g.a_inv.norm(dim=1) + 1.0
    hw = [math.ceil(float(v)) for v in reach]
    oi, oj, ok = torch.meshgrid(
        *(torch.arange(-h, h + 1, device=device, dtype=torch.float64) for h in hw), indexing="ij"
    )
    offsets = torch.stack([oi, oj, ok], dim=-1).reshape(-1, 3)
    offsets = offsets[(offsets @ g.a.T).norm(dim=1) <= radius_mm + 0.5 * float(g.a.norm(dim=0).sum())]
    size_t = torch.tensor([nx, ny, nz], dtype=torch.float64, device=device)
    mask = torch.zeros(nz * ny * nx, dtype=torch.bool, device=device)
    centre_idx = ((ctrl_mm - g.origin) @ g.a_inv.T).round()
    step = max(1, (1 << 22) // max(1, offsets.shape[0]))
    for s in range(0, centre_idx.shape[0], step):
        vox = (centre_idx[s : s + step, None, :] + offsets[None]).reshape(-1, 3)
        vox = vox[((vox >= 0) & (vox <= size_t - 1)).all(-1)]
        if vox.shape[0] == 0:
            continue
        v = vox.long()
        mask[(v[:, 2] * ny + v[:, 1]) * nx + v[:, 0]] = True
    return mask


def evaluate_on_grid(
    spline: ThinPlateSpline,
    grid: Grid,
    coarse: int = DEFAULT_COARSE,
    band: float = DEFAULT_BAND,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The spline at every voxel centre of ``grid`` -> ``(B, Z, Y, X, C)``.

    ``coarse=1`` evaluates exactly (chunked; never materialises the voxel×landmark matrix). ``coarse=s``
    evaluates exactly on a lattice s times coarser, interpolates it (separable Catmull-Rom cubic), and
    evaluates exactly again every fine voxel within ``band`` coarse cells of a landmark, where the
    kernel's kink makes interpolation inaccurate.
    """
    device = spline.ctrl_n.device
    g = _grid_geom(grid, device)
    nx, ny, nz = g.size_xyz
    b = spline.batch
    c = spline.weights.shape[-1]
    if coarse < 1 or int(coarse) != coarse:
        raise InputError(f"coarse must be a positive integer, found {coarse}")
    coarse = int(coarse)
    if coarse == 1:
        idx = _index_points(nx, ny, nz, 1, device)
        return _eval_points(spline, idx @ g.a.T + g.origin, dtype).reshape(b, nz, ny, nx, c)

    (mz, kz), (my, ky), (mx, kx) = (_cubic_upsample_matrix(n, coarse, device) for n in (nz, ny, nx))
    cidx = _index_points(kx, ky, kz, coarse, device) - coarse
    smooth = _eval_points(spline, cidx @ g.a.T + g.origin, dtype).reshape(b, kz, ky, kx, c)
    field = torch.einsum("xi,bzyic->bzyxc", mx.to(dtype), smooth)
    field = torch.einsum("yj,bzjxc->bzyxc", my.to(dtype), field)
    field = torch.einsum("zk,bkyxc->bzyxc", mz.to(dtype), field).contiguous()
    if band > 0:
        flat = field.view(b, nz * ny * nx, c)
        radius_mm = band * coarse * float(max(grid.spacing))
        all_idx = None
        ctrl_mm = spline.ctrl_n * spline.scale + spline.centre
        for i in range(b):
            sel = _band_mask(ctrl_mm[i], g, radius_mm, device).nonzero()[:, 0]
            if sel.numel() == 0:
                continue
            if all_idx is None:
                all_idx = _index_points(nx, ny, nz, 1, device)
            pts = all_idx[sel] @ g.a.T + g.origin
            flat[i, sel] = _eval_points(_SingleView(spline, i), pts, dtype)[0]
    return field


def _eval_points(spline: ThinPlateSpline, pts_mm: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Exact spline at ``pts_mm`` (P, 3) float64 mm, shared by every batch element -> (B, P, C) ``dtype``."""
    b = spline.batch
    out = torch.empty(b, pts_mm.shape[0], spline.weights.shape[-1], dtype=dtype, device=pts_mm.device)
    step = max(1, _PAIR_CHUNK // max(1, spline.ctrl_n.shape[1] * b))  # bounds the expanded copies
    for s in range(0, pts_mm.shape[0], step):
        chunk = pts_mm[s : s + step].expand(b, -1, -1)
        out[:, s : s + step] = spline._eval_normalised(spline.normalise(chunk), dtype)
    return out


class _SingleView(ThinPlateSpline):
    """One batch element of a fitted spline (shares tensors; no refit)."""

    def __init__(self, parent: ThinPlateSpline, i: int) -> None:
        self.centre = parent.centre[i : i + 1]
        self.scale = parent.scale[i : i + 1]
        self.ctrl_n = parent.ctrl_n[i : i + 1]
        self.weights = parent.weights[i : i + 1]
        self.affine = parent.affine[i : i + 1]


# ----------------------------------------------------------------------------------------------
# Warping
# ----------------------------------------------------------------------------------------------


def _select_landmarks(n: int, landmarks: int | None) -> torch.Tensor | None:
    if landmarks is None or landmarks >= n:
        return None
    if landmarks < 5:
        raise InputError(f"landmarks must be at least 5 (or None for all), found {landmarks}")
    # Evenly strided subset: deterministic, and correspondence order carries no spatial bias.
    return torch.as_tensor(np.unique(np.linspace(0, n - 1, int(landmarks)).round().astype(np.int64)))


def fit_warp(
    source_points: torch.Tensor | np.ndarray,
    target_points: torch.Tensor | np.ndarray,
    landmarks: int | None = None,
    regularization: float = 0.0,
    device: torch.device | str | None = None,
) -> ThinPlateSpline:
    """The backward spline: maps a target (output) position x to its displacement T(x) - x, where
    T(target_i) = source_i. Points ``(B, M, 3)`` mm, LPS. ``landmarks`` subsamples the correspondences
    (an approximation: measure it with :func:`sampling_deviation`)."""
    src = _as_points(source_points, "source_points")
    tgt = _as_points(target_points, "target_points")
    if src.shape != tgt.shape:
        raise InputError(
            f"source_points {tuple(src.shape)} and target_points {tuple(tgt.shape)} must have the same "
            "shape (B, M, 3): every source correspondence needs its target"
        )
    dev = torch.device(device) if device is not None else tgt.device
    src = src.to(dev, torch.float64)
    tgt = tgt.to(dev, torch.float64)
    check_landmarks(src, "source_points")
    check_landmarks(tgt, "target_points")
    sel = _select_landmarks(src.shape[1], landmarks)
    if sel is not None:
        sel = sel.to(dev)
        src, tgt = src[:, sel], tgt[:, sel]
    return ThinPlateSpline(tgt, src - tgt, regularization=regularization, check=False)


def sampling_positions(
    spline: ThinPlateSpline,
    grid: Grid,
    coarse: int = DEFAULT_COARSE,
    band: float = DEFAULT_BAND,
) -> torch.Tensor:
    """Continuous source voxel indices (i, j, k) sampled by every output voxel: ``(B, Z, Y, X, 3)`` float32."""
    disp = evaluate_on_grid(spline, grid, coarse=coarse, band=band, dtype=torch.float32)
    g = _grid_geom(grid, disp.device)
    nx, ny, nz = g.size_xyz
    # Source index = output index + A⁻¹·displacement: no large absolute coordinates in float32.
    didx = disp @ g.a_inv.T.to(torch.float32)
    k, j, i = torch.meshgrid(
        *(torch.arange(n, dtype=torch.float32, device=disp.device) for n in (nz, ny, nx)), indexing="ij"
    )
    return didx + torch.stack([i, j, k], dim=-1)


def sampling_deviation(
    spline: ThinPlateSpline,
    grid: Grid,
    coarse: int = DEFAULT_COARSE,
    band: float = DEFAULT_BAND,
    reference: torch.Tensor | None = None,
) -> dict[str, float]:
    """Max and mean distance (voxels) between the fast and the exact sampling positions on ``grid``."""
    exact = reference if reference is not None else sampling_positions(spline, grid, coarse=1)
    fast = sampling_positions(spline, grid, coarse=coarse, band=band)
    d = (fast - exact).norm(dim=-1)
    return {"max_voxels": float(d.max()), "mean_voxels": float(d.mean())}


def warp_images(
    images: torch.Tensor | np.ndarray,
    grid: Grid,
    source_points: torch.Tensor | np.ndarray,
    target_points: torch.Tensor | np.ndarray,
    mode: str = "bilinear",
    landmarks: int | None = None,
    coarse: int = DEFAULT_COARSE,
    band: float = DEFAULT_BAND,
    regularization: float = 0.0,
    padding_mode: str = "border",
    spline: ThinPlateSpline | None = None,
) -> torch.Tensor:
    """Deform ``images`` ``(B, C, Z, Y, X)`` (on ``grid``) so that ``source_points`` land on
    ``target_points`` (``(B, M, 3)`` mm, LPS); returns ``(B, C, Z, Y, X)`` on the images' device.

    ``mode``: "bilinear" (trilinear in 3D) for intensities, "nearest" for label maps (the result keeps
    the input dtype). ``coarse=1`` is the exact spline; the default fast path deviates from it by at
    most a few hundredths of a voxel (see :func:`sampling_deviation`). ``spline`` reuses a fitted
    :func:`fit_warp` (e.g. to warp an image and its segmentation with one fit).
    """
    img = torch.as_tensor(images)
    if img.ndim == 4:
        img = img[:, None]
    if img.ndim != 5:
        raise InputError(f"images: expected (B, C, Z, Y, X), found shape {tuple(img.shape)}")
    if tuple(img.shape[2:]) != grid.shape_zyx:
        raise InputError(
            f"images: spatial shape {tuple(img.shape[2:])} does not match the grid's {grid.shape_zyx}"
        )
    if mode not in ("bilinear", "nearest"):
        raise InputError(f"mode must be 'bilinear' or 'nearest', found {mode!r}")
    if spline is None:
        spline = fit_warp(source_points, target_points, landmarks, regularization, device=img.device)
    if spline.batch != img.shape[0]:
        raise InputError(f"images: batch of {img.shape[0]} images but {spline.batch} point sets")
    pos = sampling_positions(spline, grid, coarse=coarse, band=band)
    return resample(img, grid, pos, mode=mode, padding_mode=padding_mode)


def resample(
    images: torch.Tensor,
    grid: Grid,
    positions: torch.Tensor,
    mode: str = "bilinear",
    padding_mode: str = "border",
) -> torch.Tensor:
    """Sample ``images`` ``(B, C, Z, Y, X)`` at continuous voxel indices ``positions`` ``(B, Z', Y', X', 3)``
    (i, j, k order, as from :func:`sampling_positions`); trilinear ("bilinear") or "nearest". Integer
    images (label maps) keep their dtype. Lets an image and its segmentation share one evaluation."""
    img = torch.as_tensor(images)
    if mode not in ("bilinear", "nearest"):
        raise InputError(f"mode must be 'bilinear' or 'nearest', found {mode!r}")
    pos = positions.to(img.device, torch.float32)
    sizes = torch.tensor([max(n - 1, 1) for n in grid.size], dtype=torch.float32, device=img.device)
    norm = pos * (2.0 / sizes) - 1.0  # align_corners=True: index 0 -> -1, index n-1 -> +1
    out = F.grid_sample(img.float(), norm, mode=mode, padding_mode=padding_mode, align_corners=True)
    if not torch.is_floating_point(img):
        out = out.round().to(img.dtype)
    elif img.dtype != torch.float32:
        out = out.to(img.dtype)
    return out
