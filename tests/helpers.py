"""Test helpers: tiny real configurations of every backbone."""


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

