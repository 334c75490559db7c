"""float16 storage of bundle weights (issue 16): round trip, the refusals and old-bundle compatibility."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers_predict import tiny_bundle_parts

from DeepSSMLogic.bundle import (
    FP32_SCHEMA_VERSION,
    MEAN_PARTICLES,
    MODEL_JSON,
    SCHEMA_VERSION,
    WEIGHTS,
    _content_digest,
    _probe_input,
    half_precision_weights,
    load_bundle,
    pack_bundle,
    read_bundle_meta,
    save_bundle,
)
from DeepSSMLogic.errors import BundleError, InputError
from DeepSSMLogic.fileutil import save_torch, sha256_file
from DeepSSMLogic.networks import BaseDeepSSM

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "Resources" / "SampleData" / "demo_bundle.zip"


def _trained_like(seed: int = 3):
    """The tiny bundle's parts with a non-zero output layer (an untrained network predicts the mean
    shape whatever its encoder weights, which would hide any rounding)."""
    net, sm, grid, ref, normalizer = tiny_bundle_parts(seed=seed)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        last = net.encoder.fc[-1]
        last.weight.copy_(torch.randn(last.weight.shape, generator=g) * 0.3)
    return net, sm, grid, ref, normalizer


def _save(path: Path, parts, weights_dtype: str) -> Path:
    net, sm, grid, ref, normalizer = parts
    return save_bundle(path, net, net.architecture, grid, normalizer, sm, ref, weights_dtype=weights_dtype)


def test_float16_round_trip_is_smaller_loads_as_float32_and_predicts_the_same(tmp_path):
    parts = _trained_like()
    net, _sm, grid, ref, normalizer = parts
    p32 = _save(tmp_path / "m32.zip", parts, "float32")
    p16 = _save(tmp_path / "m16.zip", parts, "float16")
    assert p16.stat().st_size < 0.75 * p32.stat().st_size
    b = load_bundle(p16)
    assert b.meta["schema_version"] == SCHEMA_VERSION == 2
    w = b.meta["weights"]
    assert w["storage"] == "float16" and w["float16_tensors"] >= 4
    assert 0 < w["probe_max_change_mm"] <= w["tolerance_mm"] == 0.01
    # the network is float32 again, its encoder weights the float16-rounded originals
    loaded = b.network.state_dict()
    for k, v in net.state_dict().items():
        assert loaded[k].dtype == v.dtype, k
    conv = "encoder.conv.4.weight"  # the 2nd 5×5×5 convolution: 24×12×125 weights
    assert torch.equal(loaded[conv], net.state_dict()[conv].half().float())
    assert not torch.equal(loaded[conv], net.state_dict()[conv])
    # the shape-space layer (PCA mean and basis, mm) is untouched
    assert torch.equal(loaded["decoder.bias"], net.state_dict()["decoder.bias"])
    x = _probe_input(ref, normalizer, grid)
    with torch.no_grad():
        change = (b.network(x)[1] - net(x)[1]).abs().max()
    assert 0 < float(change) < 0.01


def test_tensors_out_of_range_keep_float32_with_the_reason_named():
    net, _sm, grid, ref, normalizer = _trained_like()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    state["encoder.conv.4.weight"][0, 0, 0, 0, 0] = 1e5  # beyond float16's 65504
    out, info = half_precision_weights(
        state, net.architecture, _probe_input(ref, normalizer, grid), tolerance_mm=float("inf")
    )
    assert info["storage"] == "float16"
    assert out["encoder.conv.4.weight"].dtype == torch.float32
    assert torch.equal(out["encoder.conv.4.weight"], state["encoder.conv.4.weight"])
    assert "float16 range (max |x| 1e+05 > 65504)" in info["float32_kept"]["encoder.conv.4.weight"]
    assert out["encoder.conv.7.weight"].dtype == torch.float16


def test_a_change_over_the_tolerance_keeps_every_tensor_float32():
    net, _sm, grid, ref, normalizer = _trained_like()
    state = net.state_dict()
    out, info = half_precision_weights(
        state, net.architecture, _probe_input(ref, normalizer, grid), tolerance_mm=1e-9
    )
    assert info["storage"] == "float32" and "moved the predicted particles" in info["reason"]
    assert all(v.dtype != torch.float16 for v in out.values())


def _rewrite(d: Path, edit) -> None:
    meta = json.loads((d / MODEL_JSON).read_text())
    edit(meta)
    meta["content_sha256"] = _content_digest(meta)
    (d / MODEL_JSON).write_text(json.dumps(meta))


def test_float16_weights_need_the_declaration_and_schema_2(tmp_path):
    d16 = _save(tmp_path / "m16", _trained_like(), "float16")
    # a float32-declared bundle whose weights.pt holds float16 tensors is inconsistent
    d = shutil.copytree(d16, tmp_path / "undeclared")
    _rewrite(d, lambda m: m.update(weights={"storage": "float32"}))
    with pytest.raises(BundleError, match=r"holds float16 tensors.*declares weights storage 'float32'"):
        load_bundle(d)
    # float16 storage in a schema-1 description (which older releases would misread) is refused
    d = shutil.copytree(d16, tmp_path / "schema1")
    _rewrite(d, lambda m: m.update(schema_version=1))
    with pytest.raises(BundleError, match="field 'schema_version': expected 2 or later for float16"):
        read_bundle_meta(d)
    d = shutil.copytree(d16, tmp_path / "storage")
    _rewrite(d, lambda m: m["weights"].update(storage="int8"))
    with pytest.raises(BundleError, match=r"field 'weights\.storage'"):
        read_bundle_meta(d)


def test_float32_bundles_of_schema_1_keep_loading(tmp_path):
    """A bundle as written before float16 storage: schema 1, no 'weights' section, fp32 tensors."""
    d = _save(tmp_path / "old", _trained_like(), "float32")
    _rewrite(d, lambda m: m.pop("weights"))
    b = load_bundle(d)
    assert b.meta["schema_version"] == FP32_SCHEMA_VERSION and "weights" not in b.meta
    assert all(v.dtype == torch.float32 for v in b.network.state_dict().values() if v.is_floating_point())


def test_a_float32_schema_1_paper_bundle_like_the_first_demo_still_loads_and_predicts(tmp_path):
    """The demo bundle shipped until issue 16 was this kind: the paper's encoder with pool_size=2,
    float32 weights, schema 1 (no 'weights' section), a zip. Written here the way it was, packed, loaded."""
    net0, sm, grid, ref, normalizer = _trained_like()
    torch.manual_seed(5)
    net = BaseDeepSSM(
        grid.shape_zyx,
        3,
        sm.mean,
        sm.components,
        sm.score_mean,
        sm.score_std,
        conv_padding="same",
        pool_size=2,
    ).eval()
    net.encoder.fc[-1].load_state_dict(net0.encoder.fc[-1].state_dict())
    d = save_bundle(
        tmp_path / "old", net, net.architecture, grid, normalizer, sm, ref, weights_dtype="float32"
    )
    _rewrite(d, lambda m: m.pop("weights") and m.update(schema_version=FP32_SCHEMA_VERSION))
    z = pack_bundle(d, tmp_path / "old_demo.zip")
    meta = read_bundle_meta(z)
    assert meta["schema_version"] == 1 and "weights" not in meta and "encoder" not in meta["architecture"]
    b = load_bundle(z)
    loaded = b.network.state_dict()
    assert all(torch.equal(v, loaded[k]) for k, v in net.state_dict().items())
    x = _probe_input(ref, normalizer, grid)
    with torch.no_grad():
        assert torch.equal(b.network(x)[1], net(x)[1])


def test_pack_bundle_zips_a_verified_folder_and_refuses_a_modified_one(tmp_path):
    d = _save(tmp_path / "m", _trained_like(), "float16")
    z = pack_bundle(d, tmp_path / "m.zip")
    assert read_bundle_meta(z) == read_bundle_meta(d)
    a, b = load_bundle(d).network.state_dict(), load_bundle(z).network.state_dict()
    assert all(torch.equal(v, b[k]) for k, v in a.items())
    with pytest.raises(InputError, match=r"must end in \.zip"):
        pack_bundle(d, tmp_path / "m.tar")
    (d / MEAN_PARTICLES).write_text((d / MEAN_PARTICLES).read_text().replace("1", "2", 1))
    with pytest.raises(BundleError, match="SHA256 does not match"):
        pack_bundle(d, tmp_path / "m2.zip")
    assert not (tmp_path / "m2.zip").exists()


@pytest.mark.skipif(not DEMO.is_file(), reason="no shipped demo bundle")
def test_the_shipped_demo_bundle_is_the_demos_light_float16_model_within_4_mb():
    from DeepSSMLogic.commands.demo import DemoSettings

    assert DEMO.stat().st_size <= 4_000_000  # issue 16: demo bundle ≤ 4 MB
    meta = read_bundle_meta(DEMO)
    assert meta["schema_version"] == SCHEMA_VERSION and meta["weights"]["storage"] == "float16"
    assert meta["architecture"]["encoder"] == DemoSettings.encoder
    b = load_bundle(DEMO)
    assert b.n_particles == DemoSettings.n_particles and not b.network.training


def test_hand_converted_weights_load_when_declared(tmp_path):
    """float16 tensors written by another tool load back as float32 when model.json declares them."""
    d = _save(tmp_path / "m", _trained_like(), "float32")
    state = torch.load(d / WEIGHTS, weights_only=True)
    state["encoder.conv.0.weight"] = state["encoder.conv.0.weight"].half()
    save_torch(state, d / WEIGHTS)
    digest = sha256_file(d / WEIGHTS)
    _rewrite(
        d,
        lambda m: (
            m.update(schema_version=2, weights={"storage": "float16"}) or m["files"].update({WEIGHTS: digest})
        ),
    )
    b = load_bundle(d)
    assert b.network.state_dict()["encoder.conv.0.weight"].dtype == torch.float32


def test_an_ensembles_member_encoders_are_stored_as_float16_and_its_pca_layers_are_not(tmp_path):
    from DeepSSMLogic.uncertainty import EnsembleDeepSSM, UncertaintySpec

    members = [_trained_like(seed)[0] for seed in (3, 4)]
    net = EnsembleDeepSSM(members).eval()
    _, sm, grid, ref, normalizer = _trained_like()
    spec = UncertaintySpec(method="ensemble", members=2, scale=1.0)
    path = save_bundle(
        tmp_path / "ens.zip", net, net.architecture, grid, normalizer, sm, ref,
        uncertainty=spec.to_dict(), weights_dtype="float16",
    )  # fmt: skip
    meta = read_bundle_meta(path)
    assert meta["weights"]["storage"] == "float16"
    kept = meta["weights"].get("float32_kept", {})
    assert not any(k.startswith("members.") and ".encoder." in k for k in kept), kept
    loaded = load_bundle(path).network.state_dict()
    for k in (0, 1):
        conv = f"members.{k}.encoder.conv.4.weight"
        assert torch.equal(loaded[conv], net.state_dict()[conv].half().float())
        assert torch.equal(loaded[f"members.{k}.decoder.bias"], net.state_dict()[f"members.{k}.decoder.bias"])
