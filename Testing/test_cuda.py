"""The CUDA path against the CPU (issue 17): training, prediction, TPS warp, out-of-memory handling.

Marked ``cuda`` and skipped without a CUDA device, so the quick suite and CI (no GPU) skip them;
``benchmarks/gpu_check.py`` runs them on a GPU machine (``pytest -m cuda``). Every test needs only
torch/numpy/scipy; the full-``Predictor`` test also needs SimpleITK and is skipped without it.

Tolerances (stated here, asserted below):
* training, fp32 with TF32 off, 3 epochs of Adam: per-epoch loss and validation RMSE within 1e-3
  relative, every weight tensor within 1e-3 (relative norm of the difference), the two trained
  networks' particles within 1e-2 mm of each other; bf16 autocast + channels_last_3d: every loss finite, the last epoch's
  training loss at most 0.7x the first;
* prediction (the predictor's own forward: channels_last_3d, inference_mode, convolutions in full
  fp32), particles within 1e-3 mm of the CPU;
* TPS sampling positions (exact and the default fast path) within 1e-3 voxel of the CPU;
* out of memory (a real one, under a per-process memory cap): the batch is halved and the run stays on
  the GPU; when even batch 1 does not fit it continues on the CPU with a RuntimeWarning.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from test_training import sphere_set, tiny_config

from DeepSSMLogic.augment.tps import fit_warp, sampling_positions, warp_images
from DeepSSMLogic.bundle import load_bundle
from DeepSSMLogic.geometry import Grid
from DeepSSMLogic.networks import BaseDeepSSM
from DeepSSMLogic.predict import Predictor, run_batched
from DeepSSMLogic.training import train

REPO = Path(__file__).resolve().parents[1]
DEMO_BUNDLE = REPO / "Resources" / "SampleData" / "demo_bundle.zip"
CUDA = torch.device("cuda")
CPU = torch.device("cpu")

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """TF32 off for cuDNN convolutions and cuBLAS matmuls (both restored afterwards): the CPU's
    arithmetic, so an fp32 comparison measures the code path, not the 10-bit TF32 mantissa."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@contextlib.contextmanager
def memory_cap(extra_bytes: int) -> Iterator[None]:
    """Cap this process's CUDA caching allocator at what it holds now plus ``extra_bytes``: any
    allocation beyond raises a real ``torch.cuda.OutOfMemoryError``."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(CUDA).total_memory
    fraction = (torch.cuda.memory_reserved(CUDA) + extra_bytes) / total
    torch.cuda.set_per_process_memory_fraction(min(max(fraction, 1e-6), 1.0), CUDA)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, CUDA)
        torch.cuda.empty_cache()


def _network_only_predictor(network: torch.nn.Module) -> Predictor:
    """A :class:`Predictor` holding only its network: ``Predictor.__init__`` needs SimpleITK (the
    reference image), which a bare GPU machine lacks, but its forward (channels_last_3d,
    inference_mode, moving the network between devices) is what runs on the GPU and is tested here."""
    p = Predictor.__new__(Predictor)
    p._network = network.eval().to(memory_format=torch.channels_last_3d)
    p._network_device = CPU
    p.channels_last = True
    return p


# -- training ------------------------------------------------------------------------------------------
def _run(tmp_path: Path, device: str, **kw):
    data = sphere_set(16, seed=1)
    config = tiny_config(device=device, **kw)
    return train(config, data, sphere_set(8, seed=2), tmp_path / device)


def test_training_fp32_cuda_matches_cpu(tmp_path):
    settings = dict(precision="fp32", channels_last="off", epochs=3)
    cpu = _run(tmp_path, "cpu", **settings)
    with exact_fp32():
        gpu = _run(tmp_path, "cuda", **settings)
    for a, b in zip(cpu.history, gpu.history):
        assert math.isclose(a["train_loss"], b["train_loss"], rel_tol=1e-3), (a, b)
        assert math.isclose(a["val_rmse_mm"], b["val_rmse_mm"], rel_tol=1e-3), (a, b)
    # relative size of the weight difference per tensor (a max over single weights is not robust: Adam
    # moves a weight whose gradient is ~0 by ±lr whatever the sign of the rounding noise)
    sa, sb = cpu.model.state_dict(), gpu.model.state_dict()
    rel = {
        k: float((sa[k].double() - sb[k].double()).norm() / sa[k].double().norm().clamp_min(1e-12))
        for k in sa
        if sa[k].is_floating_point() and sa[k].numel() > 1
    }
    worst = max(rel, key=rel.get)
    assert rel[worst] < 1e-3, (
        f"{worst}: CPU and CUDA weights differ by {rel[worst]:.2e} (relative) after 3 epochs"
    )
    images = torch.from_numpy(np.stack([im for im, _ in sphere_set(8, seed=2)]))
    with torch.no_grad():
        dev_mm = float((cpu.model(images)[1] - gpu.model(images)[1]).abs().max())
    assert dev_mm < 1e-2, f"the CPU- and CUDA-trained networks predict {dev_mm:.2e} mm apart"


def test_training_bf16_channels_last_is_finite_and_converges(tmp_path):
    result = _run(tmp_path, "cuda", precision="bf16", channels_last="on", epochs=8)
    losses = [h["train_loss"] for h in result.history]
    assert all(math.isfinite(v) for v in losses + [h["val_rmse_mm"] for h in result.history])
    assert losses[-1] <= 0.7 * losses[0], f"bf16 training did not converge: {losses}"
    assert all(p.device.type == "cpu" and torch.isfinite(p).all() for p in result.model.parameters())


# -- prediction ----------------------------------------------------------------------------------------
def _smooth_inputs(shape_zyx: tuple[int, ...], n: int, seed: int) -> np.ndarray:
    """``(n, 1, Z, Y, X)`` float32 smooth random fields, zero mean and unit variance (as normalised
    images are): realistic activations for a trained network without SimpleITK to read an image."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    out = np.empty((n, 1, *shape_zyx), dtype=np.float32)
    for i in range(n):
        f = gaussian_filter(rng.normal(size=shape_zyx), sigma=2.0)
        out[i, 0] = (f - f.mean()) / f.std()
    return out


@pytest.mark.parametrize("which", ["demo bundle", "random 64^3"])
def test_predictor_forward_cuda_matches_cpu_within_1e3_mm(which):
    # the demo's trained network, and a larger random one whose particles spread ~1 mm: with TF32
    # convolutions (PyTorch's CUDA default) the latter moved by 2e-2 mm in a CPU emulation, so this
    # fails unless the predictor runs its convolutions in full fp32
    if which == "demo bundle":
        bundle = load_bundle(DEMO_BUNDLE)  # no SimpleITK needed
        network, shape = bundle.network, bundle.grid.shape_zyx
    else:
        network, shape = _oom_network(), (64, 64, 64)
    p = _network_only_predictor(network)
    xs = _smooth_inputs(shape, 6, seed=0)
    d_cpu, p_cpu, _ = run_batched(p._network_forward, xs, 3, CPU)
    d_gpu, p_gpu, used = run_batched(p._network_forward, xs, 3, CUDA)
    assert used.type == "cuda"
    dev = float(np.abs(p_gpu - p_cpu).max())
    assert dev < 1e-3, f"CUDA particles differ from the CPU by {dev:.2e} mm"
    assert np.abs(d_gpu - d_cpu).max() < 1e-3
    assert torch.backends.cudnn.allow_tf32  # the global setting is restored after the forward


def test_full_predictor_cuda_matches_cpu(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    bundle = load_bundle(DEMO_BUNDLE)  # keeps its extracted files while referenced
    image = sitk.ReadImage(str(bundle.reference_image_path))
    on_cpu = Predictor(bundle, device="cpu", align=False).predict(image).particles
    on_gpu = Predictor(bundle, device="cuda", align=False).predict(image).particles
    assert np.abs(on_gpu - on_cpu).max() < 1e-3


# -- TPS warp ----------------------------------------------------------------------------------------
def _warp_case(n_landmarks: int = 512, seed: int = 0) -> tuple[Grid, np.ndarray, np.ndarray]:
    """A grid and ``(2, L, 3)`` source/target landmarks (mm) with smooth displacements up to ~6 mm."""
    grid = Grid(origin=(-36.0, -30.0, -27.0), spacing=(1.5, 1.5, 1.5), size=(48, 40, 36))
    rng = np.random.default_rng(seed)
    lo, hi = np.asarray(grid.origin), np.asarray(grid.origin) + (np.asarray(grid.size) - 1) * 1.5
    src = rng.uniform(lo + 6, hi - 6, size=(2, n_landmarks, 3))
    disp = 4.0 * np.sin(src[..., ::-1] / 9.0 + np.arange(2)[:, None, None])
    return grid, src, src + disp


@pytest.mark.parametrize("coarse", [1, 4])
def test_tps_sampling_positions_cuda_match_cpu_within_1e3_voxel(coarse):
    grid, src, tgt = _warp_case()
    on_cpu, on_gpu = (
        sampling_positions(fit_warp(src, tgt, device=dev), grid, coarse=coarse).cpu().double()
        for dev in (CPU, CUDA)
    )
    dev_vox = float((on_gpu - on_cpu).norm(dim=-1).max())
    assert dev_vox < 1e-3, f"coarse={coarse}: CUDA sampling positions differ by {dev_vox:.2e} voxel"


def test_tps_warped_images_cuda_match_cpu():
    grid, src, tgt = _warp_case(256, seed=1)
    images = torch.from_numpy(_smooth_inputs(grid.shape_zyx, 2, seed=3))
    a = warp_images(images, grid, src, tgt)
    b = warp_images(images.to(CUDA), grid, src, tgt).cpu()
    # a 1e-3 voxel shift moves a unit-variance smooth field by far less than 1e-2
    assert float((a - b).abs().max()) < 1e-2


# -- out of memory: a real CUDA OOM under a memory cap ------------------------------------------------------
def _oom_network() -> BaseDeepSSM:
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(3 * 64, 4, dtype=torch.float64))
    net = BaseDeepSSM(
        (64, 64, 64),
        4,
        torch.randn(64, 3) * 20,
        q.T,
        torch.zeros(4),
        torch.ones(4) * 5,
        conv_padding="same",
        pool_size=2,
    )
    with torch.no_grad():  # the trained output layer is zero at init; give it weights
        for prm in net.parameters():
            if prm.requires_grad:
                prm.add_(0.05 * torch.randn_like(prm))
    return net


def test_oom_halves_the_batch_and_stays_on_the_gpu():
    p = _network_only_predictor(_oom_network())
    xs = _smooth_inputs((64, 64, 64), 16, seed=5)
    sizes: list[tuple[str, int]] = []

    def forward(x, device):
        sizes.append((device.type, int(x.shape[0])))
        return p._network_forward(x, device)

    _, ref, _ = run_batched(p._network_forward, xs, 16, CPU)
    run_batched(p._network_forward, xs[:1], 1, CUDA)  # weights + cuDNN handles resident first
    # 150 MiB: batch 16 needs 200 MiB for the first convolution's output alone, batch 1 ~40 MiB
    with memory_cap(150 * 2**20):
        _, out, used = run_batched(forward, xs, 16, CUDA)
    assert used.type == "cuda"
    assert sizes[0] == ("cuda", 16) and min(b for _, b in sizes) < 16, sizes
    assert all(t == "cuda" for t, _ in sizes)
    assert float(np.abs(out - ref).max()) < 1e-3


def test_oom_at_batch_one_falls_back_to_cpu_with_a_warning():
    p = _network_only_predictor(_oom_network())
    xs = _smooth_inputs((64, 64, 64), 2, seed=6)
    _, ref, _ = run_batched(p._network_forward, xs, 2, CPU)
    run_batched(p._network_forward, xs[:1], 1, CUDA)
    with memory_cap(0), pytest.warns(RuntimeWarning, match="continuing on the CPU"):
        _, out, used = run_batched(p._network_forward, xs, 2, CUDA)
    assert used.type == "cpu"
    assert float(np.abs(out - ref).max()) < 1e-4
    assert torch.zeros(4, device=CUDA).sum().item() == 0.0  # the GPU is usable again after the cap
