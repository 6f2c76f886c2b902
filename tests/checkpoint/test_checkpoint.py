"""The checkpoint file format and safe reading of foreign weight files."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import swin_ssl_state_dict, tiny_backbone, tiny_psat_kwargs
from med3dinsight_plugin import (
    CheckpointError,
    Med3DInsightModel,
    PlaneSliceAwareTransformer,
    __version__,
    load_checkpoint,
    save_pretrained,
)
from med3dinsight_plugin.checkpoint import FORMAT


def test_roundtrip_every_backbone(tiny_backbone_name, tmp_path):
    backbone = tiny_backbone(tiny_backbone_name)
    path = save_pretrained(backbone, tmp_path / "ckpt.safetensors", intensity_normalization={"scheme": "CT"},
                           teacher={"image": "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"})
    ckpt = load_checkpoint(path)
    original = backbone.network.state_dict()
    assert ckpt.source_format == "med3dinsight" and set(ckpt.state_dict) == set(original)
    for key, tensor in original.items():
        assert torch.equal(ckpt.state_dict[key], tensor), key
    meta = ckpt.metadata
    assert meta["format"] == FORMAT and meta["package_version"] == __version__
    assert meta["backbone"] == json.loads(json.dumps(backbone.config))
    assert meta["in_channels"] == 1 and meta["patch_size"] == list(backbone.patch_size)
    assert meta["intensity_normalization"] == {"scheme": "CT"} and meta["teacher"]["image"].startswith("hf-hub:")
    plan = meta["adaptation_plan"]
    assert {"architecture_plans", "pretrain_num_input_channels", "recommended_downstream_patchsize",
            "key_to_encoder", "key_to_stem", "keys_to_in_proj", "key_to_lpe"} <= set(plan)
    assert plan["key_to_encoder"] == backbone.key_to_encoder and plan["keys_to_in_proj"]
    assert torch.equal(ckpt.extras["reconstruction_head"]["weight"], backbone.reconstruction_head.weight)


def test_shared_tensors_are_stored_once_and_relinked(tmp_path):
    backbone = tiny_backbone("plain_conv_unet")
    ckpt = load_checkpoint(save_pretrained(backbone, tmp_path / "c.safetensors"))
    alias, key = "decoder.encoder.stages.0.0.convs.0.conv.weight", "encoder.stages.0.0.convs.0.conv.weight"
    assert ckpt.metadata["aliases"]["network." + alias] == "network." + key
    assert ckpt.state_dict[alias] is ckpt.state_dict[key]
    from safetensors import safe_open
    with safe_open(str(tmp_path / "c.safetensors"), "pt") as f:
        stored = set(f.keys())
    assert "network." + alias not in stored and "network." + key in stored


def test_whole_model_keeps_psat_and_settings(tmp_path):
    backbone = tiny_backbone("plain_conv_unet")
    model = Med3DInsightModel(backbone, PlaneSliceAwareTransformer(**tiny_psat_kwargs(backbone.token_dim)))
    ckpt = load_checkpoint(save_pretrained(torch.nn.DataParallel(model), tmp_path))  # a folder, a wrapper
    assert Path(ckpt.path).name == "med3dinsight.safetensors"
    assert ckpt.metadata["psat"] == model.psat.config and ckpt.metadata["alignment"]["type"] == "ot"
    assert torch.equal(ckpt.extras["psat"]["queries"], model.psat.queries)


def test_failed_write_leaves_no_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    backbone = tiny_backbone("plain_conv_unet")
    target = tmp_path / "c.safetensors"
    target.write_bytes(b"previous")
    with pytest.raises(CheckpointError, match="JSON-serialisable"):
        save_pretrained(backbone, target, spacing=np.float32(1.0))
    from med3dinsight_plugin.checkpoint import format as module  # where save_pretrained looks it up

    def broken(tensors, filename, metadata):
        Path(filename).write_bytes(b"half a file")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(module, "_save_safetensors", broken)
    with pytest.raises(CheckpointError, match="No space left on device"):
        save_pretrained(backbone, target)
    assert target.read_bytes() == b"previous" and os.listdir(tmp_path) == ["c.safetensors"]
    with pytest.raises(CheckpointError, match="reserved"):
        save_pretrained(backbone, tmp_path / "d.safetensors", backbone="x")
    with pytest.raises(CheckpointError, match="does not exist"):
        save_pretrained(backbone, tmp_path / "no" / "such" / "folder.safetensors")


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {_Payload.marker}",))


def test_pickle_payload_is_refused_and_never_runs(tmp_path):
    _Payload.marker = tmp_path / "executed"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "evil": _Payload()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="needs arbitrary unpickling.*convert it"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not _Payload.marker.exists()


@pytest.mark.parametrize("content,match", [
    (None, "does not exist"),
    (b"hello, I am a text file", "neither a safetensors file nor a torch checkpoint"),
])
def test_unreadable_files(tmp_path, content, match):
    path = tmp_path / "c.safetensors"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path)


def test_truncated_files(tmp_path):
    backbone = tiny_backbone("plain_conv_unet")
    good = save_pretrained(backbone, tmp_path / "c.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(tmp_path / "cut.safetensors")
    torch.save(backbone.network.state_dict(), tmp_path / "c.pt")
    data = (tmp_path / "c.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(tmp_path / "cut.pt")


def test_foreign_layouts_are_recognised(tmp_path):
    net = tiny_backbone("plain_conv_unet").network
    sd = net.state_dict()
    # nnU-Net checkpoint_final.pth: numpy scalars in the logs, a torch.device in init_args
    torch.save({"network_weights": sd, "optimizer_state": {}, "grad_scaler_state": None,
                "logging": {"mean_fg_dice": [np.float64(0.5)], "ema_fg_dice": [np.float32(0.4)]},
                "_best_ema": np.float64(0.4), "current_epoch": 3, "trainer_name": "nnUNetTrainer",
                "init_args": {"fold": 0, "device": torch.device("cpu")},
                "inference_allowed_mirroring_axes": (0, 1, 2)}, tmp_path / "checkpoint_final.pth")
    ckpt = load_checkpoint(tmp_path / "checkpoint_final.pth")
    assert ckpt.source_format == "nnunet" and ckpt.encoder_prefixes == ("encoder.",)
    assert ckpt.metadata["trainer_name"] == "nnUNetTrainer"
    torch.save({"network_weights": sd, "nnssl_adaptation_plan": {"key_to_encoder": "encoder.stages",
                                                                 "key_to_stem": "encoder.stages.0"}},
               tmp_path / "nnssl.pth")
    assert load_checkpoint(tmp_path / "nnssl.pth").encoder_prefixes == ("encoder.stages.", "encoder.stages.0.")
    swin = tiny_backbone("swin_unetr").network
    torch.save(swin_ssl_state_dict(swin.swinViT.state_dict()), tmp_path / "model_swinvit.pt")
    assert load_checkpoint(tmp_path / "model_swinvit.pt").source_format == "monai_swin_ssl"
    torch.save(sd, tmp_path / "plain.pt")
    assert load_checkpoint(tmp_path / "plain.pt").source_format == "state_dict"
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in swin.state_dict().items()}, str(tmp_path / "plain.safetensors"))
    assert load_checkpoint(tmp_path / "plain.safetensors").source_format == "state_dict"
    torch.save({"epoch": 1}, tmp_path / "empty.pt")
    with pytest.raises(CheckpointError, match="no recognisable weights"):
        load_checkpoint(tmp_path / "empty.pt")


def test_written_files_get_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        path = save_pretrained(tiny_backbone("plain_conv_unet"), tmp_path / "c.safetensors")
    finally:
        os.umask(umask)
    assert (path.stat().st_mode & 0o777) == 0o644  # not mkstemp's 0600
