"""Backbone registry: ``build_backbone(name, ...)`` returns a :class:`Backbone` around the real downstream network.

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

from typing import Callable, Dict, List, Optional, Sequence

from torch import nn

from .base import Backbone, BackboneOutput, NetworkSpec
from ..errors import Med3DInsightError

__all__ = ["Backbone", "BackboneOutput", "NetworkSpec", "build_backbone", "build_backbone_from_config",
           "list_backbones", "network_spec", "register_backbone"]

_REGISTRY: Dict[str, Callable[..., Backbone]] = {}


def register_backbone(name: str) -> Callable[[Callable[..., Backbone]], Callable[..., Backbone]]:
    """Decorator registering ``builder(in_channels, patch_size, **network_kwargs) -> Backbone`` under ``name``."""
    def wrap(builder: Callable[..., Backbone]) -> Callable[..., Backbone]:
        if name in _REGISTRY:
            raise Med3DInsightError(f"backbone {name!r} is already registered")
        _REGISTRY[name] = builder
        return builder
    return wrap


def list_backbones() -> List[str]:
    """Names accepted by :func:`build_backbone`."""
    return sorted(_REGISTRY)


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
    if name not in _REGISTRY:
        raise Med3DInsightError(f"unknown backbone {name!r}: expected one of {list_backbones()}")
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise Med3DInsightError(f"in_channels must be a positive integer, got {in_channels!r}")
    return _REGISTRY[name](in_channels=in_channels, patch_size=patch_size, **network_kwargs)


def build_backbone_from_config(config: dict) -> Backbone:
    """Rebuild a backbone from its ``.config`` (as stored in checkpoint metadata), with fresh weights."""
    config = dict(config)
    network_kwargs = config.pop("network_kwargs", {})
    return build_backbone(**config, **network_kwargs)


def network_spec(network: nn.Module) -> Optional[NetworkSpec]:
    """Encoder prefixes and input/position-embedding weights of a plain SwinUNETR, UNETR, PlainConvUNet or
    ResidualEncoderUNet (or a subclass); ``None`` for any other module (e.g. a bare encoder)."""
    names = {c.__name__ for c in type(network).__mro__}
    for backbone_cls in _backbone_classes(Backbone):
        if names & set(backbone_cls.network_classes):
            return backbone_cls.network_spec(network)
    return None


def _backbone_classes(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _backbone_classes(sub)


# Registration happens on import; these modules import MONAI / nnU-Net lazily inside their builders.
from . import nnunet, swin_unetr, unetr  # noqa: E402,F401
