"""Predictor: input-space particles under any pose/geometry, training normaliser reuse, bad input,
batching and the CUDA out-of-memory fallback (DeepSSMLogic.predict)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from helpers_predict import make_tiny_bundle, phantom_image, rigid

from DeepSSMLogic import io
from DeepSSMLogic.bundle import load_bundle
from DeepSSMLogic.errors import InputError
from DeepSSMLogic.predict import Predictor, anatomy_mask, apply_matrix, resolve_device, run_batched
from DeepSSMLogic.preprocess import IntensityNormalizer, resample_to_grid


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return load_bundle(make_tiny_bundle(tmp_path_factory.mktemp("pb") / "model"))


@pytest.fixture(scope="module")
def predictor(bundle):
    return Predictor(bundle, device="cpu")


@pytest.fixture(scope="module")
def aligned(predictor):
    return predictor.predict(phantom_image(seed=1))


def _rmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(((a - b) ** 2).sum(-1).mean()))


def test_prediction_fields(aligned, bundle):
    assert aligned.particles.shape == (64, 3) and aligned.particles.dtype == np.float64
    assert aligned.descriptor.shape == (3,) and aligned.descriptor_kind == "pca"
    assert aligned.alignment.matrix.shape == (4, 4)
    # the pre-aligned phantom registers to (almost) the identity
    assert np.abs(aligned.alignment.matrix - np.eye(4)).max() < 0.05
    assert {"read_check", "align", "resample_normalise", "forward", "map_back", "total"} <= set(
        aligned.timings
    )
    d = aligned.to_dict()
    assert d["descriptor_kind"] == "pca" and len(d["alignment"]["matrix_model_to_input"]) == 4
    # the descriptor is the PCA score vector of the model-frame particles
    recon = bundle.shape_model.reconstruct(aligned.descriptor)
    assert np.allclose(recon, aligned.particles_model, atol=1e-3)


@pytest.mark.parametrize(
    "deg, shift",
    [
        ((0.0, 0.0, 0.0), (38.0, -27.0, 31.0)),
        ((6.0, -5.0, 8.0), (4.0, -3.0, 5.0)),
        ((0.0, 0.0, 25.0), (2.0, 1.0, 0.0)),
    ],
    ids=["large-offset", "rotated", "rotated-25deg"],
)
def test_particles_follow_the_input_pose(predictor, aligned, deg, shift):
    pose = rigid(deg, shift)
    size = (40, 36, 32)
    # a field of view that contains the moved phantom, with a distractor-free different origin
    origin = -(np.asarray(size) - 1) * 1.5 / 2.0 + np.asarray(shift)
    moved = phantom_image(pose=pose, size=size, origin=origin, seed=2)
    pred = predictor.predict(moved)
    expected = apply_matrix(pose, aligned.particles)
    assert _rmse(pred.particles, expected) < 0.5
    assert np.abs(pred.alignment.matrix - pose @ aligned.alignment.matrix).max()[()] < 0.6


def test_flipped_and_permuted_direction(predictor, aligned):
    # the same physical phantom stored with a flipped / permuted voxel order and anisotropic voxels
    direction = np.array([[-1.0, 0, 0], [0, 0, 1.0], [0, 1.0, 0]])
    size = (40, 26, 40)
    spacing = (1.5, 2.0, 1.4)
    origin = -(direction @ ((np.asarray(size) - 1) * np.asarray(spacing))) / 2.0
    img = phantom_image(size=size, spacing=spacing, origin=origin, direction=direction, seed=3)
    pred = predictor.predict(img)
    assert _rmse(pred.particles, aligned.particles) < 0.5


def test_align_false_is_identity_and_worse_on_moved_input(bundle, aligned):
    p = Predictor(bundle, device="cpu", align=False)
    out = p.predict(phantom_image(seed=1))
    assert np.array_equal(out.alignment.matrix, np.eye(4)) and out.alignment.kind == "none"
    assert np.allclose(out.particles, out.particles_model)
    pose = rigid((0.0, 0.0, 6.0), (6.0, -4.0, 3.0))
    moved = p.predict(phantom_image(pose=pose, size=(48, 44, 40), seed=2))
    assert _rmse(moved.particles, apply_matrix(pose, aligned.particles)) > 3.0


def test_training_normaliser_is_reused_unchanged(bundle, monkeypatch):
    p = Predictor(bundle, device="cpu", align=False)
    norm_before = p.normalizer
    seen = []

    def capture(x, device):
        seen.append(x.numpy().copy())
        return p._network_forward(x, device)

    p.forward = capture

    def no_refit(*a, **k):
        raise AssertionError("the predictor must not refit the normaliser")

    monkeypatch.setattr(IntensityNormalizer, "fit", classmethod(no_refit))
    img = phantom_image(seed=1)
    bright = sitk.Cast(img, sitk.sitkFloat32) * 1.5 + 30.0
    p.predict_many([img, bright], batch_size=2)
    assert p.normalizer is norm_before and p.normalizer == bundle.normalizer
    for x, im in zip(seen[0], (img, bright), strict=True):
        expected = bundle.normalizer(resample_to_grid(im, bundle.grid))
        assert np.allclose(x[0], expected, atol=1e-5)
    # with training statistics a brighter image stays brighter (no per-image z-scoring)
    assert seen[0][1].mean() > seen[0][0].mean() + 0.3


def test_predict_many_matches_single(predictor, aligned, tmp_path):
    io.write_image(phantom_image(seed=1), tmp_path / "a.nrrd")
    outs = predictor.predict_many([tmp_path / "a.nrrd", phantom_image(seed=1)], batch_size=2)
    assert len(outs) == 2 and outs[0].source.endswith("a.nrrd")
    for o in outs:
        assert np.allclose(o.particles, aligned.particles, atol=1e-3)


def _image_with(arr, spacing=(1.5, 1.5, 1.5)):
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    return img


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: sitk.Image([30, 30], sitk.sitkFloat32), "expected a 3D image, found 2D"),
        (lambda: _image_with(np.where(np.arange(32**3).reshape(32, 32, 32) == 5, np.nan, 1.0)), "NaN or Inf"),
        (lambda: _image_with(np.full((32, 32, 32), np.inf, dtype=np.float32)), "NaN or Inf"),
        (lambda: _image_with(np.full((32, 32, 32), 7.0, dtype=np.float32)), "constant"),
        (lambda: _image_with(np.random.default_rng(0).random((10, 12, 14)), (1.0, 1.0, 1.0)), "cannot fit"),
        (lambda: _image_with(np.random.default_rng(0).random((2, 40, 40))), "too small"),
        (lambda: np.zeros((20, 20, 20)), "bare array has no physical geometry"),
        (lambda: sitk.Image([20, 20, 20], sitk.sitkVectorFloat32, 3), "scalar"),
    ],
    ids=["2d", "nan", "inf", "constant", "far-smaller", "thin", "array", "vector"],
)
def test_bad_input_is_refused(predictor, make, match):
    with pytest.raises(InputError, match=match):
        predictor.predict(make())


def test_bad_input_files(predictor, tmp_path):
    with pytest.raises(InputError, match=r"does not exist|not found|no such"):
        predictor.predict(tmp_path / "missing.nrrd")
    sitk.WriteImage(sitk.Image([20, 20], sitk.sitkFloat32), str(tmp_path / "flat.nrrd"))
    with pytest.raises(InputError, match=r"flat\.nrrd: expected a 3D image"):
        predictor.predict(tmp_path / "flat.nrrd")


# -- batching / out-of-memory ------------------------------------------------------------------------
def _fake_forward(fail_above: int | None, calls: list):
    """Pretend forward: descriptor = per-sample mean, particles = a function of it; raises CUDA OOM
    on a 'cuda' device for batches larger than ``fail_above`` (None: every batch)."""

    def fwd(x, device):
        calls.append((device.type, x.shape[0]))
        if device.type == "cuda" and (fail_above is None or x.shape[0] > fail_above):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        m = x.reshape(x.shape[0], -1).mean(1, keepdim=True)
        return m, m[:, :, None].expand(-1, 4, 3)

    return fwd


def test_oom_halves_the_batch_then_continues_on_the_gpu():
    x = np.arange(7, dtype=np.float32)[:, None, None, None, None] * np.ones((7, 1, 2, 2, 2), np.float32)
    calls = []
    d, p, dev = run_batched(_fake_forward(2, calls), x, 8, torch.device("cuda"))
    assert dev.type == "cuda"
    assert np.allclose(d[:, 0], np.arange(7)) and p.shape == (7, 4, 3)
    assert calls[:3] == [("cuda", 7), ("cuda", 4), ("cuda", 2)]
    assert all(b <= 2 for t, b in calls[3:])


def test_oom_at_batch_one_falls_back_to_cpu_with_warning():
    x = np.random.default_rng(0).random((3, 1, 2, 2, 2)).astype(np.float32)
    calls = []
    with pytest.warns(RuntimeWarning, match="continuing on the CPU"):
        d, _p, dev = run_batched(_fake_forward(None, calls), x, 4, torch.device("cuda"))
    assert dev.type == "cpu"
    assert np.allclose(d[:, 0], x.reshape(3, -1).mean(1), atol=1e-6)
    # 3 inputs with batch 4: tries 3 (4 halved to 2, then 1) before giving up on the GPU
    assert [c for c in calls if c[0] == "cuda"] == [("cuda", 3), ("cuda", 2), ("cuda", 1)]


def test_oom_on_cpu_is_not_swallowed():
    def fwd(x, device):
        raise torch.cuda.OutOfMemoryError("boom")

    with pytest.raises(torch.cuda.OutOfMemoryError):
        run_batched(fwd, np.zeros((1, 1, 2, 2, 2), np.float32), 1, torch.device("cpu"))


@pytest.mark.parametrize(
    "message",
    ["CUDA error: out of memory", "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"],
)
def test_oom_raised_as_plain_runtime_error_is_handled(message):
    # cuBLAS / cuDNN / the CUDA runtime report their own failed allocations as a plain RuntimeError
    calls = []

    def fwd(x, device):
        calls.append((device.type, x.shape[0]))
        if device.type == "cuda" and x.shape[0] > 1:
            raise RuntimeError(message)
        return x.reshape(x.shape[0], -1)[:, :1], x.reshape(x.shape[0], 1, -1)[:, :, :3]

    x = np.random.default_rng(0).random((3, 1, 2, 2, 2)).astype(np.float32)
    d, _p, dev = run_batched(fwd, x, 4, torch.device("cuda"))
    assert dev.type == "cuda" and calls[:3] == [("cuda", 3), ("cuda", 2), ("cuda", 1)]
    assert np.allclose(d[:, 0], x[:, 0, 0, 0, 0])


def test_other_runtime_errors_on_the_gpu_are_not_swallowed():
    def fwd(x, device):
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device")

    with pytest.raises(RuntimeError, match="no kernel image"):
        run_batched(fwd, np.zeros((2, 1, 2, 2, 2), np.float32), 2, torch.device("cuda"))


def test_predictor_falls_back_to_cpu_end_to_end(bundle):
    p = Predictor(bundle, device="cpu", align=False)
    reference = p.predict(phantom_image(seed=1)).particles
    p.device = torch.device("cuda")  # as if constructed on a GPU machine
    real = p._network_forward

    def flaky(x, device):
        if device.type == "cuda":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return real(x, device)

    p.forward = flaky
    with pytest.warns(RuntimeWarning):
        out = p.predict_many([phantom_image(seed=1)] * 2, batch_size=2)
    assert p.device.type == "cpu"
    for o in out:
        assert np.allclose(o.particles, reference, atol=1e-4)


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA GPU"):
            resolve_device("cuda")
    with pytest.raises(InputError, match="unknown device"):
        resolve_device("tpu-9")


# -- registration precision -----------------------------------------------------------------------
def test_anatomy_mask_is_the_band_around_the_points():
    ref = sitk.Image([20, 20, 20], sitk.sitkFloat32)
    ref.SetSpacing((2.0, 2.0, 2.0))
    ref.SetOrigin((-19.0, -19.0, -19.0))
    points = np.array([[0.0, 0.0, 0.0], [8.0, 0.0, 0.0]])
    mask = sitk.GetArrayFromImage(anatomy_mask(points, ref, 5.0)).astype(bool)  # (Z, Y, X)
    idx = np.argwhere(np.ones_like(mask))[:, ::-1]
    centres = np.asarray(ref.GetOrigin()) + 2.0 * idx
    dist = np.linalg.norm(centres[:, None] - points[None], axis=-1).min(axis=1)
    assert np.array_equal(mask.ravel(), dist <= 5.0) and 0 < mask.sum() < mask.size
    with pytest.raises(InputError, match="does not lie on the reference grid"):
        anatomy_mask(points + 500.0, ref, 5.0)


def _femur_case(seed: int, jitter: bool) -> tuple[sitk.Image, np.ndarray, np.ndarray]:
    """A 64³ @ 1.5 mm synthetic femur: (image, its particles (M, 3) mm, its pose 4x4)."""
    from DeepSSMLogic import synthetic
    from DeepSSMLogic.preprocess import image_from_array

    s = synthetic.make_subject("femur", np.random.default_rng(seed), n_particles=256, pose_jitter=jitter)
    return image_from_array(s.image, s.grid), s.particles, s.pose


def test_registration_of_aligned_and_jittered_femurs_is_submillimetre():
    """The femur's neighbouring bone (a distractor at a random offset) pulls a whole-image fit; with
    the mean-shape band and the high-pass the particles move less (measured: mean/max 0.41/0.83 mm
    vs 0.55/1.41 mm before, 8-subject mean reference on the 64³ grid; the benchmark's 14-subject
    reference on the particle-bounded grid gives 0.28 mm)."""
    from dataclasses import replace

    from DeepSSMLogic.predict import RegistrationSettings, register_to_reference

    train = [_femur_case(100 + i, False) for i in range(8)]
    ref = sitk.GetImageFromArray(np.mean([sitk.GetArrayFromImage(t[0]) for t in train], axis=0))
    ref.CopyInformation(train[0][0])
    mean_shape = np.mean([t[1] for t in train], axis=0)
    new = RegistrationSettings()
    old = replace(new, highpass_mm=None, anatomy_margin_mm=None)
    err_new, err_old = [], []
    for seed, jitter in ((200, False), (201, False), (202, True), (203, True)):
        image, particles, pose = _femur_case(seed, jitter)
        unposed = apply_matrix(np.linalg.inv(pose), particles)
        for settings, errs in ((new, err_new), (old, err_old)):
            m = register_to_reference(image, ref, settings, mean_shape).matrix
            errs.append(np.linalg.norm(apply_matrix(m, unposed) - particles, axis=1))
    e_new, e_old = np.stack(err_new), np.stack(err_old)
    assert e_new.mean() <= 0.5 and e_new.max() <= 1.0, (e_new.mean(), e_new.max())
    assert e_old.mean() >= 1.2 * e_new.mean(), (e_old.mean(), e_new.mean())
