"""MONAI UNETR backbone: tokens are the ViT's output sequence, reconstruction comes from ``decoder2``."""
from __future__ import annotations

from typing import Optional, Sequence

from ..errors import Med3DInsightError
from .base import Backbone, positive_triple
from .family import BackboneFamily
from .registry import network_of_backbone

DEFAULT_PATCH_SIZE = (96, 96, 96)
VIT_PATCH = 16  # MONAI's UNETR cuts the volume into 16^3 ViT patches: one token (and position embedding) each


class UNETRBackbone(Backbone):
    network_classes = ("UNETR",)
    encoder_prefixes = ("vit.", "encoder1.", "encoder2.", "encoder3.", "encoder4.")
    bottleneck_prefixes = ("vit.",)  # what encoder_features runs
    head_prefixes = ("out.",)
    key_to_encoder = "vit"
    key_to_stem = "vit.patch_embedding"
    keys_to_in_proj = ("vit.patch_embedding.patch_embeddings", "encoder1.layer.conv1.conv", "encoder1.layer.conv3.conv")
    key_to_lpe = "vit.patch_embedding.position_embeddings"

    def check_spatial_shape(self, shape):
        # The ViT's learnable position embedding fixes the input size.
        if tuple(shape) != self.patch_size:
            raise Med3DInsightError(f"unetr was built for patches of {self.patch_size} (its position embedding has "
                                    f"one entry per {VIT_PATCH}^3 patch) but got spatial size {tuple(shape)}; crop "
                                    f"to {self.patch_size}")

    @classmethod
    def network_spec(cls, network):
        # MONAI's TransformerBlock builds norm_cross_attn even without cross-attention; it never runs.
        dead = tuple(n for n, _ in network.named_parameters() if ".norm_cross_attn." in n)
        return super().network_spec(network)._replace(dead_parameters=dead)

    def token_grid(self, spatial):
        return tuple(int(s) // VIT_PATCH for s in spatial)  # one ViT token per VIT_PATCH^3 block

    def encoder_features(self, x):
        return self.network.vit(x)[0]

    def features(self, x):
        # Same modules, same order as UNETR.forward (MONAI 1.4-1.6), without the segmentation head.
        net = self.network
        tokens, hidden = net.vit(x)
        enc1 = net.encoder1(x)
        enc2 = net.encoder2(net.proj_feat(hidden[3]))
        enc3 = net.encoder3(net.proj_feat(hidden[6]))
        enc4 = net.encoder4(net.proj_feat(hidden[9]))
        dec3 = net.decoder5(net.proj_feat(tokens), enc4)
        dec2 = net.decoder4(dec3, enc3)
        dec1 = net.decoder3(dec2, enc2)
        return tokens, net.decoder2(dec1, enc1)


def build_unetr(in_channels: int = 1, patch_size: Optional[Sequence[int]] = None, **network_kwargs):
    """MONAI ``UNETR(in_channels, out_channels=2, img_size=patch_size, **network_kwargs)`` with MONAI's ViT-B/16
    defaults (hidden 768, 12 layers, 12 heads, feature_size 16); one token per 16^3 block of the patch."""
    from monai.networks.nets import UNETR

    patch = positive_triple("patch_size", patch_size or DEFAULT_PATCH_SIZE)
    if "img_size" in network_kwargs:
        raise Med3DInsightError("pass the UNETR input size as patch_size to build_backbone, not as img_size")
    if any(p % VIT_PATCH for p in patch):
        raise Med3DInsightError(f"unetr needs a patch size divisible by {VIT_PATCH} (ViT patches of {VIT_PATCH}^3), "
                                f"got {patch}")
    kwargs = {"out_channels": 2, "feature_size": 16, "hidden_size": 768, "mlp_dim": 3072, "num_heads": 12,
              **network_kwargs}
    try:
        network = UNETR(in_channels=in_channels, img_size=patch, **kwargs)
    except (TypeError, ValueError, AssertionError) as e:
        raise Med3DInsightError(f"UNETR rejected the arguments {kwargs}: {e}") from None
    return UNETRBackbone(network, in_channels, patch, token_dim=kwargs["hidden_size"],
                         decoder_dim=kwargs["feature_size"],
                         config=dict(name="unetr", in_channels=in_channels, patch_size=list(patch),
                                     network_kwargs=kwargs))


FAMILY = BackboneFamily(
    name="unetr", backbone_class=UNETRBackbone, builders={"unetr": build_unetr}, build_network=network_of_backbone,
    nnunet_trainer="Med3DInsightTrainer_UNETR", nnunet_networks=("nnunet_trainers.networks.UNETRForNNUNet",),
    wrapped_network="monai.networks.nets.UNETR", patch_multiple=(VIT_PATCH, 2 * VIT_PATCH), size_argument="img_size",
    lpe_token_size=VIT_PATCH,
    tiny={"unetr": dict(patch_size=(32, 32, 32), feature_size=8, hidden_size=48, mlp_dim=96, num_heads=4)})
