"""The one loader: exact coverage, prefixes, adapters, refusal without side effects, foreign layouts."""
import json

import pytest
import torch
import torch.nn.functional as F

from helpers import swin_ssl_state_dict, tiny_backbone
from med3dinsight_plugin import IncompatibleCheckpointError, load_pretrained_encoder, save_pretrained


def _snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _same(a, b, prefixes=("",)):
    return all(torch.equal(a[k], b[k]) for k in a if k.startswith(prefixes))


@pytest.fixture
def saved(tmp_path, tiny_backbone_name):
    backbone = tiny_backbone(tiny_backbone_name, seed=0)
    return backbone, save_pretrained(backbone, tmp_path / "ckpt.safetensors")


def test_full_encoder_coverage_and_decoder_untouched(saved, tiny_backbone_name):
    source, path = saved
    target = tiny_backbone(tiny_backbone_name, seed=1).network
    before = _snapshot(target)
    report = load_pretrained_encoder(target, path)
    assert report.applied and report.coverage == 100.0 and report.expected == report.loaded > 0
    assert not (report.missing or report.unexpected or report.mismatched or report.adapted)
    after, pretrained = target.state_dict(), source.network.state_dict()
    assert _same(after, pretrained, source.encoder_prefixes)
    decoder = [k for k in after
               if not k.startswith(source.encoder_prefixes) and not torch.equal(after[k], pretrained[k])]
    assert decoder and all(torch.equal(after[k], before[k]) for k in decoder)  # decoder kept its own weights
    report_all = load_pretrained_encoder(target, path, scope="all")
    head = ("out.", "decoder.seg_layers.")
    assert _same(target.state_dict(), {k: v for k, v in pretrained.items() if not k.startswith(head)},
                 tuple(k for k in pretrained if not k.startswith(head)))
    assert report_all.outside_encoder < report.outside_encoder


def test_wrapper_prefixes_on_both_sides(tmp_path):
    source = tiny_backbone("plain_conv_unet", seed=0).network
    prefixed = {f"module._orig_mod.{k}": v for k, v in source.state_dict().items()}
    torch.save({"state_dict": prefixed}, tmp_path / "ddp_compiled.pt")
    target = tiny_backbone("plain_conv_unet", seed=1).network
    wrapped = torch.nn.DataParallel(torch.compile(target))
    report = load_pretrained_encoder(wrapped, tmp_path / "ddp_compiled.pt")
    assert report.coverage == 100.0 and report.key_mapping == "identity"
    assert _same(target.state_dict(), source.state_dict(), ("encoder.",))


def test_channel_adaptation_one_to_four(saved, tiny_backbone_name):
    source, path = saved
    target = tiny_backbone(tiny_backbone_name, seed=1, in_channels=4)
    report = load_pretrained_encoder(target, path)
    assert report.coverage == 100.0 and report.adapted
    assert all("input channels 1->4" in how for how in report.adapted.values())
    # a volume repeated over 4 channels gives the 1-channel model's encoder output: the kernel was divided by 4
    x = torch.randn(1, 1, *source.patch_size)
    with torch.no_grad():
        torch.testing.assert_close(target.eval().tokens(x.repeat(1, 4, 1, 1, 1)), source.eval().tokens(x),
                                   rtol=1e-4, atol=1e-4)
    with pytest.raises(IncompatibleCheckpointError, match="channel adaptation is off"):
        load_pretrained_encoder(tiny_backbone(tiny_backbone_name, in_channels=4), path, adapt_channels=False)


def test_channels_that_cannot_be_adapted_are_refused(tmp_path):
    two = tiny_backbone("resenc_unet", in_channels=2)
    path = save_pretrained(two, tmp_path / "two.safetensors")
    three = tiny_backbone("resenc_unet", in_channels=3).network
    with pytest.raises(IncompatibleCheckpointError, match="reads 2 input channel.*model 3; only 1 -> N") as info:
        load_pretrained_encoder(three, path)
    assert "encoder.stem.convs.0.conv.weight" in info.value.report.mismatched


def test_unetr_position_embedding_resized_trilinearly(tmp_path):
    source = tiny_backbone("unetr", seed=0)  # 32^3 patch: 2x2x2 tokens
    path = save_pretrained(source, tmp_path / "u.safetensors")
    target = tiny_backbone("unetr", seed=1, patch_size=(48, 64, 48))  # 3x4x3 tokens
    report = load_pretrained_encoder(target, path)
    key = "vit.patch_embedding.position_embeddings"
    assert report.coverage == 100.0 and "[2, 2, 2]->[3, 4, 3]: trilinear" in report.adapted[key]
    grid = source.network.state_dict()[key].transpose(1, 2).reshape(1, -1, 2, 2, 2)
    expected = F.interpolate(grid, size=(3, 4, 3), mode="trilinear", align_corners=False).flatten(2).transpose(1, 2)
    torch.testing.assert_close(target.network.state_dict()[key], expected)
    target(torch.randn(1, 1, 48, 64, 48))  # and the model runs at its own patch size


def test_mismatched_checkpoint_raises_readable_report_and_changes_nothing(tmp_path):
    path = save_pretrained(tiny_backbone("swin_unetr"), tmp_path / "fs12.safetensors")
    target = tiny_backbone("swin_unetr", seed=1, feature_size=24).network
    before = _snapshot(target)
    with pytest.raises(IncompatibleCheckpointError) as info:
        load_pretrained_encoder(target, path)
    report = info.value.report
    assert not report.applied and report.mismatched and report.coverage < 100
    text = str(report)
    assert "NOT loaded (model unchanged)" in text and "shape-mismatched" in text and "fs12.safetensors" in text
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())
    json.dumps(report.to_dict())
    with pytest.raises(IncompatibleCheckpointError, match="no tensor of the checkpoint matches"):
        load_pretrained_encoder(tiny_backbone("unetr").network, path)


def test_partial_load_when_not_strict(tmp_path):
    source = tiny_backbone("plain_conv_unet").network
    half = {k: v for k, v in source.state_dict().items() if k.startswith("encoder.stages.0.")}
    target = tiny_backbone("plain_conv_unet", seed=1).network
    report = load_pretrained_encoder(target, half, strict_encoder=False)
    assert report.applied and 0 < report.coverage < 100 and report.missing
    assert _same(target.state_dict(), source.state_dict(), ("encoder.stages.0.",))


def test_official_swin_ssl_weights(tmp_path):
    """MONAI's model_swinvit.pt layout: 'module.' without 'swinViT.', fc1/fc2 names, an extra norm."""
    source = tiny_backbone("swin_unetr", seed=0).network
    torch.save(swin_ssl_state_dict(source.swinViT.state_dict()), tmp_path / "model_swinvit.pt")
    target = tiny_backbone("swin_unetr", seed=1).network
    report = load_pretrained_encoder(target, tmp_path / "model_swinvit.pt")
    n_swin = len({t.data_ptr() for t in target.swinViT.state_dict().values()})
    assert report.coverage == 100.0 and report.expected == n_swin  # the file declares only the Swin encoder
    assert "add 'swinViT.'" in report.key_mapping and "mlp.fc1->mlp.linear1" in report.key_mapping
    assert sorted(report.unexpected) == ["norm.bias", "norm.weight"]
    assert _same(target.swinViT.state_dict(), source.swinViT.state_dict())
    mlp = [k for k in target.state_dict() if "mlp.linear1" in k]
    assert mlp and all(torch.equal(target.state_dict()[k], source.state_dict()[k]) for k in mlp)


def test_bare_encoder_and_classifier_targets(tmp_path):
    from med3dinsight_plugin.classifier import Med3DInsightClassifier

    source = tiny_backbone("swin_unetr")
    path = save_pretrained(source, tmp_path / "s.safetensors")
    bare = tiny_backbone("swin_unetr", seed=1).network.swinViT
    report = load_pretrained_encoder(bare, path)
    assert report.coverage == 100.0 and report.key_mapping == "strip 'swinViT.'"
    assert _same(bare.state_dict(), source.network.swinViT.state_dict())
    classifier = Med3DInsightClassifier(tiny_backbone("plain_conv_unet", seed=1), num_classes=3)
    assert load_pretrained_encoder(classifier, save_pretrained(tiny_backbone("plain_conv_unet"),
                                                               tmp_path / "p.safetensors")).coverage == 100.0


def test_nnunet_checkpoint_into_a_network(tmp_path):
    import numpy as np

    source = tiny_backbone("plain_conv_unet").network
    torch.save({"network_weights": source.state_dict(), "_best_ema": np.float64(0.3), "trainer_name": "x"},
               tmp_path / "checkpoint_final.pth")
    target = tiny_backbone("plain_conv_unet", seed=1).network
    report = load_pretrained_encoder(target, tmp_path / "checkpoint_final.pth")
    assert report.source_format == "nnunet" and report.coverage == 100.0
    assert _same(target.state_dict(), source.state_dict(), ("encoder.", "decoder.encoder."))


def test_wrapper_segments_are_dropped_only_where_wrappers_put_them():
    from med3dinsight_plugin.loading import _strip_wrappers

    assert _strip_wrappers("module._orig_mod.encoder.x") == "encoder.x"
    assert _strip_wrappers("network._orig_mod.encoder.x") == "network.encoder.x"  # a compiled submodule
    assert _strip_wrappers("encoder.module.x") == "encoder.module.x"  # a real submodule named "module"
    assert _strip_wrappers("module.") == "" and _strip_wrappers("module.swinViT.") == "swinViT."
