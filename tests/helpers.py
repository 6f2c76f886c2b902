"""Test helpers: tiny real configurations and a synthetic nnU-Net raw dataset writer."""
import json
from pathlib import Path

import numpy as np


def write_nnunet_raw_dataset(raw: Path, dataset_id: int = 990, cases: int = 3, shape=(32, 32, 32)) -> Path:
    """A tiny nnU-Net raw dataset: noise volumes with a brighter cube and its label."""
    import SimpleITK as sitk

    folder = raw / f"Dataset{dataset_id:03d}_Tiny"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    for i in range(cases):
        image = rng.normal(size=shape).astype(np.float32)
        label = np.zeros(shape, np.uint8)
        label[8:20, 10:22, 6:18] = 1
        image[label > 0] += 3
        for array, path in ((image, folder / "imagesTr" / f"case{i:03d}_0000.nii.gz"),
                            (label, folder / "labelsTr" / f"case{i:03d}.nii.gz")):
            sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "cube": 1},
        "numTraining": cases, "file_ending": ".nii.gz"}))
    return folder


# Tiny but real configurations of every backbone, for tests that run forward and backward passes.
TINY_BACKBONES = {
    "swin_unetr": dict(patch_size=(64, 64, 64), feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2)),
    "unetr": dict(patch_size=(32, 32, 32), feature_size=8, hidden_size=48, mlp_dim=96, num_heads=4),
    "plain_conv_unet": dict(patch_size=(32, 32, 32), base_features=4, max_features=32),
    "resenc_unet": dict(patch_size=(32, 32, 32), base_features=4, max_features=32),
}


def tiny_psat_kwargs(in_dim: int, out_dim: int = 16) -> dict:
    return dict(in_dim=in_dim, width=32, depth=2, heads=4, num_queries=6, out_dim=out_dim, num_slice_bins=16,
                dropout=0.0)


def tiny_backbone(name: str, seed: int = 0, **overrides):
    """A tiny real backbone of ``name`` (see TINY_BACKBONES), built with a fixed seed."""
    import torch

    from med3dinsight_plugin import build_backbone

    torch.manual_seed(seed)
    kwargs = {**TINY_BACKBONES[name], **overrides}
    return build_backbone(name, **kwargs)


def swin_ssl_state_dict(swin_vit_state: dict) -> dict:
    """MONAI's official SwinUNETR SSL file layout (model_swinvit.pt) made from a SwinUNETR's swinViT weights:
    ``module.``-prefixed keys without ``swinViT``, timm's ``mlp.fc1/fc2`` names, and an extra final norm."""
    import torch

    sd = {"module." + k.replace("mlp.linear1.", "mlp.fc1.").replace("mlp.linear2.", "mlp.fc2."): v.clone()
          for k, v in swin_vit_state.items()}
    width = max(v.shape[0] for k, v in swin_vit_state.items() if k.endswith("reduction.weight"))
    sd["module.norm.weight"], sd["module.norm.bias"] = torch.ones(width), torch.zeros(width)
    return {"epoch": 100, "state_dict": sd}
