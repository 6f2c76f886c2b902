"""Backbone registry: ``build_backbone(name, ...)`` returns a :class:`Backbone` around the real downstream network.

Each family of networks is described once, by a :class:`BackboneFamily` in its own module, and registered with
:func:`register_backbone` (:mod:`.registry`); everything else reads the descriptors.

=====================  ==========================================================================================
name                   network
=====================  ==========================================================================================
``"swin_unetr"``       MONAI ``SwinUNETR`` (default ``feature_size=48``: 768-wide tokens)
``"unetr"``            MONAI ``UNETR`` (ViT-B/16: 768-wide tokens)
``"nnunet"``           PlainConvUNet / ResidualEncoderUNet exactly as nnU-Net builds it from ``plans=`` and
                       ``configuration=`` (or from a plans ``architecture=`` dict)
``"plain_conv_unet"``  nnU-Net's default PlainConvUNet topology for ``patch_size`` (and ``spacing``), no plans needed
``"resenc_unet"``      nnU-Net's ResidualEncoderUNet (ResEnc planner topology) for ``patch_size``, no plans needed
=====================  ==========================================================================================

MONAI and nnU-Net are imported only when a backbone of theirs is built.
"""
from __future__ import annotations

from . import nnunet, swin_unetr, unetr
from .base import Backbone, BackboneOutput, NetworkSpec
from .family import BackboneFamily
from .registry import (
    backbone_family,
    build_backbone,
    build_backbone_from_config,
    builder_names,
    family_of_checkpoint,
    family_of_network,
    list_backbones,
    list_families,
    network_of_backbone,
    network_spec,
    register_backbone,
)

__all__ = ["Backbone", "BackboneFamily", "BackboneOutput", "NetworkSpec", "backbone_family", "build_backbone",
           "build_backbone_from_config", "builder_names", "family_of_checkpoint", "family_of_network",
           "list_backbones", "list_families", "network_of_backbone", "network_spec", "register_backbone"]

# The built-in families: each module describes its family (FAMILY); registering it is one line here. MONAI and
# nnU-Net are imported only inside their builders.
register_backbone(nnunet.FAMILY)
register_backbone(swin_unetr.FAMILY)
register_backbone(unetr.FAMILY)
