"""Base-DeepSSM / TL-DeepSSM: shapes, the frozen PCA layer, grid checks, rebuild from the architecture."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from DeepSSMLogic.errors import InputError
from DeepSSMLogic.networks import (
    LIGHT_CHANNELS,
    LIGHT_ENCODERS,
    BaseDeepSSM,
    LightSpec,
    ResidualBlock3d,
    TLDeepSSM,
    build_network,
    count_parameters,
    encoder_output_shape,
    light_output_shape,
    minimum_grid_size,
    xavier_init,
)


def _pca(m: int, k: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(3 * m, k)))
    return {
        "pca_mean": rng.normal(size=(m, 3)) * 10,
        "pca_components": q.T,  # (K, 3M) orthonormal rows
        "score_mean": rng.normal(size=k),
        "score_std": rng.uniform(0.5, 3.0, size=k),
    }


@pytest.mark.parametrize(
    ("shape", "padding"),
    [((60, 60, 60), "valid"), ((61, 66, 72), "valid"), ((8, 8, 8), "same"), ((12, 17, 20), "same")],
)
def test_base_output_shapes_for_several_grids(shape, padding):
    torch.manual_seed(0)
    net = BaseDeepSSM(shape, 5, **_pca(20, 5), conv_padding=padding).eval()
    with torch.no_grad():
        scores, particles = net(torch.randn(2, 1, *shape))
    assert scores.shape == (2, 5) and particles.shape == (2, 20, 3)
    assert net.encoder.flat_features == 192 * int(np.prod(encoder_output_shape(shape, padding)))


def test_paper_network_size_matches_reference_implementation():
    # 118×69×88 voxels (x×y×z), 20 modes, 1024 particles: the reference counts 7,885,011 parameters
    net = BaseDeepSSM((88, 69, 118), 20, n_particles=1024)
    assert net.encoder.flat_features == 12288
    assert count_parameters(net) == 7_885_011
    assert count_parameters(net, trainable_only=True) == 7_885_011 - (20 * 3072 + 3072)


def test_frozen_pca_layer_reconstructs_exactly_and_is_not_trained():
    torch.manual_seed(0)
    pca = _pca(16, 4)
    net = BaseDeepSSM((8, 8, 8), 4, **pca, conv_padding="same")
    x = torch.randn(3, 1, 8, 8, 8)
    net.eval()
    with torch.no_grad():
        scores, particles = net(x)
        whitened = net.encoder(x)
    np.testing.assert_allclose(
        scores.numpy(), whitened.numpy() * pca["score_std"] + pca["score_mean"], rtol=1e-5, atol=1e-5
    )
    expected = pca["pca_mean"][None] + (scores.double().numpy() @ pca["pca_components"]).reshape(3, 16, 3)
    np.testing.assert_allclose(particles.numpy(), expected, rtol=1e-5, atol=1e-4)

    assert not net.decoder.weight.requires_grad and not net.decoder.bias.requires_grad


@pytest.mark.slow
def test_optimizer_with_weight_decay_leaves_the_pca_layer_alone():
    torch.manual_seed(0)
    net = BaseDeepSSM((8, 8, 8), 4, **_pca(16, 4), conv_padding="same")
    x = torch.randn(3, 1, 8, 8, 8)
    before = {k: v.clone() for k, v in net.decoder.state_dict().items()}
    enc_before = net.encoder.fc[-1].weight.clone()
    # even an optimizer given every parameter (with weight decay) must leave the PCA layer alone
    opt = torch.optim.Adam(net.parameters(), lr=1e-2, weight_decay=1e-2)
    net.train()
    loss = net(x)[1].pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    for k, v in net.decoder.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not torch.equal(net.encoder.fc[-1].weight, enc_before)


def test_too_small_grid_names_the_minimum():
    assert minimum_grid_size("valid") == 60
    assert minimum_grid_size("same") == 8
    with pytest.raises(InputError, match="at least 60 voxels"):
        BaseDeepSSM((59, 80, 80), 3, n_particles=10)
    with pytest.raises(InputError, match="at least 8 voxels"):
        TLDeepSSM((7, 20, 20), 10, 4, conv_padding="same")
    with pytest.raises(InputError, match="conv_padding"):
        BaseDeepSSM((64, 64, 64), 3, n_particles=10, conv_padding="full")


def test_bad_pca_arrays_are_refused():
    pca = _pca(10, 3)
    pca["pca_components"] = pca["pca_components"][:2]
    with pytest.raises(InputError, match="pca_components"):
        BaseDeepSSM((8, 8, 8), 3, **pca, conv_padding="same")


@pytest.mark.parametrize("variant", ["base", "tl"])
def test_build_network_round_trip_through_state_dict(variant):
    torch.manual_seed(1)
    if variant == "base":
        net = BaseDeepSSM((10, 12, 9), 4, **_pca(12, 4), conv_padding="same")
    else:
        rng = np.random.default_rng(0)
        net = TLDeepSSM((10, 12, 9), 12, 6, rng.normal(size=(12, 3)), 2.5, hidden=32, conv_padding="same")
    x = torch.randn(2, 1, 10, 12, 9)
    net.train()
    net(x)  # move BN running statistics away from their defaults
    net.eval()
    arch = json.loads(json.dumps(net.architecture))
    rebuilt = build_network(arch)
    assert rebuilt.architecture == net.architecture
    rebuilt.load_state_dict(net.state_dict())
    rebuilt.eval()
    with torch.no_grad():
        for a, b in zip(net(x), rebuilt(x), strict=True):
            assert torch.equal(a, b)


def test_pool_size_caps_the_fc_layer_independently_of_the_grid():
    small = BaseDeepSSM((24, 24, 24), 4, **_pca(12, 4), conv_padding="same", pool_size=2)
    large = BaseDeepSSM((48, 40, 56), 4, **_pca(12, 4), conv_padding="same", pool_size=2)
    assert small.encoder.flat_features == large.encoder.flat_features == 192 * 8
    assert count_parameters(small) == count_parameters(large)
    unpooled = BaseDeepSSM((48, 40, 56), 4, **_pca(12, 4), conv_padding="same")
    assert count_parameters(unpooled) > 3 * count_parameters(large)
    with torch.no_grad():
        scores, particles = large.eval()(torch.randn(2, 1, 48, 40, 56))
    assert scores.shape == (2, 4) and particles.shape == (2, 12, 3)
    rebuilt = build_network(json.loads(json.dumps(large.architecture)))
    assert rebuilt.encoder.flat_features == 192 * 8
    with pytest.raises(InputError, match="pool_size"):
        BaseDeepSSM((24, 24, 24), 4, **_pca(12, 4), conv_padding="same", pool_size=0)


def test_build_network_refuses_bad_descriptions():
    with pytest.raises(InputError, match="variant"):
        build_network({"variant": "conditional", "input_shape_zyx": [8, 8, 8], "n_particles": 3})
    with pytest.raises(InputError, match="n_modes"):
        build_network(
            {"variant": "base", "input_shape_zyx": [8, 8, 8], "n_particles": 3, "conv_padding": "same"}
        )
    with pytest.raises(InputError, match="newer"):
        build_network({"version": 99, "variant": "base"})


def test_tl_inference_is_tflank_then_decoder():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    mean = rng.normal(size=(9, 3)) * 5
    net = TLDeepSSM((8, 8, 8), 9, 5, mean, 3.0, hidden=16, conv_padding="same").eval()
    x = torch.randn(2, 1, 8, 8, 8)
    with torch.no_grad():
        latent, particles = net(x)
        assert latent.shape == (2, 5) and particles.shape == (2, 9, 3)
        assert torch.equal(particles, net.autoencoder.decode(net.tflank(x)))
        z, recon = net.autoencode(torch.as_tensor(mean, dtype=torch.float32)[None].repeat(2, 1, 1))
    assert z.shape == (2, 5) and recon.shape == (2, 9, 3)


def test_channels_last_gives_the_same_output():
    torch.manual_seed(0)
    net = BaseDeepSSM((12, 10, 14), 3, **_pca(8, 3), conv_padding="same").eval()
    x = torch.randn(2, 1, 12, 10, 14)
    with torch.no_grad():
        ref = net(x)[1]
        net.to(memory_format=torch.channels_last_3d)
        out = net(x.contiguous(memory_format=torch.channels_last_3d))[1]
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_pca_path_stays_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    net = BaseDeepSSM((8, 8, 8), 3, **_pca(8, 3), conv_padding="same").eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        scores, particles = net(torch.randn(1, 1, 8, 8, 8))
    assert scores.dtype == torch.float32 and particles.dtype == torch.float32


# -- the light encoder (issue 16) ----------------------------------------------------------------


@pytest.mark.parametrize("shape", [(8, 8, 8), (17, 20, 23), (38, 46, 52)])
def test_light_encoder_shapes(shape):
    torch.manual_seed(0)
    net = BaseDeepSSM(shape, 5, **_pca(20, 5), conv_padding="same", encoder="light").eval()
    with torch.no_grad():
        scores, particles = net(torch.randn(2, 1, *shape))
    assert scores.shape == (2, 5) and particles.shape == (2, 20, 3)
    assert light_output_shape(shape) == tuple(-(-n // 8) for n in shape)  # ⌈n/8⌉ after 3 stride-2 convs
    assert net.encoder.flat_features == LIGHT_CHANNELS[-1] * int(np.prod(light_output_shape(shape)))
    tl = TLDeepSSM(shape, 20, 6, conv_padding="same", encoder="light").eval()
    with torch.no_grad():
        latent, recon = tl(torch.randn(2, 1, *shape))
    assert latent.shape == (2, 6) and recon.shape == (2, 20, 3)


def test_light_encoder_parameter_count_and_no_full_resolution_conv():
    # 52×46×38 (x×y×z), 10 modes, 512 particles: the light stack's convolutions, counted by hand
    shape = (38, 46, 52)
    light = BaseDeepSSM(shape, 10, n_particles=512, conv_padding="same", encoder="light")
    paper = BaseDeepSSM(shape, 10, n_particles=512, conv_padding="same")
    convs = 0
    c_in = 1
    for c in LIGHT_CHANNELS:  # strided conv (no bias) + BN + PReLU, residual block: 2 convs + 2 BN + PReLU ×2
        convs += (27 * c_in * c + 2 * c + 1) + 2 * (27 * c * c + 2 * c) + 2
        c_in = c
    flat = 64 * 5 * 6 * 7
    fc = (flat * 384 + 384 + 1) + (384 * 96 + 96 + 1) + (96 * 10 + 10)
    assert count_parameters(light, trainable_only=True) == convs + fc
    assert count_parameters(light, trainable_only=True) < count_parameters(paper, trainable_only=True) / 2
    first = next(m for m in light.encoder.conv.modules() if isinstance(m, torch.nn.Conv3d))
    assert first.kernel_size == (3, 3, 3) and first.stride == (2, 2, 2)


def test_light_encoder_untrained_predicts_the_mean_shape():
    torch.manual_seed(0)
    pca = _pca(16, 4)
    net = BaseDeepSSM((12, 12, 12), 4, **pca, conv_padding="same", encoder="light").eval()
    with torch.no_grad():
        scores, particles = net(torch.randn(3, 1, 12, 12, 12) * 5)
    mean_scores = torch.as_tensor(pca["score_mean"], dtype=torch.float32).expand(3, 4)
    assert torch.allclose(scores, mean_scores, atol=1e-5)
    expected = net.reconstruct(mean_scores)
    assert torch.allclose(particles, expected, atol=1e-4)


def test_light_residual_blocks_start_as_identity_but_train():
    torch.manual_seed(0)
    block = ResidualBlock3d(4)
    xavier_init(block)
    x = torch.randn(2, 4, 5, 5, 5)
    assert torch.allclose(block(x), block.act(x))
    assert block.body[-1].weight.requires_grad


def test_light_architecture_round_trip_and_paper_default():
    torch.manual_seed(1)
    net = BaseDeepSSM((10, 12, 14), 3, **_pca(8, 3), conv_padding="same", encoder="light").eval()
    arch = json.loads(json.dumps(net.architecture))
    assert arch["encoder"] == "light" and arch["version"] == 2
    rebuilt = build_network(arch)
    rebuilt.load_state_dict(net.state_dict())
    rebuilt.eval()
    x = torch.randn(2, 1, 10, 12, 14)
    with torch.no_grad():
        assert torch.equal(net(x)[1], rebuilt(x)[1])
    # a bundle written before the field existed (no "encoder", version 1) is the paper's network
    paper = BaseDeepSSM((10, 12, 14), 3, n_particles=8, conv_padding="same")
    old = {k: v for k, v in paper.architecture.items() if k != "encoder"}
    assert old["version"] == 1 and "encoder" not in paper.architecture
    assert isinstance(build_network(old).encoder.conv[0], torch.nn.Conv3d)
    assert build_network(old).encoder.conv[0].kernel_size == (5, 5, 5)
    tl = TLDeepSSM((10, 12, 14), 8, 4, conv_padding="same", encoder="light")
    assert build_network(json.loads(json.dumps(tl.architecture))).architecture == tl.architecture


def test_light_encoder_refusals():
    with pytest.raises(InputError, match="conv_padding must be 'same'"):
        BaseDeepSSM((64, 64, 64), 3, n_particles=10, conv_padding="valid", encoder="light")
    with pytest.raises(InputError, match="'encoder'"):
        build_network(
            {
                "variant": "base",
                "input_shape_zyx": [8, 8, 8],
                "n_modes": 2,
                "n_particles": 4,
                "conv_padding": "same",
                "encoder": "tiny",
                "version": 2,
            }
        )


def test_light_bundle_round_trip(tmp_path):
    from helpers_predict import make_tiny_bundle

    from DeepSSMLogic.bundle import load_bundle

    path = make_tiny_bundle(tmp_path / "light", seed=2, encoder="light")
    b = load_bundle(path)
    assert b.meta["architecture"]["encoder"] == "light"
    assert isinstance(b.network.encoder.conv[3], ResidualBlock3d)
    saved = torch.load(path / "weights.pt", weights_only=True)
    for k, v in b.network.state_dict().items():
        assert torch.equal(v, saved[k]), k


def test_light_bundle_loads_from_a_zip(tmp_path):
    """The zip loader caps ``weights.pt`` by the architecture's parameter count: a light bundle's
    cap must come from the light encoder, not the paper's."""
    import shutil

    from helpers_predict import make_tiny_bundle

    from DeepSSMLogic.bundle import load_bundle

    path = make_tiny_bundle(tmp_path / "light", seed=2, encoder="light")
    archive = Path(shutil.make_archive(str(tmp_path / "light_bundle"), "zip", path))
    b = load_bundle(archive)
    assert b.meta["architecture"]["encoder"] == "light"
    saved = torch.load(path / "weights.pt", weights_only=True)
    for k, v in b.network.state_dict().items():
        assert torch.equal(v, saved[k]), k


# -- light encoder stacks (LightSpec) ------------------------------------------------------------


def test_the_shipped_light_stack_is_frozen():
    """Bundles store only the encoder's name: "light" must keep exactly this layer stack (key, shape)
    or every light bundle already written would load wrongly or not at all."""
    net = BaseDeepSSM((16, 16, 16), 2, n_particles=4, conv_padding="same", encoder="light")
    convs = [
        (k, tuple(v.shape))
        for k, v in net.encoder.conv.state_dict().items()
        if k.endswith("weight") and v.ndim == 5
    ]
    assert convs == [
        ("0.weight", (16, 1, 3, 3, 3)),
        ("3.body.0.weight", (16, 16, 3, 3, 3)),
        ("3.body.3.weight", (16, 16, 3, 3, 3)),
        ("4.weight", (32, 16, 3, 3, 3)),
        ("7.body.0.weight", (32, 32, 3, 3, 3)),
        ("7.body.3.weight", (32, 32, 3, 3, 3)),
        ("8.weight", (64, 32, 3, 3, 3)),
        ("11.body.0.weight", (64, 64, 3, 3, 3)),
        ("11.body.3.weight", (64, 64, 3, 3, 3)),
    ]
    strides = [m.stride for m in net.encoder.conv if isinstance(m, torch.nn.Conv3d)]
    assert strides == [(2, 2, 2)] * 3
    assert not any(isinstance(m, torch.nn.MaxPool3d) for m in net.encoder.conv.modules())


@pytest.mark.parametrize(
    "spec",
    [
        LightSpec(stem=4),
        LightSpec(pool=3),
        LightSpec(pool=1),
        LightSpec((8, 16), stem=4, blocks=2, pool=2),
        LightSpec((8, 16), pool=2, reduce=4, fc=24),
    ],
)
@pytest.mark.parametrize("shape", [(9, 8, 8), (17, 20, 23)])
def test_light_specs_build_run_and_round_trip(monkeypatch, spec, shape):
    monkeypatch.setitem(LIGHT_ENCODERS, "x-test", spec)
    torch.manual_seed(0)
    net = BaseDeepSSM(shape, 3, **_pca(10, 3), conv_padding="same", encoder="x-test").eval()
    x = torch.randn(2, 1, *shape)
    with torch.no_grad():
        z = net.encoder.conv(x)
    assert tuple(z.shape[2:]) == light_output_shape(shape, len(spec.channels))  # ⌈n/2⌉ per level
    assert z.shape[1] == spec.out_channels == net.encoder.flat_features // int(np.prod(z.shape[2:]))
    assert spec.out_channels == (spec.reduce or spec.channels[-1])
    assert net.encoder.fc[0].out_features == spec.fc
    convs = [m for m in net.encoder.conv.modules() if isinstance(m, torch.nn.Conv3d)]
    assert len(convs) == bool(spec.stem) + len(spec.channels) * (1 + 2 * spec.blocks) + bool(spec.reduce)
    assert (convs[0].stride == (1, 1, 1)) == (spec.stem > 0 or spec.pool > 0)
    pools = [m for m in net.encoder.conv.modules() if isinstance(m, torch.nn.MaxPool3d)]
    assert len(pools) == spec.pool
    arch = json.loads(json.dumps(net.architecture))
    assert arch["encoder"] == "x-test" and arch["version"] == 2
    rebuilt = build_network(arch)
    rebuilt.load_state_dict(net.state_dict())
    with torch.no_grad():
        assert torch.equal(net(x)[1], rebuilt.eval()(x)[1])


def test_unknown_encoder_names_the_known_ones():
    with pytest.raises(InputError, match=r"'encoder': expected one of \('paper', 'light'"):
        BaseDeepSSM((8, 8, 8), 2, n_particles=4, conv_padding="same", encoder="nope")


def test_light2_is_light_with_max_pooling_and_the_cli_offers_every_encoder():
    assert LIGHT_ENCODERS["light2"] == LightSpec(LIGHT_CHANNELS, stem=0, blocks=1, pool=3)
    with pytest.raises(ValueError, match="level count"):
        LightSpec(pool=True)
    net = BaseDeepSSM((20, 24, 19), 2, n_particles=4, conv_padding="same", encoder="light2")
    convs = [m for m in net.encoder.conv if isinstance(m, torch.nn.Conv3d)]
    assert [c.stride for c in convs] == [(1, 1, 1)] * 3
    assert sum(isinstance(m, torch.nn.MaxPool3d) for m in net.encoder.conv) == 3
    from DeepSSMLogic.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for command in ("train", "demo"):
        encoder = next(a for a in sub.choices[command]._actions if a.dest == "encoder")
        assert set(encoder.choices) == {"paper", *LIGHT_ENCODERS}, command


def _conv_and_fc_shapes(net: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(v.shape)) for k, v in net.encoder.state_dict().items() if k.endswith("weight")]


# the issue-16 64³ cohort (30 subjects, 1.5 mm automatic grid 56×46×42, 512 particles, 3 modes)
ISSUE_GRID = (42, 46, 56)


def test_the_shipped_light2_stack_is_frozen():
    """light2 is what every bundle since issue 16 was trained with (the default): adding light3 (a
    ``reduce`` field in LightSpec) must leave its layer stack — every weight's key and shape — as it
    was, or those bundles would no longer load."""
    assert LIGHT_ENCODERS["light2"].reduce == 0 and LIGHT_ENCODERS["light"].reduce == 0
    net = BaseDeepSSM(ISSUE_GRID, 3, n_particles=512, conv_padding="same", encoder="light2")
    conv = [(k, s) for k, s in _conv_and_fc_shapes(net) if len(s) == 5]
    assert conv == [
        ("conv.0.weight", (16, 1, 3, 3, 3)),
        ("conv.4.body.0.weight", (16, 16, 3, 3, 3)),
        ("conv.4.body.3.weight", (16, 16, 3, 3, 3)),
        ("conv.5.weight", (32, 16, 3, 3, 3)),
        ("conv.9.body.0.weight", (32, 32, 3, 3, 3)),
        ("conv.9.body.3.weight", (32, 32, 3, 3, 3)),
        ("conv.10.weight", (64, 32, 3, 3, 3)),
        ("conv.14.body.0.weight", (64, 64, 3, 3, 3)),
        ("conv.14.body.3.weight", (64, 64, 3, 3, 3)),
    ]
    assert len(net.encoder.conv) == 15
    assert dict(_conv_and_fc_shapes(net))["fc.0.weight"] == (384, 64 * 6 * 6 * 7)
    assert count_parameters(net, trainable_only=True) == 6_591_326


def test_light3_is_light2_with_a_learned_channel_reduction_and_a_quarter_of_its_fc_layer():
    """issue 16 (checkpoint ≤ 50 MB): light3 = light2's stack + a 1×1×1 conv 64 → 16 (+ BN, PReLU)
    before the flatten; the spatial resolution the FC layer sees is unchanged."""
    assert LIGHT_ENCODERS["light3"] == LightSpec(LIGHT_CHANNELS, stem=0, blocks=1, pool=3, reduce=16)
    assert LIGHT_ENCODERS["light3"].out_channels == 16 and LIGHT_ENCODERS["light2"].out_channels == 64
    for bad in (-1, True, 2.5):
        with pytest.raises(ValueError, match=r"LightSpec\.reduce"):
            LightSpec(pool=3, reduce=bad)
    for bad in (0, True, 2.5):
        with pytest.raises(ValueError, match=r"LightSpec\.fc"):
            LightSpec(pool=3, fc=bad)
    two = BaseDeepSSM(ISSUE_GRID, 3, n_particles=512, conv_padding="same", encoder="light2")
    three = BaseDeepSSM(ISSUE_GRID, 3, n_particles=512, conv_padding="same", encoder="light3")
    # light2's conv stack, then the reduction
    assert [type(m) for m in three.encoder.conv[:15]] == [type(m) for m in two.encoder.conv]
    assert [type(m) for m in three.encoder.conv[15:]] == [
        torch.nn.Conv3d,
        torch.nn.BatchNorm3d,
        torch.nn.PReLU,
    ]
    reduce = three.encoder.conv[15]
    assert reduce.kernel_size == (1, 1, 1) and (reduce.in_channels, reduce.out_channels) == (64, 16)
    x = torch.randn(1, 1, *ISSUE_GRID)
    with torch.no_grad():
        assert tuple(three.encoder.conv(x).shape) == (1, 16, 6, 6, 7)
    assert three.encoder.flat_features * 4 == two.encoder.flat_features == 64 * 6 * 6 * 7
    assert dict(_conv_and_fc_shapes(three))["fc.0.weight"] == (384, 16 * 6 * 6 * 7)
    assert count_parameters(three, trainable_only=True) == 1_947_519  # light2: 6,591,326
    arch = json.loads(json.dumps(three.architecture))
    assert arch["encoder"] == "light3" and arch["version"] == 2
    assert build_network(arch).encoder.flat_features == three.encoder.flat_features


def test_light2_and_light3_bundles_load_from_a_zip(tmp_path):
    """A light2 bundle (written with its frozen stack) and a light3 one both load, weights intact."""
    import shutil

    from helpers_predict import make_tiny_bundle

    from DeepSSMLogic.bundle import load_bundle

    for encoder in ("light2", "light3"):
        path = make_tiny_bundle(tmp_path / encoder, seed=2, encoder=encoder)
        archive = Path(shutil.make_archive(str(tmp_path / f"{encoder}_bundle"), "zip", path))
        b = load_bundle(archive)
        assert b.meta["architecture"]["encoder"] == encoder
        saved = torch.load(path / "weights.pt", weights_only=True)
        assert b.network.state_dict().keys() == saved.keys()
        for k, v in b.network.state_dict().items():
            assert torch.equal(v, saved[k]), k


def test_the_default_encoder_is_light2_in_the_cli_the_pipeline_and_the_slicer_worker():
    """issue 16: light2 is `deepssm train`'s default; the Slicer worker trains with the pipeline's."""
    from DeepSSMLogic.cli import build_parser
    from DeepSSMLogic.pipeline import TrainingOptions

    assert TrainingOptions().encoder == "light2"
    args = build_parser().parse_args(["train", "cohort.csv", "--out", "m"])
    assert args.encoder == TrainingOptions().encoder
