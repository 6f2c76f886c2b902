"""MONAI SwinUNETR backbone: tokens from the bottleneck block ``encoder10``, reconstruction from ``decoder1``."""
from __future__ import annotations

from typing import Optional, Sequence

from ..errors import Med3DInsightError
from .base import Backbone, positive_triple
from .family import BackboneFamily
from .registry import network_of_backbone

DEFAULT_PATCH_SIZE = (96, 96, 96)


class SwinUNETRBackbone(Backbone):
    network_classes = ("SwinUNETR",)
    encoder_prefixes = ("swinViT.", "encoder1.", "encoder2.", "encoder3.", "encoder4.", "encoder10.")
    bottleneck_prefixes = ("swinViT.", "encoder10.")  # what encoder_features runs
    head_prefixes = ("out.",)
    key_to_encoder = "swinViT"
    key_to_stem = "swinViT.patch_embed"
    keys_to_in_proj = ("swinViT.patch_embed.proj", "encoder1.layer.conv1.conv", "encoder1.layer.conv3.conv")

    def spatial_divisor(self):
        patch = self.network.patch_size  # an int, or one per axis
        return tuple(int(p) ** 5 for p in (patch if isinstance(patch, (tuple, list)) else (patch,) * 3))  # 5 stages

    def encoder_features(self, x):
        return self.network.encoder10(self.network.swinViT(x, self.network.normalize)[4])

    def features(self, x):
        # Same modules, same order as SwinUNETR.forward (MONAI 1.5/1.6), without the segmentation head.
        net = self.network
        hidden = net.swinViT(x, net.normalize)
        enc0 = net.encoder1(x)
        enc1 = net.encoder2(hidden[0])
        enc2 = net.encoder3(hidden[1])
        enc3 = net.encoder4(hidden[2])
        dec4 = net.encoder10(hidden[4])
        dec3 = net.decoder5(dec4, hidden[3])
        dec2 = net.decoder4(dec3, enc3)
        dec1 = net.decoder3(dec2, enc2)
        dec0 = net.decoder2(dec1, enc1)
        return dec4, net.decoder1(dec0, enc0)


def build_swin_unetr(in_channels: int = 1, patch_size: Optional[Sequence[int]] = None, **network_kwargs):
    """MONAI ``SwinUNETR(in_channels, out_channels=2, feature_size=48, **network_kwargs)``; tokens are
    ``16 * feature_size`` wide (768 by default), one per 32^3 block of the patch."""
    from monai.networks.nets import SwinUNETR

    patch = positive_triple("patch_size", patch_size or DEFAULT_PATCH_SIZE)
    if "img_size" in network_kwargs:
        raise Med3DInsightError("SwinUNETR takes no img_size since MONAI 1.5; pass patch_size to build_backbone "
                                "instead")
    kwargs = {"out_channels": 2, "feature_size": 48, **network_kwargs}
    try:
        network = SwinUNETR(in_channels=in_channels, **kwargs)
    except (TypeError, ValueError, AssertionError) as e:
        raise Med3DInsightError(f"SwinUNETR rejected the arguments {kwargs}: {e}") from None
    backbone = SwinUNETRBackbone(network, in_channels, patch, token_dim=16 * kwargs["feature_size"],
                                 decoder_dim=kwargs["feature_size"],
                                 config=dict(name="swin_unetr", in_channels=in_channels, patch_size=list(patch),
                                             network_kwargs=kwargs))
    backbone.check_spatial_shape(patch)
    minimum = tuple(2 * d for d in backbone.spatial_divisor())
    if any(p < m for p, m in zip(patch, minimum)):
        raise Med3DInsightError(f"swin_unetr needs patch sizes of at least {minimum} (a smaller patch leaves one "
                                f"bottleneck voxel, which InstanceNorm rejects), got {patch}")
    return backbone


FAMILY = BackboneFamily(
    name="swin_unetr", backbone_class=SwinUNETRBackbone, builders={"swin_unetr": build_swin_unetr},
    build_network=network_of_backbone, nnunet_trainer="Med3DInsightTrainer_SwinUNETR",
    nnunet_networks=("nnunet_trainers.networks.SwinUNETRForNNUNet",), wrapped_network="monai.networks.nets.SwinUNETR",
    patch_multiple=(32, 64),  # 5 stages of 2x: divisible by 32, and 2 bottleneck voxels for InstanceNorm
    tiny={"swin_unetr": dict(patch_size=(64, 64, 64), feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2))})
