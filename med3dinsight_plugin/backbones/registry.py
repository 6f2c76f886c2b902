"""The one registry of backbone families, and what is built from it.

:func:`register_backbone` adds a :class:`~.family.BackboneFamily`; :func:`build_backbone` builds by name;
:func:`network_spec` / :func:`family_of_network` / :func:`family_of_checkpoint` find the family of a network or a
checkpoint. ``backbones/__init__.py`` registers the built-in families and re-exports these names.
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from torch import nn

from ..errors import Med3DInsightError
from .base import Backbone, NetworkSpec
from .family import BackboneFamily

__all__ = ["backbone_family", "build_backbone", "build_backbone_from_config", "builder_names", "family_of_checkpoint",
           "family_of_network", "list_backbones", "list_families", "network_of_backbone", "network_spec",
           "register_backbone"]

_FAMILIES: Dict[str, BackboneFamily] = {}  # family name -> descriptor: the one registry


def register_backbone(family: BackboneFamily) -> BackboneFamily:
    """Register a backbone family: its builders become ``build_backbone`` names, and the loader, exports, the
    pretraining check, ``nnunet-attach`` and the nnU-Net trainers know its networks.

    Args:
        family: the family's descriptor.

    Returns:
        ``family``.
    """
    if not isinstance(family, BackboneFamily):
        raise Med3DInsightError(f"register_backbone takes a BackboneFamily, got {type(family).__name__}; describe "
                                f"the family with BackboneFamily(...)")
    taken = {n for f in _FAMILIES.values() for n in (f.name, *f.builders)}
    clash = sorted(taken & {family.name, *family.builders})
    if clash:
        raise Med3DInsightError(f"backbone {clash[0]!r} is already registered; give the family {family.name!r} "
                                f"another name")
    _FAMILIES[family.name] = family
    return family


def list_families() -> List[BackboneFamily]:
    """The registered families, by name."""
    return [_FAMILIES[n] for n in sorted(_FAMILIES)]


def builder_names() -> Iterator[Tuple[str, BackboneFamily]]:
    """``(build_backbone name, its family)`` of every registered builder."""
    for family in _FAMILIES.values():
        for name in family.builders:
            yield name, family


def backbone_family(name: str) -> BackboneFamily:
    """The family of a ``build_backbone`` name (``"plain_conv_unet"`` -> the ``"nnunet"`` family).

    Args:
        name: a ``build_backbone`` name or a family name.

    Returns:
        Its :class:`BackboneFamily`.
    """
    for builder, family in builder_names():
        if builder == name:
            return family
    raise Med3DInsightError(f"unknown backbone {name!r}: expected one of {sorted(n for n, _ in builder_names())}")


def family_of_network(network: nn.Module) -> Optional[BackboneFamily]:
    """The family whose network ``network`` is (by class name, subclasses included), or ``None`` (a bare encoder,
    another model)."""
    names = {c.__name__ for c in type(network).__mro__}
    return next((f for f in _FAMILIES.values() if names & set(f.network_classes)), None)


def family_of_checkpoint(metadata: Mapping[str, Any]) -> Optional[BackboneFamily]:
    """The family a med3dinsight checkpoint's metadata names (``backbone.name``), or ``None`` without it.

    Args:
        metadata: ``Checkpoint.metadata``.
    """
    backbone = metadata.get("backbone")
    name = backbone.get("name") if isinstance(backbone, Mapping) else None
    return backbone_family(name) if isinstance(name, str) else None


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


def network_of_backbone(config: Dict[str, Any], in_channels: int, num_classes: int) -> nn.Module:
    """A :attr:`BackboneFamily.build_network` for builders that pass ``network_kwargs`` to the network's
    constructor (the MONAI families): the backbone rebuilt from ``config`` with ``out_channels=num_classes``, its
    plain network.

    Args:
        config: the checkpoint's ``backbone`` metadata.
        in_channels: input channels.
        num_classes: output channels of the segmentation head.

    Returns:
        The network, fresh weights.
    """
    kwargs = {**config.get("network_kwargs", {}), "out_channels": num_classes}
    return build_backbone_from_config({**config, "in_channels": in_channels, "network_kwargs": kwargs}).network
