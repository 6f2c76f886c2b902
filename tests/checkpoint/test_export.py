"""Exports that nnU-Net, MONAI and nnssl load with their own, unmodified code."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import tiny_backbone
from med3dinsight_plugin import CheckpointError, build_backbone, load_pretrained_encoder, save_pretrained
from med3dinsight_plugin.export import export_checkpoint

BIN = Path(sys.executable).parent


def test_nnunet_export_is_accepted_by_nnunets_own_loader(nnunet_plans, tmp_path):
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    torch.manual_seed(0)
    backbone = build_backbone("nnunet", plans=nnunet_plans["plain"])
    ckpt = save_pretrained(backbone, tmp_path / "p.safetensors")
    out = export_checkpoint(ckpt, "nnunet", tmp_path / "pretrained.pth", plans=nnunet_plans["plain"])
    assert "every non-segmentation tensor fits" in out.note
    cm = PlansManager(str(nnunet_plans["plain"])).get_configuration("3d_fullres")
    torch.manual_seed(1)
    network = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                     cm.network_arch_init_kwargs_req_import, 1, 3, deep_supervision=True)
    load_pretrained_weights(network, str(tmp_path / "pretrained.pth"), verbose=False)
    for key, value in backbone.network.state_dict().items():
        if ".seg_layers." not in key:
            assert torch.equal(network.state_dict()[key], value), key
    assert torch.load(tmp_path / "pretrained.pth", weights_only=True)["network_weights"]


def test_nnunet_export_refuses_other_plans_and_other_networks(nnunet_plans, tmp_path):
    ckpt = save_pretrained(build_backbone("nnunet", plans=nnunet_plans["plain"]), tmp_path / "p.safetensors")
    with pytest.raises(CheckpointError, match="use nnUNetv2_train -tr Med3DInsightTrainer"):
        export_checkpoint(ckpt, "nnunet", tmp_path / "x.pth", plans=nnunet_plans["resenc"])
    swin = save_pretrained(tiny_backbone("swin_unetr"), tmp_path / "s.safetensors")
    with pytest.raises(CheckpointError, match="Med3DInsightTrainer_SwinUNETR"):
        export_checkpoint(swin, "nnunet", tmp_path / "x.pth")
    assert not (tmp_path / "x.pth").exists()
    derived = save_pretrained(tiny_backbone("plain_conv_unet"), tmp_path / "d.safetensors")
    assert "not from your dataset's plans" in export_checkpoint(derived, "nnunet", tmp_path / "d.pth").note


@pytest.mark.parametrize("name", ["swin_unetr", "unetr"])
def test_monai_export_loads_with_plain_load_state_dict(name, tmp_path):
    backbone = tiny_backbone(name)
    export_checkpoint(save_pretrained(backbone, tmp_path / "c.safetensors"), "monai", tmp_path / "monai.pt")
    state = torch.load(tmp_path / "monai.pt", weights_only=True)
    network = tiny_backbone(name, seed=1, out_channels=5).network  # another number of classes
    result = network.load_state_dict(state, strict=False)
    assert result.unexpected_keys == [] and all(k.startswith("out.") for k in result.missing_keys)
    for key, value in state.items():
        assert torch.equal(network.state_dict()[key], value)
    with pytest.raises(CheckpointError, match="--to monai exports SwinUNETR/UNETR"):
        export_checkpoint(save_pretrained(tiny_backbone("resenc_unet"), tmp_path / "r.safetensors"), "monai",
                          tmp_path / "r.pt")


def test_nnssl_export_round_trips(tmp_path):
    backbone = tiny_backbone("resenc_unet")
    export_checkpoint(save_pretrained(backbone, tmp_path / "c.safetensors"), "nnssl", tmp_path / "nnssl.pth")
    payload = torch.load(tmp_path / "nnssl.pth", weights_only=True)
    plan = payload["nnssl_adaptation_plan"]
    assert plan["architecture_plans"]["arch_class_name"] == "ResidualEncoderUNet"
    assert plan["key_to_encoder"] == "encoder.stages" and plan["key_to_stem"] == "encoder.stem"
    assert plan["pretrain_num_input_channels"] == 1
    target = tiny_backbone("resenc_unet", seed=1).network
    report = load_pretrained_encoder(target, tmp_path / "nnssl.pth")
    assert report.source_format == "nnssl" and report.coverage == 100.0


@pytest.mark.slow
def test_cli_export_and_inspect(tmp_path):
    ckpt = save_pretrained(tiny_backbone("unetr"), tmp_path / "u.safetensors", teacher="biomedclip")
    r = subprocess.run([str(BIN / "med3dinsight"), "export", str(ckpt), "--to", "monai", "-o",
                        str(tmp_path / "u.pt")], capture_output=True, text=True)
    assert r.returncode == 0 and "wrote" in r.stdout and (tmp_path / "u.pt").exists()
    r = subprocess.run([str(BIN / "med3dinsight"), "inspect", str(ckpt)], capture_output=True, text=True)
    assert r.returncode == 0 and "unetr (UNETR), in_channels 1, patch (32, 32, 32)" in r.stdout
    assert "teacher" in r.stdout and "biomedclip" in r.stdout
    for args, message in ((["export", str(tmp_path / "missing.safetensors"), "--to", "nnssl", "-o", "x"],
                           "does not exist"),
                          (["export", str(ckpt), "--to", "nnunet", "-o", str(tmp_path / "n.pth")],
                           "Med3DInsightTrainer_UNETR"),
                          (["inspect", str(tmp_path / "u.pt")], None)):
        r = subprocess.run([str(BIN / "med3dinsight"), *args], capture_output=True, text=True)
        if message is None:
            assert r.returncode == 0 and "state_dict" in r.stdout
        else:
            assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1
