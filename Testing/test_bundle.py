"""Model bundle: round trips (directory and zip) and every refusal (DeepSSMLogic.bundle)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_predict import make_tiny_bundle, phantom_image, reference_grid_for_phantom, tiny_bundle_parts

from DeepSSMLogic.bundle import (
    FP32_SCHEMA_VERSION,
    MODEL_JSON,
    SCHEMA_VERSION,
    _content_digest,
    load_bundle,
    read_bundle_meta,
    save_bundle,
)
from DeepSSMLogic.errors import BundleError, InputError
from DeepSSMLogic.fileutil import sha256_file
from DeepSSMLogic.networks import BaseDeepSSM
from DeepSSMLogic.preprocess import IntensityNormalizer


def _rewrite_meta(bundle_dir: Path, edit, keep_digest_valid: bool = True) -> None:
    meta = json.loads((bundle_dir / MODEL_JSON).read_text())
    edit(meta)
    if keep_digest_valid:
        meta["content_sha256"] = _content_digest(meta)
    (bundle_dir / MODEL_JSON).write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp("b") / "model")


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("as_zip", [False, True])
def test_round_trip(tmp_path, as_zip):
    path = make_tiny_bundle(tmp_path / ("m.zip" if as_zip else "m"), seed=4)
    assert path.is_file() == as_zip
    b = load_bundle(path)
    assert b.descriptor_kind == "pca" and b.n_particles == 64
    assert b.grid == reference_grid_for_phantom()
    assert b.meta["schema_version"] == FP32_SCHEMA_VERSION  # float32 weights: older releases load it
    assert b.meta["weights"] == {"storage": "float32"}
    assert set(b.meta["files"]) == {"weights.pt", "reference_image.nrrd", "mean.particles"}
    assert np.allclose(b.mean_particles, b.shape_model.mean, atol=1e-6)
    assert b.reference_image_path.is_file() and b.template_mesh_path is None
    # weights identical to the network that was saved: a freshly built copy with the same seed
    fresh = tiny_bundle_parts(seed=4)[0]
    loaded = b.network.state_dict()
    assert set(loaded) == set(fresh.state_dict())
    for k, v in fresh.state_dict().items():
        assert torch.equal(loaded[k], v), k
    # ... so the reloaded network predicts exactly what the in-memory one does
    x = torch.randn(2, 1, *b.grid.shape_zyx, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        scores, parts = b.network(x)
        ref_scores, ref_parts = fresh(x)
    assert scores.shape == (2, 3) and parts.shape == (2, 64, 3)
    assert torch.equal(scores, ref_scores) and torch.equal(parts, ref_parts)
    assert not b.network.training


def test_prediction_from_the_reloaded_bundle_equals_the_in_memory_network(tmp_path):
    """Predictor(reloaded bundle) on an image == the in-memory network on the same normalised input."""
    from DeepSSMLogic.predict import Predictor
    from DeepSSMLogic.preprocess import resample_to_grid

    net, _sm, grid, _ref, normalizer = tiny_bundle_parts(seed=5)
    b = load_bundle(make_tiny_bundle(tmp_path / "m.zip", seed=5))
    image = phantom_image(seed=1)
    pred = Predictor(b, device="cpu", align=False).predict(image)
    x = torch.as_tensor(np.asarray(normalizer(resample_to_grid(image, grid)), dtype=np.float32))
    with torch.no_grad():
        scores, parts = net(x[None, None])
    np.testing.assert_allclose(pred.particles, parts[0].double().numpy(), atol=1e-4)
    np.testing.assert_allclose(pred.descriptor, scores[0].double().numpy(), atol=1e-4)


def _unzip(path: Path, dst: Path) -> Path:
    with zipfile.ZipFile(path) as zf:
        zf.extractall(dst)
    return dst


def test_zip_extraction_is_cleaned_up(tmp_path):
    path = make_tiny_bundle(tmp_path / "m.zip")
    b = load_bundle(path)
    files_dir = b.reference_image_path.parent
    assert files_dir.is_dir() and files_dir != tmp_path
    del b
    import gc

    gc.collect()
    assert not files_dir.exists()


def test_normaliser_and_template_round_trip(tmp_path):
    import vtk

    src = vtk.vtkSphereSource()
    src.Update()
    b0 = load_bundle(make_tiny_bundle(tmp_path / "a"))
    norm = IntensityNormalizer(-3.0, 250.0, 41.5, 17.25)
    tp = b0.mean_particles + 0.5
    path = save_bundle(
        tmp_path / "b",
        b0.network,
        b0.architecture,
        b0.grid,
        norm,
        b0.shape_model,
        b0.reference_image_path,
        src.GetOutput(),
        {"val_rmse_mm": 1.25},
        template_particles=tp,
        hyperparameters={"epochs": 3},
    )
    b = load_bundle(path)
    assert b.normalizer == norm  # stored and restored exactly, never refitted
    assert b.template_mesh_path is not None and b.template_mesh_path.is_file()
    assert np.allclose(b.template_particles, tp)
    assert b.meta["training_summary"]["val_rmse_mm"] == 1.25
    assert b.meta["hyperparameters"]["epochs"] == 3


def test_failed_save_leaves_nothing(tmp_path):
    b0 = load_bundle(make_tiny_bundle(tmp_path / "a"))
    with pytest.raises(InputError):
        save_bundle(
            tmp_path / "bad",
            b0.network,
            b0.architecture,
            b0.grid,
            b0.normalizer,
            b0.shape_model,
            b0.reference_image_path,
            template_particles=np.zeros((3, 3)),
            template_mesh=tmp_path / "missing.vtk",
        )
    assert not (tmp_path / "bad").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["a"]


def test_refuses_newer_schema(tmp_path, bundle_dir):
    d = _copy(bundle_dir, tmp_path / "m")
    _rewrite_meta(d, lambda m: m.update(schema_version=SCHEMA_VERSION + 5))
    with pytest.raises(
        BundleError, match=rf"schema version {SCHEMA_VERSION + 5}.*schema version {SCHEMA_VERSION}"
    ):
        load_bundle(d)
    with pytest.raises(BundleError, match="newer"):
        read_bundle_meta(d)


def test_refuses_hash_mismatch_naming_the_file(tmp_path, bundle_dir):
    d = _copy(bundle_dir, tmp_path / "m")
    with open(d / "mean.particles", "a") as f:
        f.write("0 0 0\n")
    with pytest.raises(BundleError, match=r"sha256 mismatch for mean\.particles"):
        load_bundle(d)


def test_refuses_edited_model_json(tmp_path, bundle_dir):
    d = _copy(bundle_dir, tmp_path / "m")
    _rewrite_meta(d, lambda m: m["normalizer"].update(mean=0.0), keep_digest_valid=False)
    with pytest.raises(BundleError, match="content digest mismatch"):
        load_bundle(d)


class _Evil(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))


def test_refuses_pickled_module_weights(tmp_path, bundle_dir):
    d = _copy(bundle_dir, tmp_path / "m")
    torch.save(_Evil(), d / "weights.pt")  # a whole pickled object, not a state_dict
    _rewrite_meta(d, lambda m: m["files"].update({"weights.pt": sha256_file(d / "weights.pt")}))
    with pytest.raises(BundleError, match="not a plain state_dict"):
        load_bundle(d)


def test_refuses_non_tensor_state(tmp_path, bundle_dir):
    d = _copy(bundle_dir, tmp_path / "m")
    torch.save({"a": 1}, d / "weights.pt")
    _rewrite_meta(d, lambda m: m["files"].update({"weights.pt": sha256_file(d / "weights.pt")}))
    with pytest.raises(BundleError, match="mapping names to tensors"):
        load_bundle(d)


def test_refuses_missing_file(tmp_path, bundle_dir):
    d = _copy(bundle_dir, tmp_path / "m")
    (d / "reference_image.nrrd").unlink()
    with pytest.raises(BundleError, match=r"missing file\(s\).*reference_image\.nrrd"):
        load_bundle(d)
    with pytest.raises(BundleError, match="no such model bundle"):
        load_bundle(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match=r"missing model\.json"):
        load_bundle(tmp_path / "empty")


def test_refuses_keys_not_matching_architecture(tmp_path, bundle_dir):
    d = _copy(bundle_dir, tmp_path / "m")
    _rewrite_meta(d, lambda m: m["architecture"].update(n_modes=5))
    with pytest.raises(BundleError, match="do not match the architecture"):
        load_bundle(d)
    d2 = _copy(bundle_dir, tmp_path / "m2")
    state = torch.load(d2 / "weights.pt", weights_only=True)
    state["extra.weight"] = torch.zeros(2)
    del state["decoder.bias"]
    torch.save(state, d2 / "weights.pt")
    _rewrite_meta(d2, lambda m: m["files"].update({"weights.pt": sha256_file(d2 / "weights.pt")}))
    with pytest.raises(BundleError, match=r"missing decoder\.bias.*unexpected extra\.weight"):
        load_bundle(d2)


def test_refuses_tampered_or_foreign_zip(tmp_path, bundle_dir):
    z = make_tiny_bundle(tmp_path / "m.zip")
    tampered = tmp_path / "t.zip"
    with zipfile.ZipFile(z) as src, zipfile.ZipFile(tampered, "w") as dst:
        for n in src.namelist():
            data = src.read(n)
            dst.writestr(n, data + b"1 2 3\n" if n == "mean.particles" else data)
    with pytest.raises(BundleError, match=r"mean\.particles"):
        load_bundle(tampered)
    (tmp_path / "junk.zip").write_bytes(b"not a zip")
    with pytest.raises(BundleError, match="valid"):
        load_bundle(tmp_path / "junk.zip")
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(z) as src, zipfile.ZipFile(evil, "w") as dst:
        for n in src.namelist():
            dst.writestr(n, src.read(n))
        dst.writestr("../escape.txt", "x")
    with pytest.raises(BundleError, match="unexpected entries"):
        load_bundle(evil)
    assert not (tmp_path.parent / "escape.txt").exists()


def test_save_validates_arguments(tmp_path):
    grid = reference_grid_for_phantom()
    net = BaseDeepSSM(grid.shape_zyx, 2, n_particles=8, conv_padding="same")
    with pytest.raises(InputError, match="shape_model or mean_particles"):
        save_bundle(
            tmp_path / "x",
            net,
            net.architecture,
            grid,
            IntensityNormalizer(0, 1, 0, 1),
            None,
            phantom_image(),
        )
    assert not (tmp_path / "x").exists()
