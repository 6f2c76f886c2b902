"""Backbones: the real MONAI / nnU-Net networks, unchanged state_dict keys, tokens and reconstruction."""
import json
import math

import pytest
import torch

from helpers import TINY_BACKBONES
from med3dinsight_plugin import build_backbone, list_backbones
from med3dinsight_plugin.backbones import build_backbone_from_config
from med3dinsight_plugin.backbones.nnunet import architecture_for_patch


def _tiny(name, **overrides):
    kwargs = {**TINY_BACKBONES[name], **overrides}
    return build_backbone(name, in_channels=kwargs.pop("in_channels", 1), **kwargs)


def _plain_network(backbone):
    """The downstream network built directly by MONAI / nnU-Net, without this package."""
    cfg = backbone.config
    if cfg["name"] == "swin_unetr":
        from monai.networks.nets import SwinUNETR
        return SwinUNETR(in_channels=cfg["in_channels"], **cfg["network_kwargs"])
    if cfg["name"] == "unetr":
        from monai.networks.nets import UNETR
        return UNETR(in_channels=cfg["in_channels"], img_size=cfg["patch_size"], **cfg["network_kwargs"])
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    arch = backbone.architecture
    return get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                                  cfg["in_channels"], cfg["num_classes"], deep_supervision=True)


def _expected_tokens(name, patch):
    cells = {"swin_unetr": 32, "unetr": 16}.get(name, 8)  # the tiny nnU-Net nets pool 3 times at 32^3
    return math.prod(p // cells for p in patch)


def test_registry_lists_the_backbones():
    assert list_backbones() == ["nnunet", "plain_conv_unet", "resenc_unet", "swin_unetr", "unetr"]


def test_shapes_tokens_and_reconstruction(tiny_backbone_name):
    torch.manual_seed(0)
    backbone = _tiny(tiny_backbone_name, in_channels=2)
    x = torch.randn(2, 2, *backbone.patch_size)
    tokens, reconstruction = backbone(x)
    assert tokens.shape == (2, _expected_tokens(tiny_backbone_name, backbone.patch_size), backbone.token_dim)
    assert reconstruction.shape == x.shape


def test_network_state_dict_keys_are_the_plain_networks(tiny_backbone_name):
    backbone = _tiny(tiny_backbone_name)
    mine = {k: v.shape for k, v in backbone.network.state_dict().items()}
    plain = {k: v.shape for k, v in _plain_network(backbone).state_dict().items()}
    assert mine == plain
    assert set(backbone.state_dict()) == {f"network.{k}" for k in plain} | {"reconstruction_head.weight",
                                                                             "reconstruction_head.bias"}
    for prefix in backbone.encoder_prefixes:
        assert any(k.startswith(prefix) for k in plain), prefix


def test_decoder_features_reproduce_the_networks_own_forward(tiny_backbone_name):
    torch.manual_seed(1)
    backbone = _tiny(tiny_backbone_name).eval()
    x = torch.randn(1, 1, *backbone.patch_size)
    net = backbone.network
    seg_head = net.out if hasattr(net, "out") else net.decoder.seg_layers[-1]
    with torch.no_grad():
        _, decoded = backbone.features(x)
        torch.testing.assert_close(seg_head(decoded), net(x))


def test_config_rebuilds_the_same_backbone(tiny_backbone_name):
    backbone = _tiny(tiny_backbone_name)
    config = json.loads(json.dumps(backbone.config))  # checkpoint metadata must survive JSON
    rebuilt = build_backbone_from_config(config)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == \
           {k: v.shape for k, v in backbone.state_dict().items()}


@pytest.mark.parametrize("family", ["plain", "resenc"])
def test_nnunet_from_real_plans_and_planner_replica(nnunet_plans, family):
    plans = json.loads(nnunet_plans[family].read_text())
    config = plans["configurations"]["3d_fullres"]
    backbone = build_backbone("nnunet", plans=nnunet_plans[family], configuration="3d_fullres")
    assert backbone.patch_size == tuple(config["patch_size"])
    assert type(backbone.network).__name__ == ("PlainConvUNet" if family == "plain" else "ResidualEncoderUNet")
    assert backbone.architecture == config["architecture"]
    assert backbone.config["configuration"] == "3d_fullres" and backbone.config["plans"] == plans
    # architecture_for_patch reproduces what nnU-Net's planner wrote for this patch size and spacing
    assert architecture_for_patch(config["patch_size"], config["spacing"], family) == config["architecture"]
    tokens, reconstruction = backbone(torch.randn(1, 1, *backbone.patch_size))
    assert tokens.shape[-1] == config["architecture"]["arch_kwargs"]["features_per_stage"][-1]
    from_dict = build_backbone("nnunet", plans=plans, configuration="3d_fullres")
    assert from_dict.config == backbone.config
    assert (backbone.key_to_encoder, backbone.key_to_stem) == (backbone.network.key_to_encoder,
                                                               backbone.network.key_to_stem)


def test_nnunet_plans_errors(nnunet_plans, tmp_path):
    with pytest.raises(ValueError, match=r"configuration '3d_lowres' is not in the plans; available: \['2d', "):
        build_backbone("nnunet", plans=nnunet_plans["plain"], configuration="3d_lowres")
    with pytest.raises(ValueError, match="not 3D"):
        build_backbone("nnunet", plans=nnunet_plans["plain"], configuration="2d")
    with pytest.raises(ValueError, match="cannot read the nnU-Net plans file"):
        build_backbone("nnunet", plans=tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        build_backbone("nnunet", plans=tmp_path / "bad.json")
    with pytest.raises(ValueError, match="no 'configurations' key"):
        build_backbone("nnunet", plans={"foo": 1})
    with pytest.raises(ValueError, match="exactly one of plans="):
        build_backbone("nnunet")
    broken = json.loads(nnunet_plans["plain"].read_text())["configurations"]["3d_fullres"]["architecture"]
    broken["arch_kwargs"]["n_stages"] = 7  # disagrees with the 4 listed stages
    with pytest.raises(ValueError, match="nnU-Net could not build PlainConvUNet"):
        build_backbone("nnunet", architecture=broken, patch_size=(32, 32, 32))


@pytest.mark.parametrize("name,shape,match", [
    ("swin_unetr", (1, 1, 72, 64, 64), r"divisible by \(32, 32, 32\)"),
    ("unetr", (1, 1, 48, 48, 48), r"built for patches of \(32, 32, 32\)"),
    ("plain_conv_unet", (1, 1, 36, 32, 32), r"divisible by \(8, 8, 8\)"),
    ("resenc_unet", (1, 2, 32, 32, 32), "1 input channel"),
    ("swin_unetr", (1, 32, 32, 32), r"shape \(B, 1, D, H, W\)"),
])
def test_bad_volume_raises_value_error(name, shape, match):
    with pytest.raises(ValueError, match=match):
        _tiny(name)(torch.zeros(shape))


def test_bad_build_arguments_raise_value_error():
    with pytest.raises(ValueError, match="unknown backbone 'vnet'"):
        build_backbone("vnet")
    with pytest.raises(ValueError, match="no img_size since MONAI 1.5"):
        build_backbone("swin_unetr", patch_size=64, img_size=64)
    with pytest.raises(ValueError, match=r"divisible by \(32, 32, 32\)"):
        build_backbone("swin_unetr", patch_size=(48, 64, 64), feature_size=12)
    with pytest.raises(ValueError, match="divisible by 16"):
        build_backbone("unetr", patch_size=(40, 40, 40))
    with pytest.raises(ValueError, match=r"at least \(64, 64, 64\)"):
        build_backbone("swin_unetr", patch_size=(32, 64, 64), feature_size=12)
    with pytest.raises(ValueError, match="SwinUNETR rejected"):
        build_backbone("swin_unetr", patch_size=64, feature_size=13)
    with pytest.raises(ValueError, match="patch_size must be three positive integers"):
        build_backbone("plain_conv_unet", patch_size=(32, 32))
    with pytest.raises(ValueError, match="in_channels must be a positive integer"):
        build_backbone("plain_conv_unet", in_channels=0)


def test_every_trainable_parameter_gets_a_gradient_once_dead_ones_are_frozen(tiny_backbone_name):
    """What DDP without find_unused_parameters needs, as nnU-Net wraps it."""
    from med3dinsight_plugin.finetune import freeze_dead_parameters

    network = _tiny(tiny_backbone_name).network
    dead = freeze_dead_parameters(network)
    assert bool(dead) == (tiny_backbone_name == "unetr")  # MONAI's unused norm_cross_attn
    if hasattr(network, "decoder"):
        network.decoder.deep_supervision = True  # as nnU-Net trains its networks: every seg layer is used
    outputs = network(torch.randn(1, 1, *TINY_BACKBONES[tiny_backbone_name]["patch_size"]))
    sum(o.sum() for o in (outputs if isinstance(outputs, (list, tuple)) else [outputs])).backward()
    assert [n for n, p in network.named_parameters() if p.requires_grad and p.grad is None] == []
