"""Backbone registry: ``build_backbone(name, ...)`` returns a :class:`Backbone` around the real downstream network.

Each family of networks is described once, by a :class:`BackboneFamily` in its own module, and registered with
:func:`register_backbone` (:mod:`.family`); everything else reads the descriptors.

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

from typing import List, Optional, Sequence

from torch import nn

from ..errors import Med3DInsightError
from .base import Backbone, BackboneOutput, NetworkSpec
from .family import (
    BackboneFamily,
    backbone_family,
    build_downstream_network,
    builder_names,
    family_of_checkpoint,
    family_of_network,
    list_families,
    network_of_backbone,
    register_backbone,
)

__all__ = ["Backbone", "BackboneFamily", "BackboneOutput", "NetworkSpec", "backbone_family", "build_backbone",
           "build_backbone_from_config", "build_downstream_network", "family_of_checkpoint", "family_of_network",
           "list_backbones", "list_families", "network_of_backbone", "network_spec", "register_backbone"]


def list_backbones() -> List[str]:
    """Names accepted by :func:`build_backbone`."""
    return sorted(name for name, _ in builder_names())


def build_backbone(name: str, in_channels: int = 1, patch_size: Optional[Sequence[int]] = None,
                   **network_kwargs) -> Backbone:
    """Build a backbone by name.

    Args:
        name: one of :func:`list_backbones`.
        in_channels: input channels of the volumes.
        patch_size: (D, H, W) of the training crops; checked against the network's constraints. Defaults to
            96^3, or the nnU-Net configuration's patch size for ``"nnunet"``.
        **network_kwargs: passed to the network's constructor (e.g. ``feature_size`` for SwinUNETR,
            ``hidden_size`` for UNETR, ``plans``/``configuration`` for ``"nnunet"``).

    Returns:
        A :class:`Backbone` whose ``.network`` is the plain downstream network.
    """
    builder = backbone_family(name).builders[name]
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise Med3DInsightError(f"in_channels must be a positive integer, got {in_channels!r}")
    return builder(in_channels=in_channels, patch_size=patch_size, **network_kwargs)


def build_backbone_from_config(config: dict) -> Backbone:
    """Rebuild a backbone from its ``.config`` (as stored in checkpoint metadata), with fresh weights.

    Args:
        config: ``Backbone.config``: ``name``, the builder's arguments and ``network_kwargs``.

    Returns:
        The backbone.
    """
    config = dict(config)
    network_kwargs = config.pop("network_kwargs", {})
    return build_backbone(**config, **network_kwargs)


def network_spec(network: nn.Module) -> Optional[NetworkSpec]:
    """Encoder prefixes, input/position-embedding weights and head of a plain network of a registered family
    (SwinUNETR, UNETR, PlainConvUNet, ResidualEncoderUNet, or a subclass).

    Args:
        network: the plain downstream network.

    Returns:
        Its :class:`NetworkSpec`, or ``None`` for any other module (e.g. a bare encoder).
    """
    family = family_of_network(network)
    return family.network_spec(network) if family is not None else None


# The built-in families: each module describes its family (FAMILY); registering it is one line here. MONAI and
# nnU-Net are imported only inside their builders.
from . import nnunet, swin_unetr, unetr  # noqa: E402

register_backbone(nnunet.FAMILY)
register_backbone(swin_unetr.FAMILY)
register_backbone(unetr.FAMILY)
